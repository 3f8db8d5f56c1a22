"""Where rows come from: local json/jsonl/parquet/arrow files or globs, a hub dataset id (online), or an
in-memory list. Every row keeps its origin (file and row), and every row read is accounted for."""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import gzip
import io
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
    not_kept: int = 0  # left out of a source kept in part (`keep`: the alignment-handbook's mixture weight)
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    truncated: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> the first such row's message

    def drop(self, error: DataError) -> None:
        self.used -= 1
        self.dropped[error.reason] += 1
        self.first.setdefault(error.reason, str(error))

    def merge(self, other: DataReport) -> None:
        """Add another source's accounting to this one."""
        self.read, self.used, self.unused = self.read + other.read, self.used + other.used, self.unused + other.unused
        self.not_kept += other.not_kept
        self.dropped.update(other.dropped)
        self.truncated.update(other.truncated)
        for reason, message in other.first.items():
            self.first.setdefault(reason, message)

    def check(self) -> None:
        if self.read != self.used + self.unused + self.not_kept + sum(self.dropped.values()):
            raise AssertionError(f"row accounting does not add up: {self}")

    def summary(self) -> str:
        parts = [f"{self.read} rows read, {self.used} used"]
        parts += [f"{n} dropped ({reason}; first: {self.first[reason]})" for reason, n in sorted(self.dropped.items())]
        parts += [f"{self.unused} not needed (another split)"] if self.unused else []
        parts += [f"{self.not_kept} not kept (a seeded subset of the source)"] if self.not_kept else []
        parts += [f"{n} truncated ({what})" for what, n in sorted(self.truncated.items())]
        return ", ".join(parts)


BOMS = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16", b"\xff\xfe\x00\x00": "UTF-32"}


def _not_utf8(path: Path, raw: bytes, at: int, first_line: int = 1) -> DataError:
    """The error for the byte at offset `at` of `raw` (a file's bytes, or a line's: `first_line` is its number),
    naming its 1-based line and column."""
    line, column = raw.count(b"\n", 0, at) + first_line, at - raw.rfind(b"\n", 0, at)
    return DataError(
        f"{path}, line {line}: byte 0x{raw[at]:02x} at column {column} is not UTF-8; save the file as UTF-8",
        "not UTF-8",
    )


def _check_encoding(path: Path, head: bytes) -> None:
    for bom, name in sorted(BOMS.items(), key=lambda kv: -len(kv[0])):
        if head.startswith(bom):
            raise DataError(f"{path}: the file is {name}; save it as UTF-8")


def _open(path: Path):
    """The file's bytes, decompressed when it ends in .gz."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _jsonl_rows(path: Path) -> Iterator[tuple[Origin, Any]]:
    """Rows of a JSON Lines file by 1-based line: a UTF-8 BOM, CRLF endings and blank lines are fine; a line
    that is not UTF-8 or not JSON comes back as its DataError (so it can be skipped)."""
    with _open(path) as f:
        _check_encoding(path, f.read(4))
        f.seek(0)
        rows = 0
        for i, raw in enumerate(f):
            if i == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            origin = Origin(str(path), i, "line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows += 1
                yield origin, _not_utf8(path, raw, e.start, first_line=i + 1)
                continue
            if not line.strip():
                continue
            rows += 1
            try:
                yield origin, json.loads(line)
            except json.JSONDecodeError as e:
                yield origin, DataError(f"{origin}: malformed JSON ({e.msg} at column {e.colno})", "malformed JSON")
    if not rows:
        raise DataError(f"{path}: the file holds no rows")


def _text(path: Path) -> str:
    """A whole file's text (decompressed; a UTF-8 BOM dropped), or the error naming its first non-UTF-8 byte."""
    with _open(path) as f:
        raw = f.read()
    _check_encoding(path, raw[:4])
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw, e.start) from None


def _json_rows(path: Path) -> Iterator[tuple[Origin, Any]]:
    text = _text(path)
    if not text.strip():
        raise DataError(f"{path}: the file holds no rows")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{path}, line {e.lineno}"
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})", "malformed JSON") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        kind = type(data).__name__
        raise DataError(f"{path}: a .json source must hold a list of rows (or {{'data': [...]}}), got a {kind}")
    if not data:
        raise DataError(f"{path}: the file holds no rows")
    for i, row in enumerate(data):
        yield Origin(str(path), i, "row"), row


def _table_rows(path: Path) -> Iterator[tuple[Origin, Any]]:
    import datasets

    suffix = path.suffix.lower()
    try:
        ds = datasets.Dataset.from_parquet(str(path)) if suffix == ".parquet" else datasets.Dataset.from_file(str(path))
    except Exception as e:  # not a parquet/arrow file, truncated, ...
        raise DataError(f"{path}: cannot be read as {suffix[1:]} ({type(e).__name__}: {e})") from None
    if len(ds) == 0:
        raise DataError(f"{path}: the file holds no rows")
    for i, row in enumerate(ds):
        yield Origin(str(path), i, "row"), row


