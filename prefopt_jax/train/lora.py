"""LoRA adapters as a separate parameter tree. The policy is the frozen base plus the adapters; the
reference is the same base with the adapters left out, so it costs no memory at all."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from prefopt_jax.models.config import ModelConfig
from prefopt_jax.models.decoder import param_table

# projection -> how many leading axes of its (per-layer) weight are inputs
TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def init_lora(
    cfg: ModelConfig, *, rank: int, targets: Sequence[str] = tuple(TARGETS), seed: int = 0, dtype=jnp.float32
) -> dict:
    """{target: {"a": [L, *in, r], "b": [L, r, *out]}}: A random (scaled by 1/sqrt(fan-in)), B zero, so the
    adapted model starts exactly at the base model."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; targets: {sorted(TARGETS)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    table = param_table(cfg)
    out = {}
    for i, name in enumerate(targets):
        shape = table[f"layers/{name}"][0]
        n_layers, w = shape[0], shape[1:]
        n_in = TARGETS[name]
        fan_in = math.prod(w[:n_in])  # a Python int, so this also traces (abstract planning)
        key = jax.random.fold_in(jax.random.key(seed), i)
        a = jax.random.normal(key, (n_layers, *w[:n_in], rank), jnp.float32) / jnp.sqrt(fan_in)
        out[name] = {"a": a.astype(dtype), "b": jnp.zeros((n_layers, rank, *w[n_in:]), dtype)}
    return out


def with_lora(base: dict, lora: dict, scale: float, *, dropout: float = 0.0, key: jax.Array | None = None) -> dict:
    """The parameter tree the forward takes: the base layers with the adapters (B pre-scaled) attached, and,
    when `dropout` > 0 (training), a per-layer key that drops out each adapter's input."""
    scaled = {name: {"a": ad["a"], "b": ad["b"] * scale} for name, ad in lora.items()}
    layers = {**base["layers"], "lora": scaled}
    if dropout > 0.0:
        if key is None:
            raise ValueError("LoRA dropout needs a random key")
        n_layers = next(iter(lora.values()))["a"].shape[0]
        layers["lora_dropout"] = {"rate": jnp.full((n_layers,), dropout), "key": jax.random.split(key, n_layers)}
    return {**base, "layers": layers}


def merge_lora(base: dict, lora: dict, scale: float) -> dict:
    """Base weights with the adapters folded in (W + scale·A·B), for export."""
    layers = dict(base["layers"])
    for name, ad in lora.items():
        n_in = TARGETS[name]
        delta = jax.vmap(lambda a, b, n=n_in: jnp.tensordot(a, b, axes=1))(ad["a"], ad["b"]) * scale
        layers[name] = layers[name] + delta.astype(layers[name].dtype)
    return {**base, "layers": layers}
