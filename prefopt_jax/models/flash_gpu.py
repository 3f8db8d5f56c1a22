"""Flash attention for NVIDIA GPUs (Pallas on Triton) with the preference-batch mask computed inside the kernel.

The contract is `flash_tpu`'s: q [R, H, T, E], k and v [R, K, T, E] (H = K·G, query heads kv-head major),
the per-token segment ids, branches and positions [R, T] int32 and a window (int32 scalar, 0: none); the mask
is `mask.visible` evaluated inside the kernel on each tile, never an input. Padding queries (segment 0) see
nothing and their outputs are zero (they are never read).

Triton has no scalar-prefetched grid whose steps can be skipped, so every program loops over a list of
exactly the tiles it needs. Before the kernels, `tile_kinds` classifies every (query block, key block) tile
from the token arrays, one query block at a time (never a [T, T] array): EMPTY when no real query of the
tile sees any of its keys, FULL when every query sees every key, PARTIAL otherwise; `visit_lists` puts
each block's non-empty partners first. The forward and dq kernels (a program per row, query head and query
block) loop over their query block's list; the dk/dv kernel (a program per row, kv head and key block)
over its key block's list and the G query heads that share the kv head. FULL tiles skip the mask.
Backward is FlashAttention-2's: the forward saves the log-sum-exp, dq and dk/dv are separate kernels.

Forward tiles are 128 x 128 tokens (64 x 64 above head_dim 128, to fit shared memory); the backward kernels,
which hold two float32 accumulators, use tiles of at most 64 (`BACKWARD_BLOCK`). head_dim must be a power of
two up to 256. `interpret=True` runs the same kernels on CPU (tests); `jax.jit(...).lower(lowering_platforms=
("cuda",))` lowers them to Triton from any host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from prefopt_jax.models.mask import Tokens, visible

Array = jax.Array
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
EMPTY, PARTIAL, FULL = 0, 1, 2
LIST_MIN = 16  # visit lists are padded to a power of two of at least this (Triton's tensor sizes)
BACKWARD_BLOCK = 64  # dq and dk/dv tiles at most this: their float32 accumulators spill at 128 x 128
MAX_HEAD_DIM = 256


def block_for(length: int, head_dim: int) -> int | None:
    """The tile side for rows of `length` tokens: the largest of 128, 64, 32 (64, 32 above head_dim 128)
    that divides the length; None if none does or head_dim is not a power of two."""
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= MAX_HEAD_DIM:
        return None
    return next((b for b in ((64, 32) if head_dim > 128 else (128, 64, 32)) if length % b == 0), None)


def tile_kinds(seg_RxT: Array, branch_RxT: Array, pos_RxT: Array, window, block: int) -> Array:
    """int32 [R, n, n], exact: EMPTY, PARTIAL or FULL for every (query block, key block), computed eight query
    blocks at a time (at most [8, R, block, T] booleans live at once)."""
    r, t = seg_RxT.shape
    n = t // block
    tokens = Tokens(seg_RxT, branch_RxT, pos_RxT)
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (r, t))
    window = jnp.asarray(window, jnp.int32)

    def one(i: Array) -> Array:
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * block, block, axis=1)
        q_tok = Tokens(*(take(a) for a in tokens))
        vis = visible(q_tok, take(index), tokens, index, window) & (q_tok.segment_ids > 0)[:, :, None]
        tiles = vis.reshape(r, block, n, block)
        return jnp.where(tiles.all((1, 3)), FULL, jnp.where(tiles.any((1, 3)), PARTIAL, EMPTY))

    return jax.lax.map(one, jnp.arange(n), batch_size=min(n, 8)).transpose(1, 0, 2).astype(jnp.int32)


def visit_lists(kinds_RxNxM: Array) -> tuple[Array, Array]:
    """(blocks, kinds) int32 [R, N, W]: for each of the N blocks, its non-empty partner blocks in ascending
    order and their kinds, then EMPTY padding (W: M rounded up to a power of two, at least LIST_MIN)."""
    m = kinds_RxNxM.shape[-1]
    width = max(LIST_MIN, pl.next_power_of_2(m))
    order = jnp.argsort(kinds_RxNxM == EMPTY, axis=-1, stable=True).astype(jnp.int32)
    kinds = jnp.take_along_axis(kinds_RxNxM, order, axis=-1)
    pad = [(0, 0)] * (kinds.ndim - 1) + [(0, width - m)]
    return jnp.pad(order, pad), jnp.pad(kinds, pad)


# ---- the kernels ---------------------------------------------------------------------------------------


def _dot(a: Array, b: Array, trans_b: bool = False) -> Array:
    """a @ b (or a @ b.T) accumulated in float32; float32 inputs at full precision (not TF32)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _capped_scores(q: Array, k: Array, scale: float, softcap: float | None) -> Array:
    s = _dot(q, k, trans_b=True) * scale
    return s if softcap is None else jnp.tanh(s / softcap) * softcap


