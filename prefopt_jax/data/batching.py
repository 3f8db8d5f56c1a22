"""Fixed-shape micro-batches. Everything to score is a *group*: one prompt and k completions of it (a pair:
k = 2, chosen then rejected; an unpaired example or a KL pair: k = 1; a ranked set: k = K).

Every micro-batch of a run has one `Geometry` (R rows of T tokens, G groups of k completions of at most L
tokens, at most C scored tokens and P attention tiles per row), so the step compiles once. A group is laid
out as one or more *units* of [prompt | completions] placed in rows:

    padded           a unit per (group, completion), a row per unit        (no sharing, no packing)
    shared           a unit per group [prompt | c_1 | ... | c_k], a row per unit   (prefix sharing)
    packed_unshared  a unit per (group, completion), several units per row         (packing)
    packed           a unit per group, several units per row              (both: the default)

Completion j of a group sees its prompt and itself, never another completion, and its positions continue
from the prompt, so in a shared unit the prompt is computed once for all k completions.

What crosses to the device (`Batch`) is integers only: per token its id, position, segment id (a unit's
number in its row, 0 = padding) and branch (0 = prompt, j + 1 = completion j); per completion its start
(flat r*T + t) and length. The attention mask, the scored positions and which position predicts which token
are derived on the device (`prefopt_jax.models.mask`, `prefopt_jax.train.step`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from prefopt_jax.kinds import LAYOUTS

Group = tuple[np.ndarray, Sequence[np.ndarray]]  # (prompt ids, [completion ids, ...])
SPLIT = {"padded": True, "packed_unshared": True, "shared": False, "packed": False}  # a unit per completion
ONE_PER_ROW = {"padded": True, "shared": True, "packed_unshared": False, "packed": False}
TILE = 32  # block-sparse attention's tile side (prefopt_jax.models.block_sparse uses this one)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The fixed shape of a run's micro-batches. `tiles` = 0: attention tiles are not budgeted (not
    block-sparse)."""

    rows: int
    length: int
    groups: int
    completions: int
    width: int
    scored: int
    tiles: int = 0

    @property
    def tokens(self) -> int:
        return self.rows * self.length


@dataclasses.dataclass(frozen=True)
class Unit:
    """A [prompt | completions] run of tokens in one row: `group`, and which of its completions."""

    group: int
    completions: tuple[int, ...]
    prompt_len: int
    completion_lens: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.prompt_len + sum(self.completion_lens)


def _blocks(start: int, n: int, block: int) -> int:
    return (start + n - 1) // block - start // block + 1 if n else 0


def tile_bound(offset: int, prompt: int, completions: Sequence[int], block: int = TILE) -> int:
    """An upper bound of the attention tiles a unit placed at `offset` in its row makes non-empty: its
    prompt's causal triangle, and for each completion its own triangle and its rectangle against the
    prompt (parts that share a tile are counted twice, which only loosens the bound)."""
    tri = lambda m: m * (m + 1) // 2
    p = _blocks(offset, prompt, block)
    total, start = tri(p), offset + prompt
    for n in completions:
        c = _blocks(start, n, block)
        total += tri(c) + c * p
        start += n
    return total


def units_of(group: int, prompt_len: int, completion_lens: Sequence[int], layout: str) -> list[Unit]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    lens = tuple(int(n) for n in completion_lens)
    if SPLIT[layout]:
        return [Unit(group, (j,), prompt_len, (n,)) for j, n in enumerate(lens)]
    return [Unit(group, tuple(range(len(lens))), prompt_len, lens)]


class RowPlan:
    """Units placed into the rows of one micro-batch under the geometry's per-row capacities (tokens,
    scored tokens, attention tiles); `place` places all of a group's units or none. The per-row tallies
    are Python lists (placing is the host's inner loop: a run's whole plan is simulated before it starts);
    `fill`, `scored`, `tiles` and `count` read them as arrays."""

    def __init__(self, geometry: Geometry, layout: str):
        self.geometry, self.layout = geometry, layout
        r = geometry.rows
        self._fill, self._scored, self._tiles, self._count = [0] * r, [0] * r, [0] * r, [0] * r
        self.placed: list[tuple[Unit, int, int]] = []  # (unit, row, offset)
        blocks = geometry.length // TILE
        self.causal = blocks * (blocks + 1) // 2  # a row has at most this many non-empty tiles

    fill = property(lambda self: np.asarray(self._fill, np.int64))
    scored = property(lambda self: np.asarray(self._scored, np.int64))
    tiles = property(lambda self: np.asarray(self._tiles, np.int64))
    count = property(lambda self: np.asarray(self._count, np.int64))

    def copy(self) -> RowPlan:
        out = RowPlan.__new__(RowPlan)
        out.geometry, out.layout, out.causal, out.placed = self.geometry, self.layout, self.causal, list(self.placed)
        out._fill, out._scored, out._tiles, out._count = (
            list(x) for x in (self._fill, self._scored, self._tiles, self._count)
        )
        return out

    def placement(self, prompt_len: int, completion_lens: Sequence[int], slot: int) -> list | None:
        """Where the group's units would go in group slot `slot` (first fit, each unit after the ones
        before it), as [(unit, row, offset, tiles)], or None when one of them does not fit."""
        g = self.geometry
        if not 0 <= slot < g.groups or len(completion_lens) > g.completions or max(completion_lens) > g.width:
            return None
        added: dict[int, list[int]] = {}  # row -> [tokens, scored, tiles, units] this group's earlier units add
        out = []
        for u in units_of(slot, prompt_len, completion_lens, self.layout):
            scored_u = sum(u.completion_lens)
            for row in range(g.rows):
                a = added.get(row, (0, 0, 0, 0))
                if ONE_PER_ROW[self.layout] and self._count[row] + a[3]:
                    continue
                off = self._fill[row] + a[0]
                if off + u.size > g.length or self._scored[row] + a[1] + scored_u > g.scored:
                    continue
                tiles = tile_bound(off, u.prompt_len, u.completion_lens) if g.tiles else 0
                if g.tiles and min(self._tiles[row] + a[2] + tiles, self.causal) > g.tiles:
                    continue
                added[row] = [a[0] + u.size, a[1] + scored_u, a[2] + tiles, a[3] + 1]
                out.append((u, row, off, tiles))
                break
            else:
                return None
        return out

    def commit(self, placement: list) -> None:
        """Place units where `placement` put them."""
        for u, row, off, tiles in placement:
            self._tiles[row] += tiles
            self._fill[row] += u.size
            self._scored[row] += sum(u.completion_lens)
            self._count[row] += 1
            self.placed.append((u, row, off))

    def place(self, prompt_len: int, completion_lens: Sequence[int], slot: int) -> bool:
        """Place the group in group slot `slot` (all its units, first fit) if it fits; True when it did."""
        placement = self.placement(prompt_len, completion_lens, slot)
        if placement is not None:
            self.commit(placement)
        return placement is not None


