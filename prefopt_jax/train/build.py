"""A run's parts from its config, decided once (`resolve`): the loss with its hyperparameters, what it
trains on, the reference mode, the extras the step computes for it; then from those parts the optimizer, the
step specs (training and held-out), the micro-batch specs and the parameter trees. Every combination the
trainer refuses is refused here: in `resolve`, and in `attention` once the architecture is known; the loop,
`plan` and `precompute-ref` resolve once and read the decisions (`Parts`) instead of testing the config
again."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefopt_jax import config as config_lib
from prefopt_jax import data, losses, sharding
from prefopt_jax.config import Config, ConfigError, DataSection, ModelSection, TrainSection
from prefopt_jax.models import attention as attention_lib
from prefopt_jax.train import batches, runtime
from prefopt_jax.train import step as step_lib

REFERENCE_MODES = ("frozen", "lora_base", "precomputed", "none")


@dataclasses.dataclass(frozen=True)
class Parts:
    """What the config decides about a run's step and batches."""

    loss: losses.Loss
    hp: dict
    reference: str  # frozen | lora_base | precomputed | none
    extras: tuple[str, ...]  # what the loss needs beyond per-token log-probs (each in `losses.EXTRAS`)
    reference_dtype: str  # the frozen reference copy's dtype (train.reference_dtype, else model.dtype)
    rules: str  # how parameters and activations are sharded over the mesh (mesh.rules)

    @property
    def unpaired(self) -> bool:
        """The loss trains on unpaired examples (pairs are read as two of them)."""
        return self.loss.kind is losses.InputKind.UNPAIRED

    @property
    def response_only(self) -> bool:
        """Micro-batches carry RMiPO's response-only sequences."""
        return "response_only_chosen_avg" in self.extras

    @property
    def udm(self) -> bool:
        """Batches carry BCO-UDM's p(desirable | prompt) per example (`loss.udm`)."""
        return "udm_prob" in self.extras

    @property
    def side_inputs(self) -> tuple[str, ...]:
        """The per-example inputs computed on the host before training that the batches carry: the precomputed
        reference log-probs, and the extras the host provides (`losses.Provider.HOST`)."""
        host = tuple(e for e in self.extras if losses.EXTRAS[e].provider is losses.Provider.HOST)
        return ("ref_logps",) * self.precomputed + host

    @property
    def precomputed(self) -> bool:
        return self.reference == "precomputed"


def resolve(cfg: Config, devices: int | None = None) -> Parts:
    """The run's decided parts (the loss and what it trains on, its hyperparameters, the reference mode, the
    extras), or a ConfigError naming the setting that cannot work; and the mesh must fit `devices` (default:
    this process's). Each entry point (`train`, `eval`, `export`, `precompute-ref`, `plan`) resolves its config
    once and passes the parts down; reading a config (`config.load_config`) checks what needs no trainer."""
    config_lib.check_mesh(cfg, jax.device_count() if devices is None else devices)
    loss, hp = cfg.loss.build()  # unknown losses and unknown or out-of-range hyperparameters fail here
    loss.hyperparameters(**hp)
    t = cfg.train
    if t.reference not in REFERENCE_MODES:
        raise ConfigError(f"train.reference={t.reference!r}; valid: {list(REFERENCE_MODES)}")
    if not loss.needs_reference and t.reference != "none":
        raise ConfigError(f"loss {loss.name!r} needs no reference: set train.reference=none")
    if loss.needs_reference and t.reference == "none":
        raise ConfigError(
            f"loss {loss.name!r} needs a reference: train.reference must be frozen, lora_base or precomputed"
        )
    extras = loss.required_extras(**hp)
    missing = sorted(set(extras) - set(losses.EXTRAS))
    if missing:
        raise ConfigError(
            f"loss {loss.name!r} with these hyperparameters needs {missing}, which the trainer does not compute yet"
        )
    if t.reference == "lora_base" and t.lora_rank == 0:
        raise ConfigError("train.reference=lora_base needs LoRA (train.lora_rank > 0)")
    if t.reference_dtype is not None and t.reference != "frozen":
        raise ConfigError("train.reference_dtype applies to train.reference=frozen only (the reference copy)")
    if t.ref_sync_every < 0 or not 0.0 < t.ref_sync_alpha <= 1.0:
        raise ConfigError("train.ref_sync_every must be >= 0 and train.ref_sync_alpha in (0, 1]")
    if t.ref_sync_every and t.reference not in ("frozen", "lora_base"):
        raise ConfigError("train.ref_sync_every (TR-DPO) needs train.reference=frozen or lora_base")
    if not 0.0 <= t.lora_dropout < 1.0:
        raise ConfigError(f"train.lora_dropout must be in [0, 1), got {t.lora_dropout}")
    if t.lora_dropout and not t.lora_rank:
        raise ConfigError("train.lora_dropout needs LoRA (train.lora_rank > 0)")
    if t.reference == "precomputed" and (loss.needs_kl or "seq_kl_chosen" in extras):
        raise ConfigError(
            f"loss {loss.name!r} needs the reference inside the step (mismatched pairs or full distributions): "
            "train.reference must be frozen or lora_base"
        )
    return Parts(loss, hp, t.reference, extras, t.reference_dtype or cfg.model.dtype, cfg.mesh.rules)


