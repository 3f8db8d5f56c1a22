"""The decoder: one Flax NNX module for every supported family, its layers stacked on a leading axis and
run with `lax.scan` (compile time independent of depth), with a pure functional forward over the
parameter pytree so the trainer can split once and merge inside `jit`.

Shapes: B batch, T query tokens, S key tokens (= T), D width, H heads, K kv heads, G = H/K, E head
dim, F mlp width, V vocab, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax.models import attention as attention_lib
from prefopt_jax.models.config import ModelConfig
from prefopt_jax.models.mask import Tokens

Array = jax.Array
# (array, logical axis names) -> array: a sharding constraint on an activation, or nothing
Constrain = Callable[[Array, tuple], Array]


def no_constraint(x: Array, names: tuple) -> Array:
    return x


def param_table(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """Every parameter: name -> (shape, logical axes, init). Layer parameters ("layers/...") carry a
    leading L axis. This table is the one place that says what the model holds."""
    d, f, h, k, e, v, n = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.num_layers,
    )
    norm = "zeros" if cfg.norm_offset else "ones"
    t: dict[str, tuple[tuple[int, ...], tuple[str, ...], str]] = {
        "embed": ((v, d), ("vocab", "embed"), "normal"),
        "final_norm": ((d,), ("norm",), norm),
        "layers/attn_norm": ((n, d), ("layers", "norm"), norm),
        "layers/q": ((n, d, h, e), ("layers", "embed", "heads", "head_dim"), "normal"),
        "layers/k": ((n, d, k, e), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "layers/v": ((n, d, k, e), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "layers/o": ((n, h, e, d), ("layers", "heads", "head_dim", "embed"), "normal"),
        "layers/mlp_norm": ((n, d), ("layers", "norm"), norm),
        "layers/gate": ((n, d, f), ("layers", "embed", "mlp"), "normal"),
        "layers/up": ((n, d, f), ("layers", "embed", "mlp"), "normal"),
        "layers/down": ((n, f, d), ("layers", "mlp", "embed"), "normal"),
    }
    if not cfg.tie_embeddings:
        t["lm_head"] = ((d, v), ("embed", "vocab"), "normal")
    if cfg.qkv_bias:
        t["layers/q_bias"] = ((n, h, e), ("layers", "heads", "head_dim"), "zeros")
        t["layers/k_bias"] = ((n, k, e), ("layers", "kv_heads", "head_dim"), "zeros")
        t["layers/v_bias"] = ((n, k, e), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        t["layers/q_norm"] = ((n, e), ("layers", "head_dim"), norm)
        t["layers/k_norm"] = ((n, e), ("layers", "head_dim"), norm)
    if cfg.sandwich_norms:
        t["layers/post_attn_norm"] = ((n, d), ("layers", "norm"), norm)
        t["layers/post_mlp_norm"] = ((n, d), ("layers", "norm"), norm)
    return t


# ---- the pure forward ------------------------------------------------------------------------------


def rms_norm(x: Array, w: Array, eps: float, offset: float) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (offset + w.astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    r, e = cfg.rope, cfg.head_dim
    inv = 1.0 / (r.theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    if r.kind == "linear":
        inv = inv / r.factor
    elif r.kind == "llama3":
        wavelen = 2 * math.pi / inv
        low_wl = r.original_max_position / r.low_freq_factor
        high_wl = r.original_max_position / r.high_freq_factor
        scaled = np.where(wavelen > low_wl, inv / r.factor, inv)
        smooth = (r.original_max_position / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(cfg: ModelConfig, positions_BxT: Array) -> tuple[Array, Array]:
    """(cos, sin) [B,T,1,E] of the rotary embedding at these positions: computed once per forward, shared
    by every layer."""
    angles = positions_BxT[..., None].astype(jnp.float32) * rope_inv_freq(cfg)  # [B,T,E/2]
    angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxTxNxE: Array, rope: tuple[Array, Array]) -> Array:
    """Rotary embedding in the Hugging Face layout (the two halves of the head dim rotate together)."""
    cos, sin = rope
    x = x_BxTxNxE.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos + rotated * sin).astype(x_BxTxNxE.dtype)


def positions_from_segments(segment_ids_BxT: Array) -> Array:
    """Positions restarting at 0 at each new segment (packed rows)."""
    t = jnp.arange(segment_ids_BxT.shape[1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1
    )
    first = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    return t - first


def _proj(p: dict, name: str, x: Array, n_in: int) -> Array:
    """x contracted with the projection `name` over its last `n_in` axes, plus the LoRA update
    (x·A)·B when the layer carries adapters for it (`p["lora"][name]`, scale already applied to B), with
    the adapter's input dropped out when the layer carries `p["lora_dropout"]` (training only)."""
    y = jnp.tensordot(x, p[name].astype(x.dtype), axes=n_in)
    adapter = p.get("lora", {}).get(name)
    if adapter is not None:
        drop = p.get("lora_dropout")  # {"rate": scalar, "key": this layer's key}: dropout on the adapter input
        if drop is not None:
            key = jax.random.fold_in(drop["key"], sum(map(ord, name)))  # a different mask per projection
            kept = jax.random.bernoulli(key, 1.0 - drop["rate"], x.shape)
            x = jnp.where(kept, x / (1.0 - drop["rate"]).astype(x.dtype), 0).astype(x.dtype)
        xa = jnp.tensordot(x, adapter["a"].astype(x.dtype), axes=n_in)
        y = y + jnp.tensordot(xa, adapter["b"].astype(x.dtype), axes=1)
    return y


