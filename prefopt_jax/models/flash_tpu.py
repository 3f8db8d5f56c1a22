"""Flash attention for TPU (Pallas, Mosaic) with the preference-batch mask computed inside the kernel.

A query token sees a key token when both are in the same segment, the key is not after the query, the key
is in the shared prompt (branch 0) or in the query's own completion branch, and, under a sliding window w,
the query's position is less than w past the key's (`attention.visible`). The kernel gets the per-token
segment ids, branches and positions, never a mask. Each (query block, key block) tile is classified on the
device first (`block_kinds`: empty, partial, full, from per-block summaries): empty tiles are neither
fetched from HBM nor computed, full tiles skip the elementwise mask. Forward: an online softmax per query
block over its key blocks, saving the log-sum-exp; backward (FlashAttention-2): one kernel for dq over the
key blocks, one for dk and dv over the query blocks and the query heads that share each kv head.

Layouts: q [R, H, T, E], k and v [R, K, T, E] with H = K·G; token arrays [R, T] int32. T must be a
multiple of the block (128, 256 or 512: `block_for`). On CPU the same kernels run with `interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array
LANES = 128
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
EMPTY, PARTIAL, FULL = 0, 1, 2


def block_for(length: int) -> int | None:
    """The tile side for rows of `length` tokens (the largest of 512, 256, 128 that divides it)."""
    return next((b for b in (512, 256, 128) if length % b == 0), None)


def block_kinds(seg_RxT: Array, branch_RxT: Array, pos_RxT: Array, window, block: int) -> Array:
    """int32 [R, n, n]: for every (query block, key block), EMPTY (no query sees a key), PARTIAL (some do:
    apply the mask) or FULL (every query sees every key), decided from per-block summaries. A tile is only
    called EMPTY or FULL when that holds for every token in it, so the kernels' results are exact whatever
    the layout; padding-only query blocks are EMPTY (their outputs are never read)."""
    r, t = seg_RxT.shape
    n = t // block
    seg, br, pos = (a.reshape(r, n, block) for a in (seg_RxT, branch_RxT, pos_RxT))
    real = seg > 0
    big = jnp.iinfo(jnp.int32).max
    lo = lambda a: jnp.min(jnp.where(real, a, big), -1)
    hi = lambda a: jnp.max(jnp.where(real, a, -1), -1)
    smin, smax, bmin, bmax, pmin, pmax = lo(seg), hi(seg), lo(br), hi(br), lo(pos), hi(pos)
    any_real, all_real = real.any(-1), real.all(-1)
    one_seg = all_real & (smin == smax)
    one_branch = one_seg & (bmin == bmax)

    q = lambda a: a[:, :, None]  # [R, n, 1]: the query block's summary
    k = lambda a: a[:, None, :]  # [R, 1, n]: the key block's
    qi, kj = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    window = jnp.asarray(window, jnp.int32)
    same_one = q(one_seg) & k(one_seg) & (q(smin) == k(smin))
    other_branch = same_one & q(one_branch) & k(one_branch) & (q(bmin) > 0) & (k(bmin) > 0) & (q(bmin) != k(bmin))
    maybe = (kj <= qi) & q(any_real) & k(any_real) & (k(smin) <= q(smax)) & (q(smin) <= k(smax)) & ~other_branch
    maybe &= (window == 0) | (q(pmin) - k(pmax) < window)
    prompt_keys = k(one_branch) & (k(bmin) == 0)
    same_branch = q(one_branch) & k(one_branch) & (q(bmin) == k(bmin))
    full = maybe & (kj < qi) & same_one & (prompt_keys | same_branch) & ((window == 0) | (q(pmax) - k(pmin) < window))
    return jnp.where(full, FULL, jnp.where(maybe, PARTIAL, EMPTY)).astype(jnp.int32)


def fetch_order(kinds_RxNxM: Array) -> Array:
    """int32 [R, N, M]: at each step of the last axis, the block to have in memory: the step's own when it
    is not EMPTY, else the next non-empty one (else the last), so skipped steps repeat a block index and the
    pipeline fetches nothing for them."""
    m = kinds_RxNxM.shape[-1]
    idx = jnp.arange(m, dtype=jnp.int32)
    vis = kinds_RxNxM != EMPTY
    last = jax.lax.cummax(jnp.where(vis, idx, -1), axis=2)
    nxt = jax.lax.cummin(jnp.where(vis, idx, m), axis=2, reverse=True)
    return jnp.where(vis, idx, jnp.where(nxt < m, nxt, jnp.maximum(last, 0))).astype(jnp.int32)


# ---- the kernels ---------------------------------------------------------------------------------------


def _tile(x: Array, width: int) -> Array:
    """(rows, LANES) with every lane equal -> (rows, width), width a multiple of LANES."""
    return x if width == LANES else jnp.tile(x, (1, width // LANES))


def _scores(q, k, scale, softcap):
    s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
    return s if softcap is None else jnp.tanh(s / softcap) * softcap


def _visible(qmeta, kmeta, q0, k0, window, bq: int, bk: int) -> Array:
    """bool (bq, bk) from the tokens' (segment, branch, position): q side (bq, LANES) lanes, k side (1, bk)."""
    qseg, qbr, qpos = (_tile(ref[...], bk) for ref in qmeta)
    kseg, kbr, kpos = (ref[...] for ref in kmeta)
    rows = q0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = k0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    vis = (qseg == kseg) & (cols <= rows) & ((kbr == 0) | (kbr == qbr))
    return vis & ((window == 0) | (qpos - kpos < window))


