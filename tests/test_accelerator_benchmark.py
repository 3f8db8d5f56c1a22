"""benchmarks/accelerator.py cannot rot: its --smoke run (the same code, a tiny model on CPU, the Pallas
kernels in interpret mode) finishes, writes its JSON, and every check in it passes; cuDNN is skipped, with the
reason, where it cannot run."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_a_passing_report(tmp_path):
    out = tmp_path / "accelerator.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    by = lambda section: [r for r in rows if r["section"] == section]
    assert not [r for r in rows if "error" in r]
    checked = [r for r in by("attention correctness") if "ok" in r]
    assert {r["impl"] for r in checked} == {"pallas_gpu", "dense"} and all(r["ok"] for r in checked)
    assert all(r["dq_rel_err"] <= r["tolerance"] for r in checked)
    assert all("cannot run on cpu" in r["skipped"] for r in by("attention correctness") if r["impl"] == "cudnn")
    steps = by("step correctness")
    assert len(steps) == 2 and all(r["ok"] for r in steps)
    speed = [r for r in by("dpo step") if "step_s" in r]
    assert len(speed) == 2 and all(r["tokens_per_s"] > 0 and r["compile_s"] > 0 for r in speed)
    assert "| smollm2-135m/full/pallas_gpu |" in proc.stdout  # the table
