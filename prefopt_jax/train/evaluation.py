"""Held-out evaluation: the loss's metrics over every held-out example, reward accuracy by length, the
built-in task's exact answers, and `prefopt-jax eval` of a checkpoint."""

from __future__ import annotations

import sys
from typing import IO

import jax
import jax.numpy as jnp
import numpy as np

from prefopt_jax import data
from prefopt_jax.config import Config
from prefopt_jax.models.generate import generate
from prefopt_jax.train import batches, checkpoint
from prefopt_jax.train import metrics as metrics_lib
from prefopt_jax.train import step as step_lib
from prefopt_jax.train.run import Run, setup


def evaluate(run: Run, eval_step, trainable: dict, loss_state, out: IO | None = None) -> dict:
    """Held-out metrics over every held-out example (every scalar the loss reports, averaged over them;
    reward accuracy by pair length) and, for the built-in task, the exact-answer accuracy of greedy
    generations. A stateful loss runs in its evaluation mode from the training state, which held-out
    batches never change (with AlphaDPO's `update_in_eval` they move a copy, batch after batch). A progress
    bar goes to `out` when it is a terminal."""
    cfg, results = run.cfg, {}
    unpaired = run.eval_spec.loss is not run.spec.loss  # an unpaired loss: scored on held-out pairs
    reference = run.state.get("reference", run.ref_params)
    loss_state = None if unpaired else loss_state
    spec, examples = run.batch_specs["eval"], run.prepared.eval
    if examples:
        plans = data.packer(spec, examples, seed=0, shuffle=False)
        collected, bar = [], metrics_lib.progress_bar(len(examples), "held-out evaluation", out)
        while (plan := plans.next_micro()) is not None:
            bar.update(len(plan.examples))
            host = batches.host_step(spec, [plan], examples, run.mesh, run.pad_id, run.side["eval"], micro_batches=1)
            placed = jax.tree.map(lambda a: a[0], batches.place(spec, host, run.mesh))
            metrics, loss_state = eval_step(trainable, run.frozen, reference, placed, loss_state)
            collected.append(metrics)
        bar.close()
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


def evaluate_checkpoint(cfg: Config, *, out: IO | None = None) -> dict:
    """`prefopt-jax eval`: held-out metrics of the newest checkpoint in output.dir (or of the starting
    model when there is none)."""
    out = out or sys.stdout
    run = setup(cfg, out, splits=("eval",), optimizer_state=False)
    ckpt = checkpoint.manager(checkpoint.run_path(cfg.output.dir) / "checkpoints", keep=cfg.output.keep)
    restored = checkpoint.restore_latest(ckpt, run.state, skip=("opt_state",))
    where = "the starting model (no checkpoint)"
    if restored is not None:
        run.state, meta = restored
        where = f"the checkpoint at step {len(meta['history'])}"
    eval_step = step_lib.make_eval_step(run.model_cfg, run.eval_spec)
    results = evaluate(run, eval_step, run.state["trainable"], run.state["loss_state"], out)
    print(f"{where}: {headline(results)}", file=out)
    return results


SHOWN = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/kl/per_token", "eval/task_accuracy")


def headline(results: dict) -> str:
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


def eval_record(step: int, results: dict) -> dict:
    return {"step": step, **{k: v for k, v in results.items() if isinstance(v, float)}}


def held_out(run: Run, eval_step, step: int, writer, out: IO) -> dict:
    """The held-out evaluation of the current policy, written to the metrics at `step`."""
    results = evaluate(run, eval_step, run.state["trainable"], run.state["loss_state"], out)
    writer.write(step, eval_record(step, results))
    return results