def _forward_kernel(kinds, fetch, win, q_ref, k_ref, v_ref, *refs, scale, softcap, bq, bk, n):
    qmeta, kmeta = refs[0:3], refs[3:6]
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[6:]
    r, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    kind = kinds[r, i, j]

    def step(masked: bool):
        s = _scores(q_ref[...], k_ref[...], scale, softcap)
        if masked:
            s = jnp.where(_visible(qmeta, kmeta, i * bq, j * bk, win[0], bq, bk), s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # (bq, LANES)
        p = jnp.exp(s - _tile(m_new, bk))
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1)[:, None]
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * alpha[:, :1] + pv
        m_sc[...] = m_new

    pl.when(kind == PARTIAL)(lambda: step(True))
    pl.when(kind == FULL)(lambda: step(False))

    @pl.when(j == n - 1)
    def _finish():
        total = l_sc[...]
        seen = total > 0  # a query block no tile reached (padding) writes zeros
        total = jnp.where(seen, total, 1.0)
        o_ref[...] = jnp.where(seen[:, :1], acc_sc[...] / total[:, :1], 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(total), 0.0)


def _grad_terms(q, k, v, do, lse, di, visible, scale, softcap, bk):
    """(p, ds) of one tile: the probabilities and the gradient of the scores before the scale."""
    s = _scores(q, k, scale, softcap)
    p = jnp.exp((s if visible is None else jnp.where(visible, s, MASK_VALUE)) - _tile(lse, bk))
    dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _tile(di, bk))
    if softcap is not None:  # d(cap·tanh(x / cap))/dx, from the capped scores (before the mask)
        ds = ds * (1.0 - (s / softcap) ** 2)
    return p, ds


