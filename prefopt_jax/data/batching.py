"""Batch layouts. Everything to score is a *group*: one prompt and k completions of it (a pair: k = 2,
chosen then rejected; an unpaired example or a KL pair: k = 1; a ranked set: k = K).

padded  one row per (group, completion): prompt + completion, right-padded to a length bucket; rows
        ordered completion-major (all chosen rows, then all rejected rows), as TRL concatenates them.
packed  one segment per group: [prompt | completion_1 | ... | completion_k], several segments per row.
        Completion j sees the prompt and itself, never another completion, and its positions continue
        from the prompt, so the prompt is computed once for all k completions.

Both give the same contract (`Batch`): the rows to run through the model, for every token the position
whose logits predict it (`pred_index`), and for every completion the flat indices (row * T + t) of its
tokens, so per-token log-probs come out the same whichever layout ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

Group = tuple[np.ndarray, Sequence[np.ndarray]]  # (prompt ids, [completion ids, ...])


@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # int32 [R, T]
    positions: np.ndarray  # int32 [R, T]
    segment_ids: np.ndarray  # int32 [R, T], 0 = padding
    pred_index: np.ndarray  # int32 [R, T]: the position whose logits predict token t
    completion_index: np.ndarray  # int32 [G, k, L]: flat r*T + t of each completion token
    completion_mask: np.ndarray  # bool [G, k, L]
    attention: np.ndarray | None = None  # bool [R, T, T] for packed rows; None: causal within segment

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_tokens / self.input_ids.size

    def model_inputs(self) -> dict:
        """Keyword arguments of the model call."""
        out = {"input_ids": self.input_ids, "positions": self.positions, "segment_ids": self.segment_ids}
        if self.attention is not None:
            out["mask"] = self.attention
        return out


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n (so a handful of shapes compile), or n itself past the last."""
    for b in sorted(buckets):
        if n <= b:
            return b
    return n


def default_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)


def _completion_arrays(groups: Sequence[Group], spans: list[list[tuple[int, int]]], min_width: int):
    """Index arrays [G, k, L] from each completion's (flat start, length)."""
    k = len(groups[0][1])
    width = max(min_width, max(n for g in spans for _, n in g))
    index = np.zeros((len(groups), k, width), np.int32)
    mask = np.zeros((len(groups), k, width), bool)
    for gi, g in enumerate(spans):
        for j, (start, n) in enumerate(g):
            index[gi, j, :n] = np.arange(start, start + n)
            mask[gi, j, :n] = True
    return index, mask


def _check_groups(groups: Sequence[Group]) -> None:
    if not groups:
        raise ValueError("a batch needs at least one group")
    ks = {len(c) for _, c in groups}
    if len(ks) != 1:
        raise ValueError(f"every group in a batch must have the same number of completions, got {sorted(ks)}")
    if any(len(p) == 0 for p, _ in groups):
        raise ValueError("every group needs at least one prompt token (the first completion token's context)")


def padded_batch(
    groups: Sequence[Group], buckets: Sequence[int], pad_id: int = 0, min_rows: int = 0, width_buckets=None
) -> Batch:
    _check_groups(groups)
    k = len(groups[0][1])
    rows = [(p, c[j]) for j in range(k) for p, c in groups]  # completion-major
    t = bucket(max(len(p) + len(c) for p, c in rows), buckets)
    r = max(len(rows), min_rows)
    ids = np.full((r, t), pad_id, np.int32)
    seg = np.zeros((r, t), np.int32)
    spans: list[list[tuple[int, int]]] = [[(0, 0)] * k for _ in groups]
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = np.concatenate([p, c])
        seg[i, :n] = 1
        spans[i % len(groups)][i // len(groups)] = (i * t + len(p), len(c))
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (r, t)).copy()
    pred = np.maximum(positions - 1, 0)
    width = bucket(max(len(c) for _, cs in groups for c in cs), width_buckets or buckets)
    index, mask = _completion_arrays(groups, spans, width)
    return Batch(ids, positions, seg, pred, index, mask)


