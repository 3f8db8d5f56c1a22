"""The tokenised cache: what a source becomes before the train/held-out split (every usable row's tokens, or
why it cannot be used, and what truncation cut), stored as one Arrow IPC file per key, written once and
memory-mapped by every later load. The key hashes everything that decides the tokens: the bytes of each file
(or a hub dataset's fingerprint), the format, the tokenizer's whole serialised definition, its special tokens,
the chat template and the truncation settings, so a changed setting gives a new key, never a stale hit.

A load builds the examples as views into the mapped file, after checking the token buffer and the segment
lengths against the xxh3 checksums written with them (a mismatch is reported and the source tokenised again,
never trained on); so every process reads the whole file once."""

from __future__ import annotations

import collections
import gc
import json
import os
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prefopt_jax.data.records import DataError, Origin
from prefopt_jax.data.sources import DataReport, source_files
from prefopt_jax.data.tokenize import (
    Encoded,
    Encoder,
    TokenizedPair,
    TokenizedRanked,
    TokenizedUnpaired,
    completions_of,
)

VERSION = "3"  # bump when what a row becomes changes (2: plain-string transcripts read; 3: checksums)
KINDS = {TokenizedPair: 0, TokenizedUnpaired: 1, TokenizedRanked: 2}
DROPPED = -1


def _hasher():
    import xxhash  # a dependency of datasets; ~10 GB/s, so hashing the source costs next to nothing

    return xxhash.xxh3_128()


CHUNK_BYTES = 1 << 22  # the token buffer is checksummed in 4 MiB pieces, so a mismatch names where it is


def chunk_digests(values: np.ndarray, chunk_bytes: int) -> list[str]:
    """xxh3-64 hex digests of an array's bytes, one per `chunk_bytes` piece (so a mismatch says where)."""
    import xxhash

    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    return [xxhash.xxh3_64_hexdigest(raw[i : i + chunk_bytes]) for i in range(0, len(raw), chunk_bytes)]


def mismatched_chunks(found: Sequence[str], stored: Sequence[str]) -> list[int] | None:
    """The pieces whose digests differ (an empty list when only their count does), or None when all match."""
    bad = [i for i, (a, b) in enumerate(zip(found, stored, strict=False)) if a != b]
    return bad if bad or len(found) != len(stored) else None


def checksums(flat: np.ndarray, lengths: np.ndarray) -> dict:
    """xxh3 digests of the token buffer, per CHUNK_BYTES piece, and of the segment lengths that cut it into
    prompts and completions: written with the cache, checked on every load."""
    import xxhash

    pieces = chunk_digests(np.asarray(flat, np.int32), CHUNK_BYTES)
    return {"tokens": pieces, "segments": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(lengths, np.int64))}


def _corrupt(stored: dict, flat: np.ndarray, lengths: np.ndarray) -> str | None:
    """What of the cached file does not match its checksums (None: all of it does)."""
    found = checksums(flat, lengths)
    if found["segments"] != stored["segments"]:
        return "its segment lengths"
    bad = mismatched_chunks(found["tokens"], stored["tokens"])
    if bad is not None:
        first = bad[0] if bad else min(len(found["tokens"]), len(stored["tokens"]))
        per = CHUNK_BYTES // 4
        return f"its tokens {first * per}-{min((first + 1) * per, len(flat)) - 1}"
    return None


def source_digest(source: str, split: str | None, format: str | None) -> str:
    """A hash of a source's content: each local file's path and bytes, or a hub dataset's fingerprint."""
    h = _hasher()
    h.update(json.dumps({"version": VERSION, "format": format, "split": split}).encode())
    paths = source_files(source, split)
    for p in paths:
        h.update(str(p).encode() + b"\0")
        with p.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    if not paths:  # a hub dataset: datasets fingerprints what it downloaded
        import datasets

        try:
            ds = datasets.load_dataset(source, split=split or "train")
        except Exception as e:  # offline, unknown id, unknown split
            raise DataError(f"{source!r} is neither a local file nor a loadable hub dataset: {e}") from None
        h.update(f"{source}\0{ds._fingerprint}".encode())
    return h.hexdigest()


_DEFINITIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its size, digest)


