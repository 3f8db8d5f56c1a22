"""A training run that kills itself (SIGKILL: no handler, no cleanup) right after starting the
asynchronous save of step `kill_at`, so that checkpoint is being written when the process dies."""

import os
import signal
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

from prefopt_jax.config import load_config
from prefopt_jax.train import checkpoint
from prefopt_jax.train.loop import train

kill_at = int(sys.argv[1])
original = checkpoint.save


def save_then_die(mgr, step, state, meta):
    original(mgr, step, state, meta)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.save = save_then_die
train(load_config(None, sys.argv[2:]))
