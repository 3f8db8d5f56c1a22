"""Per-device memory of the 7-9B recipes, and of Llama-3-8B DPO by target and reference mode, from
`prefopt-jax plan` (one process per plan: simulated targets need their own device count).

    python benchmarks/plan_matrix.py            # the reference-mode matrix
    python benchmarks/plan_matrix.py --recipes  # every recipe on its TPU slice (v5p-8) and on a v5e-32

TPU targets need the `tpu` extra (libtpu); without it they are simulated too."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
LLAMA_DPO = ROOT / "configs" / "recipes" / "llama3-8b-instruct-dpo.yaml"
MODES = {
    "frozen (bf16 copy)": [],
    "lora_base (LoRA r16)": ["train.lora_rank=16", "train.lora_alpha=32", "train.reference=lora_base",
                             "train.reference_dtype=null"],
    "precomputed": ["train.reference=precomputed", "train.reference_dtype=null"],
}  # fmt: skip
DEVICES = {"v5e-16": 16, "v5e-32": 32, "v5p-8": 4, "8xH100": 8}
GiB = 2**30


def plan(config: Path, target: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "prefopt_jax.cli", "plan", "--config", str(config), "--target", target]
        done = subprocess.run([*cmd, "--json", str(out), *overrides], capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"{' '.join(cmd + overrides)} failed:\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())


def row(r: dict) -> str:
    verdict = "fits" if r["fits"] else "does not fit"
    source = "libtpu" if r["compiled_for"].startswith("TPU") else "simulated"
    return (
        f"{r['state_bytes'] / GiB:.1f} | {(r['frozen_bytes'] + r['reference_bytes']) / GiB:.1f} | "
        f"{r['temp_bytes'] / GiB:.1f} | {r['total_bytes'] / GiB:.1f} of {r['device_memory'] / GiB:.0f} "
        f"({verdict}) | {r['step_seconds']:.1f} | {r['attention']} | {r['batch_bytes_total'] / 2**20:.1f} | {source}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", action="store_true")
    args = parser.parse_args()
    head = (
        "| state GiB | base/ref GiB | temporaries GiB | total GiB | s/step at 40% MFU | attention | batch MiB/step "
        "| compiler |"
    )
    rule = "|---" * 10 + "|"
    if args.recipes:
        print(f"| recipe | target {head}\n{rule}")
        for recipe in RECIPES:
            slice_name = recipe.read_text().split()[2].rstrip(":")  # "# TPU v5p-8: ..."
            for target in (slice_name, "v5e-32"):
                r = plan(recipe, target, [])
                print(f"| {recipe.stem} | {target} | {row(r)} |", flush=True)
        return
    print(f"| target | reference {head}\n{rule}")
    for target in DEVICES:
        for mode, overrides in MODES.items():
            print(f"| {target} | {mode} | {row(plan(LLAMA_DPO, target, overrides))} |", flush=True)


if __name__ == "__main__":
    main()
