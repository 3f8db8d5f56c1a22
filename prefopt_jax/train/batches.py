"""From the config's data section to what the step consumes: prepared examples, the run's fixed batch
geometry, and planned micro-batches built on the host (each process only the rows of its own devices) and
placed on the mesh."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefopt_jax import data, losses
from prefopt_jax.config import ConfigError, DataSection, TrainSection, cache_folder
from prefopt_jax.data.synthetic import comparison_pairs
from prefopt_jax.kinds import InputKind

ROW_AXES = ("data", "fsdp")
TOKEN_ARRAYS = ("input_ids", "positions", "segment_ids", "branch")


def load_data(
    d: DataSection, seed: int, tokenizer, loss: losses.Loss, splits=("train", "eval")
) -> tuple[data.Prepared, list[str] | None]:
    """The train and held-out examples (only the `splits` asked for are tokenised; and, for the built-in
    task, the held-out answers), through the tokenised cache (`data.cache`). Unpaired losses train on
    unpaired files as they are, and on pairs read as two unpaired examples (chosen desirable, rejected
    undesirable); held-out pairs stay pairs, so reward accuracy is measured the same way for every loss, and
    held-out unpaired examples are scored by the loss itself. With `data.ranked_from_pairs`, the pairs of
    each prompt become one ranked set (`ranked_sets`), held out or trained on as a whole. `seed` (train.seed)
    draws the built-in task, the held-out split and the kept subsets."""
    if d.source == "builtin:compare":
        train_rows, eval_rows = comparison_pairs(d.num_train, d.num_eval, seed=seed)
        kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length)
        train = data.prepare(train_rows, tokenizer, splits=("train",) if "train" in splits else (), **kw)
        held = data.prepare(eval_rows, tokenizer, splits=("train",) if "eval" in splits else (), **kw)
        prepared, answers = data.Prepared(train.train, held.train, train.report), [r["answer"] for r in eval_rows]
    else:
        sources = (d.source,) if isinstance(d.source, str) else d.source
        kw = dict(
            format=d.format,
            max_length=d.max_length,
            max_prompt_length=d.max_prompt_length,
            on_error=d.on_error,
            eval_fraction=d.eval_fraction,
            seed=seed,
            splits=splits,
            cache_dir=cache_folder(d.cache, "tokenized"),
            workers=d.workers,
        )
        if d.ranked_from_pairs:  # every row is read: a prompt's pairs are one set, held out or not as a whole
            kw |= {"eval_fraction": 0.0, "splits": ("train",)}
        kw |= {"source_splits": d.source_splits, "keep": d.keep_fractions, "eval_rows": d.eval_rows}
        prepared = _first_process_writes(lambda: data.prepare_mixture(sources, d.weights, tokenizer, **kw))
        if d.ranked_from_pairs:
            prepared = ranked_sets(prepared, d.ranked_from_pairs, d.eval_fraction, seed, splits)
        answers = None
    check_input_kind(loss, prepared, d.source)
    if loss.kind is InputKind.UNPAIRED:  # pairs become two examples each; unpaired files are used as they are
        train, shares = [], []
        for share in prepared.sources:
            part = data.unpaired_from_pairs(prepared.train[share.train])
            shares.append(dataclasses.replace(share, train=slice(len(train), len(train) + len(part))))
            train += part
        prepared = dataclasses.replace(
            prepared, train=train if shares else data.unpaired_from_pairs(prepared.train), sources=shares
        )
    return prepared, answers


def ranked_sets(prepared: data.Prepared, k: int, eval_fraction: float, seed: int, splits) -> data.Prepared:
    """The prepared pairs of one source as ranked sets of `k` responses per prompt, split seeded by set; the
    pairs of prompts with another number of responses are counted as dropped in the report."""
    pairs = [e for e in prepared.train if isinstance(e, data.TokenizedPair)]
    if len(pairs) != len(prepared.train):
        raise ConfigError(f"data.ranked_from_pairs={k} needs a file of pairs; {prepared.sources[0].name} holds others")
    sets, left = data.ranked_from_pairs(pairs, k)
    for report in {id(r): r for r in (prepared.report, prepared.sources[0].report)}.values():  # run's, source's
        for e, n in left:
            why = f"{e.origin}: its prompt has {n} distinct responses, not {k}"
            report.drop(data.DataError(why, f"not in a set of {k}"))
    if not sets:
        raise ConfigError(
            f"data.ranked_from_pairs={k}: no prompt of {prepared.sources[0].name} has {k} distinct responses"
        )
    train_idx, eval_idx = data.split_indices(len(sets), eval_fraction, seed)
    train = [sets[i] for i in train_idx] if "train" in splits else []
    held = [sets[i] for i in eval_idx] if "eval" in splits else []
    share = dataclasses.replace(prepared.sources[0], train=slice(0, len(train)), eval=slice(0, len(held)))
    return data.Prepared(train, held, prepared.report, [share])


def check_input_kind(loss, prepared: data.Prepared, source) -> None:
    """The examples are what the loss trains on: unpaired examples need an unpaired loss, ranked candidate
    sets a loss that ranks (RRHF) and one number of candidates; pairs suit every loss (unpaired losses read
    each as two examples, ranking losses as two candidates)."""
    examples = prepared.train + prepared.eval
    advice = {
        InputKind.UNPAIRED: "an unpaired loss (kto, bco, apo_zero_unpaired)",
        InputKind.RANKED: "a ranking loss (rrhf)",
    }
    for kind in (InputKind.UNPAIRED, InputKind.RANKED):
        first = next((e for e in examples if data.KIND_OF[type(e)] is kind), None)
        if first is not None and not loss.kind.reads(kind):
            raise ConfigError(
                f"loss {loss.name!r} trains on {loss.kind.noun}, but data.source={source} holds {kind.noun} "
                f"({first.origin}); use {advice[kind]} or paired data"
            )
    ranked = [e for e in examples if isinstance(e, data.TokenizedRanked)]
    if ranked and len(ranked) != len(examples):
        other = next(e for e in examples if not isinstance(e, data.TokenizedRanked))
        raise ConfigError(f"data.source={source} mixes ranked rows ({ranked[0].origin}) with pairs ({other.origin})")
    counts = {len(e.responses) for e in ranked}
    if len(counts) > 1:
        odd = next(e for e in ranked if len(e.responses) != len(ranked[0].responses))
        raise data.DataError(
            f"{odd.origin}: {len(odd.responses)} candidates, but {ranked[0].origin} has {len(ranked[0].responses)}; "
            "every ranked row of a run needs the same number"
        )


def mixture(d: DataSection, prepared: data.Prepared):
    """The packer's mixture (each training example's source, the weights), or None (no weights given)."""
    return None if d.weights is None else (prepared.source_of_train(), d.weights)


def _first_process_writes(prepare):
    """Run `prepare` so that in a multi-host run one process writes the tokenised cache and the others read
    it: process 0 first, then the rest (a folder that is not shared: each tokenises for itself). An error in
    process 0 still reaches the barrier, so no process waits for ever; the others meet it themselves."""
    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils

    first, error = jax.process_index() == 0, None
    if first:
        try:
            result = prepare()
        except Exception as e:  # raised after the barrier
            error = e
    multihost_utils.sync_global_devices("prefopt_jax tokenised cache")
    if error is not None:
        raise error
    return result if first else prepare()


def describe(prepared: data.Prepared) -> str:
    """The data line of a run's log: the row accounting, and per source of a mixture its share."""
    text = prepared.report.summary()
    if len(prepared.sources) > 1:
        total = sum((s.weight or 0.0) for s in prepared.sources)
        for s in prepared.sources:
            n = s.train.stop - s.train.start
            share = f"weight {s.weight:g} ({s.weight / total:.0%} of the stream)" if s.weight else "by size"
            text += f"\n  {s.name}: {n} train / {s.eval.stop - s.eval.start} held-out, {share}; {s.report.summary()}"
    cached = {s.cache for s in prepared.sources} - {None}
    if cached:
        text += f" (tokenised cache: {', '.join(sorted(cached))})"
    return text


