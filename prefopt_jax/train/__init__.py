"""Training: the fused step (`step`), LoRA (`lora`), checkpoints, metrics and the loop.

`prefopt_jax.train(config)` runs a training job from Python and returns (final state, metric history),
as `prefopt-jax train` does; `config` is a `prefopt_jax.config.Config` (see `load_config`) or the path of
a YAML config."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any


def train(config: Any, **kwargs: Any) -> tuple[dict, list[dict]]:
    """Train as configured (a Config, or a YAML path); returns (final state, metric history)."""
    from prefopt_jax.config import Config, load_config
    from prefopt_jax.train.loop import train as run

    if isinstance(config, (str, Path)):
        config = load_config(config)
    if not isinstance(config, Config):
        raise TypeError(f"train() takes a prefopt_jax.config.Config or a YAML path, got {type(config).__name__}")
    return run(config, **kwargs)


class _CallablePackage(types.ModuleType):
    """So that `prefopt_jax.train(config)` works while `prefopt_jax.train.step` etc. stay submodules."""

    def __call__(self, config: Any, **kwargs: Any) -> tuple[dict, list[dict]]:
        return train(config, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
