"""How a run's tokenised examples become planned, fixed-shape micro-batches: the parts of a micro-batch
(main groups; RMiPO's response-only sequences; KTO's mismatched KL pairs), their geometries, how many
micro-batches a step has room for, and the host arrays of one planned micro-batch (for some rows only: each
process builds its own)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from prefopt_jax.data.batching import TILE, Batch, Geometry, build, index_dtype, round_up
from prefopt_jax.data.planner import MicroPlan, Packer, Part, Steps, derive_geometry, plan_extent
from prefopt_jax.data.tokenize import TokenizedPair, TokenizedRanked, TokenizedUnpaired, completions_of
from prefopt_jax.kinds import InputKind

KIND_OF = {TokenizedPair: InputKind.PAIRS, TokenizedUnpaired: InputKind.UNPAIRED, TokenizedRanked: InputKind.RANKED}


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The batches of a run: the kind of examples they hold, the layout, each part's geometry
    ("main"; "response_only" for RMiPO; "kl" for KTO's reference point), the examples per step (groups:
    pairs, unpaired examples or ranked sets) and the micro-batches a step has room for (the most any step
    of the run needs)."""

    kind: InputKind
    layout: str
    geometries: dict[str, Geometry]
    max_length: int
    batch_size: int = 1
    micro_batches: int = 1

    @property
    def groups(self) -> int:
        return self.geometries["main"].groups

    def fields(self, side: Sequence[str] = ()) -> dict[str, dict | tuple]:
        """The schema of one micro-batch, name -> (shape, dtype), from which its host arrays (`host_arrays`,
        `train.batches.host_step`) and its abstract shapes (`train.batches.abstract_batch`) are made: each
        part's token arrays [R, T] and completion spans [G, K] (a dict per part); the group slots' weights,
        labels (unpaired) or scores (ranked); and the `side` inputs computed before training ("ref_logps":
        precomputed reference log-probs; "udm_prob": BCO-UDM's prompt classifier)."""
        out: dict = {}
        for part, g in self.geometries.items():
            token, span = (g.rows, g.length), (g.groups, g.completions)
            index = index_dtype(g.length)
            out[part] = {"input_ids": (token, np.int32), "positions": (token, index), "segment_ids": (token, index)}
            out[part] |= {"branch": (token, np.int8), "completion_start": (span, np.int32)}
            out[part]["completion_length"] = (span, np.int32)
        g = self.geometries["main"]
        out["weight"] = ((g.groups,), np.float32)
        if self.kind is InputKind.UNPAIRED:
            out["label"] = ((g.groups,), np.bool_)
        if self.kind is InputKind.RANKED:
            out["scores"] = ((g.groups, g.completions), np.float32)
        side_shapes = {"ref_logps": (g.groups, g.completions, g.width), "udm_prob": (g.groups,)}
        return out | {name: (side_shapes[name], np.float32) for name in side}


def _main_group(e) -> tuple[np.ndarray, list[np.ndarray]]:
    return e.prompt, completions_of(e)


