"""Preference data, host side (numpy, datasets, tokenizers; no jax): sources and formats, chat-template
tokenisation with truncation, fixed-shape micro-batches in four layouts (packed and prefix-shared by
default), and a deterministic, resumable plan of which examples go where (the same on every host).

    prepared = prepare("../shared/data/hh_rlhf_test.jsonl", tokenizer, max_length=1024, eval_fraction=0.05)
    spec = batch_spec(prepared.train + prepared.eval, layout="packed", groups=8, max_length=1024)
    plans = packer(spec, prepared.train, seed=0)
    arrays = host_arrays(spec, plans.next_micro(), prepared.train)   # {"main": Batch, "weight": [G]}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefopt_jax.data.batching import LAYOUTS, TILE, Batch, Geometry, Group, RowPlan, index_dtype, pack, tile_bound
from prefopt_jax.data.collate import BatchSpec, batch_spec, host_arrays, packer
from prefopt_jax.data.planner import MicroPlan, Packer, Part, TooLarge, derive_geometry
from prefopt_jax.data.records import FORMATS, DataError, Origin, Pair, Ranked, Unpaired, detect_format, normalize
from prefopt_jax.data.sources import DataReport, read_records, split_records
from prefopt_jax.data.tokenize import (
    Encoder,
    TokenizedPair,
    TokenizedRanked,
    TokenizedUnpaired,
    tokenize_records,
)

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "TILE",
    "Batch",
    "BatchSpec",
    "DataError",
    "DataReport",
    "Encoder",
    "Geometry",
    "Group",
    "MicroPlan",
    "Origin",
    "Packer",
    "Pair",
    "Part",
    "Prepared",
    "Ranked",
    "RowPlan",
    "TokenizedPair",
    "TokenizedRanked",
    "TokenizedUnpaired",
    "TooLarge",
    "Unpaired",
    "batch_spec",
    "derive_geometry",
    "detect_format",
    "host_arrays",
    "index_dtype",
    "normalize",
    "pack",
    "packer",
    "prepare",
    "read_records",
    "split_records",
    "tile_bound",
    "unpaired_from_pairs",
]


@dataclasses.dataclass
class Prepared:
    train: list
    eval: list
    report: DataReport


def prepare(
    source: str | Path | Sequence[dict],
    tokenizer: Any,
    *,
    format: str | None = None,
    split: str | None = None,
    max_length: int = 1024,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    use_chat_template: bool | None = None,
    on_error: str = "raise",
    eval_fraction: float = 0.0,
    eval_split: str | None = None,
    seed: int = 0,
    splits: Sequence[str] = ("train", "eval"),
) -> Prepared:
    """Read, normalise, split and tokenise a preference source; `report` accounts for every row. The eval
    set is a seeded `eval_fraction` of the rows read (chosen before tokenisation, so the split does not depend
    on the tokenizer or the truncation), or the named `eval_split` of a hub dataset. Only the `splits` asked
    for are tokenised (the other comes back empty)."""
    if eval_fraction and eval_split:
        raise ValueError("give eval_fraction or eval_split, not both")
    encoder = Encoder(tokenizer, max_length, max_prompt_length, max_completion_length, "keep_end", use_chat_template)
    records, report = read_records(source, format=format, split=split, on_error=on_error)
    if eval_split is None:
        parts = dict(zip(("train", "eval"), split_records(records, eval_fraction, seed), strict=True))
    else:
        held, _ = read_records(source, format=format, split=eval_split, on_error=on_error, report=report)
        parts = {"train": records, "eval": held}
    out = {}
    for name, recs in parts.items():
        if name in splits:
            out[name] = tokenize_records(recs, encoder, report, on_error=on_error, check=False)
        else:
            out[name] = []
            report.used -= len(recs)
            report.unused += len(recs)
    report.check()
    return Prepared(out["train"], out["eval"], report)


def unpaired_from_pairs(examples: Sequence[TokenizedPair]) -> list[TokenizedUnpaired]:
    """Each pair as two unpaired examples, chosen desirable and rejected undesirable (how TRL's KTO
    trainer reads paired data); unpaired examples pass through."""
    return [
        u
        for e in examples
        for u in (
            [e]
            if isinstance(e, TokenizedUnpaired)
            else [
                TokenizedUnpaired(e.prompt, c, label, e.weight, e.origin)
                for c, label in ((e.chosen, True), (e.rejected, False))
            ]
        )
    ]
