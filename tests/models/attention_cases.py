"""Packed preference rows and a written-out dense attention, shared by the flash kernels' tests."""

import jax
import jax.numpy as jnp
import numpy as np

from prefopt_jax import data
from prefopt_jax.models.mask import Tokens, visible


def packed_rows(rows, length, seed):
    """Token arrays of rows packed with random [prompt | chosen | rejected] groups and padding at the end."""
    rng = np.random.default_rng(seed)
    groups = []
    while len(groups) < 40:
        groups.append(
            (np.ones(rng.integers(3, 60), np.int32), [np.ones(rng.integers(1, 90), np.int32) for _ in (0, 1)])
        )
    plan = data.RowPlan(data.Geometry(rows, length, 40, 2, 90, length), "packed")
    for slot, (p, cs) in enumerate(groups):
        plan.place(len(p), [len(c) for c in cs], slot)
    b = data.batching.build(plan, groups)
    return Tokens(*(jnp.asarray(a, jnp.int32) for a in (b.segment_ids, b.branch, b.positions)))


def reference(q, k, v, tok, window, scale, softcap):
    """Dense attention, written out: every (query, key) score, the mask, a softmax."""
    g = q.shape[1] // k.shape[1]
    kk, vv = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
    s = jnp.einsum("rhqe,rhke->rhqk", q, kk) * scale
    if softcap:
        s = jnp.tanh(s / softcap) * softcap
    idx = jnp.broadcast_to(jnp.arange(q.shape[2]), tok.segment_ids.shape)
    s = jnp.where(visible(tok, idx, tok, idx, window)[:, None], s, -jnp.inf)
    return jnp.einsum("rhqk,rhke->rhqe", jax.nn.softmax(s, -1), vv)
