"""Run configuration: typed frozen dataclasses, read from YAML with `section.key=value` overrides and
validated at load, so a typo or an impossible combination fails before any model is loaded."""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from prefopt_jax.kinds import LAYOUTS


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the valid choices."""


def cache_folder(where: str | None, name: str) -> str | None:
    """A cache setting's folder: "auto" is `name` under the user's cache ($XDG_CACHE_HOME or ~/.cache, then
    prefopt_jax); None is off; a path is expanded; a URL is kept."""
    if where == "auto":
        return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefopt_jax" / name)
    if where is not None and "://" not in where:
        return str(Path(where).expanduser())
    return where


@dataclasses.dataclass(frozen=True)
class ModelSection:
    source: str = "smollm2-135m-instruct"  # short name, local HF folder, hub id or .gguf
    dtype: str = "float32"  # parameter (and optimizer state) dtype
    compute_dtype: str | None = None  # the layers' matmuls; None: model.dtype (bfloat16 on accelerators)
    remat: str = "full"  # full | none | dots | dots_no_batch; full keeps only layer inputs (less memory)
    # auto | dense | block_sparse | pallas | pallas_gpu | cudnn; auto: pallas on TPU, cudnn on GPU, block_sparse on CPU
    attention: str = "auto"

    @property
    def compute(self) -> str:
        """The matmuls' dtype: compute_dtype, or the parameters' dtype when it is not set."""
        return self.compute_dtype or self.dtype


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = 1  # mesh axes; one may be -1 for "the remaining devices"
    fsdp: int = -1
    tensor: int = 1
    rules: str = "fsdp"  # dp | fsdp | fsdp_tp


@dataclasses.dataclass(frozen=True)
class DataSection:
    # generated "which is larger?" pairs; or a file, glob or hub dataset id; or a list of them: a mixture
    source: str | tuple[str, ...] = "builtin:compare"
    weights: tuple[float, ...] | None = None  # a mixture's shares of the training stream; None: by size
    # per source: a hub dataset's (or hub-style folder's) split to read (None: train), and the share of its rows
    # kept (a seeded subset: the alignment-handbook's dataset_mixture weight; None: all)
    source_splits: tuple[str, ...] | None = None
    keep_fractions: tuple[float, ...] | None = None
    format: str | None = None
    max_length: int = 256
    max_prompt_length: int | None = None
    eval_fraction: float = 0.1  # ignored by builtin:compare, which has its own held-out split
    eval_rows: int | None = None  # held-out rows in all, instead of eval_fraction (the handbook's int test_split_size)
    layout: str = "packed"  # packed | padded | shared (prefix sharing only) | packed_unshared (packing only)
    pack_length: int | None = None  # tokens per row (a multiple of 32; 128 for TPU/GPU); None: the longest example
    # ... but at least this many (or a row's share of a step, if less) where rows hold several examples, so short
    # examples pack several to a row: each micro-batch costs the step a loop iteration; 0: the longest example
    min_pack_length: int = 512
    # rows per micro-batch (R x pack_length tokens: its memory); None: one per device the rows are split over
    micro_batch_rows: int | None = None
    on_error: str = "raise"
    cache: str | None = "auto"  # tokenised examples ("auto": ~/.cache/prefopt_jax/tokenized); null: off
    workers: int = 0  # processes tokenising a first pass (Grain workers); 0: this one (the encoder's threads)
    # K > 0: pairs that share a prompt become one set of its K distinct responses, scored by wins - losses
    # (RRHF's ranked input; prompts with another number of responses are left out, counted in the report)
    ranked_from_pairs: int = 0
    num_train: int = 512  # builtin:compare sizes
    num_eval: int = 64


@dataclasses.dataclass(frozen=True)
class LossSection:
    # a registered loss, or several ("dpo,sft" or a YAML list) summed with `weights` (TRL's loss_type list);
    # the built-in job is RPO: DPO plus the chosen completions' NLL
    name: str | tuple[str, ...] = ("dpo", "sft")
    weights: tuple[float, ...] | None = (1.0, 1.0)  # one per loss of a mixture; None: 1.0 each
    # one loss: its hyperparameters; a mixture: {loss: {key: value}} per member (or "loss.key": value)
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"dpo": {"beta": 0.1}})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.name.split(",")) if isinstance(self.name, str) else tuple(self.name)

    def build(self):
        """(the Loss, its hyperparameters): the registered loss, or `losses.combine` of the mixture with each
        member's own hyperparameters bound (then the hyperparameters are empty)."""
        from prefopt_jax import losses

        names = self.names
        if len(names) == 1 and self.weights is None:
            return losses.get(names[0]), dict(self.hparams)
        weights = self.weights or (1.0,) * len(names)
        if len(weights) != len(names):
            raise ConfigError(f"loss.weights has {len(weights)} entries for the {len(names)} losses {list(names)}")
        per: dict[str, dict] = {n: {} for n in names}
        for key, value in self.hparams.items():
            member, dot, hp = key.partition(".")
            if member not in per:
                raise ConfigError(
                    f"loss.hparams.{key}: a mixture's hyperparameters go under a member of {list(names)}, "
                    f"e.g. loss.{names[0]}.{key}=..."
                )
            if dot:
                per[member][hp] = value
            elif isinstance(value, Mapping):
                per[member].update(value)
            else:
                raise ConfigError(f"loss.hparams.{key}: expected a mapping of {key}'s hyperparameters, got {value!r}")
        return losses.combine([(n, float(w), per[n]) for n, w in zip(names, weights, strict=True)]), {}


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 48
    # passes over the training examples; the step count is then derived from the data and train.batch_size
    # (see train_steps); a train.steps given with it wins, as TRL's max_steps wins over num_train_epochs
    epochs: float | None = None
    # examples per optimizer step (pairs; unpaired examples for KTO/BCO; ranked sets for RRHF), exactly, every
    # step: packed by tokens into as many micro-batches (gradient accumulation) as they need
    batch_size: int = 8
    learning_rate: float = 3e-4
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0  # cosine decays to this share of the peak (Hugging Face's cosine_with_min_lr)
    warmup_steps: int = 4
    warmup_ratio: float | None = None  # warmup as a fraction of the run's steps (rounded up, as TRL); wins if set
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    reference: str = "lora_base"  # frozen | lora_base | precomputed | none
    reference_dtype: str | None = None  # frozen copy only: e.g. bfloat16 to halve its memory; None: model.dtype
    reference_cache: str = "~/.cache/prefopt_jax/reference"  # precomputed log-probs (a path or gs://...)
    # TR-DPO: every this many steps ref <- alpha * policy + (1 - alpha) * ref; 0: off (with LoRA the mix is of
    # the adapter factors, not of the weights: see train.step.StepSpec)
    ref_sync_every: int = 0
    ref_sync_alpha: float = 0.6
    lora_rank: int = 8  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    max_skipped_in_a_row: int = 5
    peak_tflops: float | None = None  # per device, for MFU; None: datasheet (TPU/GPU) or measured (CPU)
    profile_steps: tuple[int, ...] | None = None  # [a, b]: a jax.profiler trace of steps a..b in output.dir/profile


