"""Which examples go into which micro-batch: deterministic, resumable, the same on every process.

A step holds exactly `batch_size` examples: the ones at the next `batch_size` positions of the training
stream (`data.order`: Grain's global index shuffle, reshuffled each epoch, or its weighted mix of per-source
streams), so a step may hold the last examples of one epoch and the first of the next. They are bin-packed
into micro-batches of the run's one `Geometry` (R rows of T tokens, T from the longest example): first-fit
decreasing, each example whole into the first micro-batch it fits, so a micro-batch holds as many whole
examples as fit and a step as few micro-batches as its examples need. The step computes the used ones and
skips the rest of its fixed number (`plan_extent` finds the most any step of the run needs, ahead of the run,
from its seeded order: no step ever overflows). Nothing is dropped, reordered across steps or deferred.
The plan depends on the examples' lengths alone, so every process of a multi-host run computes the same plan
(integers) and builds only the rows of its own devices: processes split the packed rows, not the examples, so
a multi-host run trains on exactly the batches of a single-host one. The `Packer` is a Grain iterator (a
`Steps` dataset's), so the rest of the input pipeline is Grain's (`train.pipeline`); its state is the stream
position.

A micro-batch can have several *parts*, each a sub-batch with its own geometry: the main groups, RMiPO's
response-only sequences (placed with each example: it is taken only when both fit), KTO's mismatched KL
pairs (made from the micro-batch's own selection afterwards, in a geometry they always fit), so these stay
with their own examples however many a micro-batch holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import grain
import numpy as np

from prefopt_jax.data.batching import ONE_PER_ROW, SPLIT, TILE, Geometry, RowPlan, round_up, tile_bound, units_of
from prefopt_jax.data.order import Order

# epochs derive_geometry samples at most for its per-row budgets (a small set: several epochs' orders)
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
    """Plans a run's steps over `n` examples (see the module docstring): `next_step()` is the next optimizer
    step's micro-batches (exactly `batch_size` examples, bin-packed). `shuffle=False` reads the examples once
    in order instead (held-out evaluation): `next_micro()` is the next micro-batch, filled while they fit."""

    def __init__(
        self,
        n: int,
        parts: dict[str, Part],
        *,
        batch_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        state: dict | None = None,
        mixture: tuple[np.ndarray, Sequence[float]] | None = None,
    ):
        super().__init__()
        if n < 1:
            raise ValueError("no examples to batch")
        if "main" not in parts:
            raise ValueError("a micro-batch needs a 'main' part")
        if shuffle and (batch_size is None or batch_size < 1):
            raise ValueError(f"a training stream needs batch_size >= 1 examples per step, got {batch_size}")
        if mixture is not None:
            source_of, weights = np.asarray(mixture[0]), [float(w) for w in mixture[1]]
            empty = [s for s in range(len(weights)) if not np.any(source_of == s)]
            if len(source_of) != n or empty:
                raise ValueError(f"mixture sources {empty} have no training examples" if empty else "mixture size")
            mixture = (source_of, weights)
        self.n, self.parts, self.seed, self.shuffle, self.mixture = n, parts, seed, shuffle, mixture
        self.batch_size = batch_size
        self.groups = parts["main"].geometry.groups
        self.order = Order(n, seed=seed, mixture=mixture) if shuffle else None
        self.cursor = 0  # the next stream position
        self._sizes: dict[int, int] = {}
        if state is not None:
            self.restore(state)

    # ---- state --------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Epochs of the stream read so far (a mixture's epoch: n draws)."""
        return self.cursor // self.n

    def state(self) -> dict:
        """Where the next step starts (JSON-serialisable)."""
        return {
            "next_index": self.cursor,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_examples": self.n,
            "mixture": None if self.mixture is None else self.mixture[1],
        }

    def restore(self, state: dict) -> None:
        if "next_index" not in state or "batch_size" not in state:
            raise ValueError(
                f"packer state {state} was saved by an earlier version, whose data order this version does "
                "not reproduce: start the run in a new output.dir (or set output.resume=false)"
            )
        weights = None if self.mixture is None else self.mixture[1]
        saved = (state["num_examples"], state["seed"], state["mixture"], state["batch_size"])
        if saved != (self.n, self.seed, weights, self.batch_size):
            raise ValueError(
                f"packer state {state} was saved for {saved[0]} examples, seed {saved[1]}, mixture weights "
                f"{saved[2]} and {saved[3]} per step; this run has {self.n}, {self.seed}, {weights} and "
                f"{self.batch_size}"
            )
        self.cursor = int(state["next_index"])

    get_state, set_state = state, restore  # Grain's iterator protocol

    # ---- planning -----------------------------------------------------------------------------------

    def empty(self) -> MicroPlan:
        """A micro-batch with nothing in it (a step's unused micro-batch slots are these: the step skips them)."""
        return MicroPlan([], {name: RowPlan(part.geometry, part.layout) for name, part in self.parts.items()})

    def _size(self, example: int) -> int:
        """The example's tokens in the main part (what the packing sorts by)."""
        if example not in self._sizes:
            groups = self.parts["main"].groups_of(example, 0, self.groups)
            self._sizes[example] = sum(p + sum(cs) for _, p, cs in groups)
        return self._sizes[example]

    def _add(self, plan: MicroPlan, example: int) -> bool:
        """Place the example in every part that takes it per example, all or nothing; True when it did."""
        slot = len(plan.examples)
        if slot >= self.groups:
            return False
        trials: dict[str, tuple[RowPlan, list | None]] = {}
        for name, part in self.parts.items():
            if part.groups_of is None:
                continue
            rp, groups = plan.parts[name], part.groups_of(example, slot, self.groups)
            if len(groups) == 1:  # the common case: one group, placed without copying the plan
                s, p, cs = groups[0]
                placement = rp.placement(p, cs, s)
                if placement is None:
                    return False
                trials[name] = (rp, placement)
            else:  # several groups (RMiPO's two responses): each after the one before, on a copy
                trial = rp.copy()
                if not all(trial.place(p, cs, slot=s) for s, p, cs in groups):
                    return False
                trials[name] = (trial, None)
        for name, (rp, placement) in trials.items():
            if placement is None:
                plan.parts[name] = rp
            else:
                rp.commit(placement)
        plan.examples.append(example)
        return True

    def _finish(self, plan: MicroPlan) -> MicroPlan:
        """The parts made from the whole selection (KTO's mismatched pairs), which always fit."""
        for name, part in self.parts.items():
            if part.groups_after is None:
                continue
            for group_slot, p, cs in part.groups_after(plan.examples, self.groups):
                if not plan.parts[name].place(p, cs, slot=group_slot):
                    raise TooLarge(f"part {name!r}: group {group_slot} does not fit its geometry {part.geometry}")
        return plan

    def pack(self, examples: Sequence[int]) -> list[MicroPlan]:
        """`examples` in as few micro-batches as first-fit decreasing finds: the largest first, each into the
        first micro-batch it fits (a new one when none does)."""
        plans: list[MicroPlan] = []
        for i in sorted(examples, key=lambda i: -self._size(i)):  # stable: equal sizes keep the stream's order
            if not any(self._add(plan, i) for plan in plans):
                plans.append(self.empty())
                if not self._add(plans[-1], i):
                    raise TooLarge(f"example {i} does not fit an empty micro-batch of {self.parts['main'].geometry}")
        return [self._finish(plan) for plan in plans]

    def next_step(self) -> list[MicroPlan]:
        """The micro-batches of the next optimizer step: the examples at the next `batch_size` stream positions."""
        if not self.shuffle:
            raise ValueError("a single pass (shuffle=False) is read a micro-batch at a time: next_micro()")
        examples = [self.order[p] for p in range(self.cursor, self.cursor + self.batch_size)]
        self.cursor += self.batch_size
        return self.pack(examples)

    def next_micro(self) -> MicroPlan | None:
        """A single pass's next micro-batch: the next examples in order while they fit (None at the end)."""
        if self.shuffle:
            raise ValueError("a training stream is read a step at a time: next_step()")
        plan = self.empty()
        while self.cursor < self.n and self._add(plan, self.cursor):
            self.cursor += 1
        if not plan.examples:
            if self.cursor < self.n:
                raise TooLarge(
                    f"example {self.cursor} does not fit an empty micro-batch of {self.parts['main'].geometry}"
                )
            return None
        return self._finish(plan)

    def __next__(self):
        if self.shuffle:
            return self.next_step()
        plan = self.next_micro()
        if plan is None:
            raise StopIteration
        return plan