def rows_per_device_group(mesh: Mesh) -> int:
    """How many devices a micro-batch's rows are split over (rows come in multiples of it)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_spec(
    d: DataSection,
    t: TrainSection,
    examples: Sequence,
    mesh: Mesh,
    *,
    attention: str,
    response_only: bool,
    train=None,
    mixture=None,
) -> data.BatchSpec:
    """The run's micro-batch geometry, sized from `examples` (train and held-out together, so every one
    fits), and the micro-batches a step needs, from its `train.steps` steps over `train` (default
    `examples`) planned ahead (see `data.batch_spec`). `data.pack_length` and `data.micro_batch_rows`
    override the row length (the longest example's, or at least `data.min_pack_length` where rows hold
    several examples) and the rows per micro-batch (one per device the rows are split over). Rows are a
    multiple of 128 tokens for the accelerator kernels, of 32 (the CPU tile) otherwise."""
    return data.batch_spec(
        examples,
        train=train,
        layout=d.layout,
        batch_size=t.batch_size,
        steps=t.steps,
        seed=t.seed,
        mixture=mixture,
        max_length=d.max_length,
        response_only=response_only,
        row_multiple=rows_per_device_group(mesh),
        length=d.pack_length,
        rows=d.micro_batch_rows,
        min_length=d.min_pack_length,
        tiles=attention == "block_sparse",
        length_multiple=128 if attention in ("pallas", "pallas_gpu", "cudnn") else data.TILE,
    )


def _row_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(None, ROW_AXES))


def local_rows(mesh: Mesh, rows: int) -> slice:
    """The rows of a micro-batch this process's devices hold (the span covering all of them)."""
    index = _row_sharding(mesh).addressable_devices_indices_map((1, rows))
    spans = [idx[1].indices(rows) for idx in index.values()]
    return slice(min(s[0] for s in spans), max(s[1] for s in spans))


