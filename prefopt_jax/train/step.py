"""The fused train step: policy forward/backward, reference forward and the loss in one `jit`.

The step is built per configuration (reference mode, LoRA or full fine-tuning, what the loss declares),
never branched on flags inside the compiled function. Batches are the data pipeline's contract
(`prefopt_jax.data.Batch` arrays: rows, `pred_index`, completion indices), so padded and packed
layouts run through the same step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from prefopt_jax.logprobs import gather_completions, token_logps
from prefopt_jax.losses import Loss, PairLogps
from prefopt_jax.models.config import ModelConfig
from prefopt_jax.models.decoder import forward_hidden, unembedding
from prefopt_jax.train.lora import with_lora

sg = jax.lax.stop_gradient
REFERENCE_MODES = ("frozen", "lora_base", "precomputed", "none")


def batch_arrays(batch) -> dict:
    """The arrays of a `data.Batch` the step needs, as a dict (a pytree jit can take)."""
    out = {
        "input_ids": batch.input_ids,
        "positions": batch.positions,
        "segment_ids": batch.segment_ids,
        "pred_index": batch.pred_index,
        "completion_index": batch.completion_index,
        "completion_mask": batch.completion_mask,
    }
    if batch.attention is not None:
        out["mask"] = batch.attention
    return out


def completion_logps(cfg: ModelConfig, params: dict, b: dict, *, chunk: int = 128, remat: str = "none") -> jax.Array:
    """Per-token log-probs of every completion of a batch, [G, K, L] (0 outside the completion)."""
    hidden = forward_hidden(
        cfg, params, b["input_ids"], b["positions"], b["segment_ids"], b.get("mask"), remat=remat, dtype=jnp.float32
    )
    logps = token_logps(
        hidden, unembedding(cfg, params), b["input_ids"], b["pred_index"], chunk=chunk, softcap=cfg.final_logit_softcap
    )
    return gather_completions(logps, b["completion_index"], b["completion_mask"])


def pair_logps(policy: jax.Array, reference: jax.Array | None, mask: jax.Array, extras: dict) -> PairLogps:
    """Groups of [chosen, rejected] ([G, 2, L]) as the losses' PairLogps."""
    ref_c, ref_r = (None, None) if reference is None else (reference[:, 0], reference[:, 1])
    return PairLogps(policy[:, 0], policy[:, 1], mask[:, 0], mask[:, 1], ref_c, ref_r, extras)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What one step computes. `loss` is a registered Loss with its hyperparameters bound in `hp`."""

    loss: Loss
    hp: dict
    reference: str = "frozen"  # frozen | lora_base | precomputed | none
    lora_scale: float | None = None  # None: full fine-tuning
    chunk: int = 128
    remat: str = "none"

    def __post_init__(self) -> None:
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference mode {self.reference!r}; modes: {', '.join(REFERENCE_MODES)}")
        if self.loss.needs_reference and self.reference == "none":
            raise ValueError(f"loss {self.loss.name!r} needs a reference; choose a reference mode other than 'none'")
        if self.reference == "lora_base" and self.lora_scale is None:
            raise ValueError("reference 'lora_base' needs LoRA (the base is the reference)")
        supported = {"response_only_chosen_avg", "response_only_rejected_avg"}
        missing = set(self.loss.required_extras(**self.hp)) - supported
        if missing:
            raise ValueError(f"loss {self.loss.name!r} needs extras {sorted(missing)} the step does not compute yet")


def policy_params(spec: StepSpec, trainable: dict, frozen: dict | None) -> dict:
    """The policy's parameter tree: the trained parameters, or the frozen base with the trained adapters."""
    return trainable if spec.lora_scale is None else with_lora(frozen, trainable, spec.lora_scale)


