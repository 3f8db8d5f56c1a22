"""prefopt_jax: offline preference optimization of language models in JAX/Flax.

`prefopt_jax.train(config)` trains (see `prefopt_jax.config.load_config`); `prefopt_jax.losses`,
`prefopt_jax.models`, `prefopt_jax.data` are the building blocks."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`prefopt_jax.train` (callable: `prefopt_jax.train(config)`) imported on first use, so that reading a
    config (`prefopt_jax.config`) imports neither jax nor the trainer."""
    if name == "train":
        import importlib

        return importlib.import_module("prefopt_jax.train")
    raise AttributeError(f"module 'prefopt_jax' has no attribute {name!r}")
