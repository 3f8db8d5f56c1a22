"""Loss inputs: per-token log-probs and masks, their validation, and the per-sequence statistics
(sums, lengths, averages) every loss derives from them.

Shapes: B is pairs (paired), examples (unpaired) or groups (ranked); T is tokens; K is candidates.
All arithmetic is done in float32 whatever the input dtype.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class LossInputError(ValueError):
    """Loss inputs or hyperparameters that cannot be used; the message says which and why."""


class PairLogps(NamedTuple):
    """Per-token log-probs of a batch of preference pairs (completion tokens only under the masks).

    `policy_chosen`/`policy_rejected`: float [B,Tc] / [B,Tr]; `chosen_mask`/`rejected_mask`: bool,
    same shapes; `ref_chosen`/`ref_rejected`: like the policy arrays, or None without a reference.
    `extras`: named arrays a particular loss declares (see `EXTRAS`).
    """

    policy_chosen: Array
    policy_rejected: Array
    chosen_mask: Array
    rejected_mask: Array
    ref_chosen: Array | None = None
    ref_rejected: Array | None = None
    extras: Mapping[str, Array] = {}


class UnpairedLogps(NamedTuple):
    """Per-token log-probs of unpaired examples (KTO, BCO).

    `policy`, `ref`: float [B,T]; `mask`: bool [B,T]; `label`: bool [B], True = desirable.
    `kl_policy`, `kl_ref`: float [B] summed completion log-probs of the mismatched (prompt_i,
    completion_j) pairs that estimate KTO's KL reference point, or None when the loss needs none.
    """

    policy: Array
    mask: Array
    label: Array
    ref: Array | None = None
    kl_policy: Array | None = None
    kl_ref: Array | None = None
    extras: Mapping[str, Array] = {}


class RankedLogps(NamedTuple):
    """K scored candidates per prompt (RRHF): `policy` float [B,K,T], `mask` bool [B,K,T],
    `scores` float [B,K] (higher is better)."""

    policy: Array
    mask: Array
    scores: Array
    extras: Mapping[str, Array] = {}


class Provider(enum.Enum):
    """Who computes an extra input: the train step from the models, or the host before training (a per-example
    side input carried in the batch)."""

    STEP = "step"
    HOST = "host"


class Extra(NamedTuple):
    shape: str  # "B": one value per example; or the token layout it shares: "chosen", "rejected", "full"
    provider: Provider


# Every extra input a loss may declare: its shape and who computes it. A new extra is an entry here and the code
# that computes it (the step's `extra_inputs`, or a host side input), nothing else.
EXTRAS: dict[str, Extra] = {
    "seq_kl_chosen": Extra("B", Provider.STEP),  # TDPO: sum over chosen tokens of KL(ref || policy)
    "seq_kl_rejected": Extra("B", Provider.STEP),
    "response_only_chosen_avg": Extra("B", Provider.STEP),  # RMiPO: avg log-prob of the response alone
    "response_only_rejected_avg": Extra("B", Provider.STEP),
    "wpo_aligned_chosen": Extra("chosen", Provider.STEP),  # WPO: log p(y_t) - log sum_v p(v)^2, per token
    "wpo_aligned_rejected": Extra("rejected", Provider.STEP),
    "full_chosen": Extra("full", Provider.STEP),  # ORPO: per-token log-probs over prompt + chosen
    "full_chosen_mask": Extra("full", Provider.STEP),
    "udm_prob": Extra("B", Provider.HOST),  # BCO-UDM: p(the prompt is from the desirable set), a classifier's
}


def _shape_error(where: str, what: str, got: tuple, want: tuple) -> LossInputError:
    return LossInputError(f"{where}: `{what}` has shape {got}, expected {want}")


def _check_logps(where: str, name: str, x: Any, ndim: int) -> None:
    if x is None:
        raise LossInputError(f"{where}: `{name}` is None")
    if getattr(x, "ndim", None) != ndim:
        raise LossInputError(
            f"{where}: `{name}` must be a {ndim}-D array, got shape {getattr(x, 'shape', type(x).__name__)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise LossInputError(f"{where}: `{name}` must be floating point log-probs, got dtype {x.dtype}")


def _check_mask(where: str, name: str, m: Any, shape: tuple) -> None:
    if getattr(m, "shape", None) != shape:
        raise _shape_error(where, name, getattr(m, "shape", None), shape)
    if jnp.issubdtype(m.dtype, jnp.floating):
        raise LossInputError(f"{where}: `{name}` must be bool (or integer), got dtype {m.dtype}")


def _check_extras(where: str, extras: Mapping[str, Array], needed: tuple[str, ...], shapes: dict) -> None:
    missing = [k for k in needed if k not in extras]
    if missing:
        raise LossInputError(f"{where}: missing extra input(s) {missing}; this loss needs {list(needed)}")
    for k in needed:
        want = shapes[EXTRAS[k].shape]
        if want is not None and tuple(extras[k].shape) != want:
            raise _shape_error(where, f"extras[{k!r}]", tuple(extras[k].shape), want)
    if "full_chosen" in needed and extras["full_chosen"].shape != extras["full_chosen_mask"].shape:
        raise _shape_error(
            where, "extras['full_chosen_mask']", extras["full_chosen_mask"].shape, extras["full_chosen"].shape
        )


def validate_pair(where: str, x: PairLogps, *, needs_reference: bool, extras: tuple[str, ...]) -> None:
    if not isinstance(x, PairLogps):
        raise LossInputError(f"{where}: expects PairLogps, got {type(x).__name__}")
    _check_logps(where, "policy_chosen", x.policy_chosen, 2)
    _check_logps(where, "policy_rejected", x.policy_rejected, 2)
    _check_mask(where, "chosen_mask", x.chosen_mask, x.policy_chosen.shape)
    _check_mask(where, "rejected_mask", x.rejected_mask, x.policy_rejected.shape)
    b = x.policy_chosen.shape[0]
    if x.policy_rejected.shape[0] != b:
        raise LossInputError(f"{where}: chosen and rejected batch sizes differ ({b} vs {x.policy_rejected.shape[0]})")
    if (x.ref_chosen is None) != (x.ref_rejected is None):
        raise LossInputError(f"{where}: give both `ref_chosen` and `ref_rejected`, or neither")
    if needs_reference and x.ref_chosen is None:
        raise LossInputError(f"{where}: this loss needs reference log-probs (`ref_chosen`, `ref_rejected`), got None")
    if x.ref_chosen is not None:
        if x.ref_chosen.shape != x.policy_chosen.shape:
            raise _shape_error(where, "ref_chosen", x.ref_chosen.shape, x.policy_chosen.shape)
        if x.ref_rejected.shape != x.policy_rejected.shape:
            raise _shape_error(where, "ref_rejected", x.ref_rejected.shape, x.policy_rejected.shape)
    shapes = {"B": (b,), "chosen": x.policy_chosen.shape, "rejected": x.policy_rejected.shape, "full": None}
    _check_extras(where, x.extras, extras, shapes)


def validate_unpaired(where: str, x: UnpairedLogps, *, needs_reference: bool, needs_kl: bool, extras=()) -> None:
    if not isinstance(x, UnpairedLogps):
        raise LossInputError(f"{where}: expects UnpairedLogps, got {type(x).__name__}")
    _check_logps(where, "policy", x.policy, 2)
    _check_mask(where, "mask", x.mask, x.policy.shape)
    b = x.policy.shape[0]
    if getattr(x.label, "shape", None) != (b,):
        raise _shape_error(where, "label", getattr(x.label, "shape", None), (b,))
    if needs_reference:
        if x.ref is None:
            raise LossInputError(f"{where}: this loss needs reference log-probs (`ref`), got None")
        if x.ref.shape != x.policy.shape:
            raise _shape_error(where, "ref", x.ref.shape, x.policy.shape)
    if needs_kl:
        for name in ("kl_policy", "kl_ref"):
            v = getattr(x, name)
            if v is None:
                raise LossInputError(f"{where}: needs `{name}` (summed log-probs of the mismatched KL pairs); got None")
            if v.shape != (b,):
                raise _shape_error(where, name, v.shape, (b,))
    _check_extras(where, x.extras, tuple(extras), {"B": (b,)})


def validate_ranked(where: str, x: RankedLogps) -> None:
    _check_logps(where, "policy", x.policy, 3)
    _check_mask(where, "mask", x.mask, x.policy.shape)
    if getattr(x.scores, "shape", None) != x.policy.shape[:2]:
        raise _shape_error(where, "scores", getattr(x.scores, "shape", None), x.policy.shape[:2])


# ---- per-sequence statistics -------------------------------------------------------------------


def f32(x: Array) -> Array:
    return jnp.asarray(x, jnp.float32)


def masked_sum(logps: Array, mask: Array) -> Array:
    """Sum over the last axis of the log-probs under the mask; values under padding never leak
    (even NaN or inf), because they are selected away rather than multiplied by zero."""
    return jnp.sum(jnp.where(mask, f32(logps), 0.0), axis=-1)


def lengths(mask: Array) -> Array:
    """Number of scored tokens per sequence, at least 1 (an empty completion averages to 0)."""
    return jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(jnp.float32)


def masked_mean(logps: Array, mask: Array) -> Array:
    return masked_sum(logps, mask) / lengths(mask)


def example_valid(x: PairLogps | UnpairedLogps | RankedLogps) -> Array:
    """bool [B]: the examples that have completion tokens. An example whose masks are all False is padding
    (a fixed-shape batch's empty slot): batch means and batch statistics leave it out, and its loss is
    finite so a zero weight removes it."""
    if isinstance(x, PairLogps):
        return jnp.any(x.chosen_mask, -1) | jnp.any(x.rejected_mask, -1)
    if isinstance(x, RankedLogps):
        return jnp.any(x.mask, axis=(-1, -2))
    return jnp.any(x.mask, -1)


def batch_mean(values_B: Array, valid_B: Array) -> Array:
    """The mean over the valid examples (0 when there are none)."""
    return jnp.sum(jnp.where(valid_B, f32(values_B), 0.0)) / jnp.maximum(jnp.sum(valid_B), 1)


def ld_sums(logps_BxT: Array, mask_BxT: Array, shared_B: Array, alpha: float) -> Array:
    """LD-DPO: the first `shared_B` completion tokens count fully, the rest are scaled by alpha.
    Positions are counted within the completion (the mask's running count), as TRL does."""
    pos_BxT = jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1)
    head_BxT = mask_BxT & (pos_BxT <= shared_B[:, None])
    tail_BxT = mask_BxT & ~head_BxT
    return masked_sum(logps_BxT, head_BxT) + alpha * masked_sum(logps_BxT, tail_BxT)


def token_mean_nll(logps_BxT: Array, mask_BxT: Array, reduction: str) -> Array:
    """NLL per row: 'token' is the flat token mean over the whole batch (TRL's CrossEntropyLoss),
    broadcast to every row; 'sequence' is each row's own token mean."""
    if reduction == "token":
        total = jnp.sum(masked_sum(logps_BxT, mask_BxT))
        count = jnp.maximum(jnp.sum(mask_BxT), 1).astype(jnp.float32)
        return jnp.broadcast_to(-total / count, logps_BxT.shape[:1])
    return -masked_mean(logps_BxT, mask_BxT)


class PolicySums(NamedTuple):
    """Per-pair policy statistics (float32 [B]): summed log-probs and completion lengths."""

    pc: Array
    pr: Array
    len_c: Array
    len_r: Array

    @property
    def avg_c(self) -> Array:
        return self.pc / self.len_c

    @property
    def avg_r(self) -> Array:
        return self.pr / self.len_r


def policy_sums(x: PairLogps) -> PolicySums:
    return PolicySums(
        masked_sum(x.policy_chosen, x.chosen_mask),
        masked_sum(x.policy_rejected, x.rejected_mask),
        lengths(x.chosen_mask),
        lengths(x.rejected_mask),
    )


def reference_sums(x: PairLogps) -> tuple[Array, Array]:
    """Summed reference log-probs (chosen, rejected), never differentiated."""
    rc = masked_sum(x.ref_chosen, x.chosen_mask)
    rr = masked_sum(x.ref_rejected, x.rejected_mask)
    return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
