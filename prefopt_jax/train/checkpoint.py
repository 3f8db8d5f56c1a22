"""Checkpoints with orbax: asynchronous, keep-N, each holding the train state (parameters being trained,
optimizer state, loss state, step counters) and, as JSON, the data iterator position and the metric
history, so a resumed run continues exactly where it stopped. A checkpoint becomes visible only once
complete, so a crash during a save leaves the previous one readable."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath


def run_path(directory: str | Path) -> epath.Path:
    """A run's output folder: local (made absolute) or a bucket URL such as gs://bucket/run, which every
    host of a multi-host run sees (gs:// needs the `gcs` extra: gcsfs)."""
    if "://" in str(directory):
        return epath.Path(str(directory))
    return epath.Path(Path(directory).expanduser().absolute())


def manager(directory: str | Path, *, keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(run_path(directory), options=options, item_names=("state", "meta"))


def save(mgr: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
    """Start an asynchronous save (training goes on; `mgr.wait_until_finished()` joins it)."""
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore_latest(
    mgr: ocp.CheckpointManager, like_state: dict, skip: tuple[str, ...] = ()
) -> tuple[dict, dict] | None:
    """(state, meta) of the newest complete checkpoint, shaped and placed like `like_state` (arrays or
    shapes); None if none. The `skip`ped parts of the state are not read (placeholders come back): reading a
    policy for evaluation or export needs no optimizer state in memory."""
    step = mgr.latest_step()
    if step is None:
        return None
    abstract = {
        k: jax.tree.map(lambda _: ocp.PLACEHOLDER, v) if k in skip else jax.tree.map(ocp.utils.to_shape_dtype_struct, v)
        for k, v in like_state.items()
    }
    out = mgr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    return out["state"], out["meta"]