def _masked(s: Array, kind: Array, q_tok: Tokens, q0: Array, k_tok, k0: Array, window: Array) -> Array:
    """The scores with invisible pairs at MASK_VALUE; a FULL tile skips the mask. `k_tok` is a thunk that
    loads the key side's tokens (only a PARTIAL tile reads them)."""

    def apply(s: Array) -> Array:
        bq, bk = s.shape
        q_index = q0 + jnp.arange(bq, dtype=jnp.int32)
        k_index = k0 + jnp.arange(bk, dtype=jnp.int32)
        vis = visible(q_tok, q_index, k_tok(), k_index, window) & (q_tok.segment_ids > 0)[:, None]
        return jnp.where(vis, s, MASK_VALUE)

    return jax.lax.cond(kind == FULL, lambda s: s, apply, s)


def _load_tokens(refs, at=None) -> Tokens:
    return Tokens(*(ref[...] if at is None else ref[at] for ref in refs))


def _count_to(count_ref, visits: Array) -> None:
    if count_ref:
        count_ref[0][...] = jnp.full(count_ref[0].shape, visits, jnp.int32)


def _forward_kernel(
    blocks_ref, kinds_ref, win_ref, q_ref, k_ref, v_ref, *refs, scale, softcap, bq, bk
):  # fmt: skip
    qtok_refs, ktok_refs = refs[0:3], refs[3:6]
    o_ref, lse_ref, *count_ref = refs[6:]
    i, window = pl.program_id(2), win_ref[0]
    q, q_tok = q_ref[...], _load_tokens(qtok_refs)
    visits = jnp.sum((kinds_ref[...] != EMPTY).astype(jnp.int32))

    def body(t, carry):
        acc, m, total = carry  # unnormalised output, running max, running sum of exp
        j = blocks_ref[t]
        keys = pl.ds(j * bk, bk)
        s = _capped_scores(q, k_ref[keys, :], scale, softcap)
        s = _masked(s, kinds_ref[t], q_tok, i * bq, lambda: _load_tokens(ktok_refs, keys), j * bk, window)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        v = v_ref[keys, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * total + jnp.sum(p, axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, total = jax.lax.fori_loop(0, visits, body, init)
    seen = (q_tok.segment_ids > 0) & (total > 0)
    total = jnp.where(seen, total, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / total[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(total), 0.0)
    _count_to(count_ref, visits)


def _grad_terms(q, k, v, do, lse, di, masked, scale, softcap):
    """(p, ds) of one tile: the probabilities and the gradient of the scores before the scale."""
    capped = _capped_scores(q, k, scale, softcap)
    p = jnp.exp(masked(capped) - lse[:, None])
    ds = p * (_dot(do, v, trans_b=True) - di[:, None])
    if softcap is not None:  # d(cap·tanh(x / cap))/dx, from the capped scores (before the mask)
        ds = ds * (1.0 - (capped / softcap) ** 2)
    return p, ds


def _dq_kernel(
    blocks_ref, kinds_ref, win_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, scale, softcap, bq, bk
):  # fmt: skip
    qtok_refs, ktok_refs = refs[0:3], refs[3:6]
    dq_ref, *count_ref = refs[6:]
    i, window = pl.program_id(2), win_ref[0]
    q, do, lse, di, q_tok = q_ref[...], do_ref[...], lse_ref[...], di_ref[...], _load_tokens(qtok_refs)
    visits = jnp.sum((kinds_ref[...] != EMPTY).astype(jnp.int32))

    def body(t, dq):
        j = blocks_ref[t]
        keys = pl.ds(j * bk, bk)
        k_tok = lambda: _load_tokens(ktok_refs, keys)
        masked = lambda s: _masked(s, kinds_ref[t], q_tok, i * bq, k_tok, j * bk, window)
        k = k_ref[keys, :]
        _, ds = _grad_terms(q, k, v_ref[keys, :], do, lse, di, masked, scale, softcap)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, visits, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    _count_to(count_ref, visits)


def _dkv_kernel(
    blocks_ref, kinds_ref, win_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, scale, softcap, bq, bk, g
):  # fmt: skip
    qtok_refs, ktok_refs = refs[0:3], refs[3:6]
    dk_ref, dv_ref, *count_ref = refs[6:]
    j, window = pl.program_id(2), win_ref[0]
    k, v, k_tok = k_ref[...], v_ref[...], _load_tokens(ktok_refs)
    visits = jnp.sum((kinds_ref[...] != EMPTY).astype(jnp.int32))

    def body(t, carry):
        i = blocks_ref[t]
        queries = pl.ds(i * bq, bq)
        q_tok = _load_tokens(qtok_refs, queries)
        masked = lambda s: _masked(s, kinds_ref[t], q_tok, i * bq, lambda: k_tok, j * bk, window)

        def head(gi, carry):  # the query heads that share this kv head
            dk, dv = carry
            q, do = q_ref[gi, queries, :], do_ref[gi, queries, :]
            p, ds = _grad_terms(q, k, v, do, lse_ref[gi, queries], di_ref[gi, queries], masked, scale, softcap)
            dv = dv + _dot(p.T.astype(do.dtype), do)
            return dk + _dot(ds.T.astype(q.dtype), q), dv

        return jax.lax.fori_loop(0, g, head, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, visits, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    _count_to(count_ref, visits * g)


# ---- pallas_call wrappers -----------------------------------------------------------------------------


def _call(kernel, grid, in_specs, out_specs, out_shape, name: str, interpret: bool, head_dim: int):
    warps = 4 if head_dim <= 64 else 8
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2),
        interpret=interpret,
        name=name,
    )


def _specs_by_query_block(r, t, e, g, block, width):
    """BlockSpecs for a grid (row, query head, query block) that walks each query block's visit list."""
    return dict(
        lists=pl.BlockSpec((None, None, width), lambda r, h, i: (r, i, 0)),
        window=pl.BlockSpec((1,), lambda r, h, i: (0,)),
        q=pl.BlockSpec((None, None, block, e), lambda r, h, i: (r, h, i, 0)),
        kv=pl.BlockSpec((None, None, t, e), lambda r, h, i: (r, h // g, 0, 0)),
        q_row=pl.BlockSpec((None, None, block), lambda r, h, i: (r, h, i)),
        q_tok=pl.BlockSpec((None, block), lambda r, h, i: (r, i)),
        k_tok=pl.BlockSpec((None, t), lambda r, h, i: (r, 0)),
        count=pl.BlockSpec((None, None, None, LIST_MIN), lambda r, h, i: (r, h, i, 0)),
    )


def _forward(q, k, v, tokens, window, *, scale, softcap, block, interpret, count=False):
    r, h, t, e = q.shape
    g, n = h // k.shape[1], t // block
    blocks, kinds = visit_lists(tile_kinds(*tokens, window, block))
    s = _specs_by_query_block(r, t, e, g, block, blocks.shape[-1])
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((r, h, t), jnp.float32)]
    out_specs = [s["q"], s["q_row"]]
    if count:
        out_shape.append(jax.ShapeDtypeStruct((r, h, n, LIST_MIN), jnp.int32))
        out_specs.append(s["count"])
    kernel = functools.partial(_forward_kernel, scale=scale, softcap=softcap, bq=block, bk=block)
    in_specs = [s["lists"], s["lists"], s["window"], s["q"], s["kv"], s["kv"], *[s["q_tok"]] * 3, *[s["k_tok"]] * 3]
    return _call(kernel, (r, h, n), in_specs, out_specs, out_shape, "prefopt_flash_gpu_fwd", interpret, e)(
        blocks, kinds, jnp.asarray(window, jnp.int32)[None], q, k, v, *tokens, *tokens
    )


def _backward(q, k, v, tokens, window, o, lse, do, *, scale, softcap, block, interpret, count=False):
    r, h, t, e = q.shape
    kh = k.shape[1]
    g, n = h // kh, t // block
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    window = jnp.asarray(window, jnp.int32)
    kinds = tile_kinds(*tokens, window, block)
    blocks, listed = visit_lists(kinds)
    s = _specs_by_query_block(r, t, e, g, block, blocks.shape[-1])
    counted = lambda shape: [jax.ShapeDtypeStruct(shape, jnp.int32)] if count else []
    dq_outs = _call(
        functools.partial(_dq_kernel, scale=scale, softcap=softcap, bq=block, bk=block),
        (r, h, n),
        [s["lists"], s["lists"], s["window"], s["q"], s["kv"], s["kv"], s["q"], s["q_row"], s["q_row"],
         *[s["q_tok"]] * 3, *[s["k_tok"]] * 3],
        [s["q"], *([s["count"]] if count else [])],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), *counted((r, h, n, LIST_MIN))],
        "prefopt_flash_gpu_dq", interpret, e,
    )(blocks, listed, window[None], q, k, v, do, lse, di, *tokens, *tokens)  # fmt: skip

    blocks_t, listed_t = visit_lists(kinds.transpose(0, 2, 1))  # per key block: the query blocks that see it
    width = blocks_t.shape[-1]
    lists_t = pl.BlockSpec((None, None, width), lambda r, kv, j: (r, j, 0))
    group = pl.BlockSpec((None, g, t, e), lambda r, kv, j: (r, kv, 0, 0))
    group_row = pl.BlockSpec((None, g, t), lambda r, kv, j: (r, kv, 0))
    kv_block = pl.BlockSpec((None, None, block, e), lambda r, kv, j: (r, kv, j, 0))
    q_tok = pl.BlockSpec((None, t), lambda r, kv, j: (r, 0))
    k_tok = pl.BlockSpec((None, block), lambda r, kv, j: (r, j))
    window_spec = pl.BlockSpec((1,), lambda r, kv, j: (0,))
    count_spec = pl.BlockSpec((None, None, None, LIST_MIN), lambda r, kv, j: (r, kv, j, 0))
    dkv_outs = _call(
        functools.partial(_dkv_kernel, scale=scale, softcap=softcap, bq=block, bk=block, g=g),
        (r, kh, n),
        [lists_t, lists_t, window_spec, group, kv_block, kv_block, group, group_row, group_row,
         *[q_tok] * 3, *[k_tok] * 3],
        [kv_block, kv_block, *([count_spec] if count else [])],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
         *counted((r, kh, n, LIST_MIN))],
        "prefopt_flash_gpu_dkv", interpret, e,
    )(blocks_t, listed_t, window[None], q, k, v, do, lse, di, *tokens, *tokens)  # fmt: skip
    return dq_outs, dkv_outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def flash_attention(q, k, v, seg, branch, pos, window, scale, softcap=None, block=128, interpret=False):
    """Attention output [R, H, T, E] of q [R, H, T, E] over k, v [R, K, T, E] under the mask the token
    arrays (segment ids, branches, positions: int32 [R, T]) and `window` (int32 scalar, 0: none) define."""
    tokens = (seg, branch, pos)
    return _forward(q, k, v, tokens, window, scale=scale, softcap=softcap, block=block, interpret=interpret)[0]


