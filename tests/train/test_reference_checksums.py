"""Precomputed reference log-probs verify what they return: a byte flipped inside the stored log-prob values
or offsets is an error naming the file and `precompute-ref`, never log-probs trained on."""

from pathlib import Path

import numpy as np
import pytest

from prefopt_jax.data import Origin, TokenizedPair
from prefopt_jax.train import reference_cache as rc


def _examples():
    ids = lambda n: np.arange(n, dtype=np.int32)
    return [TokenizedPair(ids(2), ids(n), ids(n + 1), 1.0, Origin("t", i, "row")) for i, n in enumerate((3, 5, 2))]


def _write(tmp_path):
    examples = _examples()
    # hand-made log-probs: completion j of example i is -(i + j / 10) repeated over its tokens
    logps = [[np.full(len(c), -(i + j / 10), np.float32) for j, c in enumerate((e.chosen, e.rejected))]
             for i, e in enumerate(examples)]  # fmt: skip
    where = rc.write(str(tmp_path), "k", {"train": logps}, {"model": "m"})
    return examples, where


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def _chunk(where: str, array: str) -> Path:
    files = [p for p in (Path(where) / array).rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) == 1, files
    return files[0]


def test_intact_cache_reads_back_the_values(tmp_path):
    examples, _ = _write(tmp_path)
    got = rc.read(str(tmp_path), "k", {"train": examples})["train"]
    assert got[1][1].tolist() == [pytest.approx(-1.1)] * 6 and got[2][0].tolist() == [-2.0, -2.0]


@pytest.mark.parametrize("array", ["train.logps", "train.offsets"])
def test_a_flipped_byte_is_an_error_naming_the_file_and_precompute_ref(tmp_path, array):
    examples, where = _write(tmp_path)
    chunk = _chunk(where, array)
    # 3 + 4 + 5 + 6 + 2 + 3 = 23 float32 values (92 bytes) or 7 int64 offsets (56 bytes): flip inside them
    assert chunk.stat().st_size == (92 if array == "train.logps" else 56)
    _flip(chunk, 41)  # a byte of the 11th value / the 6th offset
    with pytest.raises(rc.ReferenceCacheError, match=rf"{array}: checksum mismatch.*precompute-ref"):
        rc.read(str(tmp_path), "k", {"train": examples})


def test_checksums_per_chunk():
    values = np.zeros(rc.CHUNK + 1, np.float32)
    assert len(rc.checksums(values, np.array([0]))["logps"]) == 2
