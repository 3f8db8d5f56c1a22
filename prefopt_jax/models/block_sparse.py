"""Block-sparse attention: scores only for the (query block, key block) tiles that some query may see.

Packed preference rows hold several prompts with their completions; a dense [T, T] attention spends most
of its time on masked tiles (other groups, the future, padding) — on CPU the softmax over those tiles costs
more than the model's matmuls. The device lists each row's non-empty tiles from the per-token arrays
(`tiles_from_tokens`, the mask of `mask.visible` reduced per tile), gathers those tiles' queries and
keys, softmaxes each query over all of its tiles at once (one shared maximum per query, so tiles combine
exactly) and scatters the outputs back. The list has a static length per row, `tiles_per_row`, which the
packer guarantees with `data.batching.tile_bound` (an upper bound of a unit's tiles from its lengths), so one
shape compiles and no tile is ever dropped. The result equals dense attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefopt_jax.data.batching import TILE
from prefopt_jax.models.mask import Tokens, visible

Array = jax.Array
BLOCK = TILE  # 32, measured on CPU (SmolLM2, packed 1024-token rows): 32 beats 64 and 128
NEG_INF = -1e30


def block_size(length: int, block: int = BLOCK) -> int | None:
    """The tile side for rows of `length` tokens, or None when rows do not split into tiles."""
    b = min(block, length)
    return b if length % b == 0 else None


def tiles_from_tokens(tokens, per_row: int, block: int = BLOCK) -> dict[str, Array]:
    """Each row's non-empty tiles (real queries only; the window is applied per layer by `attend_tiles`):
    "row", "q", "k" (tile indices, int32 [R * per_row]) and "mask" (bool [R * per_row, B, B]). Unused
    slots point at tile (row, 0, 0) with an empty mask."""
    seg = tokens.segment_ids
    r, t = seg.shape
    nb = t // block
    index = jnp.broadcast_to(jnp.arange(t), (r, t))
    base = Tokens(tokens.segment_ids, tokens.branch, jnp.zeros_like(tokens.positions))  # no window here
    real = (seg > 0)[:, :, None]
    mask = visible(base, index, base, index, 0) & real  # [R, T, T]: only inside this reduction
    occupied = mask.reshape(r, nb, block, nb, block).any(axis=(2, 4)).reshape(r, nb * nb)
    flat = jax.vmap(lambda o: jnp.nonzero(o, size=per_row, fill_value=-1)[0])(occupied)  # [R, per_row]
    used = flat >= 0
    flat = jnp.where(used, flat, 0)
    rows = jnp.broadcast_to(jnp.arange(r)[:, None], flat.shape)
    qi, kj = flat // nb, flat % nb

    def block_tokens(a: Array, which: Array) -> Array:  # [R, T] -> [R, per_row, B]
        return jnp.take_along_axis(a.reshape(r, nb, block), which[..., None], axis=1)

    q_tok = Tokens(*(block_tokens(a, qi) for a in base))
    k_tok = Tokens(*(block_tokens(a, kj) for a in base))
    q_idx = qi[..., None] * block + jnp.arange(block)
    k_idx = kj[..., None] * block + jnp.arange(block)
    tile_mask = visible(q_tok, q_idx, k_tok, k_idx, 0) & (q_tok.segment_ids > 0)[..., :, None] & used[..., None, None]
    return {
        "row": rows.reshape(-1).astype(jnp.int32),
        "q": qi.reshape(-1).astype(jnp.int32),
        "k": kj.reshape(-1).astype(jnp.int32),
        "mask": tile_mask.reshape(-1, block, block),
    }


def attend_tiles(
    q_RxTxKxGxE: Array,
    k_RxSxKxE: Array,
    v_RxSxKxE: Array,
    tiles: dict[str, Array],
    positions_RxT: Array,
    window,
    scale: float,
    softcap: float | None = None,
) -> Array:
    """Attention output [R, T, K, G, E] computed over the listed tiles only (queries see nothing else)."""
    r, t, kh, g, e = q_RxTxKxGxE.shape
    b = tiles["mask"].shape[-1]
    nb = t // b
    row, qi, ki = tiles["row"], tiles["q"], tiles["k"]
    qt = q_RxTxKxGxE.reshape(r, nb, b, kh, g, e)[row, qi]  # [P, B, K, G, E]
    kt = k_RxSxKxE.reshape(r, nb, b, kh, e)[row, ki]  # [P, B, K, E]
    vt = v_RxSxKxE.reshape(r, nb, b, kh, e)[row, ki]
    s = jnp.einsum("pbkge,pcke->pkgbc", qt, kt).astype(jnp.float32) * scale
    if softcap:
        s = jnp.tanh(s / softcap) * softcap
    visible = tiles["mask"]
    pos = positions_RxT.reshape(r, nb, b)
    dist = pos[row, qi][:, :, None] - pos[row, ki][:, None, :]
    visible = visible & ((window == 0) | (dist < window))
    s = jnp.where(visible[:, None, None], s, NEG_INF)
    # one maximum per query over all its tiles (no gradient: the softmax does not depend on it)
    query = row * nb + qi
    m = jax.ops.segment_max(jax.lax.stop_gradient(s.max(-1)), query, num_segments=r * nb)  # [R*nb, K, G, B]
    w = jnp.exp(s - m[query][..., None])  # [P, K, G, B, C]
    denom = jax.ops.segment_sum(w.sum(-1), query, num_segments=r * nb)  # [R*nb, K, G, B]
    num = jax.ops.segment_sum(jnp.einsum("pkgbc,pcke->pbkge", w.astype(vt.dtype), vt), query, num_segments=r * nb)
    denom = jnp.where(denom > 0, denom, 1.0).transpose(0, 3, 1, 2)[..., None]  # query blocks without tiles
    return (num / denom.astype(num.dtype)).reshape(r, t, kh, g, e)
