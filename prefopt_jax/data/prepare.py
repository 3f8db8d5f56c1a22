"""From sources to tokenised train and held-out examples: read, split (seeded, before tokenisation, so the
split depends on neither the tokenizer nor the truncation), tokenise in batches, through the tokenised cache
when one is configured, and account for every row; several sources make a weighted mixture."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from absl import flags

from prefopt_jax.data import cache
from prefopt_jax.data.records import DataError
from prefopt_jax.data.sources import DataReport, kept_rows, read_records, split_indices
from prefopt_jax.data.tokenize import CHUNK, Encoded, Encoder


@dataclasses.dataclass
class SourceShare:
    """One source of a run: its name, its mixture weight (None: in proportion to its size), its examples'
    span in `Prepared.train` and `Prepared.eval`, and its own row accounting."""

    name: str
    weight: float | None
    train: slice
    eval: slice
    report: DataReport
    cache: str | None = None  # "hit", "written" or None (no cache)


@dataclasses.dataclass
class Prepared:
    train: list
    eval: list
    report: DataReport
    sources: list[SourceShare] = dataclasses.field(default_factory=list)

    def source_of_train(self) -> np.ndarray:
        """[len(train)] the source index of each training example."""
        out = np.zeros(len(self.train), np.int32)
        for i, s in enumerate(self.sources):
            out[s.train] = i
        return out


def _encode(encoder: Encoder, records: Sequence, indices: Sequence[int], workers: int = 0) -> dict[int, Encoded]:
    """The outcomes of records[i] for i in `indices`, `CHUNK` records per batch encode; with `workers` > 1,
    the chunks are encoded by that many Grain worker processes (in order, so the result is the same)."""
    chunks = [indices[start : start + CHUNK] for start in range(0, len(indices), CHUNK)]
    if workers > 1 and len(chunks) > 1:
        if not flags.FLAGS.is_parsed():  # Grain's multiprocessing reads absl flags; this is not an absl program
            flags.FLAGS.mark_as_parsed()
        dataset = grain.MapDataset.source([[records[i] for i in c] for c in chunks]).map(encoder.encode)
        options = grain.MultiprocessingOptions(num_workers=min(workers, len(chunks)))
        encoded = iter(dataset.to_iter_dataset().mp_prefetch(options, worker_init_fn=_one_thread_each))
    else:
        encoded = (encoder.encode([records[i] for i in c]) for c in chunks)
    out = {}
    bar = _progress(len(indices))
    for chunk in chunks:
        out.update(zip(chunk, next(encoded), strict=True))
        bar.update(len(chunk))
    bar.close()
    if hasattr(encoded, "close"):
        encoded.close()  # the worker processes
    return out


def _progress(total: int):
    """A tqdm bar (rate, ETA) for a first pass of more than a few chunks, on stderr when it is a terminal."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="tokenising", unit="ex", disable=total <= 4 * CHUNK or not sys.stderr.isatty())