def qkv(cfg: ModelConfig, p: dict, x: Array, rope: tuple[Array, Array], constrain: Constrain = no_constraint):
    """Queries [B,T,K,G,E] (grouped by kv head), keys and values [B,T,K,E], rotated by `rope` tables."""
    b, t, _ = x.shape
    q = constrain(_proj(p, "q", x, 1), ("batch", "length", "heads", None))
    k = constrain(_proj(p, "k", x, 1), ("batch", "length", "kv_heads", None))
    v = constrain(_proj(p, "v", x, 1), ("batch", "length", "kv_heads", None))
    if cfg.qkv_bias:
        q, k, v = q + p["q_bias"].astype(x.dtype), k + p["k_bias"].astype(x.dtype), v + p["v_bias"].astype(x.dtype)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps, cfg.norm_offset)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    g = cfg.num_heads // cfg.num_kv_heads
    return q.reshape(b, t, cfg.num_kv_heads, g, cfg.head_dim), k, v


def attend(cfg: ModelConfig, p: dict, q: Array, k: Array, v: Array, visible: Array) -> Array:
    """Attention of queries [B,T,K,G,E] over keys/values [B,S,K,E] under an explicit mask [B,T,S], then the
    output projection (the KV-cache decoding path; training derives its mask inside attention)."""
    return _proj(p, "o", attention_lib.masked_attention(cfg, q, k, v, visible), 2)


def _attention(cfg: ModelConfig, p: dict, x: Array, tokens: Tokens, window, rope, constrain: Constrain, spec):
    q, k, v = qkv(cfg, p, x, rope, constrain)
    mesh, rules = getattr(constrain, "mesh", None), getattr(constrain, "rules", None)
    out = attention_lib.attention(cfg, spec, q, k, v, tokens, window, mesh, rules)
    return _proj(p, "o", out, 2)


def _mlp(cfg: ModelConfig, p: dict, x: Array, constrain: Constrain) -> Array:
    gate, up = _proj(p, "gate", x, 1), _proj(p, "up", x, 1)
    act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return _proj(p, "down", constrain(act * up, ("batch", "length", "mlp")), 1)


def block(cfg: ModelConfig, x: Array, p: dict, attention: Callable, constrain: Constrain = no_constraint):
    """One decoder layer around `attention(normed x) -> (output, aux)`; returns (x, aux)."""
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    h, aux = attention(rms_norm(x, p["attn_norm"], eps, off))
    if cfg.sandwich_norms:
        h = rms_norm(h, p["post_attn_norm"], eps, off)
    x = x + h
    h = _mlp(cfg, p, rms_norm(x, p["mlp_norm"], eps, off), constrain)
    if cfg.sandwich_norms:
        h = rms_norm(h, p["post_mlp_norm"], eps, off)
    return constrain(x + h, ("batch", "length", None)), aux


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def embed_tokens(cfg: ModelConfig, params: dict, input_ids: Array, dtype: Any = jnp.float32) -> Array:
    x = jnp.take(params["embed"], input_ids, axis=0).astype(dtype)
    return x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype) if cfg.embed_scale else x


