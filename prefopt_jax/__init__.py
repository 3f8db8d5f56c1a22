"""prefopt_jax: offline preference optimization of language models in JAX/Flax.

`prefopt_jax.train(config)` trains (see `prefopt_jax.config.load_config`); `prefopt_jax.losses`,
`prefopt_jax.models`, `prefopt_jax.data` are the building blocks."""

__version__ = "0.1.0"

from prefopt_jax import train  # noqa: F401  (callable: prefopt_jax.train(config))
