"""`prefopt-jax plot RUN_DIR`: PNG curves of a run's metrics.jsonl (needs matplotlib: `pip install
prefopt-jax[plot]`)."""

from __future__ import annotations

import json
from pathlib import Path

# one figure per group; a group's curves share axes
GROUPS = {
    "loss": ("loss",),
    "reward_accuracy": ("rewards/accuracies", "eval/rewards/accuracies"),
    "rewards": ("rewards/chosen", "rewards/rejected", "rewards/margins"),
    "logps": ("logps/chosen", "logps/rejected", "logps/chosen_drift"),
    "kl": ("kl/per_token", "kl"),
    "grad_norm": ("grad_norm",),
    "throughput": ("tokens_per_s",),
    "mfu": ("mfu",),
}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run's output.dir?")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON record") from None
    return records


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per metric group present in the run; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'prefopt-jax[plot]'") from None
    records = read_metrics(run_dir)
    out = Path(out_dir or Path(run_dir) / "plots")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in GROUPS.items():
        curves = {k: [(r["step"], r[k]) for r in records if k in r and "step" in r] for k in keys}
        curves = {k: v for k, v in curves.items() if v}
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, points in curves.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 3 else None, label=k)
        ax.set_xlabel("step")
        ax.set_title(f"{Path(run_dir).name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