def index_dtype(length: int) -> type:
    """The dtype of positions and segment ids in rows of `length` tokens: int16 while it holds them (half
    the bytes sent to the devices), int32 past that. The step widens them to int32 on the device."""
    return np.int16 if length <= np.iinfo(np.int16).max else np.int32


@dataclasses.dataclass(frozen=True)
class Batch:
    """One micro-batch's arrays (rows `rows` of the geometry's R, every group)."""

    input_ids: np.ndarray  # int32 [R, T]
    positions: np.ndarray  # `index_dtype(T)` [R, T]
    segment_ids: np.ndarray  # `index_dtype(T)` [R, T], 0 = padding
    branch: np.ndarray  # int8 [R, T]: 0 = prompt, j + 1 = completion j
    completion_start: np.ndarray  # int32 [G, k]: flat r * T + t of each completion's first token
    completion_length: np.ndarray  # int32 [G, k]; 0 for the empty group slots

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.num_tokens / self.input_ids.size

    def model_inputs(self) -> dict:
        """Keyword arguments of the model call."""
        return {
            "input_ids": self.input_ids,
            "positions": self.positions.astype(np.int32),
            "segment_ids": self.segment_ids.astype(np.int32),
            "branch": self.branch.astype(np.int32),
        }


def spans(plan: RowPlan) -> tuple[np.ndarray, np.ndarray]:
    """Every group slot's completion (start, length), [G, k] each, from the placements."""
    g = plan.geometry
    start = np.zeros((g.groups, g.completions), np.int32)
    length = np.zeros((g.groups, g.completions), np.int32)
    for u, row, off in plan.placed:
        cursor = row * g.length + off + u.prompt_len
        for j, n in zip(u.completions, u.completion_lens, strict=True):
            start[u.group, j], length[u.group, j] = cursor, n
            cursor += n
    return start, length


def build(plan: RowPlan, groups: Sequence[Group], pad_id: int = 0, rows: slice | None = None) -> Batch:
    """The arrays of a planned micro-batch: token arrays for `rows` only (default all: each process builds
    the rows of its own devices), spans for every group. `groups[i]` are the token ids of group i."""
    g = plan.geometry
    rows = rows or slice(0, g.rows)
    r0, r1, _ = rows.indices(g.rows)
    n = r1 - r0
    ids = np.full((n, g.length), pad_id, np.int32)
    pos = np.zeros((n, g.length), index_dtype(g.length))
    seg = np.zeros((n, g.length), index_dtype(g.length))
    br = np.zeros((n, g.length), np.int8)
    next_seg: dict[int, int] = {}
    for u, row, off in plan.placed:
        if not r0 <= row < r1:
            continue
        prompt, completions = groups[u.group]
        r, p = row - r0, u.prompt_len
        ids[r, off : off + p] = prompt
        pos[r, off : off + p] = np.arange(p)
        cursor = off + p
        for j in u.completions:
            c = completions[j]
            ids[r, cursor : cursor + len(c)] = c
            pos[r, cursor : cursor + len(c)] = p + np.arange(len(c))
            br[r, cursor : cursor + len(c)] = j + 1
            cursor += len(c)
        next_seg[r] = next_seg.get(r, 0) + 1
        seg[r, off:cursor] = next_seg[r]
    start, length = spans(plan)
    return Batch(ids, pos, seg, br, start, length)


def pack(
    groups: Sequence[Group], geometry: Geometry, layout: str = "packed", pad_id: int = 0, rows: slice | None = None
) -> Batch:
    """`groups` (at most geometry.groups, all of which must fit) as one micro-batch."""
    plan = RowPlan(geometry, layout)
    for i, (p, cs) in enumerate(groups):
        if len(p) == 0:
            raise ValueError(f"group {i}: a group needs at least one prompt token (its first completion's context)")
        if not plan.place(len(p), [len(c) for c in cs], slot=i):
            raise ValueError(
                f"group {i} ({len(p)} prompt + {[len(c) for c in cs]} completion tokens) does not fit the "
                f"micro-batch {geometry} after {i} groups"
            )
    return build(plan, groups, pad_id, rows)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
