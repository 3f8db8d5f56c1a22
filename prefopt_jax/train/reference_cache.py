"""Precomputed reference log-probs: `prefopt-jax precompute-ref` runs the reference once over the train and
held-out examples and stores every completion's per-token log-probs with tensorstore (zarr3; a local path
or gs://bucket/path). The cache is keyed by a content hash of the model's weight files, the dtype and the
tokenised examples (which covers the tokenizer, the data and the truncation settings), so a change to any
of them is a different key, never a stale hit. Training with `train.reference=precomputed` reads them and
runs no reference forward at all.

Layout of `<cache>/<key>/`: per split, `<split>.logps` (float32, every completion's tokens one after
another) and `<split>.offsets` (int64, where each completion starts); `meta.json` is written last, so a
cache without it is incomplete and is never read. `meta.json` also holds xxh3 checksums of both arrays (the
log-probs per stored chunk of `CHUNK` values), checked on every read: changed bytes (bit rot, a bad copy) are
an error naming the file, never used for training; `precompute-ref` then computes them again."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorstore as ts
import xxhash

from prefopt_jax.data import TokenizedPair, TokenizedUnpaired
from prefopt_jax.data.cache import chunk_digests, mismatched_chunks

CHUNK = 1 << 20  # values per stored chunk of the log-probs (4 MiB of float32) and per checksum


def checksums(values: np.ndarray, offsets: np.ndarray) -> dict:
    """xxh3-64 hex digests of the log-probs, per CHUNK values, and of the offsets.

    >>> checksums(np.zeros(3, np.float32), np.array([0, 3]))["logps"] == [xxhash.xxh3_64_hexdigest(bytes(12))]
    True
    """
    return {
        "logps": chunk_digests(np.asarray(values, np.float32), CHUNK * 4),
        "offsets": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(offsets, np.int64)),
    }


class ReferenceCacheError(RuntimeError):
    """The cache for this configuration is missing or does not match the examples."""


def completions_of(example) -> list[np.ndarray]:
    """The completions whose reference log-probs a training example needs, in the step's order."""
    if isinstance(example, TokenizedPair):
        return [example.chosen, example.rejected]
    if isinstance(example, TokenizedUnpaired):
        return [example.completion]
    raise TypeError(f"no precomputed reference for {type(example).__name__}")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def model_digest(path: Path) -> str:
    """Content hash of a model: the file itself, or a folder's weights and config files."""
    if path.is_file():
        return file_digest(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json", ".gguf", ".bin"))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + file_digest(p).encode())
    return h.hexdigest()


def cache_key(model: str, dtype: str, splits: dict[str, Sequence]) -> str:
    """The key of one configuration's cache: model weights digest, dtype and every tokenised example."""
    h = hashlib.sha256(f"prefopt-jax reference cache v1\0{model}\0{dtype}\0".encode())
    for name in sorted(splits):
        h.update(f"split {name} {len(splits[name])}\0".encode())
        for e in splits[name]:
            h.update(np.asarray(e.prompt, np.int32).tobytes() + b"|")
            for c in completions_of(e):
                h.update(np.asarray(c, np.int32).tobytes() + b"|")
    return h.hexdigest()[:32]


def _kvstore(path: str) -> dict:
    if path.startswith("gs://"):
        bucket, _, rest = path.removeprefix("gs://").partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": rest}
    return {"driver": "file", "path": str(Path(path).expanduser().absolute()) + ("/" if path.endswith("/") else "")}


def _array(path: str, dtype: str, shape: tuple[int, ...] | None = None) -> ts.TensorStore:
    spec = {"driver": "zarr3", "kvstore": _kvstore(path)}
    if shape is None:
        return ts.open(spec, open=True).result()
    chunk = [max(1, min(shape[0], CHUNK))]
    return ts.open(
        spec,
        create=True,
        delete_existing=True,
        dtype=dtype,
        shape=shape,
        chunk_layout=ts.ChunkLayout(write_chunk_shape=chunk),
    ).result()


def write(root: str, key: str, splits: dict[str, list[list[np.ndarray]]], meta: dict) -> str:
    """Store per-example reference log-probs (`splits[name][i]` = one array per completion) under
    `root/key`; returns that location."""
    where = f"{root.rstrip('/')}/{key}"
    counts = {}
    for name, examples in splits.items():
        flat = [np.asarray(c, np.float32) for e in examples for c in e]
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in flat])]).astype(np.int64)
        values = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        _array(f"{where}/{name}.logps", "float32", values.shape).write(values).result()
        _array(f"{where}/{name}.offsets", "int64", offsets.shape).write(offsets).result()
        counts[name] = {"examples": len(examples), "completions": len(flat), "tokens": len(values)}
        counts[name]["checksums"] = checksums(values, offsets)
    meta_store = ts.KvStore.open(_kvstore(where + "/")).result()
    meta_store.write("meta.json", json.dumps({**meta, "key": key, "splits": counts}, indent=2).encode()).result()
    return where


