"""What reading and tokenising preference data costs, and what the tokenised cache saves.

On ../shared/data/hh_rlhf_test.jsonl (8,486 multi-turn pairs) with the SmolLM2 tokenizer, max length 1024:
1. First pass (read, normalise, render the chat template, tokenise in batches, write the cache): rows/s,
   against the previous way in the same run (one `apply_chat_template(tokenize=True)` per prompt and per
   prompt + completion, what `prepare` did before), median of `--repeats`.
   The same with one Grain tokenisation worker process per core (`data.workers`).
2. A second load from the cache (what a restart or another run does): seconds and the ratio to the first.
3. Time to the first batch in a fresh process (interpreter start, imports, tokenizer, data, geometry, the
   first step's arrays): without a cache and with one.
4. A simulated 8-process run (8 row shares of every micro-batch of 8 rows, each holding as many pairs as fit
   in the packed layout): over one pass every example is read by exactly one process; the tokens each reads
   depend on how the rows fill.

    python benchmarks/data_pipeline.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "hh_rlhf_test.jsonl"
MAX_LENGTH = 1024
SETTINGS = dict(max_length=MAX_LENGTH, eval_fraction=0.05, on_error="skip")  # 34 prompts exceed 1024 tokens


def per_record_tokenisation(records, tokenizer) -> int:
    """The previous way: the template tokenised once for the prompt and once per prompt + completion."""
    n = 0
    for r in records:
        msgs = [{"role": role, "content": c} for role, c in r.prompt]
        tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        for c in (r.chosen, r.rejected):
            tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": c}])
        n += 1
    return n


FIRST_BATCH = """
import time, sys
t0 = float(sys.argv[1])
from prefopt_jax import data, models
tok = models.load_tokenizer("smollm2-135m-instruct")
p = data.prepare(sys.argv[2], tok, max_length=1024, eval_fraction=0.05, cache_dir=sys.argv[3] or None, on_error="skip")
spec = data.batch_spec(p.train + p.eval, train=p.train, layout="packed", batch_size=16, max_length=1024, steps=1)
packer = data.packer(spec, p.train, seed=0)
data.host_arrays(spec, packer.next_step()[0], p.train)
print(time.time() - t0, p.sources[0].cache)
"""


def first_batch_seconds(cache_dir: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", FIRST_BATCH, str(time.time()), str(SOURCE), cache_dir],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.split()  # fmt: skip
    return float(out[-2]), out[-1]


def eight_processes(prepared) -> None:
    import numpy as np

    from prefopt_jax import data

    spec = data.batch_spec(prepared.train, layout="packed", batch_size=16, max_length=MAX_LENGTH, row_multiple=8)
    g = spec.geometries["main"]
    share = g.rows // 8
    packer = data.packer(spec, prepared.train, shuffle=False)  # one pass
    seen = np.zeros(len(prepared.train), np.int64)
    tokens = np.zeros(8, np.int64)
    micro = 0
    while (plan := packer.next_micro()) is not None:
        micro += 1
        rp = plan.parts["main"]
        for u, row, _ in rp.placed:
            host = row // share
            seen[plan.examples[u.group]] += len(u.completions)
            tokens[host] += u.size
    print(
        f"8 processes, {micro} micro-batches of {g.rows} x {g.length} ({share} rows each): pairs whose two "
        f"completions are built exactly once: {int((seen == 2).sum())}/{len(seen)} (more: "
        f"{int((seen > 2).sum())}, fewer: {int((seen < 2).sum())}); tokens per process: {tokens.min()}-{tokens.max()} "
        f"(share {tokens.min() / tokens.sum():.3f}-{tokens.max() / tokens.sum():.3f}, 1/8 = 0.125)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not SOURCE.exists():
        sys.exit(f"{SOURCE} not found")
    sys.path.insert(0, str(ROOT))
    from prefopt_jax import data, models

    tok = models.load_tokenizer("smollm2-135m-instruct")
    records, _ = data.read_records(SOURCE)
    n = len(records)
    old = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        per_record_tokenisation(records, tok)
        old.append(time.perf_counter() - t)
    first, second = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as root:
            t = time.perf_counter()
            prepared = data.prepare(SOURCE, tok, cache_dir=root, **SETTINGS)
            first.append(time.perf_counter() - t)
            assert prepared.sources[0].cache == "written"
            for _ in range(5):
                t = time.perf_counter()
                hit = data.prepare(SOURCE, tok, cache_dir=root, **SETTINGS)
                second.append(time.perf_counter() - t)
                assert hit.sources[0].cache == "hit"
            size = sum(p.stat().st_size for p in Path(root).glob("*.arrow"))
    pooled = []  # the first pass with Grain tokenisation workers (one per core), no cache
    for _ in range(args.repeats):
        t = time.perf_counter()
        with_workers = data.prepare(SOURCE, tok, workers=os.cpu_count(), **SETTINGS)
        pooled.append(time.perf_counter() - t)
    assert [e.prompt.tolist() for e in with_workers.train] == [e.prompt.tolist() for e in prepared.train]
    t_old, t_first, t_second = (statistics.median(x) for x in (old, first, second))
    print(f"{n} rows of {SOURCE.name}, SmolLM2 tokenizer, max length {MAX_LENGTH}, {os.cpu_count()} cores")
    print(f"before (per-record apply_chat_template, tokenisation only): {n / t_old:,.0f} rows/s ({t_old:.2f} s)")
    print(f"first pass (read + template + batch tokenise + write cache): {n / t_first:,.0f} rows/s ({t_first:.2f} s)")
    t_pooled = statistics.median(pooled)
    print(f"first pass with {os.cpu_count()} Grain tokenisation workers (one encoder thread each, no cache): "
          f"{n / t_pooled:,.0f} rows/s ({t_pooled:.2f} s, worker start-up included)")  # fmt: skip
    print(f"second load from the cache ({size / 2**20:.1f} MiB): {t_second * 1000:.0f} ms, "
          f"{t_first / t_second:.0f}x faster than the first pass")  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        cold = first_batch_seconds(root)
        warm = first_batch_seconds(root)
        none = first_batch_seconds("")
    print(f"fresh process to its first batch: no cache {none[0]:.1f} s, first run {cold[0]:.1f} s ({cold[1]}), "
          f"restart {warm[0]:.1f} s ({warm[1]})")  # fmt: skip
    eight_processes(hit)
    figures = {"rows": n, "before_rows_per_s": n / t_old, "first_rows_per_s": n / t_first, "second_load_s": t_second}
    figures["workers_rows_per_s"] = n / t_pooled
    print(json.dumps({**figures, "first_batch_s": {"none": none[0], "cold": cold[0], "warm": warm[0]}}))


if __name__ == "__main__":
    main()