@dataclasses.dataclass(frozen=True)
class EvalSection:
    generate: bool = True  # greedy answers on held-out prompts (builtin:compare: task accuracy)
    max_new_tokens: int = 6
    num_generate: int = 64  # the built-in job: every held-out question
    every: int = 0  # steps between held-out evaluations during training (TRL's eval_steps); 0: before and after only


@dataclasses.dataclass(frozen=True)
class OutputSection:
    dir: str = "runs/default"
    log_every: int = 1
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end and on SIGTERM/SIGINT
    keep: int = 3  # checkpoints kept
    resume: bool = True  # continue from the newest checkpoint in dir/checkpoints
    tensorboard: bool = True  # event files in dir/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    # compiled programs kept across runs (a path or gs://...), so a restart skips compiling; "auto":
    # $XDG_CACHE_HOME (or ~/.cache)/prefopt_jax/xla; null: off
    compilation_cache: str | None = "auto"


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSection = ModelSection()
    mesh: MeshSection = MeshSection()
    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    output: OutputSection = OutputSection()


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _coerce(value, option, where)
                except ConfigError:
                    continue
        raise ConfigError(f"{where}: {value!r} is not a {hint}")
    if origin is tuple or hint is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = (typing.get_args(hint) or (Any,))[0]
        if item in (int, float):  # "3,2" from the command line: numbers
            value = [yaml.safe_load(v) if isinstance(v, str) else v for v in value]
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if (origin is not None and issubclass(origin, Mapping)) or hint is Mapping:
        if isinstance(value, str) and value.strip().startswith("{"):  # a YAML mapping from the command line
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"{where}: {value!r} is not a YAML mapping ({e.problem})") from None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _section(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    for key in unknown:
        if f"{where}.{key}" in REMOVED:
            raise ConfigError(f"{where}.{key} was removed: {REMOVED[f'{where}.{key}']}")
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {names}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


# keys of earlier versions, with what replaced them
REMOVED = {
    "train.micro_batches": (
        "a step holds exactly train.batch_size examples, packed by tokens into as many micro-batches as they "
        "need; a micro-batch's size (its memory) is data.micro_batch_rows x data.pack_length tokens"
    ),
}


def _literal(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    if text == "null":  # "none" stays a string: it is a valid reference mode
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _another_loss(loss: dict, given: set) -> None:
    """A `loss.name` override: the file's weights and the hyperparameters of members no longer in the loss are
    dropped (unless `given` on the command line too); a mixture member chosen alone keeps its own."""
    names = LossSection(name=_coerce(loss["name"], typing.get_type_hints(LossSection)["name"], "loss.name")).names
    if "weights" not in given:
        loss["weights"] = None
    if "hparams" in given:
        return
    member = lambda k, v: k.split(".")[0] if "." in k else k if isinstance(v, Mapping) else None
    hp = loss.get("hparams", {})
    loss["hparams"] = {k: v for k, v in hp.items() if member(k, v) is None or member(k, v) in names}
    if len(names) == 1:  # a mixture member chosen alone: its own hyperparameters become the loss's
        own, flat = loss["hparams"], {}
        for k, v in own.items():
            if member(k, v) is not None:
                flat |= dict(v) if isinstance(v, Mapping) else {k.split(".", 1)[1]: v}
        loss["hparams"] = flat | {k: v for k, v in own.items() if member(k, v) is None}  # overrides win


def check_top_level(raw: Any, path: str | Path) -> None:
    """The file is a mapping of sections, each a mapping of keys (or empty)."""
    sections = [f.name for f in dataclasses.fields(Config)]
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections {sections}")
    for key, value in raw.items():
        if key not in sections:
            raise ConfigError(
                f"{path}: top-level key {key!r} is not a section; sections: {sections} (keys go under one, e.g. "
                "`train: {steps: 100}`)"
            )
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping of its keys, got {value!r}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), devices: int | None = None) -> Config:
    """A validated Config from YAML (or the defaults) with `section.key=value` overrides applied; the mesh
    is checked against `devices` (default: this process's devices)."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else f"{path}"
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(f"{where}: invalid YAML: {problem}") from None
        check_top_level(raw, path)
    raw = {k: dict(v or {}) for k, v in raw.items()}
    loss_keys = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.steps=100)")
        if section == "loss" and name not in ("name", "weights", "hparams"):
            raw.setdefault("loss", {}).setdefault("hparams", {})[name] = _literal(text)  # loss.beta=0.2
        else:
            raw.setdefault(section, {})[name] = _literal(text)
            loss_keys |= {name} if section == "loss" else set()
    if "name" in raw.get("loss", {}):  # the built-in mixture's weights and hyperparameters go with its name
        raw["loss"].setdefault("weights", None)
        raw["loss"].setdefault("hparams", {})
    if "name" in loss_keys:  # another loss: the old one's weights and member hyperparameters do not carry over
        _another_loss(raw["loss"], loss_keys)
    # TRL: max_steps > 0 overrides num_train_epochs; an override of one on the command line wins over the file's
    # other (`train.epochs=3` on a file with `steps: 48` runs three epochs)
    train, given = raw.get("train", {}), {item.partition("=")[0] for item in overrides}
    if train.get("epochs") is not None and "steps" in train:
        if "train.epochs" in given and "train.steps" not in given:
            del train["steps"]
        else:
            train["epochs"] = None
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; sections: {sorted(sections)}")
    hints = typing.get_type_hints(Config)
    cfg = Config(**{name: _section(hints[name], raw.get(name, {}), name) for name in sections})
    validate(cfg, devices)
    return cfg


def train_steps(cfg: Config, n_examples: int) -> int:
    """The run's optimizer steps: `train.steps`, or with `train.epochs` set, `ceil(epochs * steps per epoch)`
    where an epoch is `n_examples // train.batch_size` steps (at least 1), as TRL counts full accumulated
    batches per epoch and rounds the total up.

    >>> cfg = Config(train=TrainSection(epochs=1.5, batch_size=8))
    >>> train_steps(cfg, 100)  # 12 steps an epoch, 18 in 1.5 epochs
    18
    >>> train_steps(Config(train=TrainSection(steps=7)), 100)
    7
    """
    t = cfg.train
    if t.epochs is None:
        return t.steps
    if n_examples < 1:
        raise ConfigError(f"train.epochs={t.epochs}: there are no training examples to count epochs over")
    return max(1, math.ceil(t.epochs * steps_per_epoch(cfg, n_examples)))


def steps_per_epoch(cfg: Config, n_examples: int) -> int:
    """Optimizer steps in one pass over `n_examples` training examples (each step takes train.batch_size)."""
    return max(1, n_examples // cfg.train.batch_size)


def with_schedule(cfg: Config, n_examples: int) -> Config:
    """`cfg` with `train.steps` derived from `train.epochs` and `train.warmup_steps` from `train.warmup_ratio`
    (ceil(ratio * steps), as TRL's get_warmup_steps); unchanged when neither is set.

    >>> c = with_schedule(Config(train=TrainSection(epochs=2, batch_size=4, warmup_ratio=0.1)), 50)
    >>> c.train.steps, c.train.warmup_steps
    (24, 3)
    """
    t = cfg.train
    steps = train_steps(cfg, n_examples)
    warmup = t.warmup_steps if t.warmup_ratio is None else math.ceil(t.warmup_ratio * steps)
    if (steps, warmup) == (t.steps, t.warmup_steps):
        return cfg
    new = dataclasses.replace(cfg, train=dataclasses.replace(t, steps=steps, warmup_steps=warmup))
    if t.profile_steps is not None and t.profile_steps[1] > steps:
        raise ConfigError(f"train.profile_steps={list(t.profile_steps)} goes past the run's {steps} steps")
    return new


# model.attention's choices: "auto" and models.attention.IMPLEMENTATIONS (kept equal by a test; no jax here)
ATTENTION = ("auto", "dense", "block_sparse", "pallas", "pallas_gpu", "cudnn")


def validate(cfg: Config, devices: int | None = None) -> None:
    """What can be checked without the trainer (no jax imported): types were checked when the sections were
    made; here every number's range, every choice, the sources, and the mesh against `devices` when given.
    The trainer's own decisions (the loss, its hyperparameters, the reference, the extras) are checked when
    an entry point resolves the config (`prefopt_jax.train.build.resolve`)."""
    check_ranges(cfg)
    t = cfg.train
    choices = {
        "train.reference_dtype": (t.reference_dtype, (None, "float32", "bfloat16")),
        "train.schedule": (t.schedule, ("cosine", "linear", "constant")),
        "data.layout": (cfg.data.layout, LAYOUTS),
        "model.dtype": (cfg.model.dtype, ("float32", "bfloat16")),
        "model.compute_dtype": (cfg.model.compute_dtype, (None, "float32", "bfloat16")),
        "model.remat": (cfg.model.remat, ("none", "full", "dots", "dots_no_batch")),
        "model.attention": (cfg.model.attention, ATTENTION),
        "data.on_error": (cfg.data.on_error, ("raise", "skip")),
        "mesh.rules": (cfg.mesh.rules, ("dp", "fsdp", "fsdp_tp")),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{key}={value!r}; valid: {list(valid)}")
    d = cfg.data
    if d.ranked_from_pairs == 1 or (
        d.ranked_from_pairs and (d.source == "builtin:compare" or not isinstance(d.source, str))
    ):
        raise ConfigError(
            f"data.ranked_from_pairs={d.ranked_from_pairs}: needs K >= 2 candidates and one pair file or dataset "
            "(not builtin:compare, not a mixture)"
        )
    if t.profile_steps is not None:
        p = t.profile_steps
        if len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in p) or not 1 <= p[0] <= p[1]:
            raise ConfigError(f"train.profile_steps must be [first, last] steps with 1 <= first <= last, got {list(p)}")
        if p[1] > t.steps:
            raise ConfigError(f"train.profile_steps={list(p)} goes past train.steps={t.steps}")
    check_sources(cfg)
    check_mesh(cfg, devices)
    if cfg.data.pack_length is not None and (cfg.data.pack_length < 32 or cfg.data.pack_length % 32):
        raise ConfigError(f"data.pack_length must be a multiple of 32 (attention tiles), got {cfg.data.pack_length}")


# every numeric field's valid range: (lowest, highest, whether the lowest is excluded); None values are allowed
# where the field is optional
RANGES = {
    "data.max_length": (2, None, False),
    "data.max_prompt_length": (1, None, False),
    "data.eval_fraction": (0.0, 1.0, False),
    "data.micro_batch_rows": (1, None, False),
    "data.min_pack_length": (0, None, False),
    "data.num_train": (1, None, False),
    "data.num_eval": (0, None, False),
    "data.workers": (0, None, False),
    "data.ranked_from_pairs": (0, None, False),
    "train.steps": (1, None, False),
    "train.batch_size": (1, None, False),
    "train.learning_rate": (0.0, None, True),
    "train.warmup_steps": (0, None, False),
    "train.min_lr_ratio": (0.0, 1.0, False),
    "train.epochs": (0.0, None, True),
    "train.warmup_ratio": (0.0, 1.0, False),
    "train.max_grad_norm": (0.0, None, True),
    "train.weight_decay": (0.0, None, False),
    "train.ref_sync_every": (0, None, False),
    "train.lora_rank": (0, None, False),
    "train.lora_alpha": (0.0, None, True),
    "train.max_skipped_in_a_row": (1, None, False),
    "train.peak_tflops": (0.0, None, True),
    "eval.max_new_tokens": (1, None, False),
    "eval.num_generate": (0, None, False),
    "eval.every": (0, None, False),
    "output.log_every": (1, None, False),
    "output.checkpoint_every": (0, None, False),
    "output.keep": (1, None, False),
}


def check_sources(cfg: Config) -> None:
    d = cfg.data
    sources = (d.source,) if isinstance(d.source, str) else d.source
    if not sources or not all(isinstance(s, str) and s for s in sources):
        raise ConfigError(f"data.source must be a file, glob or hub id, or a non-empty list of them; got {d.source!r}")
    if len(sources) > 1 and "builtin:compare" in sources:
        raise ConfigError("data.source: builtin:compare cannot be part of a mixture")
    for key in ("weights", "source_splits", "keep_fractions"):
        values = getattr(d, key)
        if values is not None and len(values) != len(sources):
            raise ConfigError(f"data.{key} has {len(values)} entries for the {len(sources)} data.source entries")
        if values is not None and "builtin:compare" in sources:
            raise ConfigError(f"data.{key}: builtin:compare has no splits or weights")
    if d.weights is not None and not all(w > 0 for w in d.weights):
        raise ConfigError(f"data.weights must all be positive, got {list(d.weights)}")
    if d.eval_rows is not None and (d.eval_rows < 1 or "builtin:compare" in sources or d.ranked_from_pairs):
        raise ConfigError(
            f"data.eval_rows={d.eval_rows}: a positive count of held-out rows, for pair files and hub datasets "
            "(not builtin:compare, not with data.ranked_from_pairs: use data.eval_fraction)"
        )
    if d.keep_fractions is not None and not all(0 < f <= 1 for f in d.keep_fractions):
        raise ConfigError(f"data.keep_fractions must each lie in (0, 1], got {list(d.keep_fractions)}")


def check_ranges(cfg: Config) -> None:
    """Every numeric field within its range (`RANGES`), failing at load with the key, the value and the range."""
    for key, (lo, hi, open_lo) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        bad = value <= lo if open_lo else value < lo
        if bad or (hi is not None and value > hi):
            want = f"> {lo}" if open_lo else f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ConfigError(f"{key} must be {want}, got {value}")


def check_mesh(cfg: Config, n: int | None = None) -> None:
    """Mesh sizes are >= 1 with at most one -1 (the rest), and the mesh must fit `n` devices when given."""
    m = cfg.mesh
    sizes = {"mesh.data": m.data, "mesh.fsdp": m.fsdp, "mesh.tensor": m.tensor}
    if sum(v == -1 for v in sizes.values()) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ConfigError(f"mesh sizes {sizes}: each must be >= 1, and at most one may be -1 (the rest)")
    if n is None:
        return
    rest = -1 in sizes.values()
    known = m.data * m.fsdp * m.tensor * (-1 if rest else 1)
    if (rest and n % known) or (not rest and known > n):
        raise ConfigError(f"mesh {sizes} does not fit the {n} devices")
