"""LoRA adapters in PEFT's format: written from a run's adapters (`prefopt-jax export --adapters`) so that
`peft.PeftModel.from_pretrained(base, folder)` gives the trained policy, and read back as a starting
model (`model.source` naming an adapter folder: the base with the adapters merged in)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from prefopt_jax.models.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from prefopt_jax.sharding import host_array

# our LoRA target -> the transformers module it adapts (in every supported family)
MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
PREFIX = "base_model.model."  # PEFT's name for the wrapped causal LM


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def adapter_config(folder: Path) -> dict:
    """The folder's adapter_config.json, refused (naming the field) where it is not plain LoRA."""
    where = folder / "adapter_config.json"
    try:
        cfg = json.loads(where.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: invalid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are read")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if cfg.get(key):
            raise CheckpointError(f"{where}: {key}={cfg[key]!r} is not supported (plain LoRA only)")
    if not cfg.get("base_model_name_or_path"):
        raise CheckpointError(f"{where}: no base_model_name_or_path, so the base model is unknown")
    return cfg


def merged(tensors: Mapping[str, np.ndarray], folder: Path) -> dict[str, np.ndarray]:
    """A base checkpoint's tensors with the folder's adapters added: W + scaling·B·A (scaling α/r, or
    α/√r with rsLoRA), in float32 and back to the base's dtype."""
    cfg = adapter_config(folder)
    scaling = cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{folder}: no adapter_model.safetensors")
    adapters = read_safetensors(file)
    out = dict(tensors)
    for name, a in adapters.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removesuffix(".lora_A.weight")
        target = module.removeprefix(PREFIX) + ".weight"
        b_name = module + ".lora_B.weight"
        if target not in out or b_name not in adapters:
            raise CheckpointError(f"{file}: adapter {module!r} has no base weight {target!r} or no lora_B")
        w = out[target]
        delta = np.asarray(adapters[b_name], np.float32) @ np.asarray(a, np.float32)
        out[target] = (np.asarray(w, np.float32) + scaling * delta).astype(w.dtype)
    return out


def save_adapters(
    lora: dict, folder: str | Path, *, rank: int, alpha: float, dropout: float, base: str, dtype, write: bool = True
) -> Path:
    """The run's adapters ({target: {"a": [L, *in, r], "b": [L, r, *out]}}) as adapter_config.json and
    adapter_model.safetensors: A as [r, in] and B as [out, r] per layer and module, PEFT's names. In a
    multi-host run every process calls this (the adapters are gathered) and those with `write` write."""

    folder = Path(folder)
    tensors: dict[str, Any] = {}
    for name, ad in lora.items():
        a, b = (host_array(ad[k], np.float32) for k in ("a", "b"))
        for i in range(a.shape[0]):
            module = f"{PREFIX}model.layers.{i}.{MODULES[name]}"
            tensors[f"{module}.lora_A.weight"] = a[i].reshape(-1, rank).T.astype(dtype)
            tensors[f"{module}.lora_B.weight"] = b[i].reshape(rank, -1).T.astype(dtype)
    if not write:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(MODULES[n].rsplit(".", 1)[1] for n in lora),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
