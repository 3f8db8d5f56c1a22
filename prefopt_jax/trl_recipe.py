"""TRL / alignment-handbook recipes: a `DPOConfig`-style YAML (DPO, KTO, CPO, ORPO or princeton-nlp SimPO)
converted to this project's native config, key by key (no jax imported).

Every key is mapped, ignored with the reason (it has no effect here, or a native equivalent that is already the
behaviour), or refused with the reason (it would change the objective, the data, the schedule or the optimizer
and there is no native way to do the same). Where the recipe is silent TRL's defaults apply (read from TRL's
`trl/trainer/dpo_config.py`, `kto_config.py`, `experimental/cpo|orpo/*_config.py` and transformers'
`TrainingArguments`), not this project's.

>>> native, notes = convert({"model_name_or_path": "m", "dataset_name": "p.jsonl", "beta": 0.05, "num_train_epochs": 1})
>>> native["loss"], native["train"]["epochs"], native["train"]["learning_rate"], native["data"]["max_length"]
({'name': 'dpo', 'hparams': {'beta': 0.05}}, 1.0, 1e-06, 1024)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefopt_jax.config import ConfigError

SECTIONS = ("model", "mesh", "data", "loss", "train", "eval", "output")

# keys only TRL / handbook recipes have: one of them at the top level makes a file a recipe
MARKERS = {
    "model_name_or_path", "beta", "loss_type", "learning_rate", "num_train_epochs", "per_device_train_batch_size",
    "gradient_accumulation_steps", "output_dir", "dataset_name", "dataset_mixture", "dataset_mixer", "max_length",
    "use_peft", "lr_scheduler_type", "warmup_ratio", "bf16", "max_steps",
}  # fmt: skip

# TRL's defaults per trainer where a recipe is silent (TRL's configs; transformers' TrainingArguments)
TRAINING_ARGUMENTS = {
    "num_train_epochs": 3.0, "max_steps": -1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "warmup_steps": 0, "weight_decay": 0.0,
    "max_grad_norm": 1.0, "seed": 42, "logging_steps": 10, "save_total_limit": None,
}  # fmt: skip
DEFAULTS = {
    "dpo": {"learning_rate": 1e-6, "max_length": 1024, "beta": 0.1, "loss_type": ["sigmoid"]},
    "kto": {"learning_rate": 1e-6, "max_length": 1024, "beta": 0.1, "loss_type": "kto"},
    "cpo": {"learning_rate": 1e-6, "max_length": 1024, "beta": 0.1, "loss_type": "sigmoid", "cpo_alpha": 1.0},
    "orpo": {"learning_rate": 1e-6, "max_length": 1024, "beta": 0.1},
    # princeton-nlp SimPOConfig: beta 2.0, gamma_beta_ratio 0.25, sft_weight 0, sigmoid; TrainingArguments' lr
    "simpo": {"learning_rate": 5e-5, "max_length": 1024, "beta": 2.0, "loss_type": "sigmoid"},
}

# TRL's DPO loss_type -> the registered loss here (same maths; see docs/losses.md)
DPO_LOSSES = {
    "sigmoid": "dpo", "hinge": "hinge", "ipo": "ipo", "exo_pair": "exo_pair", "nca_pair": "nca_pair",
    "robust": "robust", "bco_pair": "bco_pair", "sppo_hard": "sppo_hard", "aot": "aot", "aot_pair": "aot",
    "aot_unpaired": "aot_unpaired", "apo_zero": "apo_zero", "apo_down": "apo_down", "discopop": "discopop",
    "sft": "sft",
}  # fmt: skip
# DPO-family hyperparameters TRL names the same way, passed to each member that takes them
FAMILY_HPARAMS = ("ld_alpha", "f_divergence_type", "f_alpha_divergence_coef", "use_weighting", "discopop_tau")
DTYPES = {"bfloat16": "bfloat16", "float32": "float32"}
LORA_TARGETS = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
    "down_proj": "down",
}  # fmt: skip
SCHEDULES = {
    "linear": "linear", "cosine": "cosine", "cosine_with_min_lr": "cosine", "constant": "constant",
    "constant_with_warmup": "constant",
}  # fmt: skip
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf")

# keys with no effect on what is trained here, and why
IGNORED = {
    "attn_implementation": "model.attention picks the attention kernel for the device",
    "use_liger_kernel": "a PyTorch kernel library; the native step is compiled by XLA",
    "gradient_checkpointing_kwargs": "PyTorch checkpointing options; model.remat is the native equivalent",
    "trust_remote_code": "models are implemented natively; no remote code runs",
    "disable_dropout": "the native models have no dropout (TRL's default, true, is the behaviour)",
    "padding_free": "examples are always packed without padding (data.layout: packed)",
    "per_device_eval_batch_size": "evaluation micro-batches are planned from memory",
    "dataset_num_proc": "only speed; data.workers is the native knob",
    "preprocessing_num_workers": "only speed; data.workers is the native knob",
    "log_level": "logging verbosity only",
    "logging_strategy": "metrics are logged every output.log_every steps",
    "logging_first_step": "the first step is always logged",
    "push_to_hub": "use `prefopt-jax export OUT --push-to-hub REPO` after training",
    "hub_model_id": "use `prefopt-jax export OUT --push-to-hub REPO` after training",
    "hub_strategy": "use `prefopt-jax export OUT --push-to-hub REPO` after training",
    "hub_private_repo": "use `prefopt-jax export OUT --push-to-hub REPO` after training",
    "run_name": "the run is named by output.dir",
    "overwrite_output_dir": "a run resumes from or writes into output.dir",
    "bf16_full_eval": "evaluation uses model.compute_dtype",
    "tf32": "a CUDA matmul mode; XLA chooses matmul precision",
    "ddp_timeout": "no torch.distributed here (multi-host: see launch/)",
    "deepspeed": "no native equivalent is needed: sharding is mesh.* (FSDP by default)",
    "fsdp": "sharding is mesh.* (FSDP by default)",
    "fsdp_config": "sharding is mesh.* (FSDP by default)",
    "dataloader_num_workers": "only speed; data.workers is the native knob",
    "remove_unused_columns": "the data reader takes the fields it needs",
    "generate_during_eval": "eval.generate is native (greedy answers on held-out prompts)",
    "torch_compile": "the step is always compiled by XLA",
    "dataset_text_field": "preference data is read by its fields (prompt/chosen/rejected ...)",
}


class _Plan:
    """The native config being built and the printout's lines."""

    def __init__(self) -> None:
        self.native: dict[str, dict] = {s: {} for s in SECTIONS}
        self.lines: list[str] = []
        self.refused: list[str] = []

    def set(self, trl_key: str, native_key: str, value: Any, why: str = "") -> None:
        section, name = native_key.split(".", 1)
        self.native[section][name] = value
        self.lines.append(f"  {trl_key} -> {native_key}={value!r}" + (f"  ({why})" if why else ""))

    def ignore(self, key: str, why: str) -> None:
        self.lines.append(f"  {key}: ignored, {why}")

    def refuse(self, key: str, why: str) -> None:
        self.refused.append(f"{key}: {why}")


