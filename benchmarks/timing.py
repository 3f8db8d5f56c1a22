"""What the benchmark scripts share: timing a jitted call."""

from __future__ import annotations

import statistics
import time

import jax


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn(*args)` after one untimed call (compilation, warm-up)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
