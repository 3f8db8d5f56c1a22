"""What verifying the tokenised cache costs: load time of the cached hh-rlhf file (8,486 pairs, SmolLM2
tokenizer, max length 1024, prompts to 512) with its xxh3 checksums checked against without, from a cold page cache (the
file's pages evicted with posix_fadvise before each load) and warm.

    python benchmarks/cache_verify.py [--source ../shared/data/hh_rlhf_test.jsonl] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _touch(outcomes) -> int:
    """Read every cached token once (what the first epoch does): the pages a lazy load left on disk."""
    total = 0
    for o in outcomes:
        e = o.example
        for part in (getattr(e, "prompt", None), getattr(e, "chosen", None), getattr(e, "rejected", None)):
            if part is not None:
                total += int(part.sum())
    return total


def _load(root: str, key: str, path: Path, verify: bool, cold: bool, touch: bool = False) -> float:
    from prefopt_jax.data import cache

    if cold:
        _evict(path)
    t = time.perf_counter()
    if verify:
        got = cache.read(root, key)
    else:
        with mock.patch.object(cache, "_corrupt", lambda *a: None):
            got = cache.read(root, key)
    if touch and got is not None:
        _touch(got[0])
    elapsed = time.perf_counter() - t
    assert got is not None
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/hh_rlhf_test.jsonl"))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from prefopt_jax import data, models

    tokenizer = models.load_tokenizer("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        prepared = data.prepare(args.source, tokenizer, max_length=1024, max_prompt_length=512, cache_dir=root)
        print(f"first pass (tokenise + write): {time.perf_counter() - t:.1f} s, {len(prepared.train)} examples")
        (path,) = Path(root).glob("*.arrow")
        print(f"cache file: {path.stat().st_size / 2**20:.1f} MiB")
        for cold, touch in ((True, False), (False, False), (True, True)):
            times = {True: [], False: []}
            for _ in range(args.repeats):
                for verify in (False, True):  # interleaved, so drift hits both alike
                    times[verify].append(_load(root, path.stem, path, verify, cold, touch))
            off, on = statistics.median(times[False]), statistics.median(times[True])
            what = ("cold" if cold else "warm") + " page cache" + (", then every token read once" if touch else "")
            print(
                f"{what}, median of {args.repeats}: without verification {off * 1e3:.0f} ms, with {on * 1e3:.0f} ms "
                f"({(on / off - 1) * 100:+.1f}%)"
            )


if __name__ == "__main__":
    main()
