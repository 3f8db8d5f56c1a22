"""The model card (`README.md`) an export carries: what a reader needs to know how the model was trained,
from the run's config and `summary.json` (a rendering of the whole config, so it lives beside `config`, not
in the trainer)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from prefopt_jax import __version__
from prefopt_jax.config import Config

SHOWN = ("rewards/accuracies", "rewards/margins", "loss", "kl/per_token", "task_accuracy")


def _figures(results: dict) -> dict[str, float]:
    return {k.removeprefix("eval/"): v for k, v in results.items() if isinstance(v, float)}


def model_card(
    cfg: Config, summary: dict | None, history: list[dict], *, dtype: str, lora: str, adapters: bool = False
) -> str:
    """Markdown with a YAML header the hub reads (base model, library, tags); `adapters`: the export is a
    PEFT adapter folder over the base."""
    names = cfg.loss.names
    loss = " + ".join(f"{w:g}·{n}" for n, w in zip(names, cfg.loss.weights or (1.0,) * len(names), strict=True))
    base = str(cfg.model.source)
    header = {
        "base_model": base,
        "library_name": "peft" if adapters else "transformers",
        "tags": ["prefopt_jax", *names],
    }
    summary = summary or {}
    data = summary.get("data", {})
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# {base} trained with {loss}",
        "",
        f"Preference-optimised with prefopt_jax {__version__} from `{base}`"
        + (": LoRA adapters, `peft.PeftModel.from_pretrained(base, this folder)`." if adapters else "."),
        "",
        "| | |",
        "|---|---|",
        f"| loss | {loss} |",
        f"| loss hyperparameters | `{json.dumps(dict(cfg.loss.hparams))}` |",
        f"| reference | {cfg.train.reference} |",
        f"| fine-tuning | {lora} |",
        f"| data | `{cfg.data.source or 'the built-in task'}` |",
    ]
    if data:
        lines.append(f"| examples | {data['train']} train, {data['eval']} held out ({data['report']}) |")
    lines += [
        f"| steps | {len(history)} of {cfg.train.steps}, {cfg.train.batch_size} per step, learning rate "
        f"{cfg.train.learning_rate:g} ({cfg.train.schedule}) |",
        f"| weights | {dtype} |",
    ]
    if summary.get("command"):
        lines.append(f"| command | `{summary['command']}` |")
    train_last = next((h for h in reversed(history) if "loss" in h), None)
    if train_last is not None:
        shown = {k: v for k, v in train_last.items() if k in SHOWN}
        lines += ["", "Last training step: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())]
    before, after = _figures(summary.get("before", {})), _figures(summary.get("after", {}))
    rows = [k for k in SHOWN if k in after]
    if rows:
        lines += ["", "Held-out figures:", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {before.get(k, float('nan')):.4g} | {after[k]:.4g} |" for k in rows]
    config = yaml.safe_dump(_plain(cfg), sort_keys=False).strip()
    lines += ["", "The run's configuration:", "", "```yaml", config, "```", ""]
    return "\n".join(lines)


def _plain(x: Any) -> Any:
    """Dataclasses, tuples and mappings as the plain dicts and lists YAML writes."""
    if dataclasses.is_dataclass(x):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def write(cfg: Config, run_dir: Path, history: list, out_dir: Path, *, dtype: str, adapters: bool) -> None:
    """The export's model card (out_dir/README.md), from the run's config, summary and metric history."""
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    lora = cfg.train.lora_rank
    how = "full" if not lora else f"LoRA r {lora}, " + ("adapters only (PEFT)" if adapters else "merged")
    (out_dir / "README.md").write_text(model_card(cfg, summary, history, dtype=dtype, lora=how, adapters=adapters))
