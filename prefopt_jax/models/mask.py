"""The attention mask of a preference batch, as a rule over per-token arrays (never a [T, T] input).

A batch row carries, per token, its segment id (one per packed group, 0 for padding), its branch (0: the
group's shared prompt; j + 1: its completion j) and its position. A query sees a key when they are in the
same segment, the key is not after the query, the key is in the prompt or in the query's own branch, and
(sliding window w > 0) the query's position is less than w past the key's. Padding tokens form segment 0
among themselves, so no query row is ever empty.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

Array = jax.Array


class Tokens(NamedTuple):
    """The per-token arrays the mask is derived from, int32 [..., T] each."""

    segment_ids: Array
    branch: Array
    positions: Array


def visible(q_tokens: Tokens, q_index: Array, k_tokens: Tokens, k_index: Array, window) -> Array:
    """bool [..., Tq, Tk]: which keys each query sees. `*_index` are the tokens' indices in their row
    (causality is by index: completions follow their prompt); `window` an int scalar (0: no window)."""
    q = lambda a: a[..., :, None]
    k = lambda a: a[..., None, :]
    same = q(q_tokens.segment_ids) == k(k_tokens.segment_ids)
    causal = k(k_index) <= q(q_index)
    branch = (k(k_tokens.branch) == 0) | (k(k_tokens.branch) == q(q_tokens.branch))
    near = (window == 0) | (q(q_tokens.positions) - k(k_tokens.positions) < window)
    return same & causal & branch & near
