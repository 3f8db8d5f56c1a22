"""What the input pipeline costs per step at recipe scale, and how many times a run compiles.

1. The Llama-3-8B DPO recipe's step (128 pairs packed by tokens into micro-batches of a row per chip, max
   length 2048, prompts <= 1800) on real pairs (every paired file in ../shared/data, SmolLM2 tokenizer): the
   fixed geometry the run derives, the bytes of one step's batch arrays (all that crosses to the devices:
   integers, no mask; the step's unused micro-batches included), and the host time per process to plan a
   step and build its share, for 1 process (v5p-8: rows over 4 chips) and for 8 processes (v5p-64: rows over
   32 chips) — median of `--steps`.
2. Compilations of `jit(step)` and `jit(evaluate)` in a 48-step DPO run on real hh-rlhf pairs (a tiny random
   model with the SmolLM2 tokenizer stands in for the weights: shapes, not values, decide compilations).

    python benchmarks/batch_pipeline.py [--steps 20] [--skip-run]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PAIRED = ["hh_rlhf_test.jsonl", "llamafactory_dpo_en_demo.jsonl", "orca_dpo_pairs_sample.jsonl", "llmbar_all.jsonl"]


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def pipeline_costs(pairs: list, steps: int) -> None:
    import numpy as np

    from prefopt_jax import data

    for label, processes, row_multiple in (("v5p-8, 1 process", 1, 4), ("v5p-64, 8 processes", 8, 32)):
        spec = data.batch_spec(
            pairs, layout="packed", batch_size=128, max_length=2048, row_multiple=row_multiple, seed=0, steps=steps
        )
        g = spec.geometries["main"]
        packer = data.packer(spec, pairs, seed=0)
        share = {"main": slice(0, g.rows // processes)}  # process 0's rows (every process does the same work)
        empty = packer.empty()
        times, nbytes, local_bytes, padding = [], [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            plans = packer.next_step()
            room = [*plans, *[empty] * (spec.micro_batches - len(plans))]
            built = [data.host_arrays(spec, p, pairs, 0, share) for p in room]
            times.append(time.perf_counter() - t0)
            local_bytes.append(sum(a.nbytes for h in built for a in _arrays(h)))
            whole = [data.host_arrays(spec, p, pairs) for p in room]
            nbytes.append(sum(a.nbytes for h in whole for a in _arrays(h)))
            useful = sum(u.size for p in plans for u, _, _ in p.parts["main"].placed)
            padding.append(1 - useful / (len(plans) * g.tokens))
            del built
        print(
            f"{label}: geometry {g.rows} rows x {g.length} tokens, up to {g.groups} pairs, {g.scored} scored/row, "
            f"room for {spec.micro_batches} micro-batches; batch arrays per 128-pair step "
            f"{mib(statistics.median(nbytes))} (max {mib(max(nbytes))}), "
            f"{mib(statistics.median(local_bytes))} from each process; "
            f"host time per process per step {statistics.median(times) * 1e3:.1f} ms median "
            f"(max {max(times) * 1e3:.1f}); padding of the micro-batches computed {np.mean(padding):.1%}"
        )


def _arrays(host: dict):
    from prefopt_jax import data

    for v in host.values():
        if isinstance(v, data.Batch):
            yield from (v.input_ids, v.positions, v.segment_ids, v.branch, v.completion_start, v.completion_length)
        else:
            yield v


def compilations(tok) -> None:
    from prefopt_jax import models
    from prefopt_jax.config import load_config
    from prefopt_jax.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = models.ModelConfig(
            family="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
            num_kv_heads=1, head_dim=8, tie_embeddings=True, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        models.save_pretrained(models.create_model(cfg, seed=0), Path(tmp) / "model", tokenizer=tok)
        rows = (DATA / "hh_rlhf_test.jsonl").read_text().splitlines()[2303 : 2303 + 512]
        (Path(tmp) / "pairs.jsonl").write_text("\n".join(rows) + "\n")
        run = load_config(None, [
            f"model.source={Path(tmp) / 'model'}", f"data.source={Path(tmp) / 'pairs.jsonl'}", "data.max_length=512",
            "data.max_prompt_length=384", "data.eval_fraction=0.1", "train.steps=48", "train.batch_size=8",
            "eval.generate=false", f"output.dir={Path(tmp) / 'run'}", "output.tensorboard=false", "mesh.fsdp=1",
        ])  # fmt: skip
        start = time.perf_counter()
        train(run, out=open(os.devnull, "w"))
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        print(
            f"48-step DPO run on 512 hh-rlhf pairs (tiny model): {summary['compilations']} compilations, "
            f"{time.perf_counter() - start:.0f} s"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-run", action="store_true", help="only the pipeline costs")
    args = p.parse_args()
    from prefopt_jax import data, models

    tok = models.load_tokenizer("smollm2-135m-instruct")
    pairs = []
    for name in PAIRED:
        if not (DATA / name).is_file():
            print(f"skipping {name}: not in {DATA}", file=sys.stderr)
            continue
        prepared = data.prepare(DATA / name, tok, max_length=2048, max_prompt_length=1800, on_error="skip")
        pairs += prepared.train
    lengths = [len(e.prompt) + len(e.chosen) + len(e.rejected) for e in pairs]
    print(f"{len(pairs)} real pairs, {statistics.mean(lengths):.0f} tokens per pair (prompt once), max {max(lengths)}")
    pipeline_costs(pairs, args.steps)
    if not args.skip_run:
        compilations(tok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
