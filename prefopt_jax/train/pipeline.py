"""The input pipeline of the train loop, in Grain: the packer's stream of steps (`data.Steps`: each step's
micro-batch plans) -> this process's rows built on the host (the step's unused micro-batches empty) and placed on
the devices -> Grain's thread prefetch, so the next steps are built while the current one runs and nothing
between two steps waits for the host. `get_state()` after `next()` is where the stream stands after that step
(what the checkpoint keeps; `set_state` resumes there). Each item carries what the loop logs with it: the
plans (FLOPs and token counts, no device round trip) and its host time."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import grain
from jax.sharding import Mesh

from prefopt_jax import data
from prefopt_jax.train import batches


@dataclasses.dataclass
class StepInput:
    batch: dict  # device arrays
    plans: list  # the micro-batches' plans (data.MicroPlan)
    host_seconds: float  # building + placing, in the background


def step_inputs(
    spec: data.BatchSpec,
    examples: Sequence,
    mesh: Mesh,
    *,
    pad_id: int,
    seed: int,
    mixture=None,
    side: Mapping[str, Sequence] | None = None,
    depth: int = 2,
) -> grain.DatasetIterator:
    """An endless iterator of `StepInput`s, `depth` steps prepared ahead; errors surface in `next`."""

    def build(plans: list) -> StepInput:
        t0 = time.perf_counter()
        host = batches.host_step(spec, plans, examples, mesh, pad_id, side)
        return StepInput(batches.place(spec, host, mesh), plans, time.perf_counter() - t0)

    steps = data.steps(spec, examples, seed=seed, mixture=mixture)
    prefetched = grain.experimental.ThreadPrefetchIterDataset(steps.map(build), prefetch_buffer_size=depth)
    return iter(prefetched)
