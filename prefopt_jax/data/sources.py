"""Where rows come from: local json/jsonl/parquet/arrow files or globs, a hub dataset id (online), or an
in-memory list. Every row keeps its origin (file and row), and every row read is accounted for."""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefopt_jax.data.records import FORMATS, DataError, Origin, Record, detect_format, normalize


@dataclasses.dataclass
class DataReport:
    """Row accounting: every row read is used, dropped (with a reason) or, in a split a command does not need
    (`prefopt-jax eval` reads only the held-out one), left untokenised; truncation is counted apart."""

    read: int = 0
    used: int = 0
    unused: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def drop(self, reason: str) -> None:
        self.used -= 1
        self.dropped[reason] += 1

    def check(self) -> None:
        if self.read != self.used + self.unused + sum(self.dropped.values()):
            raise AssertionError(f"row accounting does not add up: {self}")

    def summary(self) -> str:
        parts = [f"{self.read} rows read, {self.used} used"]
        parts += [f"{n} dropped ({reason})" for reason, n in sorted(self.dropped.items())]
        parts += [f"{self.unused} not needed (another split)"] if self.unused else []
        parts += [f"{n} truncated ({what})" for what, n in sorted(self.truncated.items())]
        return ", ".join(parts)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, DataError(f"{path}, row {i}: malformed JSON ({e.msg} at column {e.colno})", "malformed JSON")


def _file_rows(path: Path) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})", "malformed JSON") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json source must hold a list of rows (or {{'data': [...]}})")
        yield from enumerate(data)
    elif suffix in (".parquet", ".arrow"):
        import datasets

        ds = datasets.Dataset.from_parquet(str(path)) if suffix == ".parquet" else datasets.Dataset.from_file(str(path))
        yield from enumerate(ds)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .arrow")


def _rows(source: str | Path | Sequence[dict], split: str | None) -> Iterator[tuple[Origin, Any]]:
    if isinstance(source, (list, tuple)):
        for i, row in enumerate(source):
            yield Origin("in-memory rows", i), row
        return
    text = str(source)
    paths = sorted(glob.glob(text)) if any(c in text for c in "*?[") else ([Path(text)] if Path(text).exists() else [])
    if paths:
        for p in map(Path, paths):
            for i, row in _file_rows(p):
                yield Origin(str(p), i), row
        return
    if text.endswith((".jsonl", ".json", ".parquet", ".arrow")) or "*" in text:
        raise DataError(f"no data file matches {text!r}")
    import datasets  # a hub dataset id

    try:
        ds = datasets.load_dataset(text, split=split or "train")
    except Exception as e:  # offline, unknown id, unknown split
        raise DataError(f"{text!r} is neither a local file nor a loadable hub dataset: {e}") from None
    for i, row in enumerate(ds):
        yield Origin(f"{text}[{split or 'train'}]", i), row


def read_records(
    source: str | Path | Sequence[dict],
    *,
    format: str | None = None,
    split: str | None = None,
    on_error: str = "raise",
    report: DataReport | None = None,
) -> tuple[list[Record], DataReport]:
    """All usable records of a source. `on_error="raise"` stops at the first bad row with its origin;
    `"skip"` drops it and counts it by reason in the report."""
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; formats: {', '.join(FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = report or DataReport()
    records: list[Record] = []
    fmt = format
    for origin, row in _rows(source, split):
        report.read += 1
        report.used += 1
        try:
            if isinstance(row, DataError):
                raise row
            if fmt is None:
                try:
                    fmt = detect_format(row) if isinstance(row, dict) else "standard"
                except KeyError as e:
                    raise DataError(f"{origin}: {e.args[0]}", "unknown format") from None
            records.append(normalize(row, fmt, origin))
        except DataError as e:
            if on_error == "raise":
                raise
            report.drop(e.reason)
    report.check()
    return records, report


def split_records(records: Sequence[Record], eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """A deterministic train/eval split: the same seed and rows give the same split."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    order = np.random.default_rng(seed).permutation(len(records))
    n_eval = round(len(records) * eval_fraction)
    held = set(order[:n_eval].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [records[i] for i in sorted(held)]