def attention(model: ModelSection, mcfg, platform: str) -> str:
    """The attention implementation `model.attention` means for this architecture on `platform` ("auto": by
    platform), decided once the architecture is known; one that cannot run there is a configuration error."""
    try:
        return attention_lib.resolve(model.attention, platform, mcfg, model.compute)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ---- the optimizer ----------------------------------------------------------------------------------


def learning_rate(schedule: str, peak: float, warmup: int, steps: int, min_ratio: float = 0.0):
    """The learning rate of update `count` (0-based), as Hugging Face's schedulers define it: linear warmup
    `count / warmup` while count < warmup (none when warmup is 0, so the first update uses the peak), then
    constant, or decaying to 0 at `steps` (cosine: (1 + cos(pi·progress)) / 2; linear: 1 − progress); cosine
    with `min_ratio` r decays to r·peak instead (r + (1 − r)·(1 + cos(pi·progress)) / 2: cosine_with_min_lr)."""

    def rate(count):
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(warmup, 1)
        progress = jnp.clip((count - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        cosine = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        decay = {"cosine": cosine, "linear": 1.0 - progress}.get(schedule, 1.0)
        return peak * jnp.where(count < warmup, warm, decay)

    return rate


def make_optimizer(t: TrainSection) -> optax.GradientTransformation:
    """Clipping by global norm, then AdamW over `learning_rate`'s schedule of the run's steps."""
    lr = learning_rate(t.schedule, t.learning_rate, t.warmup_steps, t.steps, t.min_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(t.max_grad_norm), optax.adamw(lr, weight_decay=t.weight_decay))


# ---- step and batch specs ---------------------------------------------------------------------------


def step_spec(
    p: Parts, model: ModelSection, t: TrainSection, geometries: dict, attention: str, mesh: Mesh | None = None
) -> step_lib.StepSpec:
    """What the train step computes, from the resolved parts and the model and LoRA settings; with the mesh,
    activations and each layer's weights are kept in their shards inside the step."""
    constrain = (
        step_lib.no_constraint if mesh is None else sharding.activation_constraint(mesh, sharding.rules_for(p.rules))
    )
    platform = mesh.devices.flat[0].platform if mesh is not None else "cpu"
    return step_lib.StepSpec(
        p.loss,
        p.hp,
        geometries,
        attention_lib.AttentionSpec(attention, interpret=attention in attention_lib.KERNELS and platform == "cpu"),
        reference=p.reference,
        lora_scale=(t.lora_alpha / t.lora_rank) if t.lora_rank else None,
        lora_dropout=t.lora_dropout,
        ref_sync_every=t.ref_sync_every,
        ref_sync_alpha=t.ref_sync_alpha,
        remat=model.remat,
        seed=t.seed,
        compute_dtype=model.compute,
        constrain=constrain,
    )


def eval_spec(p: Parts, spec: step_lib.StepSpec, specs: dict, prepared: data.Prepared) -> step_lib.StepSpec:
    """The held-out step: the train step's, in the held-out geometry; an unpaired loss with held-out pairs
    scores them by the implicit reward (DPO at the loss's beta), as every loss is."""
    out = dataclasses.replace(spec, geometries=specs["eval"].geometries) if specs else spec
    held_out_pairs = any(isinstance(e, data.TokenizedPair) for e in prepared.eval[:1])
    if p.unpaired and held_out_pairs:
        beta = spec.loss.hyperparameters(**spec.hp).get("beta", 0.1)
        out = dataclasses.replace(out, loss=losses.get("dpo"), hp={"beta": beta})
    return out


def batch_specs(
    p: Parts, d: DataSection, t: TrainSection, prepared: data.Prepared, mesh: Mesh, attention: str
) -> dict[str, data.BatchSpec]:
    """Per split, the fixed micro-batch geometry, and the micro-batches a training step needs (its steps
    planned ahead over the training examples). Paired runs size one geometry from train and held-out
    examples together; an unpaired run's held-out split is pairs, with a geometry of its own."""
    mix = batches.mixture(d, prepared) if prepared.train else None

    def spec(examples, train=None):
        return batches.batch_spec(
            d, t, examples, mesh, attention=attention, response_only=p.response_only, train=train, mixture=mix
        )

    if p.unpaired:
        out = {
            name: spec(examples, examples if name == "train" else None)
            for name, examples in (("train", prepared.train), ("eval", prepared.eval))
            if examples
        }
        return {"train": out.get("train", out.get("eval")), "eval": out.get("eval", out.get("train"))}
    examples = prepared.train + prepared.eval
    if not examples:
        return {}
    both = spec(examples, prepared.train or None)
    return {"train": both, "eval": both}


# ---- parameter trees --------------------------------------------------------------------------------


def _copy_as(a, dtype):
    """A copy of a parameter in `dtype` (the policy's buffers are donated to the step, so the reference
    needs its own); abstract parameters (planning) stay abstract."""
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding)
    return jnp.copy(a) if a.dtype == dtype else a.astype(dtype)


def parameter_trees(p: Parts, t: TrainSection, spec: step_lib.StepSpec, base: dict, adapters: dict | None, mesh: Mesh):
    """(trainable, frozen, ref_params, synced): the parameter trees a run holds, from the loaded base (and
    the initial LoRA adapters). `synced` is TR-DPO's moving reference; arrays or abstract shapes alike."""
    if adapters is not None:  # LoRA: the adapters train (small: replicated), the base stays frozen
        replicated = NamedSharding(mesh, PartitionSpec())
        trainable = jax.tree.map(
            lambda a: (
                jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)
                if isinstance(a, jax.ShapeDtypeStruct)
                else jax.device_put(a, replicated)
            ),
            adapters,
        )
        # TR-DPO with LoRA: the reference has its own adapters, starting at the base
        synced = jax.tree.map(lambda a: _copy_as(a, a.dtype), trainable) if t.ref_sync_every else None
        return trainable, base, None, synced
    ref_params = None
    if spec.reference_in_step:
        dtype = runtime.dtype_of(p.reference_dtype)
        ref_params = jax.tree.map(lambda a: _copy_as(a, dtype), base)
    if t.ref_sync_every:  # TR-DPO: the reference lives in the state
        return base, None, None, ref_params
    return base, None, ref_params, None  # without a reference in the step, no second copy at all


def initial_state(p: Parts, t: TrainSection, trainable, synced, mesh: Mesh, *, optimizer_state: bool = True):
    """(the optimizer over the run's steps, the initial train state with every leaf on the mesh: the
    optimizer's scalars replicated, so restored checkpoints land the same way). Without `optimizer_state` the
    optimizer's part of the state is shapes only (evaluation and export allocate no Adam moments)."""
    optimizer = make_optimizer(t)
    init = optimizer if optimizer_state else optax.GradientTransformation(
        functools.partial(jax.eval_shape, optimizer.init), optimizer.update
    )  # fmt: skip
    state = step_lib.init_state(trainable, init, p.loss, reference=synced)
    replicated = NamedSharding(mesh, PartitionSpec())
    placed = lambda a: isinstance(a, jax.ShapeDtypeStruct) or isinstance(a.sharding, NamedSharding)
    return optimizer, jax.tree.map(lambda a: a if placed(a) else jax.device_put(a, replicated), state)
