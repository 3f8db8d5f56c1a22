"""Preference data, host side (numpy, datasets, tokenizers, Grain; no device arrays): sources and formats,
chat-template tokenisation with truncation, fixed-shape micro-batches in four layouts (packed and
prefix-shared by default), and a deterministic, resumable plan of which examples go where (the same on
every host), as a Grain iterator.

    prepared = prepare("../shared/data/hh_rlhf_test.jsonl", tokenizer, max_length=1024, eval_fraction=0.05,
                       cache_dir="~/.cache/prefopt_jax/tokenized")   # tokenised once, memory-mapped after
    spec = batch_spec(prepared.train + prepared.eval, train=prepared.train, layout="packed", batch_size=8,
                      max_length=1024, steps=100)   # 8 pairs per step, packed by tokens into micro-batches
    plans = packer(spec, prepared.train, seed=0)
    step = plans.next_step()                          # this step's micro-batches: exactly 8 pairs in all
    arrays = host_arrays(spec, step[0], prepared.train)   # {"main": Batch, "weight": [G]}
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from prefopt_jax.data.batching import LAYOUTS, TILE, Batch, Geometry, Group, RowPlan, index_dtype, pack, tile_bound
from prefopt_jax.data.collate import KIND_OF, BatchSpec, batch_spec, host_arrays, packer, steps
from prefopt_jax.data.order import Order
from prefopt_jax.data.planner import MicroPlan, Packer, Part, Steps, TooLarge, derive_geometry, plan_extent
from prefopt_jax.data.prepare import Prepared, SourceShare, prepare, prepare_mixture
from prefopt_jax.data.records import FORMATS, DataError, Origin, Pair, Ranked, Unpaired, detect_format, normalize
from prefopt_jax.data.sources import DataReport, kept_rows, read_records, split_indices, split_records
from prefopt_jax.data.tokenize import (
    Encoder,
    TokenizedPair,
    TokenizedRanked,
    TokenizedUnpaired,
)

__all__ = [
    "FORMATS",
    "KIND_OF",
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
    "Order",
    "Origin",
    "Packer",
    "Pair",
    "Part",
    "Prepared",
    "Ranked",
    "RowPlan",
    "SourceShare",
    "Steps",
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
    "kept_rows",
    "normalize",
    "pack",
    "packer",
    "plan_extent",
    "prepare",
    "prepare_mixture",
    "ranked_from_pairs",
    "read_records",
    "split_indices",
    "split_records",
    "steps",
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


def ranked_from_pairs(
    pairs: Sequence[TokenizedPair], candidates: int
) -> tuple[list[TokenizedRanked], list[tuple[TokenizedPair, int]]]:
    """Pairs that share a prompt as one ranked candidate set (RRHF's input): the prompt's distinct responses,
    each scored by its wins minus its losses over the prompt's pairs (the Copeland score of the human
    judgements), for the prompts that have exactly `candidates` distinct responses, in the order their first
    pair appears. Returns (the sets, the pairs left out with their prompt's number of distinct responses).
    A set's weight is its pairs' mean weight, its origin its first pair's."""
    by_prompt: dict[bytes, list[TokenizedPair]] = collections.defaultdict(list)
    for e in pairs:
        by_prompt[np.asarray(e.prompt).tobytes()].append(e)
    sets, left = [], []
    for group in by_prompt.values():
        responses: dict[bytes, np.ndarray] = {}
        score: collections.Counter = collections.Counter()
        for e in group:
            for ids, sign in ((e.chosen, 1), (e.rejected, -1)):
                key = np.asarray(ids).tobytes()
                responses.setdefault(key, ids)
                score[key] += sign
        if len(responses) != candidates:
            left += [(e, len(responses)) for e in group]
            continue
        weight = float(np.mean([e.weight for e in group]))
        scores = tuple(float(score[k]) for k in responses)
        sets.append(TokenizedRanked(group[0].prompt, tuple(responses.values()), scores, weight, group[0].origin))
    return sets, left
