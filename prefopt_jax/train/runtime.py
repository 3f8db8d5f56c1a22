"""What every command that runs a model needs from the config: the mesh, the model loaded into its
shards, and the tokenizer."""

from __future__ import annotations

import jax.numpy as jnp
from jax.sharding import Mesh

from prefopt_jax import models, sharding
from prefopt_jax.config import Config


def dtype_of(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def load(cfg: Config) -> tuple[Mesh, models.Decoder, object]:
    """(mesh, model with its parameters sharded over the mesh, tokenizer)."""
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    model = models.load_pretrained(cfg.model.source, dtype=dtype_of(cfg.model.dtype), mesh=mesh, rules=cfg.mesh.rules)
    return mesh, model, models.load_tokenizer(cfg.model.source)