def reference_logps(
    spec: data.BatchSpec, plan: data.MicroPlan, per_example: Sequence[Sequence[np.ndarray]]
) -> np.ndarray:
    """Precomputed reference log-probs ([k, L_i] per example) laid out like a micro-batch's completions."""
    g = spec.geometries["main"]
    out = np.zeros((g.groups, g.completions, g.width), np.float32)
    for slot, i in enumerate(plan.examples):
        for j, values in enumerate(per_example[i]):
            out[slot, j, : len(values)] = values
    return out


def host_step(
    spec: data.BatchSpec,
    plans: Sequence[data.MicroPlan],
    examples: Sequence,
    mesh: Mesh,
    pad_id: int,
    side: Mapping[str, Sequence] | None = None,
    micro_batches: int | None = None,
) -> dict:
    """One step's micro-batches as host arrays stacked on a leading axis of `micro_batches` (default the
    spec's: the step's fixed room; the unused ones are empty and the step skips them): token arrays for this
    process's rows only ([M, R_local, T]), group arrays whole ([M, G, ...]). `side` holds per-example inputs
    computed before training, by example index: "ref_logps" (precomputed reference log-probs, [k, L_i] each)
    and "udm_prob" (BCO-UDM's prompt classifier, a float each)."""
    m = spec.micro_batches if micro_batches is None else micro_batches
    if len(plans) > m:
        raise ValueError(f"a step of {len(plans)} micro-batches does not fit the step's room for {m}")
    rows = {part: local_rows(mesh, g.rows) for part, g in spec.geometries.items()}
    side = side or {}
    empty = data.MicroPlan([], {name: data.RowPlan(rp.geometry, rp.layout) for name, rp in plans[0].parts.items()})
    parts = []
    for plan in [*plans, *[empty] * (m - len(plans))]:
        one = step_arrays(data.host_arrays(spec, plan, examples, pad_id, rows))
        if "ref_logps" in side:
            one["ref_logps"] = reference_logps(spec, plan, side["ref_logps"])
        if "udm_prob" in side:
            one["udm_prob"] = np.full(spec.groups, 0.5, np.float32)  # empty slots: weight 0 anyway
            one["udm_prob"][: len(plan.examples)] = side["udm_prob"][list(plan.examples)]
        parts.append(one)
    return jax.tree.map(lambda *a: np.stack(a), *parts)


def step_arrays(host: dict) -> dict:
    """`data.host_arrays` as the step's pytree: each part's `Batch` as a dict of its arrays."""
    return {k: dataclasses.asdict(v) if isinstance(v, data.Batch) else v for k, v in host.items()}


def place(spec: data.BatchSpec, host: dict, mesh: Mesh) -> dict:
    """A step's host arrays (`host_step`) on the mesh: token arrays split by rows over data x fsdp (each
    process supplies its own rows), everything else replicated."""
    rows, whole = _row_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    out = {}
    for key, value in host.items():
        if isinstance(value, dict):
            n_rows = spec.geometries[key].rows
            start = local_rows(mesh, n_rows).start
            out[key] = {}
            for name, a in value.items():
                if name in TOKEN_ARRAYS:

                    def local(idx, a=a, n_rows=n_rows, start=start):  # global row slice -> this process's block
                        r0, r1, _ = idx[1].indices(n_rows)
                        return a[idx[0], r0 - start : r1 - start, idx[2]]

                    shape = (a.shape[0], n_rows, *a.shape[2:])  # this process's rows -> all of them
                    out[key][name] = jax.make_array_from_callback(shape, rows, local)
                else:
                    out[key][name] = jax.make_array_from_callback(a.shape, whole, lambda idx, a=a: a[idx])
        else:
            out[key] = jax.make_array_from_callback(value.shape, whole, lambda idx, a=value: a[idx])
    return out


def abstract_batch(spec: data.BatchSpec, mesh: Mesh, side: Sequence[str] = ()):
    """The step's batch as shapes and shardings (planning: no data), from the micro-batch schema
    (`spec.fields`): token arrays split by rows over data x fsdp, everything else replicated."""
    rows, whole = _row_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    m = spec.micro_batches

    def abstract(name, field):
        if isinstance(field, dict):
            return {k: abstract(k, f) for k, f in field.items()}
        shape, dtype = field
        return jax.ShapeDtypeStruct((m, *shape), dtype, sharding=rows if name in TOKEN_ARRAYS else whole)

    return {name: abstract(name, field) for name, field in spec.fields(side).items()}