def _definition_digest(tok) -> str:
    """A hash of the tokenizer's whole serialised definition (vocabulary, merges, normaliser, pre-tokeniser,
    added tokens), kept per tokenizer object and size: serialising a large vocabulary takes ~0.1 s."""
    try:
        size, digest = _DEFINITIONS[tok]
        if size == len(tok):
            return digest
    except (KeyError, TypeError):
        pass
    backend = getattr(tok, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    h = _hasher()
    h.update(definition.encode())
    try:
        _DEFINITIONS[tok] = (len(tok), h.hexdigest())
    except TypeError:  # not weak-referenceable: hashed every time
        pass
    return h.hexdigest()


def encoder_digest(encoder: Encoder) -> str:
    """A hash of what decides the tokens of a record: the tokenizer, the template and the truncation."""
    tok = encoder.tokenizer
    settings = {
        "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "bos": encoder.bos,
        "eos": encoder.eos,
        "template": getattr(tok, "chat_template", None) if encoder.use_chat_template else None,
        "max_length": encoder.max_length,
        "max_prompt_length": encoder.max_prompt_length,
        "max_completion_length": encoder.max_completion_length,
        "prompt_truncation": encoder.prompt_truncation,
    }
    h = _hasher()
    h.update(_definition_digest(tok).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def key(source: str, split: str | None, format: str | None, encoder: Encoder) -> str:
    h = _hasher()
    h.update(f"{source_digest(source, split, format)}\0{encoder_digest(encoder)}".encode())
    return h.hexdigest()


def path_for(root: str | Path, cache_key: str) -> Path:
    return Path(root).expanduser() / f"{cache_key}.arrow"


def write(
    root: str | Path, cache_key: str, outcomes: Sequence[Encoded], origins: Sequence[Origin], read: DataReport
) -> Path:
    """Store one source's outcomes and their origins (one per usable row, in order) and its read accounting
    (rows read, rows dropped while reading by reason, with the first message of each). Written to a temporary
    file and renamed, so a reader never sees a partial file and concurrent writers of one key leave one file."""
    import pyarrow as pa

    kinds, segments, tokens, labels, scores, weights = [], [], [], [], [], []
    reasons, messages, cut_prompt, cut_completions = [], [], [], []
    for o in outcomes:
        e = o.example
        dropped = isinstance(e, DataError)
        kinds.append(DROPPED if dropped else KINDS[type(e)])
        parts = [] if dropped else [e.prompt, *completions_of(e)]
        segments.append([len(p) for p in parts])
        tokens.append(np.concatenate(parts) if parts else np.zeros(0, np.int32))
        labels.append(bool(getattr(e, "label", False)))
        scores.append(list(getattr(e, "scores", ())))
        weights.append(0.0 if dropped else e.weight)
        reasons.append(e.reason if dropped else None)
        messages.append(str(e) if dropped else None)
        cut_prompt.append(o.truncated_prompt)
        cut_completions.append(o.truncated_completions)
    names = sorted({o.source for o in origins})
    source_ids = {n: i for i, n in enumerate(names)}
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int64)
    flat = np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32)
    table = pa.table(
        {
            "kind": pa.array(kinds, pa.int8()),
            "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            "segments": pa.array(segments, pa.list_(pa.int32())),
            "label": pa.array(labels, pa.bool_()),
            "scores": pa.array(scores, pa.list_(pa.float64())),
            "weight": pa.array(weights, pa.float64()),
            "source": pa.array([source_ids[o.source] for o in origins], pa.int32()),
            "index": pa.array([o.index for o in origins], pa.int64()),
            "unit": pa.array([o.unit for o in origins], pa.string()).dictionary_encode(),
            "drop_reason": pa.array(reasons, pa.string()),
            "drop_message": pa.array(messages, pa.string()),
            "truncated_prompt": pa.array(cut_prompt, pa.bool_()),
            "truncated_completions": pa.array(cut_completions, pa.int16()),
        }
    )
    meta = {"version": VERSION, "sources": names, "read": read.read, "dropped": read.dropped, "first": read.first}
    meta["checksums"] = checksums(flat, np.asarray([n for s in segments for n in s], np.int64))
    table = table.replace_schema_metadata({"prefopt_jax": json.dumps(meta)})
    target = path_for(root, cache_key)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{cache_key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table, max_chunksize=1 << 30)  # one record batch: contiguous columns
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _open_verified(path: Path):
    """(table, metadata, token values, segment lengths) of a cache file whose version and checksums hold, or
    None (missing, unreadable, another version, or corrupt: a warning names it). The token values are a
    read-only view into the memory-mapped file."""
    import pyarrow as pa

    if not path.is_file():
        return None
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        meta = json.loads(table.schema.metadata[b"prefopt_jax"])
    except (pa.ArrowException, OSError, KeyError, ValueError):
        return None
    if meta.get("version") != VERSION:
        return None
    values = table.column("tokens").chunk(0).values  # int32, no nulls: a view into the mapped file
    flat = np.frombuffer(values.buffers()[1], np.int32, count=len(values), offset=values.offset * 4)
    flat.flags.writeable = False  # a write would land in (or fault on) the mapped file
    lengths = table.column("segments").chunk(0).values.to_numpy()
    wrong = _corrupt(meta["checksums"], flat, lengths)
    if wrong is not None:  # bit rot, a bad copy, a disk error: never trained on
        why = f"tokenised cache {path}: {wrong} do not match their checksum; tokenising the source again"
        warnings.warn(why, stacklevel=3)
        return None
    return table, meta, flat, lengths