def looks_like_recipe(raw: Any) -> bool:
    """A TRL / handbook recipe: a mapping with a TRL key and no native section at the top level."""
    return isinstance(raw, Mapping) and bool(set(raw) & MARKERS) and not set(raw) & set(SECTIONS)


def trainer_of(raw: Mapping, path: str | Path | None = None) -> str:
    """Which TRL trainer a recipe is for: from its keys (KTO's weights, CPO's alpha, SimPO's gamma ratio), else
    from a folder or file name on its path (the handbook keeps recipes in .../dpo/, .../orpo/), else DPO."""
    lt = raw.get("loss_type")
    if "gamma_beta_ratio" in raw or "sft_weight" in raw:
        return "simpo"
    if "cpo_alpha" in raw or "simpo_gamma" in raw:
        return "cpo"
    if "desirable_weight" in raw or "undesirable_weight" in raw or lt in ("kto", "apo_zero_unpaired"):
        return "kto"
    parts = [p.lower() for p in Path(path).parts] if path else []
    for kind in ("orpo", "simpo", "cpo", "kto"):
        if any(kind in p for p in parts):
            return kind
    return "dpo"


def convert(
    raw: Mapping[str, Any], path: str | Path | None = None, devices: int = 1, kind: str | None = None
) -> tuple[dict, list[str]]:
    """(the native config as a dict of sections, the mapping's printout lines). `devices` multiplies the per
    device batch as TRL's data-parallel ranks do. Raises ConfigError naming every refused key and why."""
    kind = kind or trainer_of(raw, path)
    if kind not in DEFAULTS:
        raise ConfigError(f"unknown TRL trainer {kind!r}; known: {sorted(DEFAULTS)}")
    given = dict(raw)
    r = {**TRAINING_ARGUMENTS, **DEFAULTS[kind], **given}
    plan = _Plan()
    plan.lines.append(f"{path or 'recipe'}: a TRL {kind.upper()} recipe (TRL's defaults where it is silent):")
    done: set[str] = set()
    _model(r, plan, done)
    _data(r, given, plan, done)
    _loss(kind, r, given, plan, done)
    _schedule(r, given, plan, done, devices)
    _reference(kind, r, given, plan, done)
    _output(r, given, plan, done)
    for key in given:
        if key in done:
            continue
        if key in IGNORED:
            plan.ignore(key, IGNORED[key])
        else:
            plan.refuse(key, "not a TRL/handbook key this converter knows; remove it or set its native key")
    if plan.refused:
        raise ConfigError(
            f"{path or 'recipe'}: {len(plan.refused)} key(s) of this TRL {kind.upper()} recipe cannot be mapped and "
            "would change the run (remove them, or set them as the reason says):\n  " + "\n  ".join(plan.refused)
        )
    return {k: v for k, v in plan.native.items() if v}, plan.lines


