"""Hugging Face checkpoints in and out: a declarative table per family maps each of our parameters to
a transformers tensor name and a layout rule; import and export both read the same table."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from prefopt_jax.models import peft
from prefopt_jax.models.config import ModelConfig, from_hf_config, to_hf_config
from prefopt_jax.models.decoder import param_table
from prefopt_jax.models.safetensors_io import CheckpointError, read_checkpoint_folder, write_safetensors
from prefopt_jax.sharding import host_array

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


def load_hf_folder(
    folder: str | Path, *, adapters: Path | None = None
) -> tuple[ModelConfig, Callable[[str], np.ndarray]]:
    """The folder's architecture and a getter of its weights (with a PEFT LoRA folder's adapters merged)."""
    folder = Path(folder)
    cfg = read_hf_config(folder)
    tensors = read_checkpoint_folder(folder)
    if adapters is not None:
        tensors = peft.merged(tensors, adapters)
    return cfg, array_getter(cfg, HF_NAMES[cfg.family], tensors, str(folder))


def parse_size(text: str | int) -> int:
    """Bytes in "5GB", "500MB", "2GiB", "10KB" or a plain number (transformers' `max_shard_size` style)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    s = str(text).strip().upper()
    number = s.rstrip("KMGTIB")
    try:
        return int(float(number) * units[s[len(number) :]])
    except (KeyError, ValueError):
        raise ValueError(f"size {text!r}: expected a number with an optional unit (KB, MB, GB, GiB, ...)") from None


def shard_plan(cfg: ModelConfig, dtype, max_shard_bytes: int) -> list[list[tuple[str, str, int | None, str]]]:
    """The checkpoint's tensors in shards of at most `max_shard_bytes` (a larger tensor alone in its
    shard), from the parameters' shapes only: each entry is (their name, our name, layer or None, layout)."""
    itemsize = np.dtype(dtype).itemsize
    table = HF_NAMES[cfg.family]
    shards: list[list] = [[]]
    size = 0
    for name, (shape, *_) in param_table(cfg).items():
        hf_name, layout = table[name]
        per_layer = name.startswith("layers/")
        nbytes = int(np.prod(shape[1:] if per_layer else shape)) * itemsize
        for i in range(cfg.num_layers) if per_layer else [None]:
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((hf_name.format(i=i) if per_layer else hf_name, name, i, layout))
            size += nbytes
    return shards


def save_hf_folder(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    folder: str | Path,
    dtype=np.float32,
    *,
    max_shard_bytes: int = 5 * 10**9,
    write: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> list[Path]:
    """Write what transformers and vLLM load: config.json (`dtype` and `torch_dtype`),
    generation_config.json and the weights in `dtype` as safetensors shards of at most `max_shard_bytes`
    (one file `model.safetensors`, or `model-0000k-of-0000n.safetensors` and
    `model.safetensors.index.json`). Tensors reach the host one at a time and each shard is written and
    dropped before the next, so the host holds one shard at most, never the whole model. `params` may
    be sharded over several processes: all of them call this, and only those with `write` write.
    `progress` is called with each tensor's bytes once it is on the host (a progress bar's update)."""
    folder = Path(folder)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    shards = shard_plan(cfg, dtype, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map, total, written = {}, 0, []
    for file, entries in zip(names, shards, strict=True):
        tensors: dict[str, np.ndarray] = {}
        for hf_name, name, layer, layout in entries:
            node = params
            for key in name.split("/"):
                node = node[key]
            value = host_array(node if layer is None else node[layer], dtype)
            tensors[hf_name] = LAYOUTS[layout][1](value)
            weight_map[hf_name] = file
            total += value.nbytes
            if progress is not None:
                progress(value.nbytes)
        if write:
            write_safetensors(folder / file, tensors)
            written.append(folder / file)
        del tensors
    if not write:
        return written
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    name = np.dtype(dtype).name
    config = to_hf_config(cfg) | {"dtype": name, "torch_dtype": name}  # transformers 5 and older readers
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (folder / "generation_config.json").write_text(json.dumps({k: v for k, v in generation.items() if v is not None}))
    return written