def make_loss_fn(cfg: ModelConfig, spec: StepSpec) -> Callable:
    """(trainable, frozen, ref_params, batch, loss_state) -> (loss, (metrics, new loss state))."""
    needs_reference = spec.loss.needs_reference and spec.reference != "none"
    extras_needed = spec.loss.required_extras(**spec.hp)

    def loss_fn(trainable, frozen, ref_params, batch, loss_state):
        params = policy_params(spec, trainable, frozen)
        main = batch["main"]
        policy = completion_logps(cfg, params, main, chunk=spec.chunk, remat=spec.remat)
        reference = None
        if needs_reference:
            if spec.reference == "precomputed":
                reference = batch["ref_logps"]
            else:
                ref = frozen if spec.reference == "lora_base" else ref_params
                reference = sg(completion_logps(cfg, ref, main, chunk=spec.chunk))
        extras = {}
        if extras_needed:  # RMiPO: the policy's average log-prob of each response alone, no gradient
            alone = sg(completion_logps(cfg, params, batch["response_only"], chunk=spec.chunk))
            mask = batch["response_only"]["completion_mask"]
            avg = alone.sum(-1)[:, 0] / jnp.maximum(mask.sum(-1)[:, 0], 1)
            half = avg.shape[0] // 2
            extras = {"response_only_chosen_avg": avg[:half], "response_only_rejected_avg": avg[half:]}
        x = pair_logps(policy, reference, main["completion_mask"], extras)
        out = spec.loss(x, state=loss_state, **spec.hp)
        w = batch["weight"]
        value = jnp.sum(out.loss * w) / jnp.maximum(jnp.sum(w), 1e-8)
        lengths = main["completion_mask"].sum(-1)
        metrics = {
            **out.metrics,
            "loss": value,
            "lengths/chosen": jnp.mean(lengths[:, 0]),
            "lengths/rejected": jnp.mean(lengths[:, 1]),
            "num_tokens": jnp.sum(main["segment_ids"] > 0),
        }
        if reference is not None:  # likelihood displacement: how far the chosen log-prob moved
            metrics["logps/chosen_drift"] = jnp.mean(sg(policy[:, 0].sum(-1) - reference[:, 0].sum(-1)))
        return value, (metrics, out.state)

    return loss_fn


def init_state(trainable: Any, optimizer: optax.GradientTransformation, loss: Loss) -> dict:
    return {
        "trainable": trainable,
        "opt_state": optimizer.init(trainable),
        "loss_state": loss.init_state() if loss.stateful else None,
        "step": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),
    }


def make_train_step(cfg: ModelConfig, spec: StepSpec, optimizer: optax.GradientTransformation) -> Callable:
    """`step(state, frozen, ref_params, batch) -> (state, metrics)`, jitted, the state donated.

    `batch` holds micro-batches stacked on a leading axis (gradient accumulation inside the step: a scan
    that sums gradients). A step whose loss or gradients are not finite leaves the parameters as they
    were and counts itself in `state["skipped"]`."""
    grad_fn = jax.value_and_grad(make_loss_fn(cfg, spec), has_aux=True)

    def step(state, frozen, ref_params, batch):
        n_micro = jax.tree.leaves(batch)[0].shape[0]

        def micro(carry, mb):
            grads_acc, loss_state = carry
            (_, (metrics, loss_state)), grads = grad_fn(state["trainable"], frozen, ref_params, mb, loss_state)
            return (jax.tree.map(jnp.add, grads_acc, grads), loss_state), metrics

        zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
        (grads, loss_state), metrics = jax.lax.scan(micro, (zeros, state["loss_state"]), batch)
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        metrics = jax.tree.map(jnp.mean, metrics)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        new_params = optax.apply_updates(state["trainable"], updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "trainable": keep(new_params, state["trainable"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "loss_state": keep(loss_state, state["loss_state"]) if state["loss_state"] is not None else None,
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        return new_state, {**metrics, "grad_norm": grad_norm, "skipped": new_state["skipped"]}

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(cfg: ModelConfig, spec: StepSpec) -> Callable:
    """`eval(trainable, frozen, ref_params, batch, loss_state) -> metrics` (one micro-batch, no update)."""
    loss_fn = make_loss_fn(cfg, spec)

    def evaluate(trainable, frozen, ref_params, batch, loss_state):
        _, (metrics, _) = loss_fn(trainable, frozen, ref_params, batch, loss_state)
        return metrics

    return jax.jit(evaluate)
