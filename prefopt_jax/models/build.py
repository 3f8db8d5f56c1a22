"""Building a Decoder whose parameters land sharded: initialised from shapes inside `jit` with output
shardings, or assembled from host arrays slice by slice, so a full model never sits on one device."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from prefopt_jax.models.config import ModelConfig
from prefopt_jax.models.decoder import Decoder, param_table
from prefopt_jax.sharding import Rules, activation_constraint, named_sharding, rules_for


def nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: str | Rules = "fsdp") -> dict:
    """Nested dict of NamedShardings, one per parameter; a logical axis with no rule, or a mesh axis
    that does not divide a dimension, raises naming the parameter."""
    r = rules_for(rules)
    table = param_table(cfg)
    return nest({n: named_sharding(s, axes, mesh, r, f"parameter {n!r}") for n, (s, axes, _) in table.items()})


def _abstract(cfg: ModelConfig, **kw) -> Decoder:
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), **kw))


def _with_params(cfg: ModelConfig, pure: dict, mesh: Mesh | None, rules: str | Rules, **kw) -> Decoder:
    graphdef, state = nnx.split(_abstract(cfg, **kw))
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        model.constrain = activation_constraint(mesh, rules_for(rules))
    return model


def create_model(
    cfg: ModelConfig,
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: str | Rules = "fsdp",
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.float32,
    scan_layers: bool = True,
    remat: str = "none",
) -> Decoder:
    """A randomly initialised Decoder; with a mesh, each parameter is created directly in its shards."""
    kw = dict(param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers, remat=remat)

    def init() -> dict:
        return Decoder(cfg, rngs=nnx.Rngs(seed), **kw).params()

    out = param_shardings(cfg, mesh, rules) if mesh is not None else None
    return _with_params(cfg, jax.jit(init, out_shardings=out)(), mesh, rules, **kw)


def model_from_arrays(
    cfg: ModelConfig,
    get_array: Callable[[str], np.ndarray],
    *,
    mesh: Mesh | None = None,
    rules: str | Rules = "fsdp",
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.float32,
    scan_layers: bool = True,
    remat: str = "none",
) -> Decoder:
    """A Decoder from host arrays: `get_array(name)` returns each parameter of `param_table` (numpy,
    possibly memory-mapped). With a mesh, each device receives only its own slice."""
    shardings = param_shardings(cfg, mesh, rules) if mesh is not None else None
    flat = {}
    for name, (shape, _, _) in param_table(cfg).items():
        host = get_array(name)
        if tuple(host.shape) != shape:
            raise ValueError(f"parameter {name!r}: checkpoint shape {tuple(host.shape)}, the config needs {shape}")
        if shardings is None:
            flat[name] = jnp.asarray(host, param_dtype)
        else:
            sharding = functools.reduce(lambda node, key: node[key], name.split("/"), shardings)
            flat[name] = jax.make_array_from_callback(
                shape, sharding, lambda idx, h=host: np.asarray(h[idx]).astype(param_dtype)
            )
    kw = dict(param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers, remat=remat)
    return _with_params(cfg, nest(flat), mesh, rules, **kw)