class Steps(grain.IterDataset):
    """The packer as an endless Grain dataset of steps (each a list of `MicroPlan`s): `iter()` starts a
    `Packer` at the stream's start (its `set_state` moves it), so Grain's transformations and prefetching
    apply downstream."""

    def __init__(self, n: int, parts: dict[str, Part], **packer_options):
        super().__init__()
        self.n, self.parts, self.packer_options = n, parts, packer_options

    def __iter__(self) -> Packer:
        return Packer(self.n, self.parts, **self.packer_options)


def row_shape(
    longest: int,
    completions: int,
    *,
    layout: str,
    row_multiple: int,
    length: int | None,
    rows: int | None,
    length_multiple: int,
    min_length: int = 0,
    step_tokens: int = 0,
) -> tuple[int, int]:
    """(rows R, row length T) of a run's micro-batches: T fits the longest unit (rounded up to
    `length_multiple`, or `length`), R is one row per device that splits the rows (or `rows`, rounded up to a
    multiple of them); a layout with one unit per row needs at least a group's units. Where rows hold several
    units, T is at least `min_length`, or a row's share of a step (`step_tokens` over R) if that is less: short
    examples then pack several to a row instead of a micro-batch each (each micro-batch costs the step a loop
    iteration of fixed overhead)."""
    if length is not None and longest > length:
        raise ValueError(f"the longest example needs rows of {longest} tokens; data.pack_length is {length}")
    per_group = completions if SPLIT[layout] and ONE_PER_ROW[layout] else 1
    r = round_up(max(rows or 1, per_group), row_multiple)
    t = length or round_up(longest, length_multiple)
    if length is None and not ONE_PER_ROW[layout]:
        t = max(t, round_up(min(min_length, -(-step_tokens // r)), length_multiple))
    return r, t


def derive_geometry(
    prompt_lens: np.ndarray,
    completion_lens: np.ndarray,
    *,
    layout: str,
    batch_size: int,
    row_multiple: int = 1,
    length: int | None = None,
    rows: int | None = None,
    tiles: bool = False,
    seed: int = 0,
    length_multiple: int = 128,
    min_length: int = 0,
    sample_steps: int = 64,
) -> Geometry:
    """A run's micro-batch geometry from its examples' lengths (`prompt_lens` [N], `completion_lens` [N, k]):
    the shape from the longest example, the devices and `min_length` (`row_shape`), and per-row budgets of scored tokens
    and attention tiles (`tiles`: block-sparse) 10% above the most any row held over the first
    `sample_steps` steps packed without them, never below what the largest example needs in an empty row.
    Its group slots are `batch_size` (a step's examples): `collate.batch_spec` narrows them to the most the
    run's own plan puts in one micro-batch."""
    prompt_lens, completion_lens = np.asarray(prompt_lens), np.asarray(completion_lens)
    n, k = completion_lens.shape
    units = [units_of(0, int(p), cs, layout) for p, cs in zip(prompt_lens, completion_lens, strict=True)]
    longest = max(u.size for us in units for u in us)
    step_tokens = int(batch_size * np.mean([sum(u.size for u in us) for us in units]))
    r, t = row_shape(
        longest, k, layout=layout, row_multiple=row_multiple, length=length, rows=rows,
        length_multiple=length_multiple, min_length=min_length, step_tokens=step_tokens,
    )  # fmt: skip
    width = int(completion_lens.max())
    own_scored = max(sum(u.completion_lens) for us in units for u in us)
    own_tiles = max(tile_bound(0, u.prompt_len, u.completion_lens) for us in units for u in us)
    sizes = lambda i, slot, g: [(slot, int(prompt_lens[i]), tuple(int(c) for c in completion_lens[i]))]
    free = Geometry(r, t, batch_size, k, width, t, 0)  # no scored or tile budget
    packer = Packer(n, {"main": Part(free, layout, sizes)}, batch_size=batch_size, seed=seed)
    scored, tile_counts = [own_scored], [own_tiles]
    for _ in range(min(sample_steps, -(-n // batch_size) * SIMULATED_EPOCHS)):
        for plan in packer.next_step():
            rp = plan.parts["main"]
            per_row = np.zeros(r, np.int64)
            for u, row, off in rp.placed:
                per_row[row] += tile_bound(off, u.prompt_len, u.completion_lens)
            scored += rp.scored[rp.count > 0].tolist()
            tile_counts += per_row[rp.count > 0].tolist()
    blocks = t // TILE
    c = min(t, max(round_up(int(max(scored) * 1.1), 8), own_scored))
    p = min(max(round_up(int(max(tile_counts) * 1.1), 8), own_tiles), blocks * (blocks + 1) // 2)
    return Geometry(r, t, batch_size, k, width, c, p if tiles else 0)


def plan_extent(packer: Packer, steps: int) -> tuple[int, int]:
    """(the most examples one micro-batch holds, the most micro-batches one step needs) over the run's
    `steps` steps, planned ahead from its seeded order (the packer is left after them)."""
    slots = micro = 1
    for _ in range(steps):
        plans = packer.next_step()
        micro = max(micro, len(plans))
        slots = max(slots, *(len(p.examples) for p in plans))
    return slots, micro
