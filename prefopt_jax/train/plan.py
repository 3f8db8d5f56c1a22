"""`prefopt-jax plan`: will a config fit its accelerator slice, and how long will a step take?

The real train step is compiled ahead of time for the target's devices from abstract inputs (shapes and
shardings only, no weights allocated) and the compiled executable's own memory analysis is read back.
TPU slices compile with the TPU compiler (libtpu, from `pip install -e ".[tpu]"`) from any host; GPU
targets, and TPU targets without libtpu, compile for simulated CPU devices, whose figures are an
estimate (XLA:CPU computes bfloat16 in float32 and has no reduce-scatter, so temporaries are
overstated). FLOPs are counted analytically (`train.flops`): XLA's cost analysis counts a scanned
layer body once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from typing import IO

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from prefopt_jax import data, models, sharding
from prefopt_jax.config import Config, ConfigError, DataSection, TrainSection
from prefopt_jax.data.records import Origin
from prefopt_jax.data.tokenize import TokenizedPair
from prefopt_jax.models.build import nest
from prefopt_jax.train import batches, build
from prefopt_jax.train import flops as flops_lib
from prefopt_jax.train import lora as lora_lib
from prefopt_jax.train import step as step_lib

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator slice: `topology` is libtpu's name for a TPU slice (None: GPU or CPU)."""

    platform: str  # tpu | gpu | cpu
    devices: int  # JAX devices (TPU chips; v5p slice names count TensorCores, two per chip)
    hosts: int
    memory: float | None  # bytes of accelerator memory per device
    peak_flops: float | None  # dense bf16 FLOP/s per device
    topology: str | None = None
    accelerator: str | None = None  # gcloud's --accelerator-type
    local: bool = False  # this process's own devices


def _tpu(accelerator: str, topology: str, hosts: int, memory_gib: float, peak: float) -> Target:
    chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
    return Target("tpu", chips, hosts, memory_gib * GiB, peak, topology, accelerator)


_V5E, _V5P, _V6E = (16, 197e12), (95, 459e12), (32, 918e12)
TARGETS: dict[str, Target] = {
    "v5e-8": _tpu("v5litepod-8", "v5e:2x4", 1, *_V5E),
    "v5e-16": _tpu("v5litepod-16", "v5e:4x4", 4, *_V5E),
    "v5e-32": _tpu("v5litepod-32", "v5e:4x8", 8, *_V5E),
    "v5e-64": _tpu("v5litepod-64", "v5e:8x8", 16, *_V5E),
    "v5p-8": _tpu("v5p-8", "v5p:2x2x1", 1, *_V5P),
    "v5p-16": _tpu("v5p-16", "v5p:2x2x2", 2, *_V5P),
    "v5p-32": _tpu("v5p-32", "v5p:2x2x4", 4, *_V5P),
    "v5p-64": _tpu("v5p-64", "v5p:2x4x4", 8, *_V5P),
    "v5p-128": _tpu("v5p-128", "v5p:4x4x4", 16, *_V5P),
    "v6e-8": _tpu("v6e-8", "v6e:2x4", 1, *_V6E),
    "v6e-16": _tpu("v6e-16", "v6e:4x4", 4, *_V6E),
    "1xH200": Target("gpu", 1, 1, 140.4 * GiB, 989e12),  # one chip: what benchmarks/accelerator.py measures
    "8xH100": Target("gpu", 8, 1, 79.6 * GiB, 989e12),  # 80 GB HBM3 (81,559 MiB usable)
    "8xH200": Target("gpu", 8, 1, 140.4 * GiB, 989e12),
    "16xH100": Target("gpu", 16, 2, 79.6 * GiB, 989e12),
}


def target(name: str) -> Target:
    """A named slice, `cpu:N` (N simulated CPU devices, no memory limit), or `local` (this process's
    devices, e.g. a Colab TPU, with their reported memory limit)."""
    if name == "local":
        devices = jax.devices()
        stats = devices[0].memory_stats() or {}
        known = flops_lib.datasheet_peak(devices[0].device_kind)
        peak = known[1] if known else None
        return Target(
            devices[0].platform, len(devices), jax.process_count(), stats.get("bytes_limit"), peak, local=True
        )
    if name.startswith("cpu:") and name[4:].isdigit() and int(name[4:]) > 0:
        return Target("cpu", int(name[4:]), 1, None, None)
    if name not in TARGETS:
        raise ConfigError(f"unknown plan target {name!r}; targets: {', '.join(TARGETS)}, cpu:N")
    return TARGETS[name]


