"""The training loop: steps, checkpoint and metrics cadence, resume and shutdown. A run's parts are built in
`run`, its steps metered in `meter`, evaluated in `evaluation`; export is `export`."""

from __future__ import annotations

import dataclasses
import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO

import jax
from jax.sharding import NamedSharding, PartitionSpec

from prefopt_jax.config import Config, TrainSection, steps_per_epoch
from prefopt_jax.train import batches, checkpoint
from prefopt_jax.train import flops as flops_lib
from prefopt_jax.train import metrics as metrics_lib
from prefopt_jax.train import pipeline as pipeline_lib
from prefopt_jax.train import step as step_lib
from prefopt_jax.train.evaluation import eval_record, evaluate, headline, held_out
from prefopt_jax.train.meter import Meter, compilations
from prefopt_jax.train.run import Run, setup


def _stop_on_signals() -> dict:
    """SIGTERM/SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and stop at the next step boundary."""
    flag: dict = {"signal": None}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda num, frame: flag.update(signal=signal.Signals(num).name))
    return flag


class Profile:
    """`train.profile_steps=[a, b]`: a `jax.profiler` trace of steps a..b under `output.dir/profile`."""

    def __init__(self, steps: list | None, folder: Path, out: IO) -> None:
        self.steps, self.folder, self.out, self.tracing = steps, folder, out, False

    def before(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            jax.profiler.start_trace(str(self.folder))
            self.tracing = True

    def after(self, step: int, metrics, last: bool) -> None:
        if self.tracing and (step == self.steps[1] or last):
            jax.block_until_ready(metrics)  # the traced steps' device work inside the trace
            jax.profiler.stop_trace()
            self.tracing = False
            print(f"profile of steps {self.steps[0]}-{step} in {self.folder} (TensorBoard's Profile)", file=self.out)


def train(cfg: Config, *, out: IO | None = None, stop_after: int | None = None) -> tuple[dict, list[dict]]:
    """Train as configured; returns the final state and the metric history (also in output.dir).
    `stop_after` stops (with a checkpoint) after that step, as a preemption would.

    The next steps' batches are built in the background (`pipeline`), and a step's metrics are read
    after the next step has been dispatched, so the device never waits for the host between steps."""
    # over 60 lines, and reads better whole: the run from its parts to its summary, the step loop in one screen
    out = out or sys.stdout  # looked up per call, so redirected stdout is honoured
    t, start = cfg.train, time.perf_counter()
    run_dir = checkpoint.run_path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = setup(cfg, out)
    cfg, t = run.cfg, run.cfg.train  # train.epochs / train.warmup_ratio: steps and warmup known from the data
    layout = (jax.tree.map(lambda a: a.sharding, run.state), NamedSharding(run.mesh, PartitionSpec()))
    train_step = step_lib.make_train_step(run.model_cfg, run.spec, run.optimizer, out_shardings=layout)
    eval_step = step_lib.make_eval_step(run.model_cfg, run.eval_spec)
    ckpt = checkpoint.manager(run_dir / "checkpoints", keep=cfg.output.keep)
    inputs = pipeline_lib.step_inputs(
        run.batch_specs["train"], run.prepared.train, run.mesh, pad_id=run.pad_id, seed=t.seed,
        mixture=batches.mixture(cfg.data, run.prepared), side=run.side["train"],
    )  # fmt: skip
    history, before, resumed = resume_or_evaluate(run, ckpt, run_dir / "checkpoints", inputs, eval_step, out)
    writer = metrics_lib.MetricsWriter(
        run_dir, append=resumed, tensorboard=cfg.output.tensorboard, wandb=cfg.output.wandb,
        config=dataclasses.asdict(cfg), primary=jax.process_index() == 0,
    )  # fmt: skip
    peak, peak_source = flops_lib.peak_flops(t.peak_tflops)
    print(f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_source})", file=out)
    epoch_steps = steps_per_epoch(cfg, len(run.prepared.train)) if t.epochs is not None else 0
    finish = StepLog(t, cfg.output.log_every, Meter(run, train_step, peak), writer, history, out, epoch_steps)
    stop, profile = _stop_on_signals(), Profile(t.profile_steps, run_dir / "profile", out)
    pending = None  # the last step dispatched whose metrics are not read yet: (step, metrics, input)
    stopped = None  # a signal's name, or "stop_after"
    try:
        if not resumed:
            writer.write(0, eval_record(0, before))
        for step in range(len(history) + 1, t.steps + 1):
            item = next(inputs)
            stream_after = inputs.get_state()  # where the data stream stands once this step is done
            profile.before(step)
            with jax.profiler.StepTraceAnnotation("train_step", step_num=step):
                run.state, metrics = train_step(run.state, run.frozen, run.ref_params, item.batch)
            stopped = stop["signal"] or ("stop_after" if step == stop_after else None)
            profile.after(step, metrics, last=stopped is not None)
            if pending is not None:
                finish(*pending)
            pending = (step, metrics, item)
            every = cfg.output.checkpoint_every
            if (every and step % every == 0) or stopped or step == t.steps:
                finish(*pending)
                pending = None
                checkpoint.save(ckpt, step, run.state, {"iterator": stream_after, "history": history, "before": before})
            if stopped:
                break
            if cfg.eval.every and step % cfg.eval.every == 0 and step < t.steps:  # TRL's eval_steps
                if pending is not None:
                    finish(*pending)
                    pending = None
                print(f"held-out at step {step}: {headline(held_out(run, eval_step, step, writer, out))}", file=out)
        else:  # every step done: the held-out evaluation after training (the input pipeline stopped first)
            inputs.close()
            ckpt.wait_until_finished()
            after = held_out(run, eval_step, t.steps, writer, out)
    finally:  # whatever ends the loop: the pipeline's threads stopped, the last checkpoint written, logs closed
        inputs.close()
        ckpt.wait_until_finished()
        writer.close()
    if stopped:
        print(f"stopped after step {step} ({stopped}); checkpoint saved", file=out)
        return run.state, history
    summary = run_summary(run, history, before, after, time.perf_counter() - start, train_step, eval_step)
    write_summary(summary, run_dir, out)
    return run.state, history


