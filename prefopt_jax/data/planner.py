"""Which examples go into which micro-batch, and where: deterministic, resumable, the same on every process.

The examples come in the order of `data.order` (Grain's global index shuffle, reshuffled each epoch, or its
weighted mix of per-source streams). Micro-batches of a fixed `Geometry` are filled from that stream in
order: an example that does not fit the current micro-batch (its rows are full, or its scored-token or tile
budget is spent) waits and goes first into the next one, so none is dropped and the order is kept up to those
waits. Near an epoch's end the lookahead may take the next epoch's first examples (as packing pipelines
do): each stream position is trained exactly once, and an example met again while it is held or waiting
waits too, so no micro-batch holds an example twice. A micro-batch takes at most G examples; it holds
fewer only when more than `lookahead` of the examples after it do not fit, or a single pass runs out, and
its empty group slots have weight 0.
The plan depends on the examples' lengths alone, so every process of a multi-host run computes the same plan
(integers, microseconds) and builds only the rows of its own devices: processes split the packed rows, not
the examples, so a multi-host run trains on exactly the batches of a single-host one. The `Packer` is a
Grain iterator (a `MicroBatches` dataset's), so the rest of the input pipeline is Grain's
(`train.pipeline`); its state (the stream position, the examples waiting) is all a resumed run needs.

A micro-batch can have several *parts*, each a sub-batch with its own geometry: the main groups, RMiPO's
response-only sequences (placed with each example: it is taken only when both fit), KTO's mismatched KL
pairs (made from the selection afterwards, in a geometry they always fit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import grain
import numpy as np

from prefopt_jax.data.batching import ONE_PER_ROW, SPLIT, TILE, Geometry, RowPlan, round_up, tile_bound, units_of
from prefopt_jax.data.order import Order

# row lengths derive_geometry tries, as multiples of the longest unit: in eighths, because with a few rows per
# micro-batch the total (rows x length) moves in large steps, and a finer length may find a fuller one
LENGTH_FACTORS = tuple(1 + k / 8 for k in range(9))
# epochs derive_geometry simulates at most (a small set's geometry must hold several epochs' orders; more
# would only cost time: every candidate geometry is simulated)
SIMULATED_EPOCHS = 8
# (example index, its position in the micro-batch, G) -> [(group slot, prompt length, completion lengths)]
GroupsOf = Callable[[int, int, int], list[tuple[int, int, tuple[int, ...]]]]
# (examples selected, G) -> [(group slot, prompt length, completion lengths)]
GroupsAfter = Callable[[Sequence[int], int], list[tuple[int, int, tuple[int, ...]]]]


@dataclasses.dataclass(frozen=True)
class Part:
    """A sub-batch: its geometry and layout, and either the groups each example adds (`groups_of`, checked
    while selecting) or the groups the whole selection makes (`groups_after`, which must always fit)."""

    geometry: Geometry
    layout: str
    groups_of: GroupsOf | None = None
    groups_after: GroupsAfter | None = None


@dataclasses.dataclass
class MicroPlan:
    examples: list[int]  # example indices in group-slot order
    parts: dict[str, RowPlan]


class TooLarge(ValueError):
    """An example that does not fit even an empty micro-batch."""


class Packer(grain.DatasetIterator):
    """Plans micro-batches over `n` examples (see the module docstring): `next(packer)` is the next
    micro-batch's `MicroPlan`. `shuffle=False` goes through the examples once in order (held-out
    evaluation) and then stops."""

    def __init__(
        self,
        n: int,
        parts: dict[str, Part],
        *,
        seed: int = 0,
        shuffle: bool = True,
        lookahead: int | None = None,
        state: dict | None = None,
        mixture: tuple[np.ndarray, Sequence[float]] | None = None,
    ):
        super().__init__()
        if n < 1:
            raise ValueError("no examples to batch")
        if "main" not in parts:
            raise ValueError("a micro-batch needs a 'main' part")
        if mixture is not None:
            source_of, weights = np.asarray(mixture[0]), [float(w) for w in mixture[1]]
            empty = [s for s in range(len(weights)) if not np.any(source_of == s)]
            if len(source_of) != n or empty:
                raise ValueError(f"mixture sources {empty} have no training examples" if empty else "mixture size")
            mixture = (source_of, weights)
        self.n, self.parts, self.seed, self.shuffle, self.mixture = n, parts, seed, shuffle, mixture
        self.groups = parts["main"].geometry.groups
        self.lookahead = lookahead if lookahead is not None else 4 * self.groups
        self.order = Order(n, seed=seed, mixture=mixture) if shuffle else None
        self.cursor, self.deferred = 0, []  # the next stream position; examples taken from it, waiting
        if state is not None:
            self.restore(state)

    # ---- state --------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Epochs of the stream read so far (a mixture's epoch: n draws)."""
        return self.cursor // self.n

    def state(self) -> dict:
        """Where the next micro-batch starts (JSON-serialisable)."""
        return {
            "next_index": self.cursor,
            "deferred": list(self.deferred),
            "seed": self.seed,
            "num_examples": self.n,
            "mixture": None if self.mixture is None else self.mixture[1],
        }

    def restore(self, state: dict) -> None:
        if "next_index" not in state:
            raise ValueError(
                f"packer state {state} was saved by an earlier version, whose data order this version does "
                "not reproduce: start the run in a new output.dir (or set output.resume=false)"
            )
        weights = None if self.mixture is None else self.mixture[1]
        if (state.get("num_examples", self.n), state.get("seed", self.seed), state.get("mixture")) != (
            self.n,
            self.seed,
            weights,
        ):
            raise ValueError(
                f"packer state {state} was saved for {state.get('num_examples')} examples, seed "
                f"{state.get('seed')} and mixture weights {state.get('mixture')}; this run has {self.n}, "
                f"{self.seed} and {weights}"
            )
        self.cursor = int(state["next_index"])
        self.deferred = [int(i) for i in state["deferred"]]

    get_state, set_state = state, restore  # Grain's iterator protocol

    @property
    def exhausted(self) -> bool:
        """A single pass (shuffle=False) has placed every example."""
        return not self.shuffle and self.cursor >= self.n and not self.deferred

    # ---- planning -----------------------------------------------------------------------------------

    def _take(self, plans: dict[str, RowPlan], example: int, slot: int) -> bool:
        """Place the example's groups in every part that takes them per example, all or nothing."""
        trial = {name: plans[name].copy() for name, part in self.parts.items() if part.groups_of is not None}
        for name, rp in trial.items():
            for group_slot, p, cs in self.parts[name].groups_of(example, slot, self.groups):
                if not rp.place(p, cs, slot=group_slot):
                    return False
        plans.update(trial)
        return True

    def _next_candidate(self) -> int | None:
        if not self.shuffle and self.cursor >= self.n:
            return None
        i = self.order[self.cursor] if self.shuffle else self.cursor
        self.cursor += 1
        return i

    def next_micro(self) -> MicroPlan | None:
        """The next micro-batch's plan (None once a single pass is exhausted)."""
        if self.exhausted:
            return None
        plans = {name: RowPlan(part.geometry, part.layout) for name, part in self.parts.items()}
        chosen: list[int] = []
        waiting, self.deferred = self.deferred, []

        def take(i: int) -> bool:
            # an example met again (the lookahead reached the next epoch) waits: never twice in one micro-batch
            if len(chosen) < self.groups and i not in chosen and self._take(plans, i, len(chosen)):
                chosen.append(i)
                return True
            if not chosen:  # it does not fit even an empty micro-batch: it never would
                raise TooLarge(f"example {i} does not fit an empty micro-batch of {self.parts['main'].geometry}")
            self.deferred.append(i)
            return False

        for i in waiting:
            take(i)
        misses = 0
        while len(chosen) < self.groups and misses <= self.lookahead:
            i = self._next_candidate()
            if i is None:
                break
            misses += not take(i)
        if not chosen:
            return None
        for name, part in self.parts.items():
            if part.groups_after is None:
                continue
            for group_slot, p, cs in part.groups_after(chosen, self.groups):
                if not plans[name].place(p, cs, slot=group_slot):
                    raise TooLarge(f"part {name!r}: group {group_slot} does not fit its geometry {part.geometry}")
        return MicroPlan(chosen, plans)

    def next_step(self, micro_batches: int) -> list[MicroPlan]:
        """The micro-batches of one optimizer step."""
        return [self.next_micro() for _ in range(micro_batches)]

    def __next__(self) -> MicroPlan:
        plan = self.next_micro()
        if plan is None:
            raise StopIteration
        return plan


