"""Model configuration: one frozen dataclass covers the Llama, Mistral, Qwen2, Qwen3 and Gemma 2 families,
read from (and written back to) a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2")


class ModelConfigError(ValueError):
    """A configuration this library cannot build; the message names the key."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # K
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 8192
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    layer_windows: tuple[int, ...] = ()  # sliding window per layer, 0 = full attention
    attn_logit_softcap: float | None = None  # Gemma 2
    final_logit_softcap: float | None = None
    query_scale: float = 0.0  # multiplier of q·k; 0 means 1/sqrt(head_dim)
    sandwich_norms: bool = False  # Gemma 2: norms after attention and MLP too
    norm_offset: float = 0.0  # Gemma: weight is stored as w - 1
    embed_scale: bool = False  # Gemma: embeddings times sqrt(D)
    activation: str = "silu"  # silu | gelu_tanh
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED:
            raise ModelConfigError(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ModelConfigError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ModelConfigError(f"unsupported activation {self.activation!r}; supported: silu, gelu_tanh")

    @property
    def windows(self) -> tuple[int, ...]:
        return self.layer_windows or (0,) * self.num_layers

    @property
    def attention_scale(self) -> float:
        return self.query_scale or 1.0 / math.sqrt(self.head_dim)

    def num_params(self) -> int:
        d, f, h, k, hd, v = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
        )
        per_layer = d * hd * (h + 2 * k) + h * hd * d + 3 * d * f + 2 * d
        per_layer += (h + 2 * k) * hd if self.qkv_bias else 0
        per_layer += 2 * hd if self.qk_norm else 0
        per_layer += 2 * d if self.sandwich_norms else 0
        return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + d


_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _rope_from_hf(c: Mapping[str, Any]) -> RopeConfig:
    p = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = float(p.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = p.get("rope_type", p.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ModelConfigError(f"rope_type {kind!r} is not supported; supported: default, linear, llama3")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(p.get("factor", 1.0)),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        original_max_position=int(p.get("original_max_position_embeddings", c.get("max_position_embeddings", 8192))),
    )


def _windows_from_hf(c: Mapping[str, Any], family: str, n_layers: int) -> tuple[int, ...]:
    window = c.get("sliding_window")
    types = c.get("layer_types")
    if not window:
        return ()
    if types:
        if len(types) != n_layers:
            raise ModelConfigError(f"config.json: layer_types has {len(types)} entries for {n_layers} layers")
        return tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    if family == "mistral":
        return (int(window),) * n_layers
    if family == "gemma2":  # older config.json files have no layer_types: transformers alternates, sliding first
        return tuple(int(window) if i % 2 == 0 else 0 for i in range(n_layers))
    if family == "qwen2" and c.get("use_sliding_window"):
        first = int(c.get("max_window_layers", n_layers))
        return tuple(int(window) if i >= first else 0 for i in range(n_layers))
    return ()


def from_hf_config(c: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    family = c.get("model_type")
    if family not in SUPPORTED:
        raise ModelConfigError(f"{where}: model_type {family!r} is not supported; supported: {', '.join(SUPPORTED)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in c:
            raise ModelConfigError(f"{where}: missing key {key!r}")
    if c.get("mlp_bias"):
        raise ModelConfigError(f"{where}: mlp_bias=True is not supported")
    if family in ("llama", "mistral", "qwen3", "gemma2") and c.get("attention_bias"):
        raise ModelConfigError(f"{where}: attention_bias=True is not supported for {family}")
    act = c.get("hidden_activation") or c.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ModelConfigError(f"{where}: activation {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    n_layers = int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    gemma = family == "gemma2"
    return ModelConfig(
        family=family,
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(c),
        max_position_embeddings=int(c.get("max_position_embeddings", 8192)),
        tie_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        layer_windows=_windows_from_hf(c, family, n_layers),
        attn_logit_softcap=c.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcap=c.get("final_logit_softcapping") if gemma else None,
        query_scale=float(c.get("query_pre_attn_scalar", 0)) ** -0.5 if gemma else 0.0,
        sandwich_norms=gemma,
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=gemma,
        activation=_ACTIVATIONS[act],
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id") if not isinstance(c.get("eos_token_id"), list) else c["eos_token_id"][0],
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    """A config.json that transformers reads back into the same architecture."""
    rope: dict[str, Any] = {"rope_type": cfg.rope.kind, "rope_theta": cfg.rope.theta}
    if cfg.rope.kind != "default":
        rope["factor"] = cfg.rope.factor
    if cfg.rope.kind == "llama3":
        rope |= {
            "low_freq_factor": cfg.rope.low_freq_factor,
            "high_freq_factor": cfg.rope.high_freq_factor,
            "original_max_position_embeddings": cfg.rope.original_max_position,
        }
    arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma2"}
    out: dict[str, Any] = {
        "architectures": [f"{arch[cfg.family]}ForCausalLM"],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope.theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu" if cfg.activation == "silu" else "gelu_pytorch_tanh",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "dtype": "float32",
    }
    if any(cfg.windows):
        out["sliding_window"] = max(cfg.windows)
        out["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.windows]
        if cfg.family == "qwen2":
            out["use_sliding_window"] = True
    if cfg.family == "gemma2":
        out |= {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": round(cfg.attention_scale**-2),
            "attn_logit_softcapping": cfg.attn_logit_softcap,
            "final_logit_softcapping": cfg.final_logit_softcap,
        }
    return out
