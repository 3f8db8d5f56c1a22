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
    shapes); None if none. The `skip`ped parts of the state are not read (they come back as `like_state`
    has them): reading a policy for evaluation or export needs no optimizer state in memory."""
    step = mgr.latest_step()
    if step is None:
        return None
    wanted = {k: jax.tree.map(ocp.utils.to_shape_dtype_struct, v) for k, v in like_state.items() if k not in skip}
    if skip:
        restore_args = ocp.checkpoint_utils.construct_restore_args(wanted)
        state_args = ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
    else:
        state_args = ocp.args.StandardRestore(wanted)
    out = mgr.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    return {**{k: like_state[k] for k in skip}, **out["state"]}, out["meta"]