def _one_thread_each(worker: int, workers: int) -> None:
    """A tokenisation worker's Rust encoder on one thread: the workers share the cores, not each take all."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _outcomes(
    source,
    split: str | None,
    format: str | None,
    encoder: Encoder,
    on_error: str,
    cache_dir: str | None,
    need,
    workers: int = 0,
) -> tuple[int, Any, DataReport, str | None]:
    """(rows usable after reading, outcome of row i (only those `need(n)` asks for, unless the cache is being
    written), the read accounting, the cache status) of one source."""
    in_memory = isinstance(source, (list, tuple))
    key = None if in_memory or cache_dir is None else cache.key(str(source), split, format, encoder)
    hit = cache.read(cache_dir, key) if key else None
    if hit is not None:
        outcomes, report = hit
        if on_error == "raise" and report.first:  # rows the cache's writer (on_error=skip) dropped while reading
            reason, message = next(iter(report.first.items()))
            raise DataError(message, reason)
        return len(outcomes), outcomes.__getitem__, report, "hit"
    records, report = read_records(source, format=format, split=split, on_error=on_error)
    wanted = range(len(records)) if key else sorted(i for part in need(len(records)) for i in part)
    encoded = _encode(encoder, records, list(wanted), workers)
    status = None
    if key:
        outcomes = [encoded[i] for i in range(len(records))]
        if on_error == "raise":
            for o in outcomes:  # nothing bad is written for a run that would stop at it
                if isinstance(o.example, DataError):
                    raise o.example
        cache.write(cache_dir, key, outcomes, [r.origin for r in records], report)
        status = "written"
    return len(records), encoded.__getitem__, report, status


def _split(source, split, eval_split, eval_fraction: float, keep: float, seed: int, splits, common: dict):
    """([(split name, row indices, outcome of row i)] for train and eval, the accounting, the cache status): the
    kept rows split by `eval_fraction`, or train (kept) and the hub dataset's `eval_split`; the rows left out
    by `keep` accounted as not kept."""
    if eval_split is None:

        @functools.cache
        def by_fraction(n: int) -> dict[str, list[int]]:  # the seeded split, computed once
            rows = kept_rows(n, keep, seed)
            train, held = split_indices(len(rows), eval_fraction, seed)
            return {"train": [rows[i] for i in train], "eval": [rows[i] for i in held]}

        need = lambda n: [part for name, part in by_fraction(n).items() if name in splits]
        n, outcome, report, status = _outcomes(source, split, need=need, **common)
        parts = [(name, idx, outcome) for name, idx in by_fraction(n).items()]
        left_out = n - sum(len(idx) for _, idx, _ in parts)
    else:
        n, outcome, report, status = _outcomes(
            source, split, need=lambda n: [range(n)] if "train" in splits else [], **common
        )
        m, held_outcome, held_report, _ = _outcomes(
            source, eval_split, need=lambda m: [range(m)] if "eval" in splits else [], **common
        )
        report.merge(held_report)
        parts = [("train", kept_rows(n, keep, seed), outcome), ("eval", range(m), held_outcome)]
        left_out = n - len(parts[0][1])
    report.used, report.not_kept = report.used - left_out, report.not_kept + left_out
    return parts, report, status


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
    cache_dir: str | None = None,
    weight: float | None = None,
    keep: float = 1.0,
    workers: int = 0,
) -> Prepared:
    """Read, normalise, split and tokenise a preference source; `report` accounts for every row. `keep` < 1
    keeps a seeded share of the usable rows (`kept_rows`) before anything else. The eval set is a seeded
    `eval_fraction` of the kept rows, or the named `eval_split` of a hub dataset. Only the
    `splits` asked for are tokenised (the other comes back empty), unless the cache is being written: it holds
    every row. With `cache_dir` a file or hub source is tokenised once and read back on later calls; `workers` > 1
    tokenises in that many worker processes (the same examples)."""
    if eval_fraction and eval_split:
        raise ValueError("give eval_fraction or eval_split, not both")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    encoder = Encoder(tokenizer, max_length, max_prompt_length, max_completion_length, "keep_end", use_chat_template)
    common = dict(format=format, encoder=encoder, on_error=on_error, cache_dir=cache_dir, workers=workers)
    parts, report, status = _split(source, split, eval_split, eval_fraction, keep, seed, splits, common)
    out = {}
    for name, idx, get in parts:
        if name in splits:
            out[name] = [e for e in (get(i).add_to(report, on_error) for i in idx) if e is not None]
        else:
            out[name] = []
            report.used -= len(idx)
            report.unused += len(idx)
    report.check()
    name = "in-memory rows" if isinstance(source, (list, tuple)) else str(source)
    share = SourceShare(name, weight, slice(0, len(out["train"])), slice(0, len(out["eval"])), report, status)
    return Prepared(out["train"], out["eval"], report, [share])


def usable_rows(
    source, tokenizer, *, split=None, keep: float = 1.0, seed: int = 0, format=None, max_length: int = 1024,
    max_prompt_length=None, max_completion_length=None, use_chat_template=None, on_error: str = "raise",
    cache_dir=None, workers: int = 0, **split_only,
) -> int:  # fmt: skip
    """How many of `source`'s rows `prepare` (with the same arguments) would keep and split: read and
    normalised, `keep`'s share, through the tokenised cache (a miss writes it, so `prepare` then hits it).
    `split_only`: prepare's arguments that only decide the split (eval_fraction, splits, ...)."""
    encoder = Encoder(tokenizer, max_length, max_prompt_length, max_completion_length, "keep_end", use_chat_template)
    common = dict(format=format, encoder=encoder, on_error=on_error, cache_dir=cache_dir, workers=workers)
    n, *_ = _outcomes(source, split, need=lambda n: [], **common)
    return len(kept_rows(n, keep, seed))


def prepare_mixture(
    sources: Sequence[str],
    weights: Sequence[float] | None,
    tokenizer: Any,
    *,
    source_splits: Sequence[str] | None = None,
    keep: Sequence[float] | None = None,
    eval_rows: int | None = None,
    **kwargs,
) -> Prepared:
    """Several sources prepared one by one (each split with the same seed, each with its own accounting) and
    concatenated; `weights` (one per source) are their shares of the training stream (see `data.Packer`),
    `source_splits` each hub source's (or hub-style folder's) split, `keep` the share of each source's rows
    kept (see `prepare`). `eval_rows` holds out that many rows in all (the alignment-handbook's integer
    `test_split_size`) instead of `eval_fraction`: each source the same share, eval_rows / all kept rows."""
    for name, values in (("weights", weights), ("source_splits", source_splits), ("keep", keep)):
        if values is not None and len(values) != len(sources):
            raise ValueError(f"{len(values)} {name} for {len(sources)} sources")
    if weights is not None and not all(w > 0 for w in weights):
        raise ValueError(f"mixture weights must be positive, got {list(weights)}")
    per = [
        {"split": None if source_splits is None else source_splits[i], "keep": 1.0 if keep is None else float(keep[i])}
        for i in range(len(sources))
    ]
    if eval_rows is not None:
        rows = sum(usable_rows(s, tokenizer, **p, **kwargs) for s, p in zip(sources, per, strict=True))
        if not 0 < eval_rows < rows:
            raise ValueError(f"{eval_rows} held-out rows of {rows} usable rows: hold out fewer")
        kwargs["eval_fraction"] = eval_rows / rows
    total = Prepared([], [], DataReport())
    for i, source in enumerate(sources):
        one = prepare(source, tokenizer, weight=None if weights is None else float(weights[i]), **per[i], **kwargs)
        (share,) = one.sources
        share.train = slice(len(total.train), len(total.train) + len(one.train))
        share.eval = slice(len(total.eval), len(total.eval) + len(one.eval))
        total.train += one.train
        total.eval += one.eval
        total.report.merge(one.report)
        total.sources.append(share)
    return total
