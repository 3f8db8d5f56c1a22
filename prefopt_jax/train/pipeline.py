"""The input pipeline of the train loop: the next steps' micro-batches are planned, built on the host (this
process's rows only) and placed on the devices by a background thread while the current step runs, so
nothing between two steps waits for the host. Each item carries what the loop logs and checkpoints with
it: the packer state after the step, its FLOPs and token counts (from the plan: no device round trip)."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Sequence

from jax.sharding import Mesh

from prefopt_jax import data
from prefopt_jax.train import batches


@dataclasses.dataclass
class StepInput:
    batch: dict  # device arrays
    packer_state: dict  # where the data stream stands after this step
    plans: list  # the micro-batches' plans (data.MicroPlan)
    host_seconds: float  # planning + building + placing, in the background


class StepPipeline:
    """`next(pipeline)` -> StepInput, `depth` steps prepared ahead. Errors in the thread surface in `next`."""

    def __init__(
        self,
        spec: data.BatchSpec,
        packer: data.Packer,
        examples: Sequence,
        mesh: Mesh,
        *,
        micro_batches: int,
        pad_id: int,
        ref_cache: Sequence | None = None,
        depth: int = 2,
    ):
        self.spec, self.packer, self.examples, self.mesh = spec, packer, examples, mesh
        self.micro_batches, self.pad_id, self.ref_cache = micro_batches, pad_id, ref_cache
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def build(self) -> StepInput:
        t0 = time.perf_counter()
        plans = self.packer.next_step(self.micro_batches)
        host = batches.host_step(self.spec, plans, self.examples, self.mesh, self.pad_id, self.ref_cache)
        placed = batches.place(self.spec, host, self.mesh)
        return StepInput(placed, self.packer.state(), plans, time.perf_counter() - t0)

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                item = self.build()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced in the consumer, not lost in the thread
            self._queue.put(e)

    def __iter__(self) -> StepPipeline:
        return self

    def __next__(self) -> StepInput:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._thread.join(timeout=10)
