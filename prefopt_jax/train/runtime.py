"""What every command that runs a model needs from the config: the compilation cache, the mesh, the
model loaded into its shards and the tokenizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from prefopt_jax import models, sharding
from prefopt_jax.config import MeshSection, ModelSection, cache_folder


def use_compilation_cache(where: str | None) -> str | None:
    """Keep compiled programs under `where` ("auto": the user's cache folder; None: off), so a restarted or
    repeated run loads its step instead of compiling it. Returns the folder in use."""
    from jax.experimental.compilation_cache import compilation_cache

    where = cache_folder(where, "xla")
    if jax.config.jax_compilation_cache_dir != where:
        jax.config.update("jax_compilation_cache_dir", where)
        compilation_cache.reset_cache()  # the next compilation opens the new folder
    return where


def dtype_of(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def start(model: ModelSection, mesh: MeshSection, compilation_cache: str | None) -> tuple[Mesh, object]:
    """(mesh, tokenizer): what a command needs before its data, so bad data stops it before the model loads."""
    use_compilation_cache(compilation_cache)  # before the first compilation of the command
    return sharding.make_mesh(mesh.data, mesh.fsdp, mesh.tensor), models.load_tokenizer(model.source)


def load_model(model: ModelSection, rules: str, mesh: Mesh) -> models.Decoder:
    """The model with its parameters sharded over the mesh by `rules`."""
    return models.load_pretrained(model.source, dtype=dtype_of(model.dtype), mesh=mesh, rules=rules)
