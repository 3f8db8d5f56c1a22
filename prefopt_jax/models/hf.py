"""Hugging Face checkpoints in and out: a declarative table per family maps each of our parameters to
a transformers tensor name and a layout rule; import and export both read the same table."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from prefopt_jax.models.config import ModelConfig, from_hf_config, to_hf_config
from prefopt_jax.models.decoder import param_table
from prefopt_jax.models.safetensors_io import CheckpointError, read_checkpoint_folder, write_safetensors

_L = "model.layers.{i}."
_COMMON = {
    "embed": ("model.embed_tokens.weight", "same"),
    "final_norm": ("model.norm.weight", "same"),
    "lm_head": ("lm_head.weight", "transpose"),
    "layers/attn_norm": (_L + "input_layernorm.weight", "same"),
    "layers/q": (_L + "self_attn.q_proj.weight", "heads_in"),
    "layers/k": (_L + "self_attn.k_proj.weight", "heads_in"),
    "layers/v": (_L + "self_attn.v_proj.weight", "heads_in"),
    "layers/o": (_L + "self_attn.o_proj.weight", "heads_out"),
    "layers/q_bias": (_L + "self_attn.q_proj.bias", "heads_bias"),
    "layers/k_bias": (_L + "self_attn.k_proj.bias", "heads_bias"),
    "layers/v_bias": (_L + "self_attn.v_proj.bias", "heads_bias"),
    "layers/q_norm": (_L + "self_attn.q_norm.weight", "same"),
    "layers/k_norm": (_L + "self_attn.k_norm.weight", "same"),
    "layers/gate": (_L + "mlp.gate_proj.weight", "transpose"),
    "layers/up": (_L + "mlp.up_proj.weight", "transpose"),
    "layers/down": (_L + "mlp.down_proj.weight", "transpose"),
}
_LLAMA_LIKE = _COMMON | {"layers/mlp_norm": (_L + "post_attention_layernorm.weight", "same")}
HF_NAMES: dict[str, dict[str, tuple[str, str]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _COMMON
    | {
        "layers/post_attn_norm": (_L + "post_attention_layernorm.weight", "same"),
        "layers/mlp_norm": (_L + "pre_feedforward_layernorm.weight", "same"),
        "layers/post_mlp_norm": (_L + "post_feedforward_layernorm.weight", "same"),
    },
}


# layout rule -> (HF array -> ours given our per-layer shape, ours -> HF)
def _heads_in(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:  # [N*E, D] -> [D, N, E]
    d, n, e = shape
    return w.reshape(n, e, d).transpose(2, 0, 1)


def _heads_out(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:  # [D, H*E] -> [H, E, D]
    h, e, d = shape
    return w.reshape(d, h, e).transpose(1, 2, 0)


def _unpermute_rope(w: np.ndarray, n: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to the Hugging Face halves."""
    e2 = w.shape[0] // n // 2
    return w.reshape(n, e2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda w, s: w, lambda w: w),
    "transpose": (lambda w, s: w.T, lambda w: w.T),
    "heads_in": (_heads_in, lambda w: w.transpose(1, 2, 0).reshape(-1, w.shape[0])),
    "heads_out": (_heads_out, lambda w: w.transpose(2, 0, 1).reshape(w.shape[2], -1)),
    "heads_bias": (lambda w, s: w.reshape(s), lambda w: w.reshape(-1)),
    "gguf_rope_heads_in": (lambda w, s: _heads_in(_unpermute_rope(w, s[1]), s), None),  # import only
}


def array_getter(
    cfg: ModelConfig, table: Mapping[str, tuple[str, str]], tensors: Mapping[str, np.ndarray], where: str
) -> Callable[[str], np.ndarray]:
    """`get(name)` for `model_from_arrays`: our parameter from a checkpoint's tensors through a name
    table ({ours: (their name, layout)}), per-layer tensors stacked on a leading axis."""
    shapes = param_table(cfg)

    def fetch(hf_name: str) -> np.ndarray:
        if hf_name not in tensors:
            raise CheckpointError(f"{where}: tensor {hf_name!r} is missing")
        return tensors[hf_name]

    def get(name: str) -> np.ndarray:
        hf_name, layout = table[name]
        to_ours = LAYOUTS[layout][0]
        shape = shapes[name][0]
        if name.startswith("layers/"):
            per_layer = shape[1:]
            out = []
            for i in range(cfg.num_layers):
                w = fetch(hf_name.format(i=i))
                try:
                    out.append(to_ours(w, per_layer))
                except ValueError:
                    raise CheckpointError(
                        f"{where}: tensor {hf_name.format(i=i)!r} has shape {w.shape}, which does not fit {per_layer}"
                    ) from None
            return np.stack(out)
        w = fetch(hf_name)
        return to_ours(w, shape)

    return get


def read_hf_config(folder: str | Path) -> ModelConfig:
    """The architecture in a Hugging Face folder's config.json (no weights read)."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    return from_hf_config(raw, where=str(cfg_file))


def load_hf_folder(folder: str | Path) -> tuple[ModelConfig, Callable[[str], np.ndarray]]:
    folder = Path(folder)
    cfg = read_hf_config(folder)
    tensors = read_checkpoint_folder(folder)
    return cfg, array_getter(cfg, HF_NAMES[cfg.family], tensors, str(folder))


def save_hf_folder(cfg: ModelConfig, params: Mapping[str, Any], folder: str | Path, dtype=np.float32) -> None:
    """Write config.json and model.safetensors that transformers loads (params: nested dict of arrays)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = HF_NAMES[cfg.family]
    tensors: dict[str, np.ndarray] = {}
    for name in param_table(cfg):
        node = params
        for key in name.split("/"):
            node = node[key]
        value = np.asarray(node).astype(dtype)
        hf_name, layout = table[name]
        to_hf = LAYOUTS[layout][1]
        if name.startswith("layers/"):
            for i in range(cfg.num_layers):
                tensors[hf_name.format(i=i)] = to_hf(value[i])
        else:
            tensors[hf_name] = to_hf(value)
    write_safetensors(folder / "model.safetensors", tensors)
    config = to_hf_config(cfg) | {"dtype": np.dtype(dtype).name}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
