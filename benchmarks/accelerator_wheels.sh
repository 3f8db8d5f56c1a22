#!/usr/bin/env bash
# The wheels benchmarks/accelerator.py needs on the GPU device machine, which has no network and lacks them
# (it has jax with CUDA 13, flax, optax, orbax-checkpoint, chex, tensorstore, transformers, torch, Python
# 3.12): Grain and what Grain needs beyond that image. Saved into the git-ignored .whl/ at the repository
# root, carried with the call; the install command is in benchmarks/accelerator.py's docstring.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
ls -la .whl
