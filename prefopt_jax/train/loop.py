"""The training loop: the one place that reads the config and wires model, data, step and logging."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefopt_jax import data, models
from prefopt_jax.config import Config, ConfigError
from prefopt_jax.models.generate import generate
from prefopt_jax.train import batches, build, checkpoint, reference_cache, runtime, udm
from prefopt_jax.train import flops as flops_lib
from prefopt_jax.train import hub as hub_lib
from prefopt_jax.train import lora as lora_lib
from prefopt_jax.train import metrics as metrics_lib
from prefopt_jax.train import model_card as model_card_lib
from prefopt_jax.train import pipeline as pipeline_lib
from prefopt_jax.train import step as step_lib


def _stop_on_signals() -> dict:
    """SIGTERM/SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and stop at the next step boundary."""
    flag: dict = {"signal": None}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda num, frame: flag.update(signal=signal.Signals(num).name))
    return flag


@dataclasses.dataclass
class Run:
    """Everything a run's train and eval steps take, built from the config (plain data, no behaviour)."""

    cfg: Config
    mesh: Mesh
    model_cfg: models.ModelConfig
    tokenizer: Any
    prepared: data.Prepared
    answers: list[str] | None
    batch_specs: dict[str, data.BatchSpec]  # per split: the fixed micro-batch geometry
    spec: step_lib.StepSpec
    eval_spec: step_lib.StepSpec  # unpaired losses are evaluated on held-out pairs by their implicit reward
    pad_id: int
    state: dict
    frozen: dict | None  # the LoRA base (also the reference in lora_base mode)
    ref_params: dict | None  # the frozen reference copy (full fine-tuning)
    side: dict[str, dict]  # per split, per-example inputs computed before training (`batches.host_step`)


def setup(
    cfg: Config, optimizer: optax.GradientTransformation, out: IO, *, splits=("train", "eval"), optimizer_state=True
) -> Run:
    """Load the model, the data (the `splits` asked for; and the precomputed reference, if asked) and build
    the initial state. Without `optimizer_state` the optimizer's part of the state is shapes only (evaluation
    and export read a checkpoint's policy and allocate no Adam moments)."""
    t, parts = cfg.train, build.parts(cfg)
    mesh, tokenizer = runtime.start(cfg)
    if (parts.precomputed or parts.udm) and splits:  # the cache key covers both; the classifier fits on train
        splits = ("train", "eval")
    prepared, answers = batches.load_data(cfg, tokenizer, parts.loss, splits)  # bad data stops before the model
    print(f"data: {batches.describe(prepared)}", file=out)
    if parts.udm and splits and len({e.label for e in prepared.train}) < 2:
        raise ConfigError("loss.udm=true fits a classifier of desirable vs undesirable training prompts: it needs both")
    model = runtime.load_model(cfg, mesh)
    mcfg, base = model.config, model.params()
    print(f"model {cfg.model.source} ({mcfg.num_params() / 1e6:.0f}M params) loaded", file=out)
    attention = runtime.attention(cfg, mcfg, mesh.devices.flat[0].platform)
    specs = build.batch_specs(cfg, prepared, mesh, attention)
    spec = build.step_spec(cfg, specs["train"].geometries if specs else {}, attention, mesh)
    side: dict[str, dict] = {"train": {}, "eval": {}}
    by_split = {"train": prepared.train, "eval": prepared.eval}
    if parts.precomputed:
        key = reference_cache.key_for(cfg, prepared)
        for split, values in reference_cache.read(t.reference_cache, key, by_split).items():
            side[split]["ref_logps"] = values
        print(f"reference log-probs from {t.reference_cache.rstrip('/')}/{key}", file=out)
    if parts.udm:  # BCO-UDM: p(desirable | prompt) from a classifier of the base model's prompt embeddings
        for split, values in udm.desirable_probabilities(mcfg, base, by_split, mesh).items():
            side[split]["udm_prob"] = values
        p = side["train"]["udm_prob"]
        print(f"udm: prompt classifier p(desirable) {p.min():.2f}..{p.max():.2f} on the training prompts", file=out)
    adapters = None
    if t.lora_rank:
        adapters = lora_lib.init_lora(mcfg, rank=t.lora_rank, targets=t.lora_targets, seed=t.seed)
    trainable, frozen, ref_params, synced = build.parameter_trees(cfg, spec, base, adapters, mesh)
    # every leaf on the mesh (the optimizer's scalars replicated), so restored checkpoints land the same way
    replicated = NamedSharding(mesh, PartitionSpec())
    if not optimizer_state:  # the optimizer state as shapes only: nothing to allocate for Adam's moments
        optimizer = optax.GradientTransformation(partial(jax.eval_shape, optimizer.init), optimizer.update)
    state = step_lib.init_state(trainable, optimizer, parts.loss, reference=synced)
    state = jax.tree.map(
        lambda a: a if isinstance(a, jax.ShapeDtypeStruct) or isinstance(a.sharding, NamedSharding)
        else jax.device_put(a, replicated),
        state,
    )  # fmt: skip
    eval_spec = build.eval_spec(cfg, spec, specs, prepared)
    if specs:
        g, room = specs["train"].geometries["main"], specs["train"].micro_batches
        print(
            f"micro-batches: {g.rows} rows x {g.length} tokens, up to {g.groups} groups, {g.scored} scored tokens "
            f"per row; {t.batch_size} per step in at most {room} of them (as the plan needs); attention: {attention}",
            file=out,
        )
    return Run(
        cfg,
        mesh,
        mcfg,
        tokenizer,
        prepared,
        answers,
        specs,
        spec,
        eval_spec,
        tokenizer.pad_token_id or 0,
        state,
        frozen,
        ref_params,
        side,
    )