def _dq_kernel(kinds, fetch, win, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, scale, softcap, bq, bk, n):
    qmeta, kmeta = refs[0:3], refs[3:6]
    dq_ref, dq_sc = refs[6:]
    r, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    kind = kinds[r, i, j]

    def step(masked: bool):
        visible = _visible(qmeta, kmeta, i * bq, j * bk, win[0], bq, bk) if masked else None
        k = k_ref[...]
        _, ds = _grad_terms(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], di_ref[...], visible, scale,
                            softcap, bk)  # fmt: skip
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale

    pl.when(kind == PARTIAL)(lambda: step(True))
    pl.when(kind == FULL)(lambda: step(False))

    @pl.when(j == n - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(kinds, fetch, win, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, scale, softcap, bq, bk, n, g):
    qmeta, kmeta = refs[0:3], refs[3:6]
    dk_ref, dv_ref, dk_sc, dv_sc = refs[6:]
    r, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    kind = kinds[r, j, i]  # the transposed table: key block j, query block i

    def step(masked: bool):
        visible = _visible(qmeta, kmeta, i * bq, j * bk, win[0], bq, bk) if masked else None
        q, do = q_ref[...], do_ref[...]
        p, ds = _grad_terms(q, k_ref[...], v_ref[...], do, lse_ref[...], di_ref[...], visible, scale, softcap, bk)
        dv_sc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk_sc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32) * scale

    pl.when(kind == PARTIAL)(lambda: step(True))
    pl.when(kind == FULL)(lambda: step(False))

    @pl.when((gi == g - 1) & (i == n - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ---- pallas_call wrappers -----------------------------------------------------------------------------


def _token_inputs(seg, branch, pos):
    """Query-side token arrays broadcast along lanes [R, T, LANES]; key-side [R, 1, T]."""
    q_side = [jnp.broadcast_to(a[:, :, None], (*a.shape, LANES)) for a in (seg, branch, pos)]
    k_side = [a[:, None, :] for a in (seg, branch, pos)]
    return q_side, k_side


def _params(semantics: tuple[str, ...]):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward(q, k, v, seg, branch, pos, window, *, scale, softcap, block, interpret):
    r, h, t, e = q.shape
    g = h // k.shape[1]
    n = t // block
    kinds = block_kinds(seg, branch, pos, window, block)
    fetch = fetch_order(kinds)
    q_side, k_side = _token_inputs(seg, branch, pos)
    qspec = pl.BlockSpec((None, None, block, e), lambda r, h, i, j, *_: (r, h, i, 0))
    kvspec = pl.BlockSpec((None, None, block, e), lambda r, h, i, j, kinds, fetch, win: (r, h // g, fetch[r, i, j], 0))
    qmeta = pl.BlockSpec((None, block, LANES), lambda r, h, i, j, *_: (r, i, 0))
    kmeta = pl.BlockSpec((None, 1, block), lambda r, h, i, j, kinds, fetch, win: (r, 0, fetch[r, i, j]))
    lanes = pl.BlockSpec((None, None, block, LANES), lambda r, h, i, j, *_: (r, h, i, 0))
    kernel = functools.partial(_forward_kernel, scale=scale, softcap=softcap, bq=block, bk=block, n=n)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(r, h, n, n),
            in_specs=[qspec, kvspec, kvspec, *[qmeta] * 3, *[kmeta] * 3],
            out_specs=[qspec, lanes],
            scratch_shapes=[
                pltpu.VMEM((block, LANES), jnp.float32),
                pltpu.VMEM((block, LANES), jnp.float32),
                pltpu.VMEM((block, e), jnp.float32),
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((r, h, t, LANES), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="prefopt_flash_fwd",
    )(kinds, fetch, window[None], q, k, v, *q_side, *k_side)
    return o, lse[..., 0], kinds


def _backward(q, k, v, seg, branch, pos, window, o, lse, kinds, do, *, scale, softcap, block, interpret):
    r, h, t, e = q.shape
    kh = k.shape[1]
    g = h // kh
    n = t // block
    q_side, k_side = _token_inputs(seg, branch, pos)
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    lse_l, di_l = (jnp.broadcast_to(a[..., None], (*a.shape, LANES)) for a in (lse, di))
    win = window[None]

    fetch = fetch_order(kinds)
    qspec = pl.BlockSpec((None, None, block, e), lambda r, h, i, j, *_: (r, h, i, 0))
    kvspec = pl.BlockSpec((None, None, block, e), lambda r, h, i, j, kinds, fetch, w: (r, h // g, fetch[r, i, j], 0))
    lanes = pl.BlockSpec((None, None, block, LANES), lambda r, h, i, j, *_: (r, h, i, 0))
    qmeta = pl.BlockSpec((None, block, LANES), lambda r, h, i, j, *_: (r, i, 0))
    kmeta = pl.BlockSpec((None, 1, block), lambda r, h, i, j, kinds, fetch, w: (r, 0, fetch[r, i, j]))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, softcap=softcap, bq=block, bk=block, n=n),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(r, h, n, n),
            in_specs=[qspec, kvspec, kvspec, qspec, lanes, lanes, *[qmeta] * 3, *[kmeta] * 3],
            out_specs=qspec,
            scratch_shapes=[pltpu.VMEM((block, e), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="prefopt_flash_dq",
    )(kinds, fetch, win, q, k, v, do, lse_l, di_l, *q_side, *k_side)

    kinds_t = kinds.transpose(0, 2, 1)  # [R, key block, query block]
    fetch_t = fetch_order(kinds_t)
    q_at = lambda r, kv, j, gi, i, kinds, fetch, w: (r, kv * g + gi, fetch[r, j, i], 0)
    qspec_t = pl.BlockSpec((None, None, block, e), q_at)
    lanes_t = pl.BlockSpec((None, None, block, LANES), q_at)
    kvspec_t = pl.BlockSpec((None, None, block, e), lambda r, kv, j, gi, i, *_: (r, kv, j, 0))
    qmeta_t = pl.BlockSpec((None, block, LANES), lambda r, kv, j, gi, i, kinds, fetch, w: (r, fetch[r, j, i], 0))
    kmeta_t = pl.BlockSpec((None, 1, block), lambda r, kv, j, gi, i, *_: (r, 0, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, softcap=softcap, bq=block, bk=block, n=n, g=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(r, kh, n, g, n),
            in_specs=[qspec_t, kvspec_t, kvspec_t, qspec_t, lanes_t, lanes_t, *[qmeta_t] * 3, *[kmeta_t] * 3],
            out_specs=[kvspec_t, kvspec_t],
            scratch_shapes=[pltpu.VMEM((block, e), jnp.float32), pltpu.VMEM((block, e), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="prefopt_flash_dkv",
    )(kinds_t, fetch_t, win, q, k, v, do, lse_l, di_l, *q_side, *k_side)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def flash_attention(q, k, v, seg, branch, pos, window, scale, softcap=None, block=128, interpret=False):
    """Attention output [R, H, T, E] of q [R, H, T, E] over k, v [R, K, T, E] under the mask the token
    arrays (segment ids, branches, positions: int32 [R, T]) and `window` (int32 scalar, 0: none) define."""
    return _forward(q, k, v, seg, branch, pos, window, scale=scale, softcap=softcap, block=block,
                    interpret=interpret)[0]  # fmt: skip


def _vjp_forward(q, k, v, seg, branch, pos, window, scale, softcap, block, interpret):
    o, lse, kinds = _forward(q, k, v, seg, branch, pos, window, scale=scale, softcap=softcap, block=block,
                             interpret=interpret)  # fmt: skip
    return o, (q, k, v, seg, branch, pos, window, o, lse, kinds)


def _vjp_backward(scale, softcap, block, interpret, residuals, do):
    q, k, v, seg, branch, pos, window, o, lse, kinds = residuals
    dq, dk, dv = _backward(q, k, v, seg, branch, pos, window, o, lse, kinds, do, scale=scale, softcap=softcap,
                           block=block, interpret=interpret)  # fmt: skip
    return dq, dk, dv, None, None, None, None


flash_attention.defvjp(_vjp_forward, _vjp_backward)
