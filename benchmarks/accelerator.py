"""One command for a bare GPU machine: is the project right there, and how fast is its DPO step?

In priority order, rewriting one JSON after every measurement (a timeout still returns what was done) and
skipping what `--budget` seconds no longer leave time for:
1. correctness on the device: each attention implementation (the Pallas GPU flash kernel, cuDNN, dense XLA)
   in bfloat16 against dense attention in float32, values and q/k/v gradients on packed prefix-shared rows
   (relative error to the largest entry <= 1e-2); the DPO step (4 layers of SmolLM2-135M, float32, matmul
   precision "highest") on the device against the same step on this machine's CPU: loss, reward margins,
   chosen log-probs and gradient norm within 1e-4 (absolute below 1, relative above), with dense attention
   and with the GPU kernel;
2. attention alone: forward + backward of each implementation on 2,048-token packed rows (Llama-3-8B's heads,
   bfloat16): median milliseconds and the kernel's speed-up over cuDNN;
3. the DPO step, frozen bfloat16 reference, bfloat16 compute: Llama-3-8B (LoRA r16 with the LoRA base as the
   reference, and full fine-tuning with `model.dtype=bfloat16` so that it fits one chip), then SmolLM2-1.7B
   and SmolLM2-135M (float32 master weights), random weights from the architectures `models.hub_configs` ships
   (no downloads), per attention implementation: compile seconds, step seconds (median), tokens/s (real
   tokens trained), MFU against the datasheet bf16 peak (989 TFLOP/s for H100/H200) with the measured bf16
   matmul rate beside it, peak device memory (`memory_stats()`; exact when it rose during the measurement),
   the GPU compiler's own memory figure, and what `prefopt-jax plan --target 1xH200` predicted for the same
   step on CPU (simulated devices; stored in `accelerator_inputs.json`).

Batches are the run's own: the packer packs pairs whose prompt/chosen/rejected token lengths are those of
real pairs (SmolLM2's chat template over `../shared/data`, computed beforehand into
`benchmarks/accelerator_inputs.json`, since `../shared` does not travel); token ids are random.

On the device machine (no network; it has jax with CUDA, flax, optax, orbax, chex, tensorstore,
transformers, torch; the rest travels as wheels in the git-ignored `.whl/`, made here once by
`bash benchmarks/accelerator_wheels.sh`), carrying `.whl`:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \\
        python3 benchmarks/accelerator.py --out $OUT/accelerator.json --budget 420

Here (CPU): `python benchmarks/accelerator.py --smoke` runs the same code on a tiny model in interpret mode
(< 2 minutes; tests/test_accelerator_benchmark.py runs it); `--prepare` rewrites the inputs file from
`../shared/data` and the plan predictions (minutes: it compiles each step for a simulated H200).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# JAX takes 75% of a GPU's memory by default; the 8B full fine-tuning step needs more (no effect on CPU)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
import numpy as np
from timing import timed

from prefopt_jax import config, data, models, sharding
from prefopt_jax.data.records import Origin
from prefopt_jax.data.tokenize import TokenizedPair
from prefopt_jax.models import attention as attention_lib
from prefopt_jax.models import flash_gpu
from prefopt_jax.models.mask import Tokens
from prefopt_jax.train import batches, build
from prefopt_jax.train import flops as flops_lib
from prefopt_jax.train import lora as lora_lib
from prefopt_jax.train import step as step_lib

HERE = Path(__file__).resolve().parent
INPUTS = HERE / "accelerator_inputs.json"
SHARED = HERE.parents[1] / "shared" / "data"
GiB = 2**30
BF16_TOL, STEP_TOL = 1e-2, 1e-4
IMPLS = ("pallas_gpu", "cudnn", "dense")
MODELS = {  # name: (hub id, rows per micro-batch of 2,048 tokens)
    "llama3-8b": ("meta-llama/Meta-Llama-3-8B-Instruct", 1),
    "smollm2-1.7b": ("HuggingFaceTB/SmolLM2-1.7B-Instruct", 4),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", 16),
}
# the step measurements, most important first
SPEED = [
    ("llama3-8b", "lora", "pallas_gpu"), ("llama3-8b", "lora", "cudnn"),
    ("llama3-8b", "full", "pallas_gpu"), ("llama3-8b", "full", "cudnn"),
    ("llama3-8b", "lora", "dense"), ("llama3-8b", "full", "dense"),
    ("smollm2-1.7b", "full", "pallas_gpu"), ("smollm2-1.7b", "full", "cudnn"), ("smollm2-1.7b", "lora", "pallas_gpu"),
    ("smollm2-1.7b", "lora", "cudnn"), ("smollm2-1.7b", "full", "dense"),
    ("smollm2-135m", "full", "pallas_gpu"), ("smollm2-135m", "full", "cudnn"), ("smollm2-135m", "lora", "pallas_gpu"),
    ("smollm2-135m", "lora", "cudnn"), ("smollm2-135m", "full", "dense"),
]  # fmt: skip
TINY = {  # --smoke: a tiny Llama (as an HF config.json), on CPU
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


class Report:
    """The JSON, rewritten whole after every measurement; and the table printed as it grows."""

    def __init__(self, path: Path, budget: float):
        self.path, self.deadline, self.data = path, time.monotonic() + budget, {"results": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, section: str, row: dict) -> None:
        self.data["results"].append({"section": section, **row})
        self.path.write_text(json.dumps(self.data, indent=1, default=float))
        print(f"[{section}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@contextlib.contextmanager
def measuring(report: Report, section: str, row: dict, need: float):
    """Run one measurement if `need` seconds are left; record its row, or its error, and go on."""
    if report.left() < need:
        report.add(section, {**row, "skipped": f"budget: {report.left():.0f} s left, needs ~{need:.0f} s"})
        yield None
        return
    try:
        yield row
    except Exception as e:  # a failed measurement is a result: record it and go on to the next
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    report.add(section, row)


# ---- inputs ------------------------------------------------------------------------------------------


def pairs_from_lengths(lengths: list, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    """Pairs of random token ids with the given (prompt, chosen, rejected) lengths."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, vocab, n).astype(np.int32)
    return [TokenizedPair(ids(p), ids(c), ids(r), 1.0, Origin("accelerator", i)) for i, (p, c, r) in enumerate(lengths)]