def _cell(name: str, text: str) -> Any:
    """A CSV/TSV cell as the field it fills: labels as booleans, weights and scores as numbers, lists of
    responses or scores (and message lists) as the JSON they are written in; everything else as text."""
    if name == "label" and text.strip().lower() in ("true", "false", "1", "0"):
        return text.strip().lower() in ("true", "1")
    if name == "weight":
        try:
            return float(text)
        except ValueError:
            return text  # the record names the bad weight
    if text.lstrip().startswith("[") and name in ("prompt", "chosen", "rejected", "responses", "scores"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _delimited_rows(path: Path) -> Iterator[tuple[Origin, Any]]:
    """Rows of a CSV or TSV file with a header line, by the 1-based line each row starts on."""
    text = _text(path)
    delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, line = 0, 1
    for row in reader:
        origin = Origin(str(path), line, "line")  # the line the row starts on (the header is line 1)
        line = reader.line_num
        if None in row or None in row.values():
            yield origin, DataError(f"{origin}: {len(reader.fieldnames or [])} columns expected", "malformed row")
        elif any(v.strip() for v in row.values()):
            rows += 1
            yield origin, {k: _cell(k, v) for k, v in row.items()}
    if not rows:
        raise DataError(f"{path}: the file holds no rows")


FILE_READERS = {
    ".jsonl": _jsonl_rows,
    ".json": _json_rows,
    ".jsonl.gz": _jsonl_rows,
    ".json.gz": _json_rows,
    ".csv": _delimited_rows,
    ".tsv": _delimited_rows,
    ".csv.gz": _delimited_rows,
    ".tsv.gz": _delimited_rows,
    ".parquet": _table_rows,
    ".arrow": _table_rows,
}


def file_type(path: Path) -> str:
    """The file's type as FILE_READERS knows it: its last suffix, or its last two for a compressed file."""
    suffixes = [s.lower() for s in path.suffixes]
    return "".join(suffixes[-2:]) if suffixes and suffixes[-1] == ".gz" else (suffixes[-1] if suffixes else "")


def _file_rows(path: Path) -> Iterator[tuple[Origin, Any]]:
    reader = FILE_READERS.get(file_type(path))
    if reader is None:
        raise DataError(f"{path}: unsupported file type {file_type(path)!r}; use {', '.join(FILE_READERS)}")
    yield from reader(path)


def source_files(source: str, split: str | None = None) -> list[Path]:
    """The local files a source names (a path or a glob; none for a hub id); a glob or a data-file path that
    matches nothing is an error. A folder laid out as the hub lays out a dataset gives its `split`'s files
    (data/<split>-*.parquet; default train), or, for train, every data file it holds."""
    text, split = str(source), split or "train"
    if Path(text).is_dir():
        patterns = (f"data/{split}-*", f"{split}-*") + (("data/*", "*") if split == "train" else ())
        for pattern in patterns:
            found = [p for p in sorted(Path(text).glob(pattern)) if p.is_file() and file_type(p) in FILE_READERS]
            if found:
                return found
        raise DataError(f"{text}: a folder with no {split} data file ({', '.join(FILE_READERS)})")
    paths = sorted(glob.glob(text)) if any(c in text for c in "*?[") else ([text] if Path(text).exists() else [])
    if not paths and (text.endswith(tuple(FILE_READERS)) or any(c in text for c in "*?[")):
        raise DataError(f"no data file matches {text!r}")
    return [Path(p) for p in paths]


def _rows(source: str | Path | Sequence[dict], split: str | None) -> Iterator[tuple[Origin, Any]]:
    if isinstance(source, (list, tuple)):
        for i, row in enumerate(source):
            yield Origin("in-memory rows", i, "index"), row
        return
    paths = source_files(str(source), split)
    if paths:
        for p in paths:
            yield from _file_rows(p)
        return
    import datasets  # a hub dataset id

    text = str(source)
    try:
        ds = datasets.load_dataset(text, split=split or "train")
    except Exception as e:  # offline, unknown id, unknown split
        raise DataError(f"{text!r} is neither a local file nor a loadable hub dataset: {e}") from None
    for i, row in enumerate(ds):
        yield Origin(f"{text}[{split or 'train'}]", i, "row"), row


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
    read = 0
    for origin, row in _rows(source, split):
        read += 1
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
            report.drop(e)
    if not read:
        raise DataError(f"{_name(source)}{f' [{split}]' if split else ''}: no rows")
    if not records:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items()))
        raise DataError(f"{_name(source)}: none of its {read} rows can be used ({reasons})")
    report.check()
    return records, report


def _name(source: str | Path | Sequence[dict]) -> str:
    return "in-memory rows" if isinstance(source, (list, tuple)) else str(source)


def split_indices(n: int, eval_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A deterministic train/eval split of `n` rows (each in source order): the same seed and count give the
    same split."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    held = np.zeros(n, bool)
    held[order[: round(n * eval_fraction)]] = True
    return np.flatnonzero(~held).tolist(), np.flatnonzero(held).tolist()


def kept_rows(n: int, keep: float, seed: int = 0) -> list[int]:
    """The rows of `n` kept when a source is kept in part: a seeded `keep` share of them, int(n · keep) rows
    (the alignment-handbook's dataset_mixture weight), in source order; all of them when keep is 1."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"the share of a source kept must lie in (0, 1], got {keep}")
    if keep == 1.0:
        return list(range(n))
    return sorted(np.random.default_rng(seed).permutation(n)[: int(n * keep)].tolist())


def split_records(records: Sequence[Record], eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """`split_indices` applied to records."""
    train, held = split_indices(len(records), eval_fraction, seed)
    return [records[i] for i in train], [records[i] for i in held]
