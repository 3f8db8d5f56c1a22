"""Formula pieces several losses share: smoothed logistic loss, f-divergence scores, log1mexp,
running moments, and TRL-style reward metrics. Pure jnp on float32 [B] arrays."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from prefopt_jax.losses.inputs import batch_mean

Array = jax.Array
sg = jax.lax.stop_gradient

# exp() arguments are clamped here so float32 stays finite (exp(80) ~ 5.5e34 < 3.4e38).
EXP_CLAMP = 80.0


def smoothed_logistic(z: Array, label_smoothing: float) -> Array:
    """-(1-eps)·logσ(z) - eps·logσ(-z): DPO's loss with conservative (cDPO) label smoothing."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def f_divergence_score(logratio: Array, kind: str, alpha_coef: float) -> Array:
    """f-DPO: the score that replaces a log-ratio c = log π/π_ref (f'(π/π_ref) of the divergence)."""
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1.0 - jnp.exp(jnp.minimum(-logratio, EXP_CLAMP))
    if kind == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(logratio)
    if kind == "alpha_divergence":
        if abs(alpha_coef - 1.0) < 1e-6:  # the limit a -> 1 is reverse KL
            return logratio
        t = jnp.minimum((alpha_coef - 1.0) * logratio, EXP_CLAMP)
        return (jnp.exp(t) - 1.0) / (alpha_coef - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}")


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def log1mexp(x: Array) -> Array:
    """log(1 - e^x) for x < 0, switching at -ln 2 to stay accurate on both sides."""
    safe = jnp.minimum(x, -1e-6)  # x = 0 (probability 1) would give -inf
    return jnp.where(safe < -math.log(2.0), jnp.log1p(-jnp.exp(safe)), jnp.log(-jnp.expm1(safe)))


def running_moments_init() -> dict:
    """TRL's RunningMoments start: mean 0, var 1, count 1e-24."""
    # all float32 and strongly typed: a weakly typed leaf comes back strong from the step, a new signature
    return {
        "mean": jnp.zeros((), jnp.float32),
        "var": jnp.ones((), jnp.float32),
        "count": jnp.full((), 1e-24, jnp.float32),
    }


def running_moments_update(state: dict, xs: Array, valid: Array | None = None) -> dict:
    """Parallel (Chan et al.) merge of the batch mean/variance into the running ones (over the `valid`
    entries only, when given; a batch without any leaves the moments as they were)."""
    valid = jnp.ones(xs.shape, bool) if valid is None else jnp.broadcast_to(valid, xs.shape)
    n = jnp.sum(valid).astype(jnp.float32)
    xs_mean = jnp.sum(jnp.where(valid, xs, 0.0)) / jnp.maximum(n, 1.0)
    xs_var = jnp.sum(jnp.where(valid, (xs - xs_mean) ** 2, 0.0)) / jnp.maximum(n, 1.0)
    delta = xs_mean - state["mean"]
    total = state["count"] + n
    m2 = state["var"] * state["count"] + delta**2 * state["count"] * n / total + xs_var * n
    return {"mean": state["mean"] + delta * n / total, "var": m2 / total, "count": total}


def reward_metrics(chosen_B: Array, rejected_B: Array, valid_B: Array) -> dict:
    """TRL's reward metrics: means over the valid examples, and accuracy with a strict `>`."""
    chosen_B, rejected_B = sg(chosen_B), sg(rejected_B)
    return {
        "rewards/chosen": batch_mean(chosen_B, valid_B),
        "rewards/rejected": batch_mean(rejected_B, valid_B),
        "rewards/accuracies": batch_mean((chosen_B > rejected_B).astype(jnp.float32), valid_B),
        "rewards/margins": batch_mean(chosen_B - rejected_B, valid_B),
    }
