"""Preference data, host side (numpy, datasets, tokenizers; no jax): sources and formats, chat-template
tokenisation with truncation, padded and packed (prefix-shared) batches, resumable host-sharded iteration.

    data = prepare("../shared/data/hh_rlhf_test.jsonl", tokenizer, max_length=1024, eval_fraction=0.05)
    batches = BatchIterator(data.train, PairCollator("packed", 1024), global_batch=8, seed=0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefopt_jax.data.batching import (
    Batch,
    Group,
    bucket,
    common_shape,
    default_buckets,
    packed_batch,
    pad_batch,
    padded_batch,
)
from prefopt_jax.data.iterator import BatchIterator
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
    "Batch",
    "BatchIterator",
    "DataError",
    "DataReport",
    "Encoder",
    "Origin",
    "Pair",
    "PairCollator",
    "Prepared",
    "Ranked",
    "RankedCollator",
    "TokenizedPair",
    "TokenizedRanked",
    "TokenizedUnpaired",
    "Unpaired",
    "UnpairedCollator",
    "bucket",
    "common_shape",
    "default_buckets",
    "detect_format",
    "normalize",
    "packed_batch",
    "pad_batch",
    "padded_batch",
    "prepare",
    "read_records",
    "split_records",
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
) -> Prepared:
    """Read, normalise, tokenise and split a preference source; `report` accounts for every row.
    The eval set is a seeded `eval_fraction` of the rows, or the named `eval_split` of a hub dataset."""
    if eval_fraction and eval_split:
        raise ValueError("give eval_fraction or eval_split, not both")
    encoder = Encoder(tokenizer, max_length, max_prompt_length, max_completion_length, "keep_end", use_chat_template)
    records, report = read_records(source, format=format, split=split, on_error=on_error)
    examples = tokenize_records(records, encoder, report, on_error=on_error)
    if eval_split is None:
        train, held = split_records(examples, eval_fraction, seed)
    else:
        held_records, _ = read_records(source, format=format, split=eval_split, on_error=on_error, report=report)
        train, held = examples, tokenize_records(held_records, encoder, report, on_error=on_error)
    return Prepared(train, held, report)


LAYOUTS = ("padded", "packed", "shared", "packed_unshared")


def _layout(groups: list[Group], layout: str, max_length: int, buckets, pad_id: int, min_rows: int) -> Batch:
    """padded: a row per (prompt, completion); packed: groups (the prompt once, its completions after it)
    packed into rows; shared: a row per group (prefix sharing without packing); packed_unshared: a row
    segment per (prompt, completion), packed (packing without prefix sharing)."""
    if layout == "padded":
        return padded_batch(groups, buckets, pad_id, min_rows=min_rows)
    if layout == "packed_unshared":
        k = len(groups[0][1])
        singles = [(p, [c]) for p, cs in groups for c in cs]  # group-major: g * k + j
        b = _layout(singles, "packed", max_length, buckets, pad_id, min_rows)
        width = b.completion_index.shape[-1]
        index = b.completion_index.reshape(len(groups), k, width)
        return dataclasses.replace(b, completion_index=index, completion_mask=b.completion_mask.reshape(index.shape))
    if layout in ("packed", "shared"):
        # few distinct row counts to compile, at most a third of the rows empty: 1, 2, 3, 4, 6, 8, 12, 16, ...
        rows = tuple(sorted({2**i for i in range(20)} | {3 * 2**i for i in range(19)}))
        # max_length bounds prompt + one completion; a whole group (prompt + k completions) can be longer,
        # and then every row of this batch grows to the group's bucket (at most k * max_length)
        biggest = max(len(p) + sum(len(c) for c in cs) for p, cs in groups)
        row_length = bucket(biggest, (*buckets, 2 * max_length)) if biggest > max_length else max_length
        return packed_batch(
            groups,
            row_length,
            buckets,
            pad_id,
            min_rows=min_rows,
            row_buckets=rows,
            one_group_per_row=layout == "shared",
        )
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def response_only_groups(completions: Sequence[np.ndarray]) -> list[Group]:
    """Completions scored alone (no prompt, no BOS): the first token is context, the rest are scored
    (RMiPO's response-level log-probs)."""
    return [(c[:1], [c[1:]]) for c in completions]


@dataclasses.dataclass
class PairCollator:
    """TokenizedPairs -> {"batch": Batch (groups of [chosen, rejected]), "weight": [P],
    "response_only": Batch of chosen then rejected completions alone, when asked}."""

    layout: str = "padded"
    max_length: int = 1024
    buckets: Sequence[int] | None = None
    pad_id: int = 0
    response_only: bool = False
    min_rows: int = 0

    def __call__(self, examples: list[TokenizedPair]) -> dict:
        buckets = self.buckets or default_buckets(self.max_length)
        groups = [(e.prompt, [e.chosen, e.rejected]) for e in examples]
        out = {
            "batch": _layout(groups, self.layout, self.max_length, buckets, self.pad_id, self.min_rows),
            "weight": np.asarray([e.weight for e in examples], np.float32),
        }
        if self.response_only:
            alone = response_only_groups([e.chosen for e in examples] + [e.rejected for e in examples])
            out["response_only"] = _layout(alone, self.layout, self.max_length, buckets, self.pad_id, self.min_rows)
        return out


def unpaired_from_pairs(examples: Sequence[TokenizedPair]) -> list[TokenizedUnpaired]:
    """Each pair as two unpaired examples, chosen desirable and rejected undesirable (how TRL's KTO
    trainer reads paired data)."""
    return [
        TokenizedUnpaired(e.prompt, completion, label, e.weight, e.origin)
        for e in examples
        for completion, label in ((e.chosen, True), (e.rejected, False))
    ]


@dataclasses.dataclass
class RankedCollator:
    """TokenizedRanked (the same number of responses K in a batch) -> {"batch": groups of K responses,
    "scores": [G, K], "weight": [G]} for RRHF."""

    layout: str = "padded"
    max_length: int = 1024
    buckets: Sequence[int] | None = None
    pad_id: int = 0
    min_rows: int = 0

    def __call__(self, examples: list[TokenizedRanked]) -> dict:
        buckets = self.buckets or default_buckets(self.max_length)
        groups = [(e.prompt, list(e.responses)) for e in examples]
        return {
            "batch": _layout(groups, self.layout, self.max_length, buckets, self.pad_id, self.min_rows),
            "scores": np.asarray([e.scores for e in examples], np.float32),
            "weight": np.asarray([e.weight for e in examples], np.float32),
        }


@dataclasses.dataclass
class UnpairedCollator:
    """TokenizedUnpaired -> {"batch", "label", "weight", "kl": the mismatched (prompt_i, completion_{i-1})
    groups whose log-probs estimate KTO's KL reference point (TRL's rotation within the batch)}."""

    layout: str = "padded"
    max_length: int = 1024
    buckets: Sequence[int] | None = None
    pad_id: int = 0
    min_rows: int = 0

    def __call__(self, examples: list[TokenizedUnpaired]) -> dict:
        buckets = self.buckets or default_buckets(self.max_length)
        groups = [(e.prompt, [e.completion]) for e in examples]
        n = len(examples)
        kl = [
            (e.prompt, [examples[(i - 1) % n].completion[: self.max_length - len(e.prompt)]])
            for i, e in enumerate(examples)
        ]
        return {
            "batch": _layout(groups, self.layout, self.max_length, buckets, self.pad_id, self.min_rows),
            "label": np.asarray([e.label for e in examples]),
            "weight": np.asarray([e.weight for e in examples], np.float32),
            "kl": _layout(kl, self.layout, self.max_length, buckets, self.pad_id, self.min_rows),
        }