def case_config(model: str, mode: str, impl: str, *, folder: str | None = None, steps: int = 4) -> config.Config:
    """The benchmark's DPO run of `model` (LoRA or full fine-tuning) with attention `impl`; with `folder` (a
    small model's config.json) that model instead, on short rows (the checks and --smoke)."""
    hub, rows = MODELS[model]
    length, batch = (2048, 32) if folder is None else (256, 8)
    big = model == "llama3-8b"
    overrides = {
        "model.source": folder or hub,
        "model.dtype": "bfloat16" if big else "float32",
        "model.compute_dtype": "bfloat16",
        "model.attention": impl,
        "loss.name": "dpo",
        "loss.weights": "null",
        "train.lora_rank": 16 if mode == "lora" else 0,
        "train.lora_alpha": 32,
        "train.reference": "lora_base" if mode == "lora" else "frozen",
        "train.reference_dtype": "null" if mode == "lora" else "bfloat16",
        "train.batch_size": batch,
        "train.steps": steps,
        "data.max_length": length // 2,  # prompt + completion, as the lengths were truncated
        "data.pack_length": length,
        "data.micro_batch_rows": rows if folder is None else 2,
        "mesh.fsdp": 1,
        "output.compilation_cache": "null",
    }
    return config.load_config(None, [f"{k}={v}" for k, v in overrides.items()], devices=1)


