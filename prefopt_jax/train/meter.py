"""Metering a training step: what the step's own metrics do not say (its wall time and the host's, tokens,
FLOPs and MFU, the padding of the micro-batches it computed, compilations, each mixture source's examples),
and the count of skipped (non-finite) steps in a row."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from prefopt_jax.train import flops as flops_lib
from prefopt_jax.train.run import Run


def compilations(*fns) -> int:
    """How many times these jitted functions compiled (one per distinct input shape)."""
    return sum(f._cache_size() for f in fns)


@dataclasses.dataclass
class Meter:
    run: Run
    train_step: Callable
    peak: float  # FLOP/s of every device together (`flops.peak_flops`)
    tokens: int = 0  # trained so far in this process's run
    skipped_in_a_row: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)
    last: float = dataclasses.field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.sources = len(self.run.prepared.sources)
        self.source_of = self.run.prepared.source_of_train() if self.sources > 1 else None

    def __call__(self, step: int, metrics: dict, item, skipped_before: float) -> dict:
        """Step `step`'s metrics as floats, with the figures of its input `item` (`pipeline.StepInput`) added;
        `skipped_before` is the skipped-step count before it."""
        m = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        step_time, self.last = now - self.last, now
        run, spec = self.run, self.run.spec
        tokens = sum(flops_lib.plan_counts(p.parts["main"])[0] for p in item.plans)
        self.tokens += tokens
        step_flops = flops_lib.step_flops(
            run.model_cfg, item.plans, lora=spec.lora_scale is not None, reference_in_step=spec.reference_in_step,
            scores_prompts=spec.scores_prompts,
        )  # fmt: skip
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if m["skipped"] > skipped_before else 0
        computed = len(item.plans) * run.batch_specs["train"].geometries["main"].tokens
        m |= {
            "step": step,
            "step_time": step_time,
            "host_time": item.host_seconds,
            "padding_fraction": 1.0 - tokens / computed,  # of the micro-batches computed
            "tokens_per_s": self.tokens / (now - self.start),
            "flops": step_flops,
            "mfu": step_flops / step_time / self.peak,
            "compilations": compilations(self.train_step),
        }
        if self.source_of is not None:  # a mixture: examples trained on from each source this step
            drawn = self.source_of[[j for p in item.plans for j in p.examples]]
            m |= {f"examples/source_{s}": int(n) for s, n in enumerate(np.bincount(drawn, minlength=self.sources))}
        return m