def read(root: str | Path, cache_key: str) -> tuple[list[Encoded], DataReport] | None:
    """(outcomes, read accounting) of a stored key, or None when there is none (or it is unreadable or
    corrupt: then it is rebuilt)."""
    opened = _open_verified(path_for(root, cache_key))
    if opened is None:
        return None
    table, meta, flat, lengths = opened
    col = lambda name: table.column(name).chunk(0)  # written as one record batch
    segments = col("segments")
    # rows are contiguous in `flat` and a dropped row has no segments, so segment s starts where the previous ended
    ends_np = np.cumsum(lengths)
    starts, ends = (ends_np - lengths).tolist(), ends_np.tolist()
    first_segment = segments.offsets.to_numpy().tolist()
    kinds_np = col("kind").to_numpy()
    kinds = kinds_np.tolist()
    labels = col("label").to_numpy(zero_copy_only=False).tolist()
    weights = col("weight").to_numpy().tolist()
    cut_prompt = col("truncated_prompt").to_numpy(zero_copy_only=False).tolist()
    cut_completions = col("truncated_completions").to_numpy().tolist()
    unit_codes = col("unit")
    unit_names = unit_codes.dictionary.to_pylist()
    units = [unit_names[c] for c in unit_codes.indices.to_numpy().tolist()]
    names, sources, indices = meta["sources"], col("source").to_numpy().tolist(), col("index").to_numpy().tolist()
    # the rare columns (scores of ranked rows, messages of dropped ones) are read only where they are set
    ranked = {int(r): col("scores")[int(r)].as_py() for r in np.flatnonzero(kinds_np == 2)}
    drops = {int(r): (col("drop_message")[int(r)].as_py(), col("drop_reason")[int(r)].as_py())
             for r in np.flatnonzero(kinds_np == DROPPED)}  # fmt: skip
    outcomes = []
    collecting = gc.isenabled()
    gc.disable()  # tens of thousands of small acyclic objects: the cycle collector would only rescan them
    try:
        for r, kind in enumerate(kinds):
            if kind == DROPPED:
                outcomes.append(Encoded(DataError(*drops[r])))
                continue
            origin = Origin(names[sources[r]], indices[r], units[r])
            parts = [flat[starts[s] : ends[s]] for s in range(first_segment[r], first_segment[r + 1])]
            if kind == 0:
                e = TokenizedPair(parts[0], parts[1], parts[2], weights[r], origin)
            elif kind == 1:
                e = TokenizedUnpaired(parts[0], parts[1], labels[r], weights[r], origin)
            else:
                e = TokenizedRanked(parts[0], tuple(parts[1:]), tuple(ranked[r]), weights[r], origin)
            outcomes.append(Encoded(e, cut_prompt[r], cut_completions[r]))
    finally:
        if collecting:
            gc.enable()
    dropped = collections.Counter(meta["dropped"])
    report = DataReport(read=meta["read"], used=meta["read"] - sum(dropped.values()), dropped=dropped)
    report.first.update(meta["first"])
    return outcomes, report
