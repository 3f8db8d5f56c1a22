"""Each kind of loss trained on its own kind of real data with SmolLM2-135M-Instruct, and what it does to
held-out rows: the shipped configs (pairs, an RPO loss mixture, unpaired KTO, reference-free ORPO as TRL,
RRHF on ranked sets), each run through the command line for `--steps` steps on shorter rows (this CPU does
~60 tokens/s through a 135M-parameter step), printing the held-out figure the loss is judged by before and
after training and the run's wall time (loading, compilation and both evaluations included).

    python benchmarks/loss_kinds.py [--steps 24] [--only dpo,kto]

Held-out figures: reward accuracy and margin (pairs; DPO/RPO with a reference start at margin 0, where the
accuracy counts no pair as won), KTO's reward gap (mean implicit reward of held-out desirable minus
undesirable examples), RRHF's rank accuracy (the share of the scores' orderings the model's
length-normalised log-probs keep) and rank loss (the hinge sum over the pairs it gets wrong).
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
SHORT = ["data.max_length=160", "data.max_prompt_length=64", "data.on_error=skip"]
RUNS = {  # name: (config, overrides, the held-out figures it is judged by)
    "dpo": ("dpo_mixture.yaml", ["train.batch_size=4", "data.eval_fraction=0.005"], ["accuracies", "margins"]),
    "dpo_orca": (  # DPO alone on RPO's data
        "rpo.yaml",
        ["train.batch_size=4", "loss.name=dpo", "loss.weights=null", "loss.hparams={beta: 0.1}"],
        ["accuracies", "margins"],
    ),
    "rpo": ("rpo.yaml", ["train.batch_size=4"], ["accuracies", "margins"]),
    "kto": ("kto_unpaired.yaml", ["train.batch_size=8"], ["gap"]),
    "orpo": ("orpo.yaml", ["train.batch_size=4"], ["accuracies", "margins"]),
    "rrhf": ("rrhf_ranked.yaml", ["train.batch_size=2", "data.eval_fraction=0.25"], ["rank_accuracy", "rank_loss"]),
}


def figures(metrics: dict, wanted: list[str]) -> dict[str, float]:
    out = {}
    for w in wanted:
        if w == "gap":
            out[w] = metrics["eval/rewards/chosen"] - metrics["eval/rewards/rejected"]
        elif w.startswith("rank_"):
            out[w] = metrics[f"eval/rrhf/{w}"]
        else:
            out[w] = metrics[f"eval/rewards/{w}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--only", default=",".join(RUNS))
    args = ap.parse_args()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            config, extra, wanted = RUNS[name]
            out = Path(tmp) / name
            command = [
                sys.executable, "-m", "prefopt_jax.cli", "train", "--config", f"configs/{config}",
                f"train.steps={args.steps}", "train.warmup_steps=2", *SHORT, *extra, f"output.dir={out}",
            ]  # fmt: skip
            t0 = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if done.returncode:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{name}: exit {done.returncode}")
            summary = json.loads((out / "summary.json").read_text())
            before, after = figures(summary["before"], wanted), figures(summary["after"], wanted)
            row = {"run": name, "command": " ".join(command[2:]), "wall_s": round(wall), "before": before}
            row |= {"after": after, "compilations": summary["compilations"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| run | held-out figure | before | after | wall time |\n|---|---|---|---|---|")
    for r in rows:
        for i, w in enumerate(r["before"]):
            wall = f"{r['wall_s']} s" if i == 0 else ""
            print(f"| {r['run'] if i == 0 else ''} | {w} | {r['before'][w]:.3f} | {r['after'][w]:.3f} | {wall} |")


if __name__ == "__main__":
    main()
