"""Where metrics go: a JSONL file (always), TensorBoard event files (tensorboardX), Weights & Biases
(when installed and asked for), and a progress line on the terminal."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

import numpy as np
from etils import epath

LENGTH_EDGES = (64, 128, 256, 512, 1024)  # accuracy-by-length buckets: [0, 64), [64, 128), ..., [1024, inf)


class MetricsWriter:
    """Writes one record per step. `append` continues a resumed run's files instead of replacing them.
    `primary` is False on every host but the first of a multi-host run: they write nothing. In a bucket
    (gs://), where files cannot be appended to, metrics.jsonl is rewritten whole at every record."""

    def __init__(
        self,
        run_dir: epath.Path,
        *,
        append: bool,
        tensorboard: bool = True,
        wandb: bool = False,
        config: Any = None,
        primary: bool = True,
    ):
        path = run_dir / "metrics.jsonl"
        self.jsonl, self.remote, self.lines = None, None, []
        if primary and "://" in str(run_dir):
            self.remote = path
            self.lines = path.read_text().splitlines(keepends=True) if append and path.exists() else []
        elif primary:
            self.jsonl = open(path, "a" if append else "w")  # closed in close()
        self.tb = None
        tensorboard, wandb = tensorboard and primary, wandb and primary
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(logdir=str(run_dir / "tensorboard"))
        self.wandb = None
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise RuntimeError("output.wandb=true but wandb is not installed: pip install wandb") from None
            self.wandb = wandb_lib.init(dir=str(run_dir), config=config, resume="allow", name=run_dir.name)

    def write(self, step: int, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self.remote is not None:
            self.lines.append(line)
            self.remote.write_text("".join(self.lines))
        elif self.jsonl is not None:
            self.jsonl.write(line)
            self.jsonl.flush()
        else:  # not the primary host
            return
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def accuracy_by_length(correct: np.ndarray, count: np.ndarray, prefix: str = "eval/") -> dict[str, float]:
    """Reward accuracy per pair-length bucket (chosen + rejected tokens), from summed bucket counts."""
    edges = (0, *LENGTH_EDGES, None)
    out = {}
    for i, (c, n) in enumerate(zip(correct, count, strict=True)):
        if n:
            name = f"{edges[i]}-{edges[i + 1]}" if edges[i + 1] else f"{edges[i]}+"
            out[f"{prefix}rewards/accuracies_by_length/{name}"] = float(c / n)
    return out


def progress_bar(total: int, what: str, out: IO | None, unit: str = "ex"):
    """A tqdm bar with rate and ETA when `out` is a terminal; off (a no-op) otherwise (logs, tests)."""
    from tqdm import tqdm

    on = getattr(out, "isatty", lambda: False)()
    return tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", file=out, disable=not on, leave=False)


def progress(step: int, total: int, m: dict, out: IO | None = None) -> None:
    """A progress bar with loss, reward accuracy and tokens/s: redrawn in place on a terminal, one line
    per call otherwise (logs)."""
    out = out or sys.stdout
    width = 20
    done = int(width * step / total)
    if "rrhf/rank_accuracy" in m:  # ranked candidates: how many of the scores' orderings the model keeps
        quality = f"rank acc {m['rrhf/rank_accuracy']:.3f}"
    else:
        quality = (
            f"reward acc {m.get('rewards/accuracies', float('nan')):.3f}  "
            f"margin {m.get('rewards/margins', float('nan')):+.3f}"
        )
    text = (
        f"[{'#' * done}{'.' * (width - done)}] step {step}/{total}"
        + (f"  epoch {m['epoch']:.2f}" if "epoch" in m else "")
        + f"  loss {m['loss']:.4f}  {quality}  "
        f"{m['tokens_per_s']:.0f} tok/s"
        + (f"  MFU {m['mfu']:.1%}" if "mfu" in m else "")
        + (f"  compiled {m['compilations']:.0f}x" if "compilations" in m else "")
        + (f"  ETA {int(m['eta_s']) // 60}:{int(m['eta_s']) % 60:02d}" if m.get("eta_s") else "")
    )
    if out.isatty():
        print("\r" + text, end="\n" if step == total else "", file=out, flush=True)
    else:
        print(text, file=out, flush=True)