def forward_hidden(
    cfg: ModelConfig,
    params: dict,
    input_ids: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    branch: Array | None = None,
    *,
    mask: Array | None = None,
    dtype: Any = jnp.float32,
    scan_layers: bool = True,
    remat: str = "none",
    constrain: Constrain = no_constraint,
    attention: attention_lib.AttentionSpec = attention_lib.AttentionSpec(),
) -> Array:
    """Final-norm hidden states [B,T,D] (the unembedding is left to the caller, so log-probs can be
    computed in chunks without [B,T,V] logits). Which token sees which is derived inside attention from
    `segment_ids` (default: one segment per row; 0 is padding), `branch` (default 0: plain causal rows; a
    packed group's completion j is branch j + 1) and `positions` (default: restarting at each segment);
    `mask` [B,T] (1 = token, 0 = padding) is another way to give padding. `constrain` places activations
    on a mesh by their logical axis names (see `prefopt_jax.sharding.activation_constraint`); `attention`
    picks the implementation (`prefopt_jax.models.attention`)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}")
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    if mask is not None:
        segment_ids = jnp.where(mask.astype(bool), segment_ids, 0)
    if positions is None:
        positions = positions_from_segments(segment_ids)
    branch = jnp.zeros(input_ids.shape, jnp.int32) if branch is None else branch
    tokens = Tokens(segment_ids.astype(jnp.int32), branch.astype(jnp.int32), positions.astype(jnp.int32))
    x = constrain(embed_tokens(cfg, params, input_ids, dtype), ("batch", "length", None))
    rope = rope_tables(cfg, positions)
    windows = jnp.asarray(cfg.windows, jnp.int32)
    layer_axes = {
        n.removeprefix("layers/"): a[1:] for n, (_, a, _) in param_table(cfg).items() if n.startswith("layers/")
    }

    def body(h, layer):
        p, window = layer
        # each layer's weights stay in their shards up to here, so a sharded model is gathered one layer
        # at a time inside the loop, never all layers at once before it
        p = {k: constrain(v, layer_axes[k]) if k in layer_axes else v for k, v in p.items()}
        attend_layer = lambda hn: (_attention(cfg, p, hn, tokens, window, rope, constrain, attention), None)
        return block(cfg, h, p, attend_layer, constrain)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    if scan_layers:
        x, _ = jax.lax.scan(body, x, (params["layers"], windows))
    else:
        for i in range(cfg.num_layers):
            x, _ = body(x, (jax.tree.map(lambda a, i=i: a[i], params["layers"]), windows[i]))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)


def unembedding(cfg: ModelConfig, params: dict) -> Array:
    """The [D,V] output matrix (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def logits_from_hidden(cfg: ModelConfig, params: dict, hidden: Array) -> Array:
    logits = jnp.einsum("btd,dv->btv", hidden, unembedding(cfg, params).astype(hidden.dtype)).astype(jnp.float32)
    if cfg.final_logit_softcap:
        logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits


# ---- the NNX module --------------------------------------------------------------------------------


class Layers(nnx.Module):
    """Per-layer parameters, each stacked on a leading L axis."""


def _init_value(kind: str, key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    if kind == "normal":
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)


class Decoder(nnx.Module):
    """A decoder-only LM. `model(input_ids, positions=None, segment_ids=None, branch=None, mask=None)` ->
    logits [B,T,V] (float32); `model.hidden_states(...)` -> [B,T,D] for chunked log-probs (the arguments
    are `forward_hidden`'s)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        dtype: Any = jnp.float32,
        scan_layers: bool = True,
        remat: str = "none",
    ):
        self.config = cfg
        self.dtype, self.scan_layers, self.remat = dtype, scan_layers, remat
        self.constrain: Constrain = no_constraint  # set by create_model/load_pretrained with a mesh
        self.layers = Layers()
        for name, (shape, axes, init) in param_table(cfg).items():
            param = nnx.Param(_init_value(init, rngs.params(), shape, param_dtype), logical_axes=axes)
            owner, attr = (self.layers, name.split("/")[1]) if name.startswith("layers/") else (self, name)
            setattr(owner, attr, param)

    def params(self) -> dict:
        """The parameters as a plain nested dict of arrays (what the pure forward takes)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def hidden_states(self, input_ids, positions=None, segment_ids=None, branch=None, mask=None) -> Array:
        return forward_hidden(
            self.config,
            self.params(),
            input_ids,
            positions,
            segment_ids,
            branch,
            mask=mask,
            dtype=self.dtype,
            scan_layers=self.scan_layers,
            remat=self.remat,
            constrain=self.constrain,
        )

    def __call__(self, input_ids, positions=None, segment_ids=None, branch=None, mask=None) -> Array:
        hidden = self.hidden_states(input_ids, positions, segment_ids, branch, mask)
        return logits_from_hidden(self.config, self.params(), hidden)