def _model(r: dict, plan: _Plan, done: set) -> None:
    done |= {"model_name_or_path", "torch_dtype", "dtype", "bf16", "fp16", "gradient_checkpointing"}
    done |= {"model_revision", "load_in_4bit", "load_in_8bit", "chat_template"}
    if r.get("model_name_or_path") is None:
        plan.refuse("model_name_or_path", "missing: the model to train")
    else:
        plan.set("model_name_or_path", "model.source", str(r["model_name_or_path"]))
    for key in ("torch_dtype", "dtype"):
        if key in r:
            value = r[key]
            if value in (None, "auto"):
                plan.ignore(key, f"{value!r}: parameters stay float32 (model.dtype)")
            elif value in DTYPES:
                plan.set(key, "model.dtype", DTYPES[value])
            else:
                plan.refuse(key, f"{value!r}: parameters are float32 or bfloat16 here")
    if r.get("bf16"):
        plan.set("bf16", "model.compute_dtype", "bfloat16", "mixed precision: bfloat16 matmuls")
    elif "bf16" in r:
        plan.set("bf16", "model.compute_dtype", "float32")
    if r.get("fp16"):
        plan.refuse("fp16", "float16 training is not supported; use bf16: true")
    if "gradient_checkpointing" in r:
        plan.set("gradient_checkpointing", "model.remat", "full" if r["gradient_checkpointing"] else "none")
    if r.get("model_revision") not in (None, "main"):
        plan.refuse("model_revision", f"{r['model_revision']!r}: download that revision to a folder and name it")
    elif "model_revision" in r:
        plan.ignore("model_revision", "main is what a hub id loads")
    for key in ("load_in_4bit", "load_in_8bit"):
        if r.get(key):
            plan.refuse(key, "quantised (QLoRA) training is not supported; LoRA on full-precision weights is")
    if r.get("chat_template"):
        plan.refuse("chat_template", "the tokenizer's own chat template is used; put this one in the model folder")


