"""Attention over preference batches: one interface, a kernel per platform, no mask from the host.

The mask is the rule of `mask.visible` over per-token arrays (segment id, branch, position), and every
implementation derives it on the device, inside attention, from those [B, T] arrays:

    dense         XLA, any platform: scores a chunk of QUERY_CHUNK queries at a time (recomputed in the
                  backward pass), so at most [chunk, T] scores per head are live
    block_sparse  XLA, the CPU default: only the non-empty tiles of each row (`block_sparse`), with a static
                  tile budget per row that the packer guarantees
    pallas        TPU: the project's flash kernel (`flash_tpu`), empty tiles skipped, full tiles unmasked
    pallas_gpu    NVIDIA GPU: the project's flash kernel on Triton (`flash_gpu`), the same mask rule, tiles
                  and gradients; any head_dim that is a power of two (Gemma 2's 256), soft-capping, float32
    cudnn         NVIDIA GPU: cuDNN fused attention (jax.nn.dot_product_attention) with the mask derived on
                  the device; bfloat16/float16, head_dim <= 128, not with Gemma 2's logit soft-capping

On a mesh the kernels run under shard_map: rows split over the batch axes, kv heads over the tensor axis
(when they divide), so each device attends over its own rows and heads.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prefopt_jax.models import block_sparse, flash_gpu, flash_tpu
from prefopt_jax.models.config import ModelConfig
from prefopt_jax.models.mask import Tokens, visible

Array = jax.Array
NEG_INF = -1e30  # finite: masked entries get exactly zero weight, and no row is ever fully masked
QUERY_CHUNK = 512  # dense attention over longer rows goes this many queries at a time
IMPLEMENTATIONS = ("dense", "block_sparse", "pallas", "pallas_gpu", "cudnn")
KERNELS = {"pallas": flash_tpu, "pallas_gpu": flash_gpu}  # the Pallas flash kernels, by implementation


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Which implementation runs (resolved, never "auto") and what it needs to know statically.
    `tiles_per_row`: block_sparse's tile budget per row; `interpret`: run a Pallas kernel in interpret
    mode (CPU tests)."""

    impl: str = "dense"
    tiles_per_row: int = 0
    interpret: bool = False

    def __post_init__(self) -> None:
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {self.impl!r}; choose from {IMPLEMENTATIONS}")


def _heads(x_BxTxKxGxE: Array) -> Array:
    """[B,T,K,G,E] -> [B,T,H,E] (H = K·G: the query heads, kv-head major; local heads under shard_map)."""
    b, t, k, g, e = x_BxTxKxGxE.shape
    return x_BxTxKxGxE.reshape(b, t, k * g, e)