class MicroBatches(grain.IterDataset):
    """The packer as a Grain dataset of `MicroPlan`s: `iter()` starts a `Packer` at the stream's start (its
    `set_state` moves it), so Grain's transformations and prefetching apply downstream."""

    def __init__(self, n: int, parts: dict[str, Part], **packer_options):
        super().__init__()
        self.n, self.parts, self.packer_options = n, parts, packer_options

    def __iter__(self) -> Packer:
        return Packer(self.n, self.parts, **self.packer_options)


def derive_geometry(
    prompt_lens: np.ndarray,
    completion_lens: np.ndarray,
    *,
    layout: str,
    groups: int,
    row_multiple: int = 1,
    length: int | None = None,
    rows: int | None = None,
    tiles: bool = False,
    seed: int = 0,
    length_multiple: int = 128,
    sample: int = 256,
    max_short: float = 0.01,
) -> Geometry:
    """A run's micro-batch geometry from its examples' lengths (`prompt_lens` [N], `completion_lens` [N, k]):
    the fewest tokens per micro-batch (rows x row length) for which, over the first `sample` micro-batches
    of a simulated run (up to SIMULATED_EPOCHS epochs: a small set must fit several epochs' orders, not one),
    at most a `max_short` fraction hold fewer than `groups` groups and at most 4 x `groups`
    examples wait at once. Row lengths tried: the longest unit rounded up to `length_multiple` and 1.125,
    1.25, ... 2 times that (or `length`); rows: from the mean demand up, in multiples of `row_multiple` (or
    `rows`). Per-row budgets of scored tokens and attention tiles (`tiles`: block-sparse) are 10% above the
    most any row held in a packing without row limit, and never below what the largest example needs in an
    empty row, so every example fits."""
    prompt_lens, completion_lens = np.asarray(prompt_lens), np.asarray(completion_lens)
    n, k = completion_lens.shape
    units = [units_of(0, int(p), cs, layout) for p, cs in zip(prompt_lens, completion_lens, strict=True)]
    longest = max(u.size for us in units for u in us)
    if length is not None and longest > length:
        raise ValueError(f"the longest example needs rows of {longest} tokens; data.pack_length is {length}")
    width = int(completion_lens.max())
    own_scored = max(sum(u.completion_lens) for us in units for u in us)
    own_tiles = max(tile_bound(0, u.prompt_len, u.completion_lens) for us in units for u in us)
    per_group = k if SPLIT[layout] else 1
    sizes = lambda i, slot, g: [(slot, int(prompt_lens[i]), tuple(int(c) for c in completion_lens[i]))]

    def simulate(g: Geometry, lookahead: int | None = None, one_pass: bool = False):
        packer = Packer(n, {"main": Part(g, layout, sizes)}, seed=seed, lookahead=lookahead)
        for _ in range(sample):
            yield packer.next_micro(), packer
            if packer.epoch >= (1 if one_pass else SIMULATED_EPOCHS):  # enough orders of a small set seen
                return

    def budgets(t: int) -> tuple[int, int]:
        """Scored tokens and tile bound per row, from a packing without row or budget limits."""
        scored, tile_counts = [own_scored], [own_tiles]
        for plan, _ in simulate(
            Geometry(groups * per_group, t, groups, k, width, 10**9, 0), lookahead=0, one_pass=True
        ):
            rp = plan.parts["main"]
            per_row = np.zeros(rp.geometry.rows, np.int64)
            for u, row, off in rp.placed:
                per_row[row] += tile_bound(off, u.prompt_len, u.completion_lens)
            scored += rp.scored[rp.count > 0].tolist()
            tile_counts += per_row[rp.count > 0].tolist()
        blocks = t // TILE
        c = min(t, max(round_up(int(max(scored) * 1.1), 8), own_scored))
        p = min(max(round_up(int(max(tile_counts) * 1.1), 8), own_tiles), blocks * (blocks + 1) // 2)
        return c, p if tiles else 0

    def enough(g: Geometry) -> bool:
        short = waiting = count = 0
        for plan, packer in simulate(g):
            count += 1
            short += len(plan.examples) < groups
            waiting = max(waiting, len(packer.deferred))
        return short <= max_short * count and waiting <= 4 * groups

    base = round_up(longest, length_multiple)
    lengths = [length] if length else sorted({round_up(int(base * f), length_multiple) for f in LENGTH_FACTORS})
    demand = groups * float(np.mean([sum(u.size for u in us) for us in units]))
    best = None
    for t in lengths:
        scored, tile_budget = budgets(t)
        most = round_up(groups * per_group, row_multiple)  # a row per unit: always enough
        if rows is not None:
            candidates = [round_up(rows, row_multiple)]
        elif ONE_PER_ROW[layout]:
            candidates = [most]
        else:
            candidates = range(round_up(max(1, int(np.ceil(demand / t))), row_multiple), most + 1, row_multiple)
        for r in candidates:
            g = Geometry(r, t, groups, k, width, scored, tile_budget)
            if r == candidates[-1] or enough(g):
                break
        if best is None or g.tokens < best.tokens:
            best = g
    return best