@dataclasses.dataclass
class Case:
    cfg: config.Config
    mcfg: models.ModelConfig
    spec: step_lib.StepSpec
    bspec: data.BatchSpec
    train_step: object
    args: tuple  # (state, frozen, ref_params)
    steps: list  # [(placed batch, plans)]


def build_case(cfg: config.Config, examples: list, device, *, steps: int) -> Case:
    """The run's own step (as `train.run.setup` builds it) over one device, with random weights, and the
    first `steps` steps' batches, placed."""
    mesh = sharding.make_mesh(1, 1, 1, devices=[device])
    mcfg, t = models.model_config(cfg.model.source), cfg.train
    parts = build.resolve(cfg, 1)
    attention = build.attention(cfg.model, mcfg, device.platform)
    bspec = batches.batch_spec(cfg.data, t, examples, mesh, attention=attention, response_only=parts.response_only)
    spec = build.step_spec(parts, cfg.model, t, bspec.geometries, attention, mesh)
    dtype = jnp.dtype(cfg.model.dtype)
    with jax.default_device(device):
        base = models.create_model(mcfg, seed=0, mesh=mesh, rules=parts.rules, param_dtype=dtype).params()
        adapters = lora_lib.init_lora(mcfg, rank=t.lora_rank, targets=t.lora_targets, seed=0) if t.lora_rank else None
        trainable, frozen, ref_params, synced = build.parameter_trees(parts, t, spec, base, adapters, mesh)
        optimizer, state = build.initial_state(parts, t, trainable, synced, mesh)
    packer = data.packer(bspec, examples, seed=0)
    placed = []
    for _ in range(steps):
        plans = packer.next_step()
        placed.append((batches.place(bspec, batches.host_step(bspec, plans, examples, mesh, 0), mesh), plans))
    train_step = step_lib.make_train_step(mcfg, spec, optimizer)
    return Case(cfg, mcfg, spec, bspec, train_step, (state, frozen, ref_params), placed)


# ---- 1. correctness ------------------------------------------------------------------------------------


def packed_tokens(lengths: list, rows: int, length: int) -> Tokens:
    """The token arrays of `rows` packed rows of `length` tokens, as the packer builds them from pairs of
    the given lengths."""
    slots = 256
    plan = data.RowPlan(data.Geometry(rows, length, slots, 2, length, rows * length), "packed")
    groups = []
    for p, c, r in lengths:
        if len(groups) < slots and plan.place(p, [c, r], len(groups)):
            groups.append((np.ones(p, np.int32), [np.ones(c, np.int32), np.ones(r, np.int32)]))
    b = data.batching.build(plan, groups)
    return Tokens(*(jnp.asarray(a, jnp.int32) for a in (b.segment_ids, b.branch, b.positions)))


def attention_case(heads: int, kv_heads: int, dim: int, softcap: float | None) -> models.ModelConfig:
    return models.ModelConfig(
        family="gemma2" if softcap else "llama", vocab_size=256, hidden_size=heads * dim, intermediate_size=64,
        num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, attn_logit_softcap=softcap,
    )  # fmt: skip


def attention_fn(mcfg, impl: str, tokens: Tokens, window: int, platform: str):
    spec = attention_lib.AttentionSpec(impl, interpret=platform == "cpu")
    return lambda q, k, v: attention_lib.attention(mcfg, spec, q, k, v, tokens, window)


def value_and_grads(fn, inputs: tuple, weights, real, dtype) -> list:
    """[output (padding zeroed), dq, dk, dv] of `fn` on `inputs` cast to `dtype`, for a weighted-sum loss."""
    loss = lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v).astype(jnp.float32), 0) * weights)
    cast = [a.astype(dtype) for a in inputs]
    with jax.default_matmul_precision("highest"):
        out = jax.jit(fn)(*cast)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*cast)
    return [jnp.where(real, out, 0), *grads]


def fwd_bwd(fn):
    """The jitted gradient of a sum over `fn`'s output: attention's forward and backward."""
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))


