"""Does every input kind train the right way through the trainer? A few dozen steps of SmolLM2-135M (LoRA r 8,
fp32, CPU) per loss on real rows from ../shared/data, and the held-out figures before and after:

- DPO, an RPO mixture (DPO + NLL: `loss.name=[dpo, sft]`), ORPO and RRHF (its two candidates: chosen above
  rejected) on the Orca DPO pairs sample (GPT-4 answers chosen over a smaller model's), 10% held out:
  held-out reward accuracy and margin (the DPO implicit reward against the run's reference; reference-free
  losses are scored against the starting policy, `eval/rewards/*` of their own definition otherwise);
- KTO on the unpaired LLaMA-Factory KTO demo set, 10% held out: KTO's own held-out reward gap
  (`eval/rewards/chosen` - `eval/rewards/rejected`, desirable minus undesirable).

Each run is `prefopt-jax train` with the overrides printed next to it (the command a user types).

    python benchmarks/loss_kinds.py [--steps 24] [--only dpo,kto]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PAIRS = SHARED / "orca_dpo_pairs_sample.jsonl"
UNPAIRED = SHARED / "llamafactory_kto_en_demo.jsonl"
COMMON = [
    "data.max_length=384",
    "data.max_prompt_length=256",
    "data.eval_fraction=0.1",
    "data.on_error=skip",
    "train.batch_size=8",
    "train.learning_rate=0.0003",
    "train.warmup_steps=2",
    "train.lora_rank=8",
    "train.lora_alpha=16",
    "eval.generate=false",
    "output.tensorboard=false",
    "output.resume=false",
]
RUNS = {
    "dpo": ["--config", "configs/default.yaml", f"data.source={PAIRS}", "loss.name=dpo", "loss.beta=0.1"],
    "rpo": ["--config", "configs/default.yaml", f"data.source={PAIRS}"],  # [dpo, sft], weights [1, 1]
    "orpo": ["--config", "configs/orpo.yaml", f"data.source={PAIRS}"],
    "rrhf": ["--config", "configs/default.yaml", f"data.source={PAIRS}", "loss.name=rrhf", "train.reference=none"],
    "kto": ["--config", "configs/kto_unpaired.yaml", f"data.source={UNPAIRED}", "train.batch_size=16"],
}


def figures(summary: dict, name: str) -> dict:
    """The held-out figures that say whether the run moved the right way."""
    out = {}
    for when in ("before", "after"):
        m = summary[when]
        if name == "kto":
            out[when] = {"reward gap": m["eval/rewards/chosen"] - m["eval/rewards/rejected"]}
        else:
            out[when] = {k: m[f"eval/rewards/{k}"] for k in ("accuracies", "margins") if f"eval/rewards/{k}" in m}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--only", default=",".join(RUNS))
    args = ap.parse_args()
    if not PAIRS.exists():
        sys.exit(f"{PAIRS} not found (the shared data folder)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.only.split(","):
            overrides = [*RUNS[name], *COMMON, f"train.steps={args.steps}", f"output.dir={Path(work) / name}"]
            if name == "kto":
                overrides = [o for o in overrides if o != "train.batch_size=8"]
            command = [sys.executable, "-m", "prefopt_jax.cli", "train", *overrides]
            t0 = time.perf_counter()
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            summary = json.loads((Path(work) / name / "summary.json").read_text())
            results[name] = {"seconds": time.perf_counter() - t0, **figures(summary, name)}
            shown = " ".join(o for o in overrides if not o.startswith("output.dir"))
            print(f"{name}: prefopt-jax train {shown}", flush=True)
            print(f"  {results[name]}", flush=True)
    print("\n| loss | held-out figure | before | after | run (s) |\n|---|---|---|---|---|")
    for name, r in results.items():
        for k in r["before"]:
            print(f"| {name} | {k} | {r['before'][k]:.3f} | {r['after'][k]:.3f} | {r['seconds']:.0f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