def _alone(c: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """A completion scored alone (no prompt, no BOS): its first token is the context, the rest are scored
    (RMiPO's response-level log-probs)."""
    return c[:1], [c[1:]]


def _kl_group(prompt: np.ndarray, completion: np.ndarray, max_length: int):
    return prompt, [completion[: max_length - len(prompt)]]


def _lens(group) -> tuple[int, tuple[int, ...]]:
    p, cs = group
    return len(p), tuple(len(c) for c in cs)


def parts(spec: BatchSpec, examples: Sequence) -> dict[str, Part]:
    """The packer's parts for these examples."""
    main_lens = [_lens(_main_group(e)) for e in examples]
    out = {"main": Part(spec.geometries["main"], spec.layout, lambda i, slot, g: [(slot, *main_lens[i])])}
    if "response_only" in spec.geometries:
        alone = [[_lens(_alone(e.chosen)), _lens(_alone(e.rejected))] for e in examples]
        out["response_only"] = Part(
            spec.geometries["response_only"],
            spec.layout,
            lambda i, slot, g: [(slot, *alone[i][0]), (g + slot, *alone[i][1])],
        )
    if "kl" in spec.geometries:

        def kl(chosen: Sequence[int], g: int):
            n = len(chosen)
            return [
                (s, *_lens(_kl_group(examples[i].prompt, examples[chosen[(s - 1) % n]].completion, spec.max_length)))
                for s, i in enumerate(chosen)
            ]

        out["kl"] = Part(spec.geometries["kl"], "shared", groups_after=kl)
    return out


def packer(
    spec: BatchSpec, examples: Sequence, *, seed: int = 0, shuffle: bool = True, state=None, mixture=None
) -> Packer:
    """The run's plan over `examples`: steps of `spec.batch_size` (or, `shuffle=False`, a single pass)."""
    return Packer(
        len(examples), parts(spec, examples), batch_size=spec.batch_size, seed=seed, shuffle=shuffle, state=state,
        mixture=mixture,
    )  # fmt: skip


def steps(spec: BatchSpec, examples: Sequence, *, seed: int = 0, mixture=None) -> Steps:
    """The training stream of steps (each a list of micro-batch plans) as a Grain dataset (endless; see
    `data.planner`)."""
    return Steps(len(examples), parts(spec, examples), batch_size=spec.batch_size, seed=seed, mixture=mixture)


def host_arrays(
    spec: BatchSpec, plan: MicroPlan, examples: Sequence, pad_id: int = 0, rows: dict[str, slice] | None = None
) -> dict:
    """One micro-batch's host arrays: each part's `Batch` (token arrays for `rows[part]` only, default all),
    "weight" [G] (0 for empty group slots), and "label" [G] (unpaired) or "scores" [G, K] (ranked)."""
    rows = rows or {}
    g = spec.groups
    chosen = [examples[i] for i in plan.examples]
    out: dict = {"main": build(plan.parts["main"], [_main_group(e) for e in chosen], pad_id, rows.get("main"))}
    fields = spec.fields()
    for name in ("weight", "label", "scores"):  # each example's own value, by the attribute of that name
        if name in fields:
            out[name] = np.zeros(*fields[name])  # empty slots (and the step's unused room) stay 0
            if chosen:
                out[name][: len(chosen)] = [getattr(e, name) for e in chosen]
    if "response_only" in plan.parts:
        alone = {s: _alone(e.chosen) for s, e in enumerate(chosen)} | {
            g + s: _alone(e.rejected) for s, e in enumerate(chosen)
        }
        out["response_only"] = build(plan.parts["response_only"], alone, pad_id, rows.get("response_only"))
    if "kl" in plan.parts:
        n = len(chosen)
        kl = [_kl_group(e.prompt, chosen[(s - 1) % n].completion, spec.max_length) for s, e in enumerate(chosen)]
        out["kl"] = build(plan.parts["kl"], kl, pad_id, rows.get("kl"))
    return out


def batch_spec(
    examples: Sequence,
    *,
    layout: str,
    batch_size: int,
    max_length: int,
    steps: int | None = None,
    train: Sequence | None = None,
    seed: int = 0,
    mixture=None,
    response_only: bool = False,
    row_multiple: int = 1,
    length: int | None = None,
    rows: int | None = None,
    tiles: bool = False,
    length_multiple: int = 128,
    min_length: int = 0,
) -> BatchSpec:
    """The batch spec: the geometry sized from `examples` (train and held-out together, so every one fits;
    rows of at least `min_length` tokens where they hold several examples; see `planner.derive_geometry`),
    then the run's `steps` steps over `train` (default `examples`; default steps: one epoch) planned ahead
    with `seed` and `mixture` as the run will: the group slots are the most examples one micro-batch holds,
    `micro_batches` the most micro-batches one step needs. The response-only and KL parts get geometries every
    selection fits."""
    kind = KIND_OF[type(examples[0])]
    train = examples if train is None else train
    lens = [_lens(_main_group(e)) for e in examples]
    prompt = np.asarray([p for p, _ in lens])
    completions = np.asarray([c for _, c in lens])
    common = dict(row_multiple=row_multiple, tiles=tiles, seed=seed, length_multiple=length_multiple)
    main = derive_geometry(
        prompt, completions, layout=layout, batch_size=batch_size, length=length, rows=rows, min_length=min_length,
        **common,
    )  # fmt: skip
    geometries = {"main": main}
    if response_only:  # as many tokens per micro-batch as the main part: each example's responses fit beside it
        alone = np.asarray([len(c) - 1 for e in examples for c in (e.chosen, e.rejected)])[:, None]
        rows_alone = -(-main.tokens // round_up(int(alone.max()), length_multiple))
        geometries["response_only"] = derive_geometry(
            np.ones(len(alone), np.int64), alone, layout=layout, batch_size=2 * batch_size, rows=rows_alone, **common
        )
    spec = BatchSpec(kind, layout, geometries, max_length, batch_size)
    slots, micro = plan_extent(packer(spec, train, seed=seed, mixture=mixture), steps or -(-len(train) // batch_size))
    per_example = {"main": 1, "response_only": 2}  # group slots an example takes in each part
    geometries = {name: dataclasses.replace(g, groups=slots * per_example[name]) for name, g in geometries.items()}
    if kind is InputKind.UNPAIRED:  # any (prompt_i, completion_j) holds at most max_length tokens: a row each
        t = round_up(max_length, length_multiple)
        nb = t // TILE  # no row has more non-empty tiles than one causal triangle
        geometries["kl"] = Geometry(
            rows=round_up(slots, row_multiple), length=t, groups=slots, completions=1, width=max_length,
            scored=t, tiles=nb * (nb + 1) // 2 if tiles else 0,
        )  # fmt: skip
    return BatchSpec(kind, layout, geometries, max_length, batch_size, micro)


__all__ = ["Batch", "BatchSpec", "batch_spec", "host_arrays", "packer", "parts", "steps"]