def check_attention(report: Report, lengths: list, device, smoke: bool) -> None:
    """Each implementation in bfloat16 against dense attention in float32 from the same bfloat16-rounded inputs
    (so the tolerance measures the implementation, not the inputs' rounding): output and q/k/v gradients."""
    platform = device.platform
    shapes = [("llama3-8b heads", 32, 8, 128, None, 0), ("gemma2-9b heads", 16, 8, 256, 50.0, 1024)]
    if smoke:
        shapes = [("tiny", 4, 2, 64, None, 0), ("tiny softcap dim256", 2, 1, 256, 30.0, 100)]
    rows, length = (2, 2048) if not smoke else (1, 512)
    tokens = jax.device_put(packed_tokens(lengths, rows, length), device)
    real = (tokens.segment_ids > 0)[..., None, None]  # [R, T, 1, 1] against outputs [R, T, H, E]
    for name, h, kh, e, softcap, window in shapes:
        mcfg = attention_case(h, kh, e, softcap)
        rng = np.random.default_rng(0)
        shapes_qkv = ((rows, length, kh, h // kh, e), (rows, length, kh, e), (rows, length, kh, e))
        inputs = tuple(jnp.asarray(rng.normal(size=sh), jnp.bfloat16).astype(jnp.float32) for sh in shapes_qkv)
        inputs = jax.device_put(inputs, device)
        w = jax.device_put(jnp.asarray(rng.normal(size=(rows, length, h, e)), jnp.float32), device)
        want = None
        for impl in IMPLS:
            row = {"shape": name, "impl": impl, "tolerance": BF16_TOL}
            with measuring(report, "attention correctness", row, 20) as r:
                if r is None:
                    continue
                try:
                    attention_lib.resolve(impl, platform, mcfg, "bfloat16")
                except ValueError as err:
                    r["skipped"] = str(err)
                    continue
                if want is None:  # the reference, once per shape (inside: its failure is a row, not the end)
                    dense = attention_fn(mcfg, "dense", tokens, window, platform)
                    want = value_and_grads(dense, inputs, w, real, jnp.float32)
                got = value_and_grads(attention_fn(mcfg, impl, tokens, window, platform), inputs, w, real, jnp.bfloat16)
                for part, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
                    r[f"{part}_rel_err"] = float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b).max())
                r["ok"] = all(r[f"{p}_rel_err"] <= BF16_TOL for p in ("out", "dq", "dk", "dv"))


def step_metrics(case: Case) -> dict:
    state, frozen, ref = jax.tree.map(jnp.copy, case.args)
    with jax.default_matmul_precision("highest"):
        _, metrics = case.train_step(state, frozen, ref, case.steps[0][0])
    return {k: float(metrics[k]) for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm")}


def check_step(report: Report, lengths: list, device, source: str | None) -> None:
    """The DPO step on the device against the same step on the CPU, float32, matmul precision highest: 4 layers
    of SmolLM2-135M on short rows (the real pairs clipped to fit 256-token rows)."""
    cpu = jax.devices("cpu")[0]
    if source is None:  # SmolLM2-135M's architecture, 4 of its layers
        tmp = Path(tempfile.mkdtemp())
        from prefopt_jax.models.hub_configs import HUB_CONFIGS

        (tmp / "config.json").write_text(json.dumps({**HUB_CONFIGS[MODELS["smollm2-135m"][0]], "num_hidden_layers": 4}))
        source = str(tmp)
    short = [[min(p, 60), min(c, 40), min(r, 40)] for p, c, r in lengths[:32]]

    def metrics_on(dev, attention):
        cfg = case_config("smollm2-135m", "full", attention, folder=source, steps=1)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype="float32"))
        examples = pairs_from_lengths(short, models.model_config(cfg.model.source).vocab_size)
        return step_metrics(build_case(cfg, examples, dev, steps=1))

    want = None
    for impl in ("dense", "pallas_gpu"):
        row = {"model": "smollm2-135m (4 layers)", "impl_on_device": impl, "tolerance": STEP_TOL}
        with measuring(report, "step correctness", row, 60) as r:
            if r is None:
                continue
            want = want or metrics_on(cpu, "dense")  # the CPU reference, once
            got = metrics_on(device, impl)
            for k in want:
                r[k], r[f"{k}_cpu"], r[f"{k}_diff"] = got[k], want[k], abs(got[k] - want[k])
            r["ok"] = all(abs(got[k] - want[k]) <= STEP_TOL * max(1.0, abs(want[k])) for k in want)