def simulated_devices_needed(t: Target) -> int:
    """How many CPU devices this process must have to plan for `t` (0: it compiles for real TPU devices)."""
    return 0 if t.local or (t.topology and has_libtpu()) else t.devices


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def target_devices(t: Target) -> tuple[list, bool]:
    """(the devices to compile for, whether they are simulated CPU devices)."""
    if t.local:
        return jax.devices(), t.platform == "cpu"
    if t.topology and has_libtpu():
        from jax.experimental import topologies

        # compile only: no chip is claimed, no metadata server asked, and libtpu is told the slice
        for key, value in (
            ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
            ("TPU_SKIP_MDS_QUERY", "1"),
            ("TPU_WORKER_HOSTNAMES", "localhost"),
            ("TPU_ACCELERATOR_TYPE", t.accelerator),
        ):
            os.environ.setdefault(key, value)

        return list(topologies.get_topology_desc(platform="tpu", topology_name=t.topology).devices), False
    devices = jax.devices("cpu")
    if len(devices) != t.devices:
        raise RuntimeError(
            f"simulating {t.devices} devices needs a process started with that many CPU devices (this one has "
            f"{len(devices)}): run `prefopt-jax plan` in a fresh process, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={t.devices}"
        )
    return devices, True


def worst_case_pairs(d: DataSection, batch_size: int) -> list[TokenizedPair]:
    """A step of pairs at the configured limits: a prompt of min(max_prompt_length, max_length / 2) tokens
    and both completions filling the rest of max_length."""
    length = d.max_length
    prompt = min(d.max_prompt_length or length // 2, length // 2)
    ids = np.arange(length, dtype=np.int32) % 1000 + 1  # token values do not change shapes
    pair = TokenizedPair(ids[:prompt], ids[prompt:], ids[prompt:][::-1].copy(), 1.0, Origin("plan", 0))
    return [pair] * batch_size


def worst_case_examples(d: DataSection, batch_size: int, unpaired: bool) -> list:
    """The worst-case step's examples: unpaired losses count examples, not pairs, in train.batch_size (a
    pair is two examples)."""
    pairs = worst_case_pairs(d, batch_size)
    return data.unpaired_from_pairs(pairs)[: len(pairs)] if unpaired else pairs


def host_seconds(bspec: data.BatchSpec, examples: list, hosts: int, repeats: int = 5) -> float:
    """Median host time to plan one step and build one process's share of it (its rows; the group arrays
    whole), for a process of a `hosts`-process run: what each process does per step, in the background."""
    timings = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        packer = data.packer(bspec, examples, seed=0)
        plans = packer.next_step()
        share = {part: slice(0, max(g.rows // hosts, 1)) for part, g in bspec.geometries.items()}
        for plan in plans:
            data.host_arrays(bspec, plan, examples, 0, share)
        timings.append(time.perf_counter() - t0)
    return float(np.median(timings))


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_inputs(p: build.Parts, t: TrainSection, dtype: str, mcfg: models.ModelConfig, spec, optimizer, mesh):
    """(state, frozen, ref_params) as shapes and shardings, laid out as `run.setup` lays out the real ones
    (both through `build.parameter_trees`); `dtype`: the parameters' (model.dtype)."""
    table = models.param_table(mcfg)
    base = _abstract(
        nest({n: jax.ShapeDtypeStruct(shape, np.dtype(dtype)) for n, (shape, _, _) in table.items()}),
        models.param_shardings(mcfg, mesh, p.rules),
    )
    adapters = None
    if t.lora_rank:
        adapters = jax.eval_shape(
            lambda: lora_lib.init_lora(mcfg, rank=t.lora_rank, targets=t.lora_targets, seed=t.seed)
        )
    trainable, frozen, ref_params, synced = build.parameter_trees(p, t, spec, base, adapters, mesh)
    shapes = jax.eval_shape(lambda tr, r: step_lib.init_state(tr, optimizer, spec.loss, reference=r), trainable, synced)
    replicated = NamedSharding(mesh, PartitionSpec())
    trainable_shardings = jax.tree.map(lambda a: a.sharding, trainable)
    state_shardings = {k: jax.tree.map(lambda _: replicated, v) for k, v in shapes.items()}
    state_shardings["trainable"] = trainable_shardings
    state_shardings["opt_state"] = optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, s: s,
        shapes["opt_state"],
        trainable_shardings,
        transform_non_params=lambda _: replicated,
    )
    if synced is not None:
        state_shardings["reference"] = jax.tree.map(lambda a: a.sharding, synced)
    return _abstract(shapes, state_shardings), frozen, ref_params


def tree_bytes_per_device(tree) -> int:
    """Bytes each device holds of abstract arrays (the largest shard, as XLA allocates)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shard) * np.dtype(a.dtype).itemsize
    return total


def step_figures(mcfg, spec, bspec: data.BatchSpec, examples: list, *, seed: int, steps: int):
    """(model FLOPs of the mean step, micro-batches the mean step uses, tokens computed per token trained)
    over a run's first `steps` steps, planned as the run plans them."""
    packer = data.packer(bspec, examples, seed=seed)
    planned = [packer.next_step() for _ in range(steps)]
    lora, in_step = spec.lora_scale is not None, spec.reference_in_step
    per_step = [
        flops_lib.step_flops(mcfg, plans, lora=lora, reference_in_step=in_step, scores_prompts=spec.scores_prompts)
        for plans in planned
    ]
    computed = sum(len(plans) for plans in planned) * bspec.geometries["main"].tokens
    trained = sum(flops_lib.plan_counts(p.parts["main"])[0] for plans in planned for p in plans)
    return float(np.mean(per_step)), float(np.mean([len(p) for p in planned])), computed / trained


def compiled_sizes(train_step, args: tuple, mesh: jax.sharding.Mesh, *, simulated: bool) -> tuple[tuple, bool]:
    """(argument, output, alias, temporary bytes per device) of the compiled step, and whether the compiler
    refused it: the TPU compiler refuses a program that cannot fit, which is reported as a plan (with the
    compiler's figure for the temporaries), not raised."""
    # XLA:CPU's default scheduler favours concurrency; the memory-minimising one is closer to an accelerator's
    options = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"} if simulated else None
    try:
        with jax.set_mesh(mesh):  # Pallas kernels read the target chip from the mesh's devices
            compiled = train_step.lower(*args).compile(compiler_options=options)
    except Exception as e:
        found = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        arguments = sum(tree_bytes_per_device(x) for x in args if x is not None)
        return (arguments, 0, 0, int(float(found.group(1)) * GiB)), True
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes), False


def memory_figures(trees: tuple, sizes: tuple, refused: bool, memory: float | None) -> dict:
    """Bytes per device: of the step's inputs (state, frozen, ref_params, batch: abstract arrays), of the
    compiled executable (`compiled_sizes`), their total, and whether it fits `memory`."""
    state, frozen, ref_params, batch = trees
    total = sizes[0] + sizes[1] - sizes[2] + sizes[3]
    return {
        "state_bytes": tree_bytes_per_device(state),
        "frozen_bytes": tree_bytes_per_device(frozen) if frozen is not None else 0,
        "reference_bytes": tree_bytes_per_device(ref_params) if ref_params is not None else 0,
        "batch_bytes": tree_bytes_per_device(batch),
        "batch_bytes_total": sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(batch)),
        "argument_bytes": sizes[0],
        "output_bytes": sizes[1],
        "alias_bytes": sizes[2],
        "temp_bytes": sizes[3],
        "total_bytes": total,
        "device_memory": memory,
        "fits": None if memory is None else total <= memory and not refused,
        "refused_by_compiler": refused,
    }


def compiled_for(tgt, devices: list, simulated: bool) -> str:
    if simulated:
        return f"{len(devices)} simulated CPU devices (estimate)"
    return "TPU (libtpu)" if tgt.topology else f"this process's {len(devices)} {devices[0].device_kind} devices"


def plan(
    cfg: Config, target_name: str, *, mfu: float = 0.4, out: IO | None = None, examples: list | None = None
) -> dict:
    """Compile the configured train step for `target_name` and report memory per device, FLOPs per step
    and the step time at `mfu`. Returns the figures (bytes, FLOPs, seconds) as a dict. The batch is sized
    from `examples` (tokenised; the run's `train.steps` steps over them planned as the run would, and FLOPs
    the mean of those steps'), or from worst-case pairs at the configured limits."""
    # over 60 lines by its one dict of figures (what `--json` writes): one pass from the target to them
    out = out or sys.stdout
    tgt = target(target_name)
    devices, simulated = target_devices(tgt)
    m = cfg.mesh
    mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    mcfg = models.model_config(cfg.model.source)
    parts = build.resolve(cfg, len(devices))
    # a GPU or TPU target compiled for simulated CPU devices runs XLA's attention here (their kernels need
    # the hardware or its compiler)
    attention = build.attention(cfg.model, mcfg, tgt.platform if not simulated else "cpu")
    if simulated and tgt.platform != "cpu":
        attention = "dense"
    given = examples is not None
    t = cfg.train
    examples = examples if given else worst_case_examples(cfg.data, t.batch_size, parts.unpaired)
    bspec = batches.batch_spec(cfg.data, t, examples, mesh, attention=attention, response_only=parts.response_only)
    spec = build.step_spec(parts, cfg.model, t, bspec.geometries, attention, mesh)
    optimizer = build.make_optimizer(t)
    state, frozen, ref_params = abstract_inputs(parts, t, cfg.model.dtype, mcfg, spec, optimizer, mesh)
    batch = batches.abstract_batch(bspec, mesh, parts.side_inputs)
    train_step = step_lib.make_train_step(mcfg, spec, optimizer)
    sizes, refused = compiled_sizes(train_step, (state, frozen, ref_params, batch), mesh, simulated=simulated)
    step_flops, micro_used, computed_per_trained = step_figures(
        mcfg, spec, bspec, examples, seed=cfg.train.seed, steps=cfg.train.steps if given else 1
    )
    peak = flops_lib.total_peak(tgt.peak_flops, len(devices), tgt.platform)
    result = {
        "source": str(cfg.model.source),
        "loss": ",".join(cfg.loss.names),
        "reference": t.reference,
        "lora_rank": t.lora_rank,
        "batch_size": t.batch_size,
        "steps": t.steps,
        "layout": cfg.data.layout,
        "max_length": cfg.data.max_length,
        "target": target_name,
        "devices": len(devices),
        "compiled_for": compiled_for(tgt, devices, simulated),
        "mesh": dict(mesh.shape),
        "params": mcfg.num_params(),
        **memory_figures((state, frozen, ref_params, batch), sizes, refused, tgt.memory),
        "host_seconds": host_seconds(bspec, examples, tgt.hosts),
        "hosts": tgt.hosts,
        "attention": attention,
        "geometry": dataclasses.asdict(bspec.geometries["main"]),
        "shapes": 1,
        "flops": step_flops,
        "mfu": mfu,
        "step_seconds": step_flops / (peak * mfu),
        "batch_shape": list(batch["main"]["input_ids"].shape),
        "examples": "given" if given else "worst case",
        "micro_batches_used": micro_used,
        "computed_per_trained_token": computed_per_trained,
    }
    print(report(result), file=out)
    return result


def report(r: dict) -> str:
    """The plan's figures (`plan`'s result) as the lines `prefopt-jax plan` prints."""

    def gib(n: float) -> str:
        return f"{n / GiB:7.2f} GiB"

    ref = f"{r['reference']}" + (f" (LoRA r{r['lora_rank']})" if r["lora_rank"] else " (full fine-tuning)")
    lines = [
        f"plan: {r['source']} ({r['params'] / 1e9:.2f}B params), {r['loss']}, reference {ref}",
        f"target {r['target']}: compiled for {r['compiled_for']}; mesh {r['mesh']}",
        f"batch: {r['batch_size']} pairs/step packed into {r['micro_batches_used']:.2f} micro-batches on average "
        f"(room for {r['batch_shape'][0]}) of {r['batch_shape'][1:]} rows x tokens ({r['layout']}; "
        + (
            f"the given examples, {r['steps']} steps"
            if r["examples"] == "given"
            else f"worst-case pairs at max_length {r['max_length']}"
        )
        + f"); {r['computed_per_trained_token']:.3f} tokens computed per token trained; {r['shapes']} shape for "
        f"every step (fixed geometry: {r['geometry']['scored']} scored tokens per row)",
        f"attention: {r['attention']}; batch arrays {r['batch_bytes_total'] / 2**20:.2f} MiB per step in all "
        f"(integers only, no mask); host time to plan and build one process's share "
        f"({r['hosts']} process(es)): {r['host_seconds'] * 1e3:.1f} ms per step, in the background",
        "per device:",
        f"  train state (params, optimizer) {gib(r['state_bytes'])}",
        f"  frozen base / reference copy    {gib(r['frozen_bytes'] + r['reference_bytes'])}",
        f"  batch                           {gib(r['batch_bytes'])}",
        f"  arguments ({'counted' if r['refused_by_compiler'] else 'compiled'})            {gib(r['argument_bytes'])}",
        f"  temporaries                     {gib(r['temp_bytes'])}",
        f"  total                           {gib(r['total_bytes'])}",
    ]
    if r["device_memory"] is not None:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        if r["refused_by_compiler"]:
            verdict += " (the TPU compiler refused it; temporaries are its figure)"
        lines.append(f"  device memory                   {gib(r['device_memory'])}  -> {verdict}")
    lines.append(
        f"FLOPs per step {r['flops']:.3e}; at {r['mfu']:.0%} MFU a step takes {r['step_seconds']:.2f} s "
        f"({r['batch_size'] / r['step_seconds']:.1f} pairs/s)"
    )
    if r["compiled_for"].endswith("(estimate)"):
        lines.append(
            "note: compiled for simulated CPU devices; XLA:CPU computes bfloat16 in float32 and has no "
            "reduce-scatter, so temporaries are overstated (TPU targets: pip install -e '.[tpu]')"
        )
    return "\n".join(lines)
