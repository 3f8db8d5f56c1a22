"""Tokens and FLOPs computed per trained pair: the step packs exactly `batch_size` pairs by tokens into as few
fixed-shape micro-batches (R rows x T tokens) as they need, and skips the rest of its room.

Two sets, each planned as a run plans it (its seeded order, its steps; nothing compiled):
- the CPU DPO benchmark's 64 pairs (`dpo_vs_trl.py`: the first 64 helpful-base pairs of hh_rlhf_test.jsonl,
  max length 512, prompt <= 384), 8 pairs per step, one CPU device (R = 1 row, T a multiple of 32), 64 steps;
- the Llama-3-8B DPO recipe's data: every paired file in ../shared/data (10,268 pairs at max length 2048,
  prompt <= 1800), 128 pairs per step, on v5p-8 (R = 4 rows, one per chip) and 8xH100 (R = 8), T a multiple
  of 128, 80 steps (one epoch).
Per set: the tokens a pair has (prompt once: what exact shapes compute), the tokens computed per trained pair
(the micro-batches used x R x T over the pairs), micro-batches per step, and one forward's FLOPs per pair
(`train.flops`) as the model needs them and as computed: every row position through the layers, and through
the unembedding every scored slot of the chunks the step does not skip (R x 128-slot chunks up to the
busiest row's last scored token, of the budget of C per row). For the 8B sets also the DPO step of full
fine-tuning with the reference in the step (4 forwards' worth: forward + backward + the reference's):
its FLOPs as computed, and the step time if the chips ran them at 40% of their bf16 peak.

    python benchmarks/packing.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from prefopt_jax import data, models
from prefopt_jax.train import flops

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PAIRED = ["hh_rlhf_test.jsonl", "llamafactory_dpo_en_demo.jsonl", "orca_dpo_pairs_sample.jsonl", "llmbar_all.jsonl"]
HELPFUL_START = 2303


def measure(
    label: str, pairs: list, mcfg, *, batch_size: int, rows: int, multiple: int, steps: int, peak: float = 0.0
) -> dict:
    spec = data.batch_spec(
        pairs, layout="packed", batch_size=batch_size, max_length=2048, steps=steps, row_multiple=rows,
        tiles=multiple == data.TILE, length_multiple=multiple,
    )  # fmt: skip
    g = spec.geometries["main"]
    packer = data.packer(spec, pairs, seed=0)
    used, needed_tokens, needed_flops, computed_flops = [], 0.0, 0.0, 0.0
    for _ in range(steps):
        plans = packer.next_step()
        used.append(len(plans))
        for p in plans:
            tokens, attended, scored = flops.plan_counts(p.parts["main"])
            needed_tokens += tokens
            needed_flops += flops.forward_flops(mcfg, tokens, attended, scored)
            chunk = min(128, g.scored)
            slots = g.rows * chunk * -(-int(p.parts["main"].scored.max()) // chunk)
            computed_flops += flops.forward_flops(mcfg, g.tokens, attended, slots)
    trained = steps * batch_size
    exact = needed_tokens / trained
    computed = sum(used) * g.tokens / trained
    out = {
        "set": label,
        "geometry": f"{g.rows} x {g.length}, up to {g.groups} pairs, {g.scored} scored/row",
        "room": spec.micro_batches,
        "micro_batches_per_step": statistics.mean(used),
        "exact_tokens_per_pair": exact,
        "computed_tokens_per_pair": computed,
        "tokens_ratio": computed / exact,
        "needed_gflops_per_pair": needed_flops / trained / 1e9,
        "computed_gflops_per_pair": computed_flops / trained / 1e9,
    }
    out["flops_ratio"] = out["computed_gflops_per_pair"] / out["needed_gflops_per_pair"]
    out["step_pflops_computed"] = 4 * computed_flops / steps / 1e15
    out["step_s_at_40pct"] = 4 * computed_flops / steps / (0.4 * peak) if peak else None
    return out


def main() -> int:
    tok = models.load_tokenizer("smollm2-135m-instruct")
    hh = DATA / "hh_rlhf_test.jsonl"
    if not hh.is_file():
        print(f"needs the shared data at {DATA}", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in hh.read_text().splitlines()[HELPFUL_START : HELPFUL_START + 64]]
    small = data.prepare(rows, tok, max_length=512, max_prompt_length=384).train
    big = []
    for name in PAIRED:
        big += data.prepare(DATA / name, tok, max_length=2048, max_prompt_length=1800, on_error="skip").train
    smol, llama = (
        models.model_config("smollm2-135m-instruct"),
        models.model_config("meta-llama/Meta-Llama-3-8B-Instruct"),
    )
    results = [
        measure("64 pairs, 8/step, 1 CPU device (SmolLM2-135M)", small, smol, batch_size=8, rows=1,
                multiple=data.TILE, steps=64),
        measure(f"{len(big)} pairs, 128/step, v5p-8 (Llama-3-8B)", big, llama, batch_size=128, rows=4,
                multiple=128, steps=80, peak=4 * flops.PEAK_FLOPS["TPU v5p"]),
        measure(f"{len(big)} pairs, 128/step, 8xH100 (Llama-3-8B)", big, llama, batch_size=128, rows=8,
                multiple=128, steps=80, peak=8 * flops.PEAK_FLOPS["NVIDIA H100"]),
    ]  # fmt: skip
    print(
        "| set | micro-batch | room | used/step | tokens/pair exact | computed | ratio | GFLOP/pair needed | computed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['set']} | {r['geometry']} | {r['room']} | {r['micro_batches_per_step']:.2f} | "
            f"{r['exact_tokens_per_pair']:.0f} | {r['computed_tokens_per_pair']:.0f} | {r['tokens_ratio']:.3f}x | "
            f"{r['needed_gflops_per_pair']:.1f} | {r['computed_gflops_per_pair']:.1f} ({r['flops_ratio']:.3f}x) |"
        )
    print("\n| 8B DPO step, full fine-tuning | PFLOP per step computed | s/step at 40% of peak |\n|---|---|---|")
    for r in results[1:]:
        print(f"| {r['set']} | {r['step_pflops_computed']:.2f} | {r['step_s_at_40pct']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
