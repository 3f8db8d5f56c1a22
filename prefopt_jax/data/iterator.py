"""Deterministic, resumable, host-sharded iteration with background prefetch.

Epoch e visits the examples in the order of a permutation seeded by (seed, e); global batch s is the
slice [s*G, (s+1)*G) of it, and host h takes its contiguous part. The order depends on neither the
number of hosts nor on prefetching, so the same seed gives the same global batches on 1 host or 64,
and the state `{"epoch", "step"}` (the next batch to yield) is all a resumed run needs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class BatchIterator:
    def __init__(
        self,
        examples: Sequence[Any],
        make_batch: Callable[[list[Any]], Any],
        *,
        global_batch: int,
        seed: int = 0,
        host_index: int = 0,
        host_count: int = 1,
        state: dict | None = None,
        prefetch: int = 2,
    ):
        if global_batch % host_count:
            raise ValueError(f"global_batch={global_batch} is not divisible by host_count={host_count}")
        if not 0 <= host_index < host_count:
            raise ValueError(f"host_index={host_index} is outside [0, {host_count})")
        if len(examples) < global_batch:
            raise ValueError(f"{len(examples)} examples cannot fill one global batch of {global_batch}")
        self.examples, self.make_batch = examples, make_batch
        self.global_batch, self.seed = global_batch, seed
        self.host_index, self.host_count = host_index, host_count
        self.per_host = global_batch // host_count
        self.steps_per_epoch = len(examples) // global_batch  # the last partial batch is left out
        self.epoch, self.step = 0, 0
        self._prefetch = prefetch
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if state is not None:
            self.restore(state)

    # ---- what batch is where -------------------------------------------------------------------------

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def host_indices(self, epoch: int, step: int) -> np.ndarray:
        start = step * self.global_batch + self.host_index * self.per_host
        return self.permutation(epoch)[start : start + self.per_host]

    def _advance(self, epoch: int, step: int) -> tuple[int, int]:
        step += 1
        return (epoch + 1, 0) if step == self.steps_per_epoch else (epoch, step)

    # ---- state ---------------------------------------------------------------------------------------

    def state(self) -> dict:
        """The position of the next batch to be yielded (prefetched batches do not count)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_examples": len(self.examples)}

    def restore(self, state: dict) -> None:
        n = len(self.examples)
        if state.get("num_examples", n) != n or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"iterator state {state} was saved for {state.get('num_examples')} examples and seed "
                f"{state.get('seed')}; this iterator has {len(self.examples)} and seed {self.seed}"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.close()

    # ---- iteration -----------------------------------------------------------------------------------

    def _produce(self, epoch: int, step: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch = self.make_batch([self.examples[i] for i in self.host_indices(epoch, step)])
                out.put(((epoch, step), batch, None))
                epoch, step = self._advance(epoch, step)
        except BaseException as e:  # surfaced in the consumer, not lost in the thread
            out.put((None, None, e))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        if self._prefetch <= 0:
            batch = self.make_batch([self.examples[i] for i in self.host_indices(self.epoch, self.step)])
        else:
            if self._queue is None:
                self._queue, self._stop = queue.Queue(maxsize=self._prefetch), threading.Event()
                args = (self.epoch, self.step, self._queue, self._stop)
                threading.Thread(target=self._produce, args=args, daemon=True).start()
            where, batch, error = self._queue.get()
            if error is not None:
                self.close()
                raise error
            assert where == (self.epoch, self.step)
        self.epoch, self.step = self._advance(self.epoch, self.step)
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (the next `next()` restarts it from the current state)."""
        if self._queue is not None:
            self._stop.set()
            while not self._queue.empty():  # unblock a producer waiting on a full queue
                self._queue.get_nowait()
            self._queue = None
