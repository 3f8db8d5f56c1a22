"""From the config's data section to what the step consumes: prepared examples, collated micro-batches
brought to one shape, and their placement on the mesh."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefopt_jax import data, losses
from prefopt_jax.config import Config
from prefopt_jax.data.synthetic import comparison_pairs
from prefopt_jax.train import step as step_lib

ROW_AXES = ("data", "fsdp")
PER_ROW = ("input_ids", "positions", "segment_ids", "pred_index", "scored", "mask")


def load_data(cfg: Config, tokenizer) -> tuple[data.Prepared, list[str] | None]:
    """The train and held-out examples (and, for the built-in task, the held-out answers). Unpaired
    losses train on pairs read as two unpaired examples (chosen desirable, rejected undesirable); the
    held-out pairs stay pairs, so reward accuracy is measured the same way for every loss."""
    d = cfg.data
    if d.source == "builtin:compare":
        train_rows, eval_rows = comparison_pairs(d.num_train, d.num_eval, seed=cfg.train.seed)
        kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length)
        train = data.prepare(train_rows, tokenizer, **kw)
        held = data.prepare(eval_rows, tokenizer, **kw)
        prepared, answers = data.Prepared(train.train, held.train, train.report), [r["answer"] for r in eval_rows]
    else:
        prepared = data.prepare(
            d.source,
            tokenizer,
            format=d.format,
            max_length=d.max_length,
            max_prompt_length=d.max_prompt_length,
            on_error=d.on_error,
            eval_fraction=d.eval_fraction,
            seed=cfg.train.seed,
        )
        answers = None
    if losses.get(cfg.loss.name).kind == "unpaired":
        prepared = data.Prepared(data.unpaired_from_pairs(prepared.train), prepared.eval, prepared.report)
    return prepared, answers


def use_tiles(cfg: Config, mesh: Mesh) -> bool:
    """Block-sparse attention: asked for, or (auto) when a batch's rows are not split over devices (the
    tile gathers would then cross devices)."""
    if cfg.model.attention == "auto":
        return mesh.shape["data"] * mesh.shape["fsdp"] == 1
    return cfg.model.attention == "block_sparse"


def collator(cfg: Config, pad_id: int, *, response_only: bool = False, split: str = "train"):
    if losses.get(cfg.loss.name).kind == "unpaired" and split == "train":
        return data.UnpairedCollator(cfg.data.layout, cfg.data.max_length, pad_id=pad_id)
    return data.PairCollator(cfg.data.layout, cfg.data.max_length, pad_id=pad_id, response_only=response_only)


def host_batch(collated: Sequence[dict], pad_id: int, row_multiple: int, *, tiles: bool = False) -> list[dict]:
    """Collator outputs (one per micro-batch) as the step's array dicts, all of one shape (so they stack),
    with a row count that is a multiple of `row_multiple` (the devices the rows are split over); with
    `tiles`, each with its attention tile list (block-sparse attention)."""
    parts: list[dict] = [{"weight": c["weight"]} for c in collated]
    if "label" in collated[0]:
        for part, c in zip(parts, collated, strict=True):
            part["label"] = c["label"]
    sources = {"main": "batch", "response_only": "response_only", "kl": "kl"}
    keys = [k for k, source in sources.items() if source in collated[0]]
    for key in keys:
        shaped = data.common_shape([c[sources[key]] for c in collated], pad_id, row_multiple=row_multiple)
        for part, b in zip(parts, shaped, strict=True):
            part[key] = step_lib.batch_arrays(b, tiles=tiles)
        width = max(p[key]["scored"].shape[1] for p in parts)  # positions scored per row differ: pad
        for p in parts:
            p[key]["scored"] = np.pad(
                p[key]["scored"], ((0, 0), (0, width - p[key]["scored"].shape[1])), constant_values=-1
            )
        if "tiles" in parts[0][key]:  # tile lists differ in length: pad with empty tiles
            n = max(len(p[key]["tiles"]["row"]) for p in parts)
            for p in parts:
                p[key]["tiles"] = {
                    k: np.pad(v, [(0, n - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in p[key]["tiles"].items()
                }
    return parts


def with_reference_logps(parts: list[dict], per_example: Sequence[Sequence[np.ndarray]]) -> list[dict]:
    """Precomputed reference log-probs ([k, L_i] per example, micro-batch after micro-batch) laid out like
    each micro-batch's completions, [G, k, L]."""
    it = iter(per_example)
    for p in parts:
        g, k, width = p["main"]["completion_mask"].shape
        ref = np.zeros((g, k, width), np.float32)
        for i in range(g):
            for j, values in enumerate(next(it)):
                ref[i, j, : len(values)] = values
        p["ref_logps"] = ref
    return parts


def shardings(tree: dict, mesh: Mesh) -> dict:
    """The placement of a step's (stacked) batch arrays: rows split over data x fsdp, the rest replicated
    (tile lists are indexed by tile, not by row)."""
    rows = NamedSharding(mesh, PartitionSpec(None, ROW_AXES))
    whole = NamedSharding(mesh, PartitionSpec())
    return {
        k: (shardings(v, mesh) if k != "tiles" else {n: whole for n in v})
        if isinstance(v, dict)
        else (rows if k in PER_ROW else whole)
        for k, v in tree.items()
    }


def stack(parts: list[dict]) -> dict:
    """Micro-batches stacked on a leading axis."""
    return jax.tree.map(lambda *a: np.stack(a), *parts)


def place(parts: list[dict], mesh: Mesh) -> dict:
    """Micro-batches stacked and placed on the mesh (see `shardings`). Built from each process's copy of
    the global batch, so it works across hosts."""
    stacked = stack(parts)
    return jax.tree.map(
        lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index: a[index]),
        stacked,
        shardings(stacked, mesh),
    )
