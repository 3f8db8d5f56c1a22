"""The order a run visits its examples in: a Grain dataset of example indices, the same on every process.

Training reads an endless stream: Grain's global index shuffle of all examples, reshuffled each epoch (epoch
e is stream positions [e*n, (e+1)*n)); for a mixture, Grain's weighted mix of one such stream per source, each
over that source's own examples (so every example of a source is drawn equally often, give or take one, and
the sources in proportion to their weights; an "epoch" is then n draws). Held-out evaluation reads the examples
once in order. Reading position p needs no state but p, so the packer's checkpoint is a stream position (as
Grain's own iterators save it) plus the examples it holds back.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import grain
import numpy as np

# positions read from Grain at a time (at most one epoch): its index shuffle costs milliseconds per element
# on sets of a few dozen examples (microseconds on large ones), and derive_geometry replays the same orders
CHUNK = 1024


def grain_order(n: int, *, seed: int, mixture: tuple[np.ndarray, Sequence[float]] | None = None) -> grain.MapDataset:
    """The endless training stream of example indices (see the module docstring)."""
    if not 0 <= seed < 2**32 - 1 - (0 if mixture is None else len(mixture[1])):
        raise ValueError(f"train.seed must be in [0, 2**32 - 1) for the data order; got {seed}")
    if mixture is None:
        return grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    source_of, weights = mixture
    streams = [
        grain.MapDataset.source(np.flatnonzero(source_of == s)).shuffle(seed=seed + 1 + s).repeat()
        for s in range(len(weights))
    ]
    return grain.MapDataset.mix(streams, list(weights))


class Order:
    """Reads a run's stream by position, a chunk at a time; the chunks of equal streams (same size, seed
    and mixture) are shared by all the packers of a process."""

    def __init__(self, n: int, *, seed: int, mixture: tuple[np.ndarray, Sequence[float]] | None = None):
        self.n, self.chunk = n, min(n, CHUNK)
        sources = None if mixture is None else hashlib.blake2b(np.asarray(mixture[0]).tobytes()).hexdigest()
        self._key = (n, seed, None if mixture is None else tuple(mixture[1]), sources)
        if self._key not in _STREAMS:
            _STREAMS[self._key] = grain_order(n, seed=seed, mixture=mixture)

    def __getitem__(self, position: int) -> int:
        start = position - position % self.chunk
        return int(_chunk(self._key, start, self.chunk)[position - start])

    def epoch(self, e: int) -> np.ndarray:
        """The n examples of epoch `e` (positions e*n ... (e+1)*n - 1)."""
        return np.array([self[p] for p in range(e * self.n, (e + 1) * self.n)], np.int64)


_STREAMS: dict[tuple, grain.MapDataset] = {}  # stream key -> its Grain dataset


@functools.lru_cache(maxsize=256)
def _chunk(key: tuple, start: int, size: int) -> np.ndarray:
    stream = _STREAMS[key]
    return np.array([stream[p] for p in range(start, start + size)], np.int64)