def evaluate(run: Run, eval_step, trainable: dict, loss_state) -> dict:
    """Held-out metrics over every held-out example (every scalar the loss reports, averaged over them;
    reward accuracy by pair length) and, for the built-in task, the exact-answer accuracy of greedy
    generations. A stateful loss runs in its evaluation mode from the training state, which held-out
    batches never change (with AlphaDPO's `update_in_eval` they move a copy, batch after batch)."""
    cfg, results = run.cfg, {}
    unpaired = run.eval_spec.loss is not run.spec.loss  # an unpaired loss: scored on held-out pairs
    reference = run.state.get("reference", run.ref_params)
    loss_state = None if unpaired else loss_state
    spec, examples = run.batch_specs["eval"], run.prepared.eval
    if examples:
        plans = data.packer(spec, examples, seed=0, shuffle=False)
        collected = []
        while (plan := plans.next_micro()) is not None:
            host = batches.host_step(spec, [plan], examples, run.mesh, run.pad_id, run.side["eval"], micro_batches=1)
            placed = jax.tree.map(lambda a: a[0], batches.place(spec, host, run.mesh))
            metrics, loss_state = eval_step(trainable, run.frozen, reference, placed, loss_state)
            collected.append(metrics)
        summed = step_lib.combine_metrics(jax.tree.map(lambda *a: jnp.stack(a), *collected))
        skip = ("num_tokens", "num_completion_tokens", "num_groups") + (("loss",) if unpaired else ())
        for k, v in summed.items():
            if not k.startswith("length_bucket/") and k not in skip:
                results[f"eval/{k}"] = float(v)
        if "length_bucket/count" in summed:
            results |= metrics_lib.accuracy_by_length(
                np.asarray(summed["length_bucket/correct"]), np.asarray(summed["length_bucket/count"])
            )
    if cfg.eval.generate and run.answers:
        n = min(cfg.eval.num_generate, len(run.prepared.eval))
        prompts = [list(e.prompt) for e in run.prepared.eval[:n]]
        outs = generate(
            run.model_cfg,
            step_lib.policy_params(run.spec, trainable, run.frozen),
            prompts,
            max_new_tokens=cfg.eval.max_new_tokens,
            eos_id=run.tokenizer.eos_token_id,
        )
        texts = [run.tokenizer.decode(o).strip() for o in outs]
        results["eval/task_accuracy"] = float(np.mean([a == b for a, b in zip(texts, run.answers[:n], strict=True)]))
        results["eval/samples"] = texts[:4]
    return results


def compilations(*fns) -> int:
    """How many times these jitted functions compiled (one per distinct input shape)."""
    return sum(f._cache_size() for f in fns)


