"""What every command that runs a model needs from the config: the mesh, the model loaded into its
shards, and the tokenizer."""

from __future__ import annotations

import jax.numpy as jnp
from jax.sharding import Mesh

from prefopt_jax import models, sharding
from prefopt_jax.config import Config, ConfigError
from prefopt_jax.models import attention as attention_lib


def dtype_of(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def load(cfg: Config) -> tuple[Mesh, models.Decoder, object]:
    """(mesh, model with its parameters sharded over the mesh, tokenizer)."""
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    model = models.load_pretrained(cfg.model.source, dtype=dtype_of(cfg.model.dtype), mesh=mesh, rules=cfg.mesh.rules)
    return mesh, model, models.load_tokenizer(cfg.model.source)


def attention(cfg: Config, mcfg: models.ModelConfig, platform: str) -> str:
    """The attention implementation `model.attention` means for this model on `platform` ("auto": by
    platform); one that cannot run there is a configuration error."""
    try:
        return attention_lib.resolve(cfg.model.attention, platform, mcfg, cfg.model.compute)
    except ValueError as e:
        raise ConfigError(str(e)) from None
