"""Logical axis names, the rules that map them to mesh axes, the mesh itself, and arrays brought back to a host.

Models annotate every parameter with logical names only; one rules table decides the layout, so pure
data parallel, FSDP and FSDP+TP differ by a preset name. A logical name with no rule is an error,
never silent replication; an axis that does not divide a dimension is an error naming both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (None: replicated along that dimension)
Rules = Mapping[str, tuple[str, ...] | str | None]

_REPLICATED = {"length": None, "layers": None, "head_dim": None, "norm": None}
PRESETS: dict[str, dict] = {
    "dp": {
        "batch": ("data", "fsdp"),
        "embed": None,
        "mlp": None,
        "heads": None,
        "kv_heads": None,
        "vocab": None,
        **_REPLICATED,
    },
    "fsdp": {
        "batch": ("data", "fsdp"),
        "embed": "fsdp",
        "mlp": None,
        "heads": None,
        "kv_heads": None,
        "vocab": None,
        **_REPLICATED,
    },
    "fsdp_tp": {
        "batch": ("data", "fsdp"),
        "embed": "fsdp",
        "mlp": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor",
        "vocab": "tensor",
        **_REPLICATED,
    },
}


class ShardingError(ValueError):
    """A layout that cannot work: unknown logical name, or an axis that does not divide a dimension."""


def rules_for(preset_or_rules: str | Rules) -> dict:
    if isinstance(preset_or_rules, str):
        if preset_or_rules not in PRESETS:
            raise ShardingError(f"unknown sharding preset {preset_or_rules!r}; presets: {sorted(PRESETS)}")
        return dict(PRESETS[preset_or_rules])
    return dict(preset_or_rules)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices. With every size
    given, the first data*fsdp*tensor devices are used."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ShardingError("at most one mesh axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    asked = dict(zip(MESH_AXES, shape, strict=True))
    if -1 in shape:
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices do not divide into mesh axes {asked}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) < len(devices) and -1 not in asked.values():
        devices = devices[: math.prod(shape)]  # explicit sizes: use that many devices (e.g. 1 for a baseline)
    if math.prod(shape) != len(devices):
        raise ShardingError(f"mesh {asked} needs {math.prod(shape)} devices, {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(names: Sequence[str | None], rules: Rules, where: str = "") -> PartitionSpec:
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"{where}: logical axis {name!r} has no sharding rule; rules cover {sorted(rules)}")
        out.append(rules[name])
    return PartitionSpec(*out)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, where: str) -> None:
    for dim, (size, axes) in enumerate(zip(shape, spec, strict=False)):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        n = math.prod(mesh.shape[a] for a in axes)
        if size % n:
            raise ShardingError(
                f"{where}: dimension {dim} of size {size} is not divisible by mesh axes {axes} (size {n})"
            )


def named_sharding(shape, names, mesh: Mesh, rules: Rules, where: str = "") -> NamedSharding:
    spec = logical_to_spec(names, rules, where)
    check_divisible(shape, spec, mesh, where)
    return NamedSharding(mesh, spec)


def initialize_distributed() -> bool:
    """Start jax.distributed when a coordinator is configured (multi-host); True if it was started.

    Reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; on TPU VMs jax finds them itself
    when PREFOPT_DISTRIBUTED=1 is set."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("PREFOPT_DISTRIBUTED") == "1":
        # CPU processes (tests, CPU clusters) need a collectives backend; accelerators ignore this
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        return True
    if os.environ.get("PREFOPT_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


class activation_constraint:
    """`(x, logical names) -> x` constrained to the mesh. Activations may be smaller than the mesh (one
    sequence on 8 devices), so an axis that does not divide its dimension is left unsharded there."""

    def __init__(self, mesh: Mesh, rules: Rules):
        self.mesh, self.rules = mesh, dict(rules)

    def __call__(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        spec = []
        for size, axes in zip(x.shape, logical_to_spec(names, self.rules, "activation"), strict=True):
            group = (axes,) if isinstance(axes, str) else tuple(axes or ())
            spec.append(axes if group and size % math.prod(self.mesh.shape[a] for a in group) == 0 else None)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*spec)))

    def __eq__(self, other: object) -> bool:  # static module state must compare by value
        return isinstance(other, activation_constraint) and (self.mesh, self.rules) == (other.mesh, other.rules)

    def __hash__(self) -> int:
        return hash((self.mesh, tuple(sorted(self.rules.items()))))


def host_array(x: Any, dtype) -> np.ndarray:
    """One array on this host in `dtype`: cast on the device first (half the transfer for bfloat16); an
    array spread over several processes is gathered (every process must take part)."""
    if isinstance(x, jax.Array):
        x = x.astype(dtype)
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x).astype(dtype, copy=False)