def train(cfg: Config, *, out: IO | None = None, stop_after: int | None = None) -> tuple[dict, list[dict]]:
    """Train as configured; returns the final state and the metric history (also in output.dir).
    `stop_after` stops (with a checkpoint) after that step, as a preemption would.

    The next steps' batches are built in the background (`pipeline`), and a step's metrics are read
    after the next step has been dispatched, so the device never waits for the host between steps."""
    out = out or sys.stdout  # looked up per call, so redirected stdout is honoured
    t = cfg.train
    run_dir = checkpoint.run_path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    optimizer = build.make_optimizer(cfg)
    run = setup(cfg, optimizer, out)
    spec = run.spec
    layout = (jax.tree.map(lambda a: a.sharding, run.state), NamedSharding(run.mesh, PartitionSpec()))
    train_step = step_lib.make_train_step(run.model_cfg, spec, optimizer, out_shardings=layout)
    eval_step = step_lib.make_eval_step(run.model_cfg, run.eval_spec)
    peak, peak_source = flops_lib.peak_flops(t.peak_tflops)
    geometry = run.batch_specs["train"].geometries["main"]

    ckpt = checkpoint.manager(run_dir / "checkpoints", keep=cfg.output.keep)
    restored = checkpoint.restore_latest(ckpt, run.state) if cfg.output.resume else None
    inputs = pipeline_lib.step_inputs(
        run.batch_specs["train"], run.prepared.train, run.mesh, pad_id=run.pad_id, seed=t.seed,
        mixture=batches.mixture(cfg, run.prepared), side=run.side["train"],
    )  # fmt: skip
    if restored is None:
        history: list[dict] = []
        before = evaluate(run, eval_step, run.state["trainable"], run.state["loss_state"])
        print(f"before training: {_fmt(before)}", file=out)
    else:
        run.state, meta = restored
        inputs.set_state(meta["iterator"])
        history, before = meta["history"], meta["before"]
        print(f"resumed from the checkpoint at step {len(history)} in {run_dir / 'checkpoints'}", file=out)
    writer = metrics_lib.MetricsWriter(
        run_dir, append=restored is not None, tensorboard=cfg.output.tensorboard, wandb=cfg.output.wandb,
        config=dataclasses.asdict(cfg), primary=jax.process_index() == 0,
    )  # fmt: skip
    if restored is None:
        writer.write(0, _eval_record(0, before))
    stop = _stop_on_signals()
    print(f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_source})", file=out)
    iterator_state = inputs.get_state()  # where the data stream stands after the last finished step
    source_of = run.prepared.source_of_train()
    progress = {"in_a_row": 0, "tokens": 0, "last": time.perf_counter(), "t0": time.perf_counter()}

    def finish(i: int, metrics, item: pipeline_lib.StepInput, stream_after: dict) -> None:
        """Read step i's metrics (the device has the next step queued by now), log them, check them."""
        nonlocal iterator_state
        m = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        step_time, progress["last"] = now - progress["last"], now
        tokens = sum(flops_lib.plan_counts(p.parts["main"])[0] for p in item.plans)
        progress["tokens"] += tokens
        step_flops = flops_lib.step_flops(
            run.model_cfg,
            item.plans,
            lora=spec.lora_scale is not None,
            reference_in_step=spec.reference_in_step,
            scores_prompts=spec.scores_prompts,
        )
        skipped_before = history[-1]["skipped"] if history else 0
        progress["in_a_row"] = progress["in_a_row"] + 1 if m["skipped"] > skipped_before else 0
        m |= {
            "step": i + 1,
            "step_time": step_time,
            "host_time": item.host_seconds,
            "padding_fraction": 1.0 - tokens / (len(item.plans) * geometry.tokens),  # of the micro-batches computed
            "tokens_per_s": progress["tokens"] / (now - progress["t0"]),
            "flops": step_flops,
            "mfu": step_flops / step_time / peak,
            "compilations": compilations(train_step),
        }
        if len(run.prepared.sources) > 1:  # a mixture: examples trained on from each source this step
            k = len(run.prepared.sources)
            drawn = np.bincount(source_of[[j for p in item.plans for j in p.examples]], minlength=k)
            m |= {f"examples/source_{s}": int(n) for s, n in enumerate(drawn)}
        history.append(m)
        iterator_state = stream_after
        writer.write(i + 1, m)
        if (i + 1) % cfg.output.log_every == 0 or i + 1 == t.steps:
            metrics_lib.progress(i + 1, t.steps, m, out)
        if progress["in_a_row"] >= t.max_skipped_in_a_row:
            inputs.close()
            writer.close()
            raise FloatingPointError(
                f"{progress['in_a_row']} steps in a row had a non-finite loss or gradient (step {i + 1}); "
                "lower train.learning_rate, check the data, or raise train.max_skipped_in_a_row"
            )

    def save(step: int) -> None:
        meta = {"iterator": iterator_state, "history": history, "before": before}
        checkpoint.save(ckpt, step, run.state, meta)

    pending = None  # (step index, its metrics on the device, its input, the stream's state after it)
    profile, tracing = t.profile_steps, False
    for i in range(len(history), t.steps):
        item = next(inputs)
        stream_after = inputs.get_state()
        if profile is not None and i + 1 == profile[0]:
            jax.profiler.start_trace(str(run_dir / "profile"))
            tracing = True
        with jax.profiler.StepTraceAnnotation("train_step", step_num=i + 1):
            run.state, metrics = train_step(run.state, run.frozen, run.ref_params, item.batch)
        interrupted = stop["signal"] is not None or i + 1 == stop_after
        if tracing and (i + 1 == profile[1] or interrupted):
            jax.block_until_ready(metrics)  # the traced steps' device work inside the trace
            jax.profiler.stop_trace()
            tracing = False
            print(f"profile of steps {profile[0]}-{i + 1} in {run_dir / 'profile'} (TensorBoard's Profile)", file=out)
        if pending is not None:
            finish(*pending)
        pending = (i, metrics, item, stream_after)
        every = cfg.output.checkpoint_every
        if (every and (i + 1) % every == 0) or interrupted or i + 1 == t.steps:
            finish(*pending)
            pending = None
            save(i + 1)
        if interrupted:
            inputs.close()
            ckpt.wait_until_finished()
            writer.close()
            print(f"stopped after step {i + 1} ({stop['signal'] or 'stop_after'}); checkpoint saved", file=out)
            return run.state, history
    inputs.close()
    ckpt.wait_until_finished()
    after = evaluate(run, eval_step, run.state["trainable"], run.state["loss_state"])
    writer.write(t.steps, _eval_record(t.steps, after))
    writer.close()
    summary = {
        "before": before,
        "after": after,
        "seconds": time.perf_counter() - start,
        "compilations": {"train_step": compilations(train_step), "eval_step": compilations(eval_step)},
        "geometry": dataclasses.asdict(geometry),
        "attention": spec.attention.impl,
        "data": {
            "train": len(run.prepared.train),
            "eval": len(run.prepared.eval),
            "report": run.prepared.report.summary(),
            "sources": [
                {
                    "name": s.name,
                    "weight": s.weight,
                    "train": s.train.stop - s.train.start,
                    "eval": s.eval.stop - s.eval.start,
                    "report": s.report.summary(),
                    "tokenised_cache": s.cache,
                    "examples_trained_on": sum(h.get(f"examples/source_{k}", 0) for h in history),
                }
                for k, s in enumerate(run.prepared.sources)
            ],
        },
        "command": shlex.join(["prefopt-jax", *sys.argv[1:]]) if Path(sys.argv[0]).name == "prefopt-jax" else None,
    }
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"after training:  {_fmt(after)}", file=out)
    print(
        f"done in {summary['seconds']:.0f} s ({summary['compilations']['train_step']} train-step and "
        f"{summary['compilations']['eval_step']} eval-step compilations); metrics in {run_dir / 'metrics.jsonl'}",
        file=out,
    )
    return run.state, history