# ---- 2. attention speed --------------------------------------------------------------------------------


def attention_speed(report: Report, lengths: list, device, smoke: bool) -> None:
    rows, length, (h, kh, e) = (8, 2048, (32, 8, 128)) if not smoke else (1, 256, (4, 2, 64))
    tokens = jax.device_put(packed_tokens(lengths, rows, length), device)
    mcfg = attention_case(h, kh, e, None)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(rows, length, kh, h // kh, e)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(rows, length, kh, e)), jnp.bfloat16) for _ in range(2))
    q, k, v = jax.device_put((q, k, v), device)
    block = flash_gpu.block_for(length, e)
    kinds = np.asarray(flash_gpu.tile_kinds(*tokens, 0, block))
    n = length // block
    nonempty = int((kinds != flash_gpu.EMPTY).sum())
    report.add("attention tiles", {  # what the kernel computes, against a dense-mask kernel's every tile
        "rows": f"{rows} x {length}", "block": block, "nonempty_of_all": nonempty / kinds.size,
        "nonempty_of_causal": nonempty / (rows * n * (n + 1) / 2),
        "full_of_nonempty": float((kinds == flash_gpu.FULL).sum() / nonempty),
    })  # fmt: skip
    ms = {}
    for impl in IMPLS:
        row = {"rows": f"{rows} x {length}", "heads": f"{h}/{kh}x{e}", "impl": impl}
        with measuring(report, "attention speed", row, 30) as r:
            if r is None:
                continue
            try:
                attention_lib.resolve(impl, device.platform, mcfg, "bfloat16")
            except ValueError as err:
                r["skipped"] = str(err)
                continue
            step = fwd_bwd(attention_fn(mcfg, impl, tokens, 0, device.platform))
            ms[impl] = r["fwd_bwd_ms"] = 1e3 * timed(step, q, k, v, repeats=3 if smoke else 10)
            if impl != "pallas_gpu" and "pallas_gpu" in ms:
                r["pallas_gpu_speedup"] = ms[impl] / ms["pallas_gpu"]


# ---- 3. the DPO step -------------------------------------------------------------------------------------


def memory_figures(device) -> dict:
    stats = device.memory_stats() or {}
    return {"peak_bytes": stats.get("peak_bytes_in_use"), "in_use_bytes": stats.get("bytes_in_use")}


def run_case(row: dict, cfg: config.Config, examples: list, device, *, lora: bool, steps: int, peak) -> None:
    """One DPO-step measurement into `row`; everything it allocated is freed when it returns or raises."""
    gc.collect()  # what an earlier case left in reference cycles goes before this one allocates
    before = memory_figures(device)["peak_bytes"] or 0
    case = build_case(cfg, examples, device, steps=steps)
    t0 = time.perf_counter()
    compiled = case.train_step.lower(*case.args, case.steps[0][0]).compile()
    row["compile_s"] = time.perf_counter() - t0
    m = compiled.memory_analysis()
    row["compiled_bytes"] = (
        m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    )
    state, frozen, ref = case.args
    times, tokens, step_flops = [], [], []
    for batch, plans in case.steps:
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, ref, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
        tokens.append(sum(flops_lib.plan_counts(p.parts["main"])[0] for p in plans))
        step_flops.append(
            flops_lib.step_flops(case.mcfg, plans, lora=lora, reference_in_step=case.spec.reference_in_step)
        )
    timed_steps = slice(1, None) if len(times) > 1 else slice(None)  # the first step warms up
    row["step_s"] = statistics.median(times[timed_steps])
    row["tokens_per_s"] = statistics.median([n / t for n, t in zip(tokens, times, strict=True)][timed_steps])
    achieved = statistics.median([f / t for f, t in zip(step_flops, times, strict=True)][timed_steps])
    row["achieved_flops"] = achieved
    row["mfu"] = achieved / peak[1] if peak else None
    row["loss"] = float(metrics["loss"])
    row.update(memory_figures(device))
    row["peak_exact"] = (row["peak_bytes"] or 0) > before  # the high-water mark rose during this case


def step_speed(report: Report, lengths: list, device, *, smoke: bool, source: str | None, predictions: dict):
    peak = flops_lib.datasheet_peak(device.device_kind)
    report.data["datasheet_bf16_peak"] = peak[1] if peak else None
    with measuring(report, "matmul rate", {"dtype": "bfloat16"}, 10) as r:
        if r is not None:  # random operands: all-ones matrices can read faster
            r["flops"] = report.data["measured_bf16_matmul"] = flops_lib.measured_peak_flops(
                n=8192 if not smoke else 256, repeats=10, dtype=jnp.bfloat16, random=True
            )
    cases = SPEED if not smoke else [("smollm2-135m", "full", "pallas_gpu"), ("smollm2-135m", "lora", "dense")]
    for model, mode, impl in cases:
        with measuring(
            report, "dpo step", {"case": f"{model}/{mode}/{impl}"}, 150 if model == "llama3-8b" else 60
        ) as r:
            if r is None:
                continue
            cfg = case_config(model, mode, impl, folder=source)
            examples = pairs_from_lengths(lengths, models.model_config(cfg.model.source).vocab_size)
            try:
                run_case(r, cfg, examples, device, lora=mode == "lora", steps=4 if not smoke else 2, peak=peak)
            finally:
                gc.collect()  # the case's arrays (and an exception's frames) go before the next case
            if report.data.get("measured_bf16_matmul"):
                r["of_measured_matmul"] = r["achieved_flops"] / report.data["measured_bf16_matmul"]
            plan = predictions.get(f"{model}/{mode}")
            if plan and r["peak_bytes"] and r["peak_exact"]:  # a later, smaller case reports an earlier peak
                r["plan_total_bytes"] = plan["total_bytes"]
                r["peak_over_plan"] = r["peak_bytes"] / plan["total_bytes"]


def table(result: dict) -> str:
    """The DPO step rows as a markdown table (what the README quotes), the attention speed-up under it."""
    gib = lambda n: f"{n / GiB:.1f}" if n else "-"
    pct = lambda x: f"{x:.0%}" if x is not None else "-"
    lines = [
        f"{result['device']}, jax {result['jax']}; measured bf16 matmul "
        f"{(result.get('measured_bf16_matmul') or 0) / 1e12:.3g} TFLOP/s",
        "| model / tuning / attention | compile s | step s | tokens/s | MFU | of measured matmul | peak GiB "
        "| plan GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        if r["section"] != "dpo step":
            continue
        if "step_s" not in r:
            lines.append(f"| {r['case']} | {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        peak = gib(r.get("peak_bytes")) + ("" if r.get("peak_exact") or not r.get("peak_bytes") else " (<=)")
        lines.append(
            f"| {r['case']} | {r['compile_s']:.0f} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} "
            f"| {pct(r.get('mfu'))} "
            f"| {pct(r.get('of_measured_matmul'))} | {peak} | {gib(r.get('plan_total_bytes'))} |"
        )
    for r in result["results"]:
        if r["section"] == "attention speed" and "fwd_bwd_ms" in r:
            lines.append(f"attention {r['impl']} ({r['rows']}, {r['heads']}): {r['fwd_bwd_ms']:.2f} ms fwd+bwd")
    return "\n".join(lines)


# ---- --prepare: the inputs file ------------------------------------------------------------------------


def real_lengths(limit: int = 512) -> list:
    """(prompt, chosen, rejected) token lengths of real pairs under SmolLM2's chat template: helpful HH-RLHF
    (multi-turn, short answers), LLaMA-Factory's DPO demo (long answers) and Orca pairs, truncated as the
    zephyr recipe does (prompt 512, prompt + completion 1,024 tokens), so a pair fits a 2,048-token row."""
    tok = models.load_tokenizer("smollm2-135m-instruct")
    rows = []
    for name, skip, take in (("hh_rlhf_test.jsonl", 2303, 256), ("llamafactory_dpo_en_demo.jsonl", 0, 128),
                             ("orca_dpo_pairs_sample.jsonl", 0, 128)):  # fmt: skip
        lines = (SHARED / name).read_text().splitlines()[skip : skip + take]
        rows += [json.loads(line) for line in lines]
    pairs = data.prepare(rows, tok, max_length=1024, max_prompt_length=512).train
    return [[len(p.prompt), len(p.chosen), len(p.rejected)] for p in pairs][:limit]


def prepare() -> int:
    """Rewrite accelerator_inputs.json: the real pairs' lengths, and plan's 1xH200 prediction per step case."""
    from prefopt_jax.train import plan as plan_lib

    lengths = real_lengths()
    predictions = {}
    for model, mode in dict.fromkeys((m, mode) for m, mode, _ in SPEED):
        cfg = case_config(model, mode, "auto")
        vocab = models.model_config(cfg.model.source).vocab_size
        with open("/dev/null", "w") as quiet:
            r = plan_lib.plan(cfg, "1xH200", examples=pairs_from_lengths(lengths, vocab), out=quiet)
        keep = ("total_bytes", "state_bytes", "frozen_bytes", "reference_bytes", "temp_bytes", "flops", "step_seconds")
        predictions[f"{model}/{mode}"] = {k: r[k] for k in keep} | {"compiled_for": r["compiled_for"]}
        print(model, mode, f"{r['total_bytes'] / GiB:.1f} GiB", flush=True)
    INPUTS.write_text(json.dumps({"lengths": lengths, "plan_1xH200": predictions}, indent=None) + "\n")
    print(f"wrote {INPUTS}: {len(lengths)} pairs, {len(predictions)} predictions")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="accelerator.json", help="the JSON, rewritten after every measurement")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later measurements are skipped")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU, interpret-mode kernels")
    parser.add_argument("--prepare", action="store_true", help="rewrite accelerator_inputs.json (needs ../shared)")
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare()
    inputs = json.loads(INPUTS.read_text())
    lengths = inputs["lengths"]
    device = jax.devices()[0] if not args.smoke else jax.devices("cpu")[0]
    report = Report(Path(args.out), args.budget)
    report.data.update(jax=jax.__version__, device=device.device_kind, platform=device.platform, smoke=args.smoke)
    source = None
    if args.smoke:
        tmp = Path(tempfile.mkdtemp())
        (tmp / "config.json").write_text(json.dumps(TINY))
        source = str(tmp)
        lengths = [[min(p, 60), min(c, 40), min(r, 40)] for p, c, r in lengths[:48]]
    check_attention(report, lengths, device, args.smoke)
    check_step(report, lengths, device, source)
    attention_speed(report, lengths, device, args.smoke)
    step_speed(report, lengths, device, smoke=args.smoke, source=source, predictions=inputs.get("plan_1xH200", {}))
    print(table(report.data))
    failed = [r for r in report.data["results"] if r.get("ok") is False or "error" in r]
    print(f"wrote {args.out}: {len(report.data['results'])} rows, {len(failed)} failed or wrong")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