def _datasets(r: dict, plan: _Plan) -> list[tuple[str, str, float, str]]:
    """(id, split, fraction kept, config) per dataset of dataset_name / dataset_mixture / dataset_mixer."""
    out = []
    if r.get("dataset_name"):
        out.append((r["dataset_name"], r.get("dataset_train_split", "train"), 1.0, r.get("dataset_config")))
    mix = r.get("dataset_mixture")
    if mix is not None:
        entries = mix.get("datasets") if isinstance(mix, Mapping) else None
        if not isinstance(entries, list):
            plan.refuse("dataset_mixture", "expected {datasets: [{id, split, weight, ...}]}")
            return out
        for i, d in enumerate(entries, 1):
            if not isinstance(d, Mapping) or "id" not in d:
                plan.refuse(f"dataset_mixture.datasets[{i}]", "each dataset needs an `id`")
                continue
            out.append((d["id"], d.get("split", "train"), float(d.get("weight", 1.0)), d.get("config")))
    mixer = r.get("dataset_mixer")  # the older handbook: {id: fraction} and dataset_splits
    if mixer is not None:
        splits = r.get("dataset_splits") or ["train", "test"]
        train = [s for s in splits if "train" in s] or splits[:1]
        for ds, frac in dict(mixer).items():
            out += [(ds, s, float(frac), None) for s in train]
    return out


def _data(r: dict, given: dict, plan: _Plan, done: set) -> None:
    done |= {"dataset_name", "dataset_train_split", "dataset_config", "dataset_mixture", "dataset_mixer"}
    done |= {"dataset_splits", "dataset_test_split", "max_length", "max_prompt_length", "max_completion_length"}
    done |= {"truncation_mode", "do_eval", "eval_strategy", "evaluation_strategy", "eval_steps"}
    sets = _datasets(r, plan)
    sources = []
    for i, (ds, split, frac, config) in enumerate(sets, 1):
        where = f"dataset {i} ({ds})"
        if config not in (None, "default"):
            plan.refuse(where, f"config {config!r}: save that configuration's split to a file and name the file")
        elif not 0.0 < frac <= 1.0:
            plan.refuse(where, f"weight {frac}: the fraction of the dataset kept must lie in (0, 1]")
        else:
            sources.append((str(ds), split, frac))
    if isinstance(r.get("dataset_mixture"), Mapping):
        extra = set(r["dataset_mixture"]) - {"datasets", "seed", "test_split_size"}
        for key in sorted(extra):
            plan.refuse(f"dataset_mixture.{key}", "not a handbook mixture key")
        size = r["dataset_mixture"].get("test_split_size")
        if isinstance(size, float) and 0.0 < size < 1.0:  # datasets' train_test_split: a float is a fraction
            plan.set("dataset_mixture.test_split_size", "data.eval_fraction", size, "the share held out")
        elif isinstance(size, int) and not isinstance(size, bool) and size >= 1:  # an int is a row count
            plan.set("dataset_mixture.test_split_size", "data.eval_rows", size, "rows held out in all")
        elif size is not None:
            plan.refuse("dataset_mixture.test_split_size", f"{size!r}: a share (a float < 1) or a row count")
        if "seed" in r["dataset_mixture"]:
            plan.ignore("dataset_mixture.seed", "the held-out split follows train.seed")
        for i, d in enumerate(r["dataset_mixture"].get("datasets") or [], 1):
            if isinstance(d, Mapping) and "columns" in d:
                plan.ignore(f"dataset_mixture.datasets[{i}].columns", "the reader takes the fields it needs")
    if sources:
        names, splits, kept = (list(column) for column in zip(*sources, strict=True))
        plan.set("dataset_*", "data.source", names[0] if len(names) == 1 else names)
        if any(s != "train" for s in splits):
            plan.set("dataset splits", "data.source_splits", splits)
        if any(f != 1.0 for f in kept):  # the handbook keeps that fraction of each dataset; not a stream share
            plan.set("dataset weights", "data.keep_fractions", kept, "the share of each dataset kept, seeded")
        if len(sources) > 1:  # datasets concatenated: each one's share of the stream is its (kept) size
            plan.lines.append("  (a mixture of datasets: data.weights unset, each one's share is its kept size)")
    elif not sets:
        plan.refuse("dataset_name", "missing: a recipe names its data (dataset_name or dataset_mixture)")
    if "dataset_splits" in given and r.get("dataset_mixer") is not None:
        plan.lines.append("  dataset_splits: the train split is read; held-out rows come from it by data.eval_fraction")
    plan.set("max_length", "data.max_length", int(r["max_length"]), "" if "max_length" in given else "TRL default")
    if r.get("max_prompt_length") is not None:
        plan.set("max_prompt_length", "data.max_prompt_length", int(r["max_prompt_length"]))
    if r.get("max_completion_length") is not None:
        plan.refuse("max_completion_length", "completions are truncated by data.max_length only")
    if r.get("truncation_mode", "keep_start") != "keep_start":
        plan.refuse("truncation_mode", f"{r['truncation_mode']!r}: only keep_start (TRL's default) is native")
    _evaluation(r, given, plan)