def read(root: str, key: str, splits: dict[str, Sequence]) -> dict[str, list[list[np.ndarray]]]:
    """The cached log-probs of each split's examples, checked against their completion lengths."""
    where = f"{root.rstrip('/')}/{key}"
    meta_raw = ts.KvStore.open(_kvstore(where + "/")).result().read("meta.json").result()
    if meta_raw.state != "value":
        raise ReferenceCacheError(
            f"no precomputed reference log-probs for this model, data and settings at {where}; "
            "run `prefopt-jax precompute-ref` with the same config first"
        )
    stored = json.loads(meta_raw.value).get("splits", {})
    out = {}
    for name, examples in splits.items():
        values = _array(f"{where}/{name}.logps", "float32").read().result()
        offsets = _array(f"{where}/{name}.offsets", "int64").read().result()
        verify(where, name, stored.get(name, {}).get("checksums"), values, offsets)
        lengths = [len(c) for e in examples for c in completions_of(e)]
        if len(offsets) != len(lengths) + 1 or not np.array_equal(np.diff(offsets), lengths):
            raise ReferenceCacheError(f"{where}/{name}: the cached completions do not match the examples")
        pieces = iter(np.split(values, offsets[1:-1]))
        out[name] = [[next(pieces) for _ in completions_of(e)] for e in examples]
    return out


def verify(where: str, name: str, stored: dict | None, values: np.ndarray, offsets: np.ndarray) -> None:
    """Raise ReferenceCacheError, naming the file, unless the arrays are the bytes that were written."""
    again = "run `prefopt-jax precompute-ref` with the same config to compute them again"
    if not stored:
        raise ReferenceCacheError(f"{where}/{name}: no checksums in meta.json (an older cache); {again}")
    now = checksums(values, offsets)
    if now["offsets"] != stored.get("offsets"):
        raise ReferenceCacheError(f"{where}/{name}.offsets: checksum mismatch (changed bytes); {again}")
    bad = mismatched_chunks(now["logps"], stored.get("logps", []))
    if bad is not None:
        raise ReferenceCacheError(
            f"{where}/{name}.logps: checksum mismatch in chunk(s) {bad or 'count'} of {CHUNK} values (changed "
            f"bytes); {again}"
        )


def key_for(model, prepared) -> str:
    """The cache key of a run's reference (`model`: the config's model section) over `prepared`'s train and
    held-out examples."""
    from prefopt_jax import models

    digest = model_digest(models.resolve_source(model.source))
    dtypes = f"{model.dtype}/{model.compute}"
    return cache_key(digest, dtypes, {"train": prepared.train, "eval": prepared.eval})


def precompute(cfg, out=None) -> str:
    """Run the reference (the model at `model.source`) over the train and held-out examples once and store
    the log-probs; returns where. Nothing is recomputed when the cache is already complete."""
    import sys

    import jax

    from prefopt_jax import data
    from prefopt_jax.train import batches, build, runtime
    from prefopt_jax.train import metrics as metrics_lib
    from prefopt_jax.train import step as step_lib

    out = out or sys.stdout
    parts = build.resolve(cfg)
    mesh, tokenizer = runtime.start(cfg.model, cfg.mesh, cfg.output.compilation_cache)
    prepared, _ = batches.load_data(cfg.data, cfg.train.seed, tokenizer, parts.loss)
    model = runtime.load_model(cfg.model, parts.rules, mesh)
    key = key_for(cfg.model, prepared)
    root = cfg.train.reference_cache
    splits = {"train": prepared.train, "eval": prepared.eval}
    try:
        read(root, key, splits)
        print(f"reference log-probs already cached at {root.rstrip('/')}/{key}", file=out)
        return f"{root.rstrip('/')}/{key}"
    except (ReferenceCacheError, ValueError) as e:
        if "checksum" in str(e) or "no checksums" in str(e):
            print(f"reference log-probs: {e.args[0].split('; ')[0]}; computing them again", file=out)
    mcfg, params = model.config, model.params()
    pad_id = tokenizer.pad_token_id or 0
    attention = build.attention(cfg.model, mcfg, mesh.devices.flat[0].platform)
    specs = build.batch_specs(parts, cfg.data, cfg.train, prepared, mesh, attention)
    results: dict[str, list] = {}
    for name, examples in splits.items():
        spec = specs[name]
        step_spec = build.step_spec(parts, cfg.model, cfg.train, spec.geometries, attention, mesh)
        geometry, attn = spec.geometries["main"], step_spec.attention_for("main")
        logps_fn = jax.jit(
            lambda p, b, g=geometry, a=attn, s=step_spec: step_lib.completion_logps(
                mcfg, p, b, g, a, dtype=s.dtype, constrain=s.constrain
            )[0]
        )
        results[name] = [None] * len(examples)
        plans = data.packer(spec, examples, seed=0, shuffle=False) if examples else None
        bar = metrics_lib.progress_bar(len(examples), f"reference log-probs ({name})", out)
        while plans is not None and (plan := plans.next_micro()) is not None:
            bar.update(len(plan.examples))
            placed = batches.place(spec, batches.host_step(spec, [plan], examples, mesh, pad_id, micro_batches=1), mesh)
            logps = jax.device_get(logps_fn(params, jax.tree.map(lambda a: a[0], placed["main"])))
            for slot, i in enumerate(plan.examples):
                results[name][i] = [logps[slot, j, : len(c)] for j, c in enumerate(completions_of(examples[i]))]
        bar.close()
        print(f"reference log-probs: {name} {len(examples)} examples", file=out)
    meta = {"model": cfg.model.source, "dtype": cfg.model.dtype, "data": cfg.data.source}
    where = write(root, key, results, meta)
    print(f"wrote {where}", file=out)
    return where
