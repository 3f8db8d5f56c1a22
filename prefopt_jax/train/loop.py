"""The training loop: the one place that reads the config and wires model, data, step and logging."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefopt_jax import data, losses, models, sharding
from prefopt_jax.config import Config
from prefopt_jax.data.synthetic import comparison_pairs
from prefopt_jax.models.generate import greedy_generate
from prefopt_jax.train import checkpoint
from prefopt_jax.train import lora as lora_lib
from prefopt_jax.train import step as step_lib


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    t = cfg.train
    if t.schedule == "cosine":
        warmup = max(t.warmup_steps, 1)
        lr = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, warmup, max(t.steps, warmup + 1))
    elif t.schedule == "linear":
        warm = optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1))
        decay = optax.linear_schedule(t.learning_rate, 0.0, max(t.steps - t.warmup_steps, 1))
        lr = optax.join_schedules([warm, decay], [t.warmup_steps])
    else:
        lr = optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1))
    return optax.chain(optax.clip_by_global_norm(t.max_grad_norm), optax.adamw(lr, weight_decay=t.weight_decay))


def _load_data(cfg: Config, tokenizer) -> tuple[data.Prepared, list[str] | None]:
    d = cfg.data
    if d.source == "builtin:compare":
        train_rows, eval_rows = comparison_pairs(d.num_train, d.num_eval, seed=cfg.train.seed)
        kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length)
        train = data.prepare(train_rows, tokenizer, **kw)
        held = data.prepare(eval_rows, tokenizer, **kw)
        return data.Prepared(train.train, held.train, train.report), [r["answer"] for r in eval_rows]
    prepared = data.prepare(
        d.source,
        tokenizer,
        format=d.format,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        on_error=d.on_error,
        eval_fraction=d.eval_fraction,
        seed=cfg.train.seed,
    )
    return prepared, None


def _device_batch(collated: list[dict], pad_id: int, mesh: Mesh) -> dict:
    """Micro-batches (collator outputs) brought to one shape, stacked on a leading axis, and placed with
    their rows split over the mesh's data and fsdp axes."""
    row_axes = ("data", "fsdp")
    n_rows = mesh.shape["data"] * mesh.shape["fsdp"]
    parts: list[dict] = [{"weight": c["weight"]} for c in collated]
    keys = {"main": "batch"} | ({"response_only": "response_only"} if "response_only" in collated[0] else {})
    for key, source in keys.items():
        shaped = data.common_shape([c[source] for c in collated], pad_id, row_multiple=n_rows)
        for part, b in zip(parts, shaped, strict=True):
            part[key] = step_lib.batch_arrays(b)
    for key in keys:  # micro-batches score different numbers of positions per row: pad to the widest
        width = max(p[key]["scored"].shape[1] for p in parts)
        for p in parts:
            p[key]["scored"] = np.pad(
                p[key]["scored"], ((0, 0), (0, width - p[key]["scored"].shape[1])), constant_values=-1
            )
    stacked = jax.tree.map(lambda *a: np.stack(a), *parts)
    rows = NamedSharding(mesh, PartitionSpec(None, row_axes))
    whole = NamedSharding(mesh, PartitionSpec())
    per_row = ("input_ids", "positions", "segment_ids", "pred_index", "scored", "mask")
    return {
        key: {k: jax.device_put(v, rows if k in per_row else whole) for k, v in value.items()}
        if isinstance(value, dict)
        else jax.device_put(value, whole)
        for key, value in stacked.items()
    }


def _stop_on_signals() -> dict:
    """SIGTERM/SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and stop at the next step boundary."""
    flag: dict = {"signal": None}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda num, frame: flag.update(signal=signal.Signals(num).name))
    return flag