def _evaluation(r: dict, given: dict, plan: _Plan) -> None:
    """do_eval, eval_strategy / evaluation_strategy and eval_steps."""
    if r.get("do_eval") is False:
        plan.set("do_eval", "data.eval_fraction", 0.0, "no held-out split")
    elif "do_eval" in given:
        plan.lines.append("  do_eval: true -> held-out metrics before and after training (data.eval_fraction)")
    strategy = r.get("eval_strategy", r.get("evaluation_strategy"))
    if strategy in (None, "no") and "eval_steps" in given:
        plan.ignore("eval_steps", f"eval_strategy is {strategy!r}")
    every = r.get("eval_steps")
    if strategy == "steps" and isinstance(every, int) and every >= 1:  # TRL: also before and after training
        plan.set("eval_strategy/eval_steps", "eval.every", every, "held-out evaluation every N steps")
    elif strategy not in (None, "no"):
        plan.refuse(
            "eval_strategy/eval_steps",
            f"{strategy!r} with eval_steps {every!r}: held-out evaluation runs every N steps (eval_strategy: steps, "
            "eval_steps: N), or before and after training only (eval_strategy: 'no')",
        )


def _loss(kind: str, r: dict, given: dict, plan: _Plan, done: set) -> None:
    """The recipe's loss (`kind`: the trainer it names) as `loss.name`, weights and hyperparameters."""
    # over 60 lines, and reads better whole: one mapping per TRL trainer, side by side
    done |= {"loss_type", "loss_weights", "beta", "label_smoothing", "rpo_alpha", "reference_free"}
    done |= set(FAMILY_HPARAMS) | {"desirable_weight", "undesirable_weight", "cpo_alpha", "simpo_gamma", "alpha"}
    done |= {"gamma_beta_ratio", "sft_weight"}
    beta = float(r["beta"])
    if kind in ("orpo", "simpo", "kto", "cpo"):
        name, hp = {"orpo": "orpo", "simpo": "simpo", "kto": "kto", "cpo": "cpo"}[kind], {"beta": beta}
        lt = r.get("loss_type")
        if kind == "kto":
            name = {"kto": "kto", "apo_zero_unpaired": "apo_zero_unpaired"}.get(lt)
            if name is None:
                plan.refuse("loss_type", f"{lt!r}: KTO's loss types here are kto and apo_zero_unpaired")
                return
            hp |= {k: float(r[k]) for k in ("desirable_weight", "undesirable_weight") if k in r}
        elif kind == "cpo":
            hp |= {"loss_variant": lt, "cpo_alpha": float(r["cpo_alpha"])}
            hp |= {k: float(r[k]) for k in ("simpo_gamma", "alpha", "label_smoothing") if k in r}
        elif kind == "simpo":
            hp |= {"loss_variant": lt} | {k: float(r[k]) for k in ("gamma_beta_ratio", "label_smoothing") if k in r}
        loss: dict[str, Any] = {"name": name, "hparams": hp}
        if kind == "simpo" and float(r.get("sft_weight") or 0.0) > 0:
            loss = {"name": ["simpo", "sft"], "weights": [1.0, float(r["sft_weight"])], "hparams": {"simpo": hp}}
        for key, value in loss.items():
            plan.set("loss_type/beta/...", f"loss.{key}", value)
        return
    types = r["loss_type"]
    types = [t.strip() for t in types.split(",")] if isinstance(types, str) else list(types)
    weights = r.get("loss_weights")
    if weights is not None and len(weights) != len(types):
        plan.refuse("loss_weights", f"{len(weights)} weights for the {len(types)} loss types {types}")
        return
    weights = [float(w) for w in weights] if weights is not None else [1.0] * len(types)
    if r.get("rpo_alpha") is not None:  # TRL before 1.0: RPO = DPO + rpo_alpha x the chosen NLL
        if "sft" in types:
            plan.refuse("rpo_alpha", "given with loss_type sft: say the NLL's weight once, in loss_weights")
            return
        types, weights = [*types, "sft"], [*weights, float(r["rpo_alpha"])]
    names = []
    smoothing = float(r.get("label_smoothing") or 0.0)
    for t in types:
        if t not in DPO_LOSSES:
            plan.refuse("loss_type", f"{t!r}: TRL DPO loss types known here: {sorted(DPO_LOSSES)}")
            return
        name = DPO_LOSSES[t]
        names.append("cdpo" if name == "dpo" and smoothing > 0 else name)  # conservative DPO: sigmoid + smoothing
    per: dict[str, dict] = {}
    for n in names:
        if n == "sft":
            per[n] = {}
            continue
        per[n] = {"beta": beta} | {k: r[k] for k in FAMILY_HPARAMS if k in given}
        if smoothing > 0 and n in ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired"):
            per[n]["label_smoothing"] = smoothing
        elif smoothing > 0:
            plan.refuse("label_smoothing", f"{smoothing} with loss type {n!r}, which has no label smoothing")
    if len(names) == 1:
        plan.set("loss_type", "loss.name", names[0])
        plan.set("beta/...", "loss.hparams", per[names[0]])
    else:
        plan.set("loss_type", "loss.name", names)
        plan.set("loss_weights", "loss.weights", weights)
        plan.set("beta/...", "loss.hparams", per)
    if r.get("reference_free"):
        plan.set("reference_free", "train.reference", "none")


