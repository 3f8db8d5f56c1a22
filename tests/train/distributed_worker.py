"""One process of the 2-process test (tests/train/test_distributed.py): 4 simulated CPU devices each,
jax.distributed over localhost, the same training run as one process with 8 devices."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

from prefopt_jax.sharding import initialize_distributed

initialize_distributed()

import jax  # noqa: E402

from prefopt_jax.config import load_config  # noqa: E402
from prefopt_jax.train.loop import train  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
_, history = train(load_config(None, sys.argv[2:]))
with open(sys.argv[1], "w") as f:
    json.dump({"process": jax.process_index(), "losses": [h["loss"] for h in history]}, f)