def evaluate_checkpoint(cfg: Config, *, out: IO | None = None) -> dict:
    """`prefopt-jax eval`: held-out metrics of the newest checkpoint in output.dir (or of the starting
    model when there is none)."""
    out = out or sys.stdout
    run = setup(cfg, build.make_optimizer(cfg), out, splits=("eval",), optimizer_state=False)
    ckpt = checkpoint.manager(checkpoint.run_path(cfg.output.dir) / "checkpoints", keep=cfg.output.keep)
    restored = checkpoint.restore_latest(ckpt, run.state, skip=("opt_state",))
    where = "the starting model (no checkpoint)"
    if restored is not None:
        run.state, meta = restored
        where = f"the checkpoint at step {len(meta['history'])}"
    results = evaluate(
        run, step_lib.make_eval_step(run.model_cfg, run.eval_spec), run.state["trainable"], run.state["loss_state"]
    )
    print(f"{where}: {_fmt(results)}", file=out)
    return results


SHOWN = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/kl/per_token", "eval/task_accuracy")


def _fmt(results: dict) -> str:
    """The headline held-out figures (everything is in metrics.jsonl and summary.json)."""
    shown = [k for k in results if k in SHOWN or "by_length" in k] + (
        ["eval/samples"] if "eval/samples" in results else []
    )
    return ", ".join(
        f"{k.removeprefix('eval/')} {results[k]:.3f}"
        if isinstance(results[k], float)
        else f"{k.removeprefix('eval/')} {results[k]}"
        for k in shown
    )


