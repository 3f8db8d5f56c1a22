"""Preference data, host side (numpy, datasets, tokenizers, Grain; no device arrays): sources and formats,
chat-template tokenisation with truncation, fixed-shape micro-batches in four layouts (packed and
prefix-shared by default), and a deterministic, resumable plan of which examples go where (the same on
every host), as a Grain iterator.

    prepared = prepare("../shared/data/hh_rlhf_test.jsonl", tokenizer, max_length=1024, eval_fraction=0.05,
                       cache_dir="~/.cache/prefopt_jax/tokenized")   # tokenised once, memory-mapped after
    spec = batch_spec(prepared.train + prepared.eval, layout="packed", groups=8, max_length=1024)
    plans = packer(spec, prepared.train, seed=0)
    arrays = host_arrays(spec, plans.next_micro(), prepared.train)   # {"main": Batch, "weight": [G]}
"""

from __future__ import annotations

from collections.abc import Sequence

from prefopt_jax.data.batching import LAYOUTS, TILE, Batch, Geometry, Group, RowPlan, index_dtype, pack, tile_bound
from prefopt_jax.data.collate import BatchSpec, batch_spec, host_arrays, micro_batches, packer
from prefopt_jax.data.order import Order
from prefopt_jax.data.planner import MicroBatches, MicroPlan, Packer, Part, TooLarge, derive_geometry
from prefopt_jax.data.prepare import Prepared, SourceShare, prepare, prepare_mixture
from prefopt_jax.data.records import FORMATS, DataError, Origin, Pair, Ranked, Unpaired, detect_format, normalize
from prefopt_jax.data.sources import DataReport, read_records, split_indices, split_records
from prefopt_jax.data.tokenize import (
    Encoder,
    TokenizedPair,
    TokenizedRanked,
    TokenizedUnpaired,
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
    "MicroBatches",
    "MicroPlan",
    "Order",
    "Origin",
    "Packer",
    "Pair",
    "Part",
    "Prepared",
    "Ranked",
    "RowPlan",
    "SourceShare",
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
    "micro_batches",
    "normalize",
    "pack",
    "packer",
    "prepare",
    "prepare_mixture",
    "read_records",
    "split_indices",
    "split_records",
    "tile_bound",
    "unpaired_from_pairs",
]


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