def masked_attention(cfg: ModelConfig, q_BxTxKxGxE: Array, k_BxSxKxE: Array, v_BxSxKxE: Array, vis_BxTxS: Array):
    """Softmax attention under an explicit mask, [B,T,H,E] (softcap and scale from the config)."""
    scores = jnp.einsum("btkge,bske->bkgts", q_BxTxKxGxE, k_BxSxKxE).astype(jnp.float32) * cfg.attention_scale
    if cfg.attn_logit_softcap:
        scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    scores = jnp.where(vis_BxTxS[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxKxGxE.dtype)
    return _heads(jnp.einsum("bkgts,bske->btkge", probs, v_BxSxKxE))


def dense(cfg: ModelConfig, q: Array, k: Array, v: Array, tokens: Tokens, window) -> Array:
    """XLA attention [B,T,H,E]; rows longer than QUERY_CHUNK go a chunk of queries at a time, each chunk
    recomputed in the backward pass (the same per-query softmax, at a fraction of the memory)."""
    b, t = q.shape[:2]
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    if t <= QUERY_CHUNK:
        return masked_attention(cfg, q, k, v, visible(tokens, index, tokens, index, window))
    n = -(-t // QUERY_CHUNK)
    pad = n * QUERY_CHUNK - t

    def chunks(a: Array) -> Array:  # [B, T, ...] -> [n, B, chunk, ...]
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return a.reshape(b, n, QUERY_CHUNK, *a.shape[2:]).swapaxes(0, 1)

    def one(args):
        q_c, tq, idx = args
        return masked_attention(cfg, q_c, k, v, visible(Tokens(*tq), idx, tokens, index, window))

    out = jax.lax.map(jax.checkpoint(one), (chunks(q), tuple(chunks(a) for a in tokens), chunks(index)))
    return out.swapaxes(0, 1).reshape(b, n * QUERY_CHUNK, *out.shape[3:])[:, :t]


def _cudnn(cfg: ModelConfig, q: Array, k: Array, v: Array, tokens: Tokens, window, implementation: str = "cudnn"):
    b, t = q.shape[:2]
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    vis = visible(tokens, index, tokens, index, window)
    return jax.nn.dot_product_attention(
        _heads(q), k, v, mask=vis[:, None], scale=cfg.attention_scale, implementation=implementation
    )


def _block(impl: str, length: int, head_dim: int) -> int | None:
    return flash_tpu.block_for(length) if impl == "pallas" else flash_gpu.block_for(length, head_dim)


def _pallas(cfg: ModelConfig, spec: AttentionSpec, q: Array, k: Array, v: Array, tokens: Tokens, window) -> Array:
    b, t, kh, g, e = q.shape
    block = _block(spec.impl, t, e)
    if block is None:
        raise ValueError(f"{spec.impl} attention cannot tile rows of {t} tokens with head_dim {e}")
    q_h = q.reshape(b, t, kh * g, e).transpose(0, 2, 1, 3)
    k_h, v_h = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    ints = [a.astype(jnp.int32) for a in tokens]
    out = KERNELS[spec.impl].flash_attention(
        q_h, k_h, v_h, *ints, jnp.asarray(window, jnp.int32), cfg.attention_scale,
        cfg.attn_logit_softcap or None, block, spec.interpret,
    )  # fmt: skip
    return out.transpose(0, 2, 1, 3)


def _local(cfg: ModelConfig, spec: AttentionSpec, q, k, v, tokens: Tokens, window) -> Array:
    if spec.impl == "dense":
        return dense(cfg, q, k, v, tokens, window)
    if spec.impl == "block_sparse":
        if spec.tiles_per_row < 1:
            raise ValueError("block_sparse attention needs a tile budget per row (tiles_per_row >= 1)")
        tiles = block_sparse.tiles_from_tokens(tokens, spec.tiles_per_row)
        return _heads(
            block_sparse.attend_tiles(
                q, k, v, tiles, tokens.positions, window, cfg.attention_scale, cfg.attn_logit_softcap
            )
        )
    if spec.impl in KERNELS:
        return _pallas(cfg, spec, q, k, v, tokens, window)
    return _cudnn(cfg, q, k, v, tokens, window)


def attention(
    cfg: ModelConfig, spec: AttentionSpec, q: Array, k: Array, v: Array, tokens: Tokens, window, mesh=None, rules=None
) -> Array:
    """Attention output [B,T,H,E] of queries [B,T,K,G,E] over keys and values [B,T,K,E]. With a mesh (and
    its rules), a kernel runs per device under shard_map; dense attention is left to XLA's partitioner."""
    if mesh is None or spec.impl == "dense" or math.prod(mesh.shape.values()) == 1:
        return _local(cfg, spec, q, k, v, tokens, window)
    batch = rules.get("batch")
    heads = rules.get("kv_heads")
    head_devices = math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads or ()))
    if cfg.num_kv_heads % head_devices:
        heads = None  # kv heads that do not divide the tensor axis: every device keeps all heads
    row = PartitionSpec(batch, None)
    qkv = PartitionSpec(batch, None, heads)
    out_spec = PartitionSpec(batch, None, heads)
    fn = jax.shard_map(
        lambda q, k, v, tok, w: _local(cfg, spec, q, k, v, Tokens(*tok), w),
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, (row, row, row), PartitionSpec()),
        out_specs=out_spec,
        check_vma=False,
    )
    out = fn(q, k, v, tuple(tokens), jnp.asarray(window, jnp.int32))
    return out.reshape(*q.shape[:2], cfg.num_heads, cfg.head_dim)


def resolve(requested: str, platform: str, cfg: ModelConfig, dtype) -> str:
    """The implementation "auto" (or a request) means on `platform`: Pallas on TPU, cuDNN on GPU
    (bfloat16/float16, head dim <= 128, no soft-capping), block-sparse tiles on CPU, dense where the preferred
    kernel cannot run. Rows must be a multiple of 128 tokens (the batch geometry's are). An explicit request
    that cannot run here is an error; a Pallas kernel on CPU runs in interpret mode (slow: for tests).
    "pallas_gpu" is not yet what "auto" picks on GPU: it has not been timed on a GPU against cuDNN and dense
    (`benchmarks/accelerator.py` does that)."""
    ok = {
        "dense": True,
        "block_sparse": True,
        "pallas": platform in ("tpu", "cpu"),
        "pallas_gpu": platform in ("gpu", "cpu") and flash_gpu.block_for(128, cfg.head_dim) is not None,
        "cudnn": platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and cfg.head_dim <= 128
        and not cfg.attn_logit_softcap,
    }  # fmt: skip
    if requested != "auto":
        if requested not in ok:
            raise ValueError(f"model.attention={requested!r}; choose from auto, {', '.join(IMPLEMENTATIONS)}")
        if not ok[requested]:
            raise ValueError(f"model.attention={requested!r} cannot run on {platform} for this model")
        return requested
    preferred = {"tpu": "pallas", "gpu": "cudnn", "cpu": "block_sparse"}.get(platform, "dense")
    return preferred if ok[preferred] else "dense"