def packed_batch(
    groups: Sequence[Group],
    row_length: int,
    buckets: Sequence[int] = (),
    pad_id: int = 0,
    min_rows: int = 0,
    row_buckets: Sequence[int] = (),
    width_buckets=None,
    one_group_per_row: bool = False,
) -> Batch:
    """Groups packed first-fit (longest first) into rows of `row_length` tokens; the row count is
    rounded up to `row_buckets` (and to at least `min_rows`) with empty rows. `one_group_per_row`
    keeps the prefix sharing but not the packing (for measuring each on its own)."""
    _check_groups(groups)
    sizes = [len(p) + sum(len(c) for c in cs) for p, cs in groups]
    if max(sizes) > row_length:
        raise ValueError(f"a group of {max(sizes)} tokens does not fit a packed row of {row_length}")
    fill: list[int] = []
    place: dict[int, tuple[int, int]] = {}
    for gi in sorted(range(len(groups)), key=lambda g: -sizes[g]):
        fits = (r for r, used in enumerate(fill) if used + sizes[gi] <= row_length and not one_group_per_row)
        row = next(fits, None)
        if row is None:
            fill.append(0)
            row = len(fill) - 1
        place[gi] = (row, fill[row])
        fill[row] += sizes[gi]
    t = bucket(max(fill), [b for b in buckets if b < row_length] + [row_length])
    r = bucket(max(len(fill), min_rows), row_buckets) if row_buckets else max(len(fill), min_rows)
    ids = np.full((r, t), pad_id, np.int32)
    pos = np.zeros((r, t), np.int32)
    seg = np.zeros((r, t), np.int32)
    branch = np.zeros((r, t), np.int32)  # 0: prompt, j + 1: completion j
    pred = np.zeros((r, t), np.int32)
    spans: list[list[tuple[int, int]]] = []
    next_seg = np.ones(r, np.int32)
    for gi, (p, cs) in enumerate(groups):
        row, start = place[gi]
        n_p = len(p)
        ids[row, start : start + n_p] = p
        pos[row, start : start + n_p] = np.arange(n_p)
        pred[row, start : start + n_p] = np.maximum(np.arange(start, start + n_p) - 1, 0)
        cursor, g_spans = start + n_p, []
        for j, c in enumerate(cs):
            n = len(c)
            sl = slice(cursor, cursor + n)
            ids[row, sl] = c
            pos[row, sl] = n_p + np.arange(n)
            branch[row, sl] = j + 1
            pred[row, sl] = np.arange(cursor - 1, cursor + n - 1)
            pred[row, cursor] = start + n_p - 1  # the first completion token is predicted by the prompt's end
            g_spans.append((row * t + cursor, n))
            cursor += n
        seg[row, start:cursor] = next_seg[row]
        next_seg[row] += 1
        spans.append(g_spans)
    idx = np.arange(t)
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    causal = idx[None, :, None] >= idx[None, None, :]
    visible_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    attention = same & causal & visible_branch
    width = bucket(max(len(c) for _, cs in groups for c in cs), width_buckets or buckets or (row_length,))
    index, mask = _completion_arrays(groups, spans, width)
    return Batch(ids, pos, seg, pred, index, mask, attention)


def pad_batch(b: Batch, rows: int, length: int, width: int, pad_id: int = 0) -> Batch:
    """`b` grown to [rows, length] rows and completion width `width` (empty rows, padding tokens), with
    its flat completion indices moved to the new row length; the per-token results are unchanged."""
    r, t = b.input_ids.shape
    if rows < r or length < t or width < b.completion_index.shape[-1]:
        raise ValueError(f"cannot shrink a batch of {(r, t)} rows x tokens to {(rows, length)}")

    def grow(a: np.ndarray, fill) -> np.ndarray:
        out = np.full((rows, length, *a.shape[2:]), fill, a.dtype)
        out[:r, :t] = a
        return out

    attention = None
    if b.attention is not None:
        attention = np.zeros((rows, length, length), bool)
        attention[:r, :t, :t] = b.attention
    g, k, w = b.completion_index.shape
    index = np.zeros((g, k, width), np.int32)
    mask = np.zeros((g, k, width), bool)
    index[..., :w] = (b.completion_index // t) * length + b.completion_index % t
    mask[..., :w] = b.completion_mask
    return Batch(
        grow(b.input_ids, pad_id),
        grow(b.positions, 0),
        grow(b.segment_ids, 0),
        grow(b.pred_index, 0),
        np.where(mask, index, 0).astype(np.int32),
        mask,
        attention,
    )


def common_shape(batches: Sequence[Batch], pad_id: int = 0, row_multiple: int = 1) -> list[Batch]:
    """Batches padded to one shape, so they stack (the micro-batches of one accumulated step), with a
    row count that is a multiple of `row_multiple` (the devices the rows are split over)."""
    rows = -(-max(b.input_ids.shape[0] for b in batches) // row_multiple) * row_multiple
    length = max(b.input_ids.shape[1] for b in batches)
    width = max(b.completion_index.shape[-1] for b in batches)
    return [pad_batch(b, rows, length, width, pad_id) for b in batches]