def write_summary(summary: dict, run_dir: Path, out: IO) -> None:
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    compiled = summary["compilations"]
    print(f"after training:  {headline(summary['after'])}", file=out)
    print(
        f"done in {summary['seconds']:.0f} s ({compiled['train_step']} train-step and {compiled['eval_step']} "
        f"eval-step compilations); metrics in {run_dir / 'metrics.jsonl'}",
        file=out,
    )


@dataclasses.dataclass
class StepLog:
    """Reads a step's metrics (the device has the next step queued by then), meters them, writes and prints
    them, and stops the run after `train.max_skipped_in_a_row` non-finite steps in a row."""

    train: TrainSection
    log_every: int  # output.log_every
    meter: Meter
    writer: metrics_lib.MetricsWriter
    history: list[dict]
    out: IO
    epoch_steps: int = 0  # with train.epochs: steps per epoch, so the progress line shows the epoch
    first_done: float = 0.0  # when this process's first step (the compiling one) was read: the ETA counts from it
    seen: int = 0  # steps read by this process

    def __call__(self, step: int, metrics: dict, item: pipeline_lib.StepInput) -> None:
        t, history = self.train, self.history
        m = self.meter(step, metrics, item, skipped_before=history[-1]["skipped"] if history else 0)
        history.append(m)
        self.seen += 1
        if self.seen == 1:
            self.first_done = time.perf_counter()
        self.writer.write(step, m)
        if step % self.log_every == 0 or step == t.steps:
            if self.epoch_steps:  # train.epochs: the epoch this step ends in, as TRL's logs show it
                m = m | {"epoch": step / self.epoch_steps}
            if self.seen >= 2:  # the run's ETA from this process's steps since its first (which compiles)
                per_step = (time.perf_counter() - self.first_done) / (self.seen - 1)
                m = m | {"eta_s": per_step * (t.steps - step)}
            metrics_lib.progress(step, t.steps, m, self.out)
        if self.meter.skipped_in_a_row >= t.max_skipped_in_a_row:
            raise FloatingPointError(
                f"{self.meter.skipped_in_a_row} steps in a row had a non-finite loss or gradient (step {step}); "
                "lower train.learning_rate, check the data, or raise train.max_skipped_in_a_row"
            )


def resume_or_evaluate(run: Run, ckpt, folder: Path, inputs, eval_step, out: IO) -> tuple[list[dict], dict, bool]:
    """(metric history, held-out figures before training, resumed): from the newest checkpoint when there is
    one (`output.resume`; the data stream put back where it stood), else an empty history and the held-out
    evaluation of the starting model."""
    restored = checkpoint.restore_latest(ckpt, run.state) if run.cfg.output.resume else None
    if restored is None:
        before = evaluate(run, eval_step, run.state["trainable"], run.state["loss_state"], out)
        print(f"before training: {headline(before)}", file=out)
        return [], before, False
    run.state, meta = restored
    inputs.set_state(meta["iterator"])
    print(f"resumed from the checkpoint at step {len(meta['history'])} in {folder}", file=out)
    return meta["history"], meta["before"], True


def run_summary(run: Run, history: list, before: dict, after: dict, seconds: float, train_step, eval_step) -> dict:
    """What `summary.json` holds: held-out figures before and after, time, compilations, the geometry and
    attention used, and the data's accounting per source (with the examples trained on from each)."""
    sources = [
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
    ]
    prepared = run.prepared
    return {
        "before": before,
        "after": after,
        "seconds": seconds,
        "compilations": {"train_step": compilations(train_step), "eval_step": compilations(eval_step)},
        "geometry": dataclasses.asdict(run.batch_specs["train"].geometries["main"]),
        "attention": run.spec.attention.impl,
        "data": {
            "train": len(prepared.train),
            "eval": len(prepared.eval),
            "report": prepared.report.summary(),
            "sources": sources,
        },
        "command": shlex.join(["prefopt-jax", *sys.argv[1:]]) if Path(sys.argv[0]).name == "prefopt-jax" else None,
    }
