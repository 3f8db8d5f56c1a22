"""A run's parts, built from its config once per entry point (`train`, `eval`, `export`): the mesh, the
model, the data, the step specs, the initial state and the side inputs computed before training."""

from __future__ import annotations

import dataclasses
from typing import IO, Any

import optax
from jax.sharding import Mesh

from prefopt_jax import data, models
from prefopt_jax.config import Config, ConfigError, ModelSection, steps_per_epoch, with_schedule
from prefopt_jax.train import batches, build, reference_cache, runtime, udm
from prefopt_jax.train import lora as lora_lib
from prefopt_jax.train import step as step_lib


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
    optimizer: optax.GradientTransformation  # over the run's steps (known once the data is read, with train.epochs)


def side_inputs(
    parts: build.Parts, model: ModelSection, cache: str, prepared: data.Prepared, mcfg, base, mesh: Mesh, out: IO
) -> dict:
    """Per split, the per-example inputs computed before training (`parts.side_inputs`): the precomputed
    reference log-probs, read from their cache, and BCO-UDM's p(desirable | prompt), from a classifier of the
    base model's prompt embeddings. `cache`: where the precomputed log-probs are (train.reference_cache)."""
    side: dict[str, dict] = {"train": {}, "eval": {}}
    by_split = {"train": prepared.train, "eval": prepared.eval}
    if parts.precomputed:
        key = reference_cache.key_for(model, prepared)
        for split, values in reference_cache.read(cache, key, by_split).items():
            side[split]["ref_logps"] = values
        print(f"reference log-probs from {cache.rstrip('/')}/{key}", file=out)
    if parts.udm:
        for split, values in udm.desirable_probabilities(mcfg, base, by_split, mesh).items():
            side[split]["udm_prob"] = values
        p = side["train"]["udm_prob"]
        print(f"udm: prompt classifier p(desirable) {p.min():.2f}..{p.max():.2f} on the training prompts", file=out)
    return side


def setup(cfg: Config, out: IO, *, splits=("train", "eval"), optimizer_state=True) -> Run:
    """Load the model, the data (the `splits` asked for; and the precomputed reference, if asked) and build
    the optimizer (its schedule over the run's steps) and the initial state. Without `optimizer_state` the
    optimizer's part of the state is shapes only (evaluation and export read a checkpoint's policy and
    allocate no Adam moments)."""
    t, parts = cfg.train, build.resolve(cfg)
    mesh, tokenizer = runtime.start(cfg.model, cfg.mesh, cfg.output.compilation_cache)
    if (parts.precomputed or parts.udm) and splits:  # the cache key covers both; the classifier fits on train
        splits = ("train", "eval")
    prepared, answers = batches.load_data(cfg.data, t.seed, tokenizer, parts.loss, splits)  # bad data: before the model
    print(f"data: {batches.describe(prepared)}", file=out)
    if splits and "train" in splits and (t.epochs is not None or t.warmup_ratio is not None):
        cfg = with_schedule(cfg, len(prepared.train))  # the run's steps and warmup, from the data (TRL's way)
        t = cfg.train
        per = steps_per_epoch(cfg, len(prepared.train))
        print(f"schedule: {t.steps} steps ({per} per epoch of {len(prepared.train)} examples), warmup {t.warmup_steps}",
              file=out)  # fmt: skip
    if parts.udm and splits and len({e.label for e in prepared.train}) < 2:
        raise ConfigError("loss.udm=true fits a classifier of desirable vs undesirable training prompts: it needs both")
    model = runtime.load_model(cfg.model, parts.rules, mesh)
    mcfg, base = model.config, model.params()
    print(f"model {cfg.model.source} ({mcfg.num_params() / 1e6:.0f}M params) loaded", file=out)
    attention = build.attention(cfg.model, mcfg, mesh.devices.flat[0].platform)
    specs = build.batch_specs(parts, cfg.data, t, prepared, mesh, attention)
    spec = build.step_spec(parts, cfg.model, t, specs["train"].geometries if specs else {}, attention, mesh)
    side = side_inputs(parts, cfg.model, t.reference_cache, prepared, mcfg, base, mesh, out)
    adapters = None
    if t.lora_rank:
        adapters = lora_lib.init_lora(mcfg, rank=t.lora_rank, targets=t.lora_targets, seed=t.seed)
    trainable, frozen, ref_params, synced = build.parameter_trees(parts, t, spec, base, adapters, mesh)
    optimizer, state = build.initial_state(parts, t, trainable, synced, mesh, optimizer_state=optimizer_state)
    eval_spec = build.eval_spec(parts, spec, specs, prepared)
    if specs:
        g, room = specs["train"].geometries["main"], specs["train"].micro_batches
        print(
            f"micro-batches: {g.rows} rows x {g.length} tokens, up to {g.groups} groups, {g.scored} scored tokens "
            f"per row; {t.batch_size} per step in at most {room} of them (as the plan needs); attention: {attention}",
            file=out,
        )
    pad_id = tokenizer.pad_token_id or 0
    return Run(cfg, mesh, mcfg, tokenizer, prepared, answers, specs, spec, eval_spec, pad_id, state, frozen,
               ref_params, side, optimizer)  # fmt: skip
