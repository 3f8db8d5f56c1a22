"""Losses over unpaired, labelled examples: KTO, its APO-zero variant, and BCO."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from prefopt_jax.kinds import InputKind
from prefopt_jax.losses.inputs import UnpairedLogps, batch_mean, example_valid, f32, masked_sum, validate_unpaired
from prefopt_jax.losses.primitives import running_moments_init, running_moments_update, sg
from prefopt_jax.losses.registry import Loss, LossOutput, all_of, in_range, positive, register

Array = jax.Array
_log_sigmoid = jax.nn.log_sigmoid


def _log_ratios(x: UnpairedLogps) -> tuple[Array, Array]:
    policy = masked_sum(x.policy, x.mask)
    return policy, policy - sg(masked_sum(x.ref, x.mask))


def _labelled_means(values_B: Array, label_B: Array, valid_B: Array) -> tuple[Array, Array]:
    """Means over the (valid) desirable and undesirable examples; NaN for an empty half (TRL logs nothing)."""
    desirable = label_B.astype(bool) & valid_B
    undesirable = ~label_B.astype(bool) & valid_B
    n_d, n_u = jnp.sum(desirable), jnp.sum(undesirable)
    mean_d = jnp.where(n_d > 0, jnp.sum(jnp.where(desirable, values_B, 0.0)) / jnp.maximum(n_d, 1), jnp.nan)
    mean_u = jnp.where(n_u > 0, jnp.sum(jnp.where(undesirable, values_B, 0.0)) / jnp.maximum(n_u, 1), jnp.nan)
    return mean_d, mean_u


def _unpaired_metrics(rewards_B: Array, policy_B: Array, label_B: Array, valid_B: Array) -> dict:
    rc, rr = _labelled_means(sg(rewards_B), label_B, valid_B)
    lc, lr = _labelled_means(sg(policy_B), label_B, valid_B)
    return {
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/margins": rc - rr,
        "logps/chosen": lc,
        "logps/rejected": lr,
    }


def _unpaired_loss(
    name: str,
    compute: Callable,
    *,
    defaults: dict,
    needs_kl: bool,
    formula: str,
    source: str,
    check: Callable[[dict], None],
    extras: Callable[[dict], tuple[str, ...]] = lambda hp: (),
    init_state: Callable | None = None,
    notes: str = "",
) -> Loss:
    def validate(x: UnpairedLogps, hp: dict) -> None:
        validate_unpaired(f"loss {name!r}", x, needs_reference=True, needs_kl=needs_kl, extras=extras(hp))

    return register(
        Loss(
            name=name,
            kind=InputKind.UNPAIRED,
            compute=compute,
            validate=validate,
            defaults=defaults,
            needs_reference=True,
            formula=formula,
            source=source,
            aggregation="sum",
            extras=extras,
            check=all_of(positive("beta"), check),
            init_state=init_state,
            notes=notes,
            needs_kl=needs_kl,
        )
    )


def _kto(x: UnpairedLogps, state, hp: dict) -> LossOutput:
    policy, r = _log_ratios(x)
    beta, label, valid = hp["beta"], x.label.astype(bool), example_valid(x)
    z = sg(jnp.maximum(batch_mean(f32(x.kl_policy) - f32(x.kl_ref), valid), 0.0))
    desirable = hp["desirable_weight"] * (1.0 - jax.nn.sigmoid(beta * (r - z)))
    undesirable = hp["undesirable_weight"] * (1.0 - jax.nn.sigmoid(beta * (z - r)))
    loss = jnp.where(label, desirable, undesirable)
    return LossOutput(loss, {"kl": z, **_unpaired_metrics(beta * r, policy, label, valid)}, None)


_WEIGHTS = all_of(in_range("desirable_weight", 0.0, float("inf")), in_range("undesirable_weight", 0.0, float("inf")))

_unpaired_loss(
    "kto",
    _kto,
    defaults={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    needs_kl=True,
    formula="λ_D(1 − σ(β(r − z))) if desirable else λ_U(1 − σ(β(z − r))); z = max(0, mean(KL pairs)), r = π − π_ref",
    source="TRL KTOTrainer `_compute_loss` (trl 1.16)",
    check=_WEIGHTS,
    notes="KTO (Ethayarajh et al. 2024, arXiv 2402.01306). z is the batch mean of the mismatched pairs' "
    "log-ratio, clamped at 0 and never differentiated; under jit it is the global batch mean (TRL: mean "
    "of per-device means, equal for equal device batches). The objective is the mean over all examples.",
)


def _apo_zero_unpaired(x: UnpairedLogps, state, hp: dict) -> LossOutput:
    policy, r = _log_ratios(x)
    beta, label = hp["beta"], x.label.astype(bool)
    desirable = hp["desirable_weight"] * (1.0 - jax.nn.sigmoid(beta * r))
    undesirable = hp["undesirable_weight"] * jax.nn.sigmoid(beta * r)
    metrics = {"kl": jnp.zeros((), jnp.float32), **_unpaired_metrics(beta * r, policy, label, example_valid(x))}
    return LossOutput(jnp.where(label, desirable, undesirable), metrics, None)


_unpaired_loss(
    "apo_zero_unpaired",
    _apo_zero_unpaired,
    defaults={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    needs_kl=False,
    formula="λ_D(1 − σ(β·r)) if desirable else λ_U·σ(β·r)",
    source="TRL KTOTrainer loss_type='apo_zero_unpaired' (trl 1.16)",
    check=_WEIGHTS,
    notes="Unpaired APO-zero (arXiv 2408.06266); no KL reference point.",
)


def _bco(x: UnpairedLogps, state, hp: dict) -> LossOutput:
    policy, logratio = _log_ratios(x)
    r = hp["beta"] * logratio
    valid = example_valid(x)
    if hp["training"]:
        state = running_moments_update(state, sg(r), valid)
    delta = sg(state["mean"])
    label = x.label.astype(bool)
    undesirable = -_log_sigmoid(-(r - delta))
    if hp["udm"]:
        p = f32(x.extras["udm_prob"])
        ratio = jnp.clip(p / (1.0 - p + 1e-8), hp["min_density_ratio"], hp["max_density_ratio"])
        undesirable = undesirable * sg(ratio)
    loss = jnp.where(label, -_log_sigmoid(r - delta), undesirable)
    return LossOutput(loss, {"delta": delta, **_unpaired_metrics(r, policy, label, valid)}, state)


_unpaired_loss(
    "bco",
    _bco,
    defaults={"beta": 0.1, "training": True, "udm": False, "min_density_ratio": 0.5, "max_density_ratio": 10.0},
    needs_kl=False,
    formula="−logσ(r − δ) if desirable else −logσ(−(r − δ)); r = β(π − π_ref), δ = running mean of r",
    source="TRL ≤ 0.28 experimental/bco `bco_loss`, `RunningMoments`",
    check=positive("min_density_ratio", "max_density_ratio"),
    extras=lambda hp: ("udm_prob",) if hp["udm"] else (),
    init_state=running_moments_init,
    notes="BCO (Jung et al. 2024, arXiv 2404.04656). State: running (mean, var, count) of all rewards, "
    "updated before use while training=True. udm=True weights undesirable losses by the clamped density "
    "ratio p/(1−p) of a prompt classifier (extra `udm_prob`).",
)