def train(cfg: Config, *, out=None, stop_after: int | None = None) -> tuple[dict, list[dict]]:
    """Train as configured; returns the final state and the metric history (also in output.dir).
    `stop_after` stops (with a checkpoint) after that step, as a preemption would."""
    out = out or sys.stdout  # looked up per call, so redirected stdout is honoured
    t = cfg.train
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    start = time.perf_counter()
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    model = models.load_pretrained(cfg.model.source, dtype=dtype, mesh=mesh, rules=cfg.mesh.rules)
    tokenizer = models.load_tokenizer(cfg.model.source)
    mcfg, base = model.config, model.params()
    prepared, answers = _load_data(cfg, tokenizer)
    print(
        f"model {cfg.model.source} ({mcfg.num_params() / 1e6:.0f}M params) loaded; data: {prepared.report.summary()}",
        file=out,
    )

    loss = losses.get(cfg.loss.name)
    spec = step_lib.StepSpec(
        loss,
        dict(cfg.loss.hparams),
        reference=t.reference,
        lora_scale=(t.lora_alpha / t.lora_rank) if t.lora_rank else None,
        remat=cfg.model.remat,
    )
    needs_alone = bool(loss.required_extras(**spec.hp))
    pad_id = tokenizer.pad_token_id or 0
    collate = data.PairCollator(cfg.data.layout, cfg.data.max_length, pad_id=pad_id, response_only=needs_alone)
    micro = t.batch_size // t.micro_batches
    batches = data.BatchIterator(prepared.train, list, global_batch=t.batch_size, seed=t.seed)

    if t.lora_rank:
        adapters = lora_lib.init_lora(mcfg, rank=t.lora_rank, targets=t.lora_targets, seed=t.seed)
        trainable = jax.device_put(adapters, NamedSharding(mesh, PartitionSpec()))  # small: replicated
        frozen, ref_params = base, None
    else:
        trainable, frozen, ref_params = jax.tree.map(jnp.copy, base), None, base
    optimizer = make_optimizer(cfg)
    # every leaf on the mesh (the optimizer's scalars replicated), so restored checkpoints land the same way
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(
        lambda a: a if isinstance(a.sharding, NamedSharding) else jax.device_put(a, replicated),
        step_lib.init_state(trainable, optimizer, loss),
    )
    train_step = step_lib.make_train_step(mcfg, spec, optimizer)
    eval_step = step_lib.make_eval_step(mcfg, spec)

    def evaluate(trainable) -> dict:
        results = {}
        if prepared.eval:
            accs, margins = [], []
            for i in range(0, len(prepared.eval) - micro + 1, micro):
                b = jax.tree.map(lambda a: a[0], _device_batch([collate(prepared.eval[i : i + micro])], pad_id, mesh))
                m = eval_step(trainable, frozen, ref_params, b, state["loss_state"])
                accs.append(float(m["rewards/accuracies"]))
                margins.append(float(m["rewards/margins"]))
            results = {"eval/rewards/accuracies": float(np.mean(accs)), "eval/rewards/margins": float(np.mean(margins))}
        if cfg.eval.generate and answers:
            n = min(cfg.eval.num_generate, len(prepared.eval))
            prompts = [list(e.prompt) for e in prepared.eval[:n]]
            outs = greedy_generate(
                mcfg,
                step_lib.policy_params(spec, trainable, frozen),
                prompts,
                max_new_tokens=cfg.eval.max_new_tokens,
                eos_id=tokenizer.eos_token_id,
            )
            texts = [tokenizer.decode(o).strip() for o in outs]
            results["eval/task_accuracy"] = float(np.mean([a == b for a, b in zip(texts, answers[:n], strict=True)]))
            results["eval/samples"] = texts[:4]
        return results

    ckpt = checkpoint.manager(run_dir / "checkpoints", keep=cfg.output.keep)
    restored = checkpoint.restore_latest(ckpt, state) if cfg.output.resume else None
    if restored is None:
        history: list[dict] = []
        before = evaluate(state["trainable"])
        print(f"before training: {_fmt(before)}", file=out)
    else:
        state, meta = restored
        batches.restore(meta["iterator"])
        history, before = meta["history"], meta["before"]
        print(f"resumed from the checkpoint at step {len(history)} in {run_dir / 'checkpoints'}", file=out)
    log = (run_dir / "metrics.jsonl").open("a" if restored else "w")
    stop = _stop_on_signals()

    def save(step: int) -> None:
        checkpoint.save(ckpt, step, state, {"iterator": batches.state(), "history": history, "before": before})

    in_a_row, tokens, t0 = 0, 0, time.perf_counter()
    for i in range(len(history), t.steps):
        examples = next(batches)
        parts = [collate(examples[j * micro : (j + 1) * micro]) for j in range(t.micro_batches)]
        state, metrics = train_step(state, frozen, ref_params, _device_batch(parts, pad_id, mesh))
        m = {k: float(v) for k, v in metrics.items()}
        tokens += int(m["num_tokens"]) * t.micro_batches
        in_a_row = in_a_row + 1 if m["skipped"] > (history[-1]["skipped"] if history else 0) else 0
        m |= {"step": i + 1, "tokens_per_s": tokens / (time.perf_counter() - t0)}
        history.append(m)
        log.write(json.dumps(m) + "\n")
        log.flush()
        if (i + 1) % cfg.output.log_every == 0 or i + 1 == t.steps:
            print(
                f"step {i + 1:4d}/{t.steps}  loss {m['loss']:.4f}  "
                f"reward acc {m.get('rewards/accuracies', float('nan')):.3f}  "
                f"margin {m.get('rewards/margins', float('nan')):+.3f}  {m['tokens_per_s']:.0f} tok/s",
                file=out,
            )
        if in_a_row >= t.max_skipped_in_a_row:
            raise FloatingPointError(f"{in_a_row} steps in a row had a non-finite loss or gradient (step {i + 1})")
        every = cfg.output.checkpoint_every
        interrupted = stop["signal"] is not None or i + 1 == stop_after
        if (every and (i + 1) % every == 0) or interrupted or i + 1 == t.steps:
            save(i + 1)
        if interrupted:
            ckpt.wait_until_finished()
            log.close()
            print(f"stopped after step {i + 1} ({stop['signal'] or 'stop_after'}); checkpoint saved", file=out)
            return state, history
    ckpt.wait_until_finished()
    log.close()
    after = evaluate(state["trainable"])
    summary = {"before": before, "after": after, "seconds": time.perf_counter() - start}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"after training:  {_fmt(after)}", file=out)
    print(f"done in {summary['seconds']:.0f} s; metrics in {run_dir / 'metrics.jsonl'}", file=out)
    return state, history


def _fmt(results: dict) -> str:
    return ", ".join(
        f"{k.removeprefix('eval/')} {v:.3f}" if isinstance(v, float) else f"{k.removeprefix('eval/')} {v}"
        for k, v in results.items()
    )