def _schedule(r: dict, given: dict, plan: _Plan, done: set, devices: int) -> None:
    done |= {"learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "weight_decay"}
    done |= {"gradient_accumulation_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio"}
    done |= {"warmup_steps", "max_grad_norm", "optim", "seed", "adam_beta1", "adam_beta2", "adam_epsilon"}
    default = lambda k: "" if k in given else "TRL default"
    plan.set("learning_rate", "train.learning_rate", float(r["learning_rate"]), default("learning_rate"))
    if int(r["max_steps"]) > 0:  # TRL: max_steps wins over num_train_epochs
        plan.set("max_steps", "train.steps", int(r["max_steps"]))
        if "num_train_epochs" in given:
            plan.ignore("num_train_epochs", "max_steps > 0 wins, as in TRL")
    else:
        plan.set("num_train_epochs", "train.epochs", float(r["num_train_epochs"]), default("num_train_epochs"))
    per_device, accumulate = int(r["per_device_train_batch_size"]), int(r["gradient_accumulation_steps"])
    plan.set(
        "per_device_train_batch_size x gradient_accumulation_steps",
        "train.batch_size",
        per_device * accumulate * devices,
        f"{per_device} x {accumulate} x {devices} device(s): examples per optimizer step; the micro-batches that "
        "hold them are planned from memory (no accumulation knob; data.micro_batch_rows sets their rows)",
    )
    schedule = r["lr_scheduler_type"]
    if schedule not in SCHEDULES:
        plan.refuse("lr_scheduler_type", f"{schedule!r}: native schedules are {sorted(SCHEDULES)}")
    else:
        plan.set("lr_scheduler_type", "train.schedule", SCHEDULES[schedule], default("lr_scheduler_type"))
    kwargs = dict(r.get("lr_scheduler_kwargs") or {})
    if schedule == "cosine_with_min_lr" and set(kwargs) in ({"min_lr_rate"}, {"min_lr"}):
        rate = kwargs.get("min_lr_rate", float(kwargs.get("min_lr", 0.0)) / float(r["learning_rate"]))
        plan.set("lr_scheduler_kwargs", "train.min_lr_ratio", float(rate), "cosine down to this share of the peak")
    elif schedule == "cosine_with_min_lr":
        plan.refuse(
            "lr_scheduler_type", f"cosine_with_min_lr needs lr_scheduler_kwargs min_lr_rate or min_lr, got {kwargs!r}"
        )
    elif kwargs:
        plan.refuse("lr_scheduler_kwargs", f"{kwargs!r}: only cosine_with_min_lr's min_lr_rate / min_lr map")
    warmup_steps, ratio = float(r.get("warmup_steps") or 0), float(r.get("warmup_ratio") or 0)
    if schedule == "constant":  # Hugging Face's constant schedule has no warmup
        plan.set("lr_scheduler_type", "train.warmup_steps", 0, "constant: no warmup, as Hugging Face's")
    elif warmup_steps >= 1:  # transformers: warmup_steps > 0 wins over warmup_ratio
        plan.set("warmup_steps", "train.warmup_steps", int(warmup_steps))
    elif warmup_steps > 0:  # transformers >= 4.5x: a float below 1 is a ratio
        plan.set("warmup_steps", "train.warmup_ratio", warmup_steps)
    else:
        plan.set("warmup_ratio", "train.warmup_ratio", ratio, default("warmup_ratio"))
        plan.set("warmup_ratio", "train.warmup_steps", 0)
    plan.set("weight_decay", "train.weight_decay", float(r["weight_decay"]), default("weight_decay"))
    plan.set("max_grad_norm", "train.max_grad_norm", float(r["max_grad_norm"]), default("max_grad_norm"))
    plan.set("seed", "train.seed", int(r["seed"]), default("seed"))
    if r.get("optim", "adamw_torch") not in ADAMW:
        plan.refuse("optim", f"{r['optim']!r}: the native optimizer is AdamW ({', '.join(ADAMW)})")
    elif "optim" in given:
        plan.lines.append(f"  optim: {r['optim']} -> AdamW (optax.adamw: betas 0.9/0.999, eps 1e-8, as torch)")
    for key, want in (("adam_beta1", 0.9), ("adam_beta2", 0.999), ("adam_epsilon", 1e-8)):
        if key in given and float(given[key]) != want:
            plan.refuse(key, f"{given[key]}: the native AdamW uses {want}")


def _reference(kind: str, r: dict, given: dict, plan: _Plan, done: set) -> None:
    done |= {"use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_task_type"}
    done |= {"precompute_ref_log_probs", "precompute_ref_batch_size", "sync_ref_model", "ref_model_sync_steps"}
    done |= {"ref_model_mixup_alpha", "ref_model_init_kwargs", "model_init_kwargs"}
    peft = bool(r.get("use_peft"))
    if peft:
        plan.set("lora_r", "train.lora_rank", int(r.get("lora_r", 16)), "" if "lora_r" in given else "TRL default")
        plan.set("lora_alpha", "train.lora_alpha", float(r.get("lora_alpha", 32)))
        plan.set("lora_dropout", "train.lora_dropout", float(r.get("lora_dropout", 0.05)))
        targets = r.get("lora_target_modules")
        if targets == "all-linear" or targets is None:  # PEFT's all-linear: every linear layer but the head
            plan.set("lora_target_modules", "train.lora_targets", list(LORA_TARGETS.values()))
        else:
            targets = [targets] if isinstance(targets, str) else list(targets)
            unknown = [t for t in targets if t not in LORA_TARGETS]
            if unknown:
                plan.refuse("lora_target_modules", f"{unknown}: LoRA targets here are {sorted(LORA_TARGETS)}")
            else:
                plan.set("lora_target_modules", "train.lora_targets", [LORA_TARGETS[t] for t in targets])
    else:
        plan.set("use_peft", "train.lora_rank", 0, "full fine-tuning, as TRL without PEFT")
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
            if key in given:
                plan.ignore(key, "use_peft is false")
    if kind in ("orpo", "simpo") or (kind == "cpo"):
        return  # reference-free objectives
    if r.get("reference_free"):
        return
    if r.get("precompute_ref_log_probs"):
        plan.set("precompute_ref_log_probs", "train.reference", "precomputed", "run `prefopt-jax precompute-ref` first")
    else:
        ref = "lora_base" if peft else "frozen"
        plan.set("(reference)", "train.reference", ref, "the base weights" if peft else "a frozen copy, as TRL")
    if "precompute_ref_batch_size" in given:
        plan.ignore("precompute_ref_batch_size", "its micro-batches are planned from memory")
    if r.get("sync_ref_model"):
        plan.set("ref_model_sync_steps", "train.ref_sync_every", int(r.get("ref_model_sync_steps", 512)))
        plan.set("ref_model_mixup_alpha", "train.ref_sync_alpha", float(r.get("ref_model_mixup_alpha", 0.6)))
    else:
        for key in ("ref_model_sync_steps", "ref_model_mixup_alpha"):
            if key in given:
                plan.ignore(key, "sync_ref_model is false")
    for key in ("model_init_kwargs", "ref_model_init_kwargs"):
        if given.get(key):
            plan.refuse(key, f"{given[key]!r}: set model.* keys instead")


def _output(r: dict, given: dict, plan: _Plan, done: set) -> None:
    done |= {"output_dir", "logging_steps", "report_to", "save_strategy", "save_steps", "save_total_limit"}
    done |= {"resume_from_checkpoint", "save_only_model"}
    if "output_dir" in given:
        plan.set("output_dir", "output.dir", str(r["output_dir"]))
    plan.set("logging_steps", "output.log_every", int(r["logging_steps"]), "" if "logging_steps" in given else "TRL")
    if "report_to" in given:
        to = r["report_to"]
        to = [to] if isinstance(to, str) else list(to or [])
        unknown = [t for t in to if t not in ("tensorboard", "wandb", "none", "all")]
        if unknown:
            plan.ignore(f"report_to {unknown}", "metrics also go to metrics.jsonl in output.dir")
        plan.set("report_to", "output.tensorboard", "tensorboard" in to or "all" in to)
        plan.set("report_to", "output.wandb", "wandb" in to or "all" in to)
    strategy = r.get("save_strategy", "steps")
    if strategy == "no":
        plan.set("save_strategy", "output.checkpoint_every", 0, "checkpoints at the end (and on SIGTERM) only")
    elif strategy == "steps":
        every = float(r.get("save_steps", 500))
        if every < 1:
            plan.refuse("save_steps", f"{every}: a fraction of the run; give a step count")
        else:
            plan.set("save_steps", "output.checkpoint_every", int(every), "" if "save_steps" in given else "TRL")
    else:
        plan.refuse("save_strategy", f"{strategy!r}: checkpoints are every output.checkpoint_every steps")
    if r.get("save_total_limit") is not None:
        plan.set("save_total_limit", "output.keep", int(r["save_total_limit"]))
    resume = r.get("resume_from_checkpoint")
    if resume in (None, False):
        plan.set("resume_from_checkpoint", "output.resume", False, "" if "resume_from_checkpoint" in given else "TRL")
    elif resume is True:
        plan.set("resume_from_checkpoint", "output.resume", True, "the newest checkpoint in output.dir")
    else:
        plan.refuse("resume_from_checkpoint", f"{resume!r}: resuming reads the newest checkpoint of output.dir")
    if "save_only_model" in given:
        plan.ignore("save_only_model", "checkpoints always hold the optimizer state, so a run resumes exactly")


def apply_overrides(raw: Mapping, args: Sequence[str]) -> dict:
    """TRL-style `--key value` (or `--key=value`, `--flag`) overrides applied to a recipe's keys.

    >>> apply_overrides({"beta": 0.1}, ["--beta", "0.2", "--bf16", "--output_dir=runs/x"])
    {'beta': 0.2, 'bf16': True, 'output_dir': 'runs/x'}
    """
    import yaml

    out, i = dict(raw), 0
    args = list(args)
    while i < len(args):
        item = args[i]
        if not item.startswith("--"):
            raise ConfigError(f"override {item!r}: TRL recipes take --key value overrides (e.g. --beta 0.2)")
        key, eq, value = item[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        out[key] = yaml.safe_load(value)
        i += 1
    return out


def to_yaml(native: Mapping, lines: Sequence[str]) -> str:
    """The native config as YAML, the mapping as comments above it."""
    import yaml

    head = "".join(f"# {line.strip()}\n" for line in lines)
    return head + yaml.safe_dump(dict(native), sort_keys=False, default_flow_style=None)