def _eval_record(step: int, results: dict) -> dict:
    return {"step": step, **{k: v for k, v in results.items() if isinstance(v, float)}}


def export(
    cfg: Config,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    push_to_hub: str | None = None,
    adapters: bool = False,
    out: IO | None = None,
) -> Path:
    """`prefopt-jax export`: the newest checkpoint's policy (LoRA merged into the base) as a Hugging Face
    folder: safetensors shards of at most `max_shard_size` in `dtype` with their index, config.json,
    generation_config.json, the tokenizer and chat template, and a model card. Reads no data and builds
    no optimizer state; in a multi-host run every process takes part and process 0 writes (to a `gs://`
    destination through a local staging folder). `push_to_hub`
    uploads the folder to that hub repository (created if missing). `adapters`: a LoRA run's adapters
    alone, in PEFT's format over `model.source` (which must be a Hugging Face folder or hub id)."""
    out = out or sys.stdout
    dtypes = {"bfloat16": jnp.bfloat16, "float32": np.float32}
    if dtype not in dtypes:
        raise ConfigError(f"export dtype {dtype!r}: expected one of {list(dtypes)}")
    try:
        max_bytes = models.parse_size(max_shard_size)
    except ValueError as e:
        raise ConfigError(f"export --max-shard-size: {e}") from None
    if adapters and not cfg.train.lora_rank:
        raise ConfigError("export --adapters needs a LoRA run (train.lora_rank > 0); without it export the model")
    base = str(cfg.model.source)
    if adapters and (base in models.SHORT_NAMES or base.endswith(".gguf")):
        raise ConfigError(
            f"export --adapters: model.source={base} is a GGUF file, which transformers and PEFT cannot use as the "
            "base; export the merged model instead"
        )
    hub = hub_lib.preflight(push_to_hub) if push_to_hub else None  # offline or logged out: fail before any work
    run = setup(cfg, build.make_optimizer(cfg), out, splits=(), optimizer_state=False)
    run_dir = checkpoint.run_path(cfg.output.dir)
    mgr = checkpoint.manager(run_dir / "checkpoints", keep=cfg.output.keep)
    restored = checkpoint.restore_latest(mgr, run.state, skip=("opt_state",))
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'} to export")
    state, meta = restored
    trainable = state["trainable"]
    primary = jax.process_index() == 0
    destination = str(out_dir)
    remote = "://" in destination  # a bucket: written here first, then copied
    out_dir = Path(tempfile.mkdtemp(prefix="prefopt-export-")) if remote else Path(out_dir)
    if adapters:
        t = cfg.train
        if Path(base).expanduser().exists():
            base = str(Path(base).expanduser().resolve())
        models.peft.save_adapters(
            trainable, out_dir, rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout, base=base,
            dtype=dtypes[dtype], write=primary,
        )  # fmt: skip
        files = [out_dir / "adapter_model.safetensors"]
    else:
        params = (
            trainable
            if run.spec.lora_scale is None
            else lora_lib.merge_lora(run.frozen, trainable, run.spec.lora_scale)
        )
        files = models.save_hf_folder(
            run.model_cfg, params, out_dir, dtype=dtypes[dtype], max_shard_bytes=max_bytes, write=primary
        )
    if primary:
        run.tokenizer.save_pretrained(str(out_dir))
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
        how = (
            "full"
            if not cfg.train.lora_rank
            else f"LoRA r {cfg.train.lora_rank}, " + ("adapters only (PEFT)" if adapters else "merged")
        )
        card = model_card_lib.model_card(cfg, summary, meta["history"], dtype=dtype, lora=how, adapters=adapters)
        (out_dir / "README.md").write_text(card)
        if hub is not None:
            print(f"uploaded to {hub_lib.upload(hub, push_to_hub, out_dir)}", file=out)
        if remote:
            copy_folder(out_dir, destination)
            shutil.rmtree(out_dir)
        print(
            f"exported the policy at step {len(meta['history'])} to {destination} ({len(files)} shard(s), {dtype})",
            file=out,
        )
    return checkpoint.run_path(destination) if remote else out_dir


def copy_folder(local: Path, destination: str) -> None:
    """Every file of `local` into `destination` (a bucket URL), streamed in 64 MiB pieces."""
    target = checkpoint.run_path(destination)
    target.mkdir(parents=True, exist_ok=True)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            (target / f.relative_to(local)).parent.mkdir(parents=True, exist_ok=True)
            with f.open("rb") as src, (target / f.relative_to(local)).open("wb") as dst:
                shutil.copyfileobj(src, dst, 64 << 20)