def _vjp_forward(q, k, v, seg, branch, pos, window, scale, softcap, block, interpret):
    tokens = (seg, branch, pos)
    o, lse = _forward(q, k, v, tokens, window, scale=scale, softcap=softcap, block=block, interpret=interpret)
    return o, (q, k, v, tokens, window, o, lse)


def _vjp_backward(scale, softcap, block, interpret, residuals, do):
    q, k, v, tokens, window, o, lse = residuals
    (dq,), (dk, dv) = _backward(
        q, k, v, tokens, window, o, lse, do, scale=scale, softcap=softcap, block=min(block, BACKWARD_BLOCK),
        interpret=interpret,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None


flash_attention.defvjp(_vjp_forward, _vjp_backward)


def tiles_visited(q, k, v, seg, branch, pos, window, scale, softcap=None, block=128, interpret=True) -> dict:
    """How many tiles each kernel computed, counted inside the kernels' loops: {"fwd": [R, H, N],
    "dq": [R, H, N'], "dkv": [R, K, N']} (N' blocks of the backward's tile side; dkv counts a tile once per
    query head of the group)."""
    tokens = (seg, branch, pos)
    kw = dict(scale=scale, softcap=softcap, interpret=interpret, count=True)
    o, lse, fwd = _forward(q, k, v, tokens, window, block=block, **kw)
    back = min(block, BACKWARD_BLOCK)
    (_, dq), (_, _, dkv) = _backward(q, k, v, tokens, window, o, lse, jnp.ones_like(o), block=back, **kw)
    return {"fwd": fwd[..., 0], "dq": dq[..., 0], "dkv": dkv[..., 0]}
