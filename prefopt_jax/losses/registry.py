"""The loss registry: each loss is a `Loss` (a callable with its declared needs and docs), looked up
by name. Weighted combinations of registered losses are losses too."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from prefopt_jax.kinds import InputKind
from prefopt_jax.losses.inputs import LossInputError, batch_mean, example_valid, validate_pair


class LossOutput(NamedTuple):
    """`loss`: per-example loss [B] (the scalar objective is its mean); `metrics`: scalars named as
    TRL names them; `state`: the updated state of a stateful loss, else None."""

    loss: Any
    metrics: dict
    state: Any = None


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED = _Required()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Loss:
    """A registered loss. Call it as `loss(inputs, state=None, **hyperparameters)`.

    `compute(inputs, state, hp)` does the maths on validated inputs; `validate(inputs, hp)` checks
    them; `check(hp)` checks hyperparameter ranges; `extras(hp)` names the extra inputs needed.
    """

    name: str
    kind: InputKind  # what its inputs are (`InputKind.reads`: every loss also trains on pairs)
    compute: Callable[[Any, Any, dict], LossOutput]
    validate: Callable[[Any, dict], None]
    defaults: Mapping[str, Any]
    needs_reference: bool
    formula: str
    source: str
    aggregation: str
    extras: Callable[[dict], tuple[str, ...]] = lambda hp: ()
    check: Callable[[dict], None] = lambda hp: None
    init_state: Callable[[], Any] | None = None
    notes: str = ""
    needs_kl: bool = False  # unpaired: the mismatched (prompt, other completion) pairs' log-probs

    @property
    def stateful(self) -> bool:
        return self.init_state is not None

    def hyperparameters(self, **overrides: Any) -> dict:
        """Defaults merged with overrides; unknown names and missing required ones are errors."""
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise LossInputError(
                f"loss {self.name!r}: unknown hyperparameter(s) {unknown}; valid: {sorted(self.defaults)}"
            )
        hp = {**self.defaults, **overrides}
        missing = sorted(k for k, v in hp.items() if v is REQUIRED)
        if missing:
            raise LossInputError(f"loss {self.name!r}: hyperparameter(s) {missing} must be given (no default)")
        self.check(hp)
        return hp

    def evaluation(self, hp: dict) -> dict:
        """`hp` for held-out evaluation: `training=False` where the loss has that switch, so a stateful
        loss reads its statistics without moving them (AlphaDPO still moves them with `update_in_eval`)."""
        return {**hp, "training": False} if "training" in self.defaults else hp

    def required_extras(self, **overrides: Any) -> tuple[str, ...]:
        return self.extras(self.hyperparameters(**overrides))

    def __call__(self, inputs: Any, *, state: Any = None, **overrides: Any) -> LossOutput:
        hp = self.hyperparameters(**overrides)
        self.validate(inputs, hp)
        if self.stateful and state is None:
            state = self.init_state()
        return self.compute(inputs, state, hp)


_REGISTRY: dict[str, Loss] = {}


def register(loss: Loss) -> Loss:
    if loss.name in _REGISTRY:
        raise ValueError(f"loss {loss.name!r} is registered twice")
    _REGISTRY[loss.name] = loss
    return loss


def names() -> list[str]:
    """Registered loss names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> Loss:
    """The registered loss `name`, called as `loss(inputs, state=None, **hyperparameters)`.

    >>> import jax.numpy as jnp
    >>> from prefopt_jax import losses
    >>> x = losses.PairLogps(  # one pair, two completion tokens each; the policy's chosen up 0.5 nat
    ...     policy_chosen=jnp.array([[-1.0, -2.0]]), policy_rejected=jnp.array([[-1.5, -2.5]]),
    ...     chosen_mask=jnp.array([[True, True]]), rejected_mask=jnp.array([[True, True]]),
    ...     ref_chosen=jnp.array([[-1.5, -2.0]]), ref_rejected=jnp.array([[-1.5, -2.5]]),
    ... )
    >>> out = losses.get("dpo")(x, beta=0.1)  # -log sigmoid(0.1 * 0.5) = log(1 + e^-0.05)
    >>> round(float(out.loss[0]), 4), round(float(out.metrics["rewards/margins"]), 4)
    (0.6685, 0.05)
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LossInputError(f"unknown loss {name!r}; registered losses: {', '.join(_REGISTRY)}") from None


# ---- hyperparameter checks shared by several losses ------------------------------------------------


def positive(*keys: str) -> Callable[[dict], None]:
    def check(hp: dict) -> None:
        for k in keys:
            if _is_number(hp[k]) and not hp[k] > 0:
                raise LossInputError(f"hyperparameter {k}={hp[k]!r} must be > 0")

    return check


def in_range(key: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = True):
    def check(hp: dict) -> None:
        v = hp[key]
        if not _is_number(v):
            return
        bad = (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi)
        if bad:
            lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
            raise LossInputError(f"hyperparameter {key}={v!r} must lie in {lb}{lo}, {hi}{rb}")

    return check


def one_of(key: str, choices: Sequence[Any]) -> Callable[[dict], None]:
    def check(hp: dict) -> None:
        if hp[key] not in choices:
            raise LossInputError(f"hyperparameter {key}={hp[key]!r} must be one of {list(choices)}")

    return check


def all_of(*checks: Callable[[dict], None]) -> Callable[[dict], None]:
    def check(hp: dict) -> None:
        for c in checks:
            c(hp)

    return check


# ---- weighted combinations -------------------------------------------------------------------------


def combine(terms: Sequence[tuple]) -> Loss:
    """A weighted sum of registered losses, e.g. RPO `[("dpo", 1.0), ("sft", 1.0)]` or MPO
    `[("dpo", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]`. A term is `(name, weight)` or
    `(name, weight, {hyperparameters})`; the hyperparameters are bound here, so the result is called
    as `loss(inputs, state=...)`. Metrics: the first term's names win; each term's mean loss is
    logged as `loss/<name>`. State is a dict keyed by the stateful terms' names.

    >>> import jax.numpy as jnp
    >>> from prefopt_jax import losses
    >>> x = losses.PairLogps(
    ...     policy_chosen=jnp.array([[-1.0, -2.0]]), policy_rejected=jnp.array([[-1.5, -2.5]]),
    ...     chosen_mask=jnp.array([[True, True]]), rejected_mask=jnp.array([[True, True]]),
    ...     ref_chosen=jnp.array([[-1.5, -2.0]]), ref_rejected=jnp.array([[-1.5, -2.5]]),
    ... )
    >>> rpo = losses.combine([("dpo", 1.0, {"beta": 0.1}), ("sft", 1.0)])
    >>> out = rpo(x)  # DPO's log(1 + e^-0.05) plus the chosen tokens' mean NLL, (1 + 2) / 2
    >>> round(float(out.loss[0]), 4), float(out.metrics["loss/sft"])
    (2.1685, 1.5)
    """
    # over 60 lines with its runnable example; the code itself is ~45
    if not terms:
        raise LossInputError("combine: needs at least one (name, weight) term")
    parts = []
    for t in terms:
        if not isinstance(t, (tuple, list)) or len(t) not in (2, 3):
            raise LossInputError(f"combine: each term is (name, weight[, hyperparameters]); got {t!r}")
        name, weight, hp = t[0], t[1], (t[2] if len(t) == 3 else {})
        loss = get(name)
        parts.append((loss, float(weight), loss.hyperparameters(**hp)))
    seen = [p[0].name for p in parts]
    if len(set(seen)) != len(seen):
        raise LossInputError(f"combine: a loss appears twice in {seen}")
    kinds = {p[0].kind for p in parts}
    if len(kinds) > 1:
        raise LossInputError(f"combine: cannot mix input kinds {sorted(k.value for k in kinds)}")

    def validate(inputs: Any, hp: dict) -> None:
        for loss, _, lhp in parts:
            loss.validate(inputs, lhp)

    def compute(inputs: Any, state: Any, hp: dict) -> LossOutput:
        total, metrics, new_state = 0.0, {}, {}
        for loss, weight, lhp in parts:
            if "training" in lhp:  # the mixture's evaluation mode reaches its members
                lhp = {**lhp, "training": lhp["training"] and hp["training"]}
            sub_state = state.get(loss.name) if (loss.stateful and state is not None) else None
            if loss.stateful and sub_state is None:
                sub_state = loss.init_state()
            out = loss.compute(inputs, sub_state, lhp)
            total = total + weight * out.loss
            for k, v in out.metrics.items():
                metrics.setdefault(k, v)
            metrics[f"loss/{loss.name}"] = batch_mean(out.loss, example_valid(inputs))
            if loss.stateful:
                new_state[loss.name] = out.state
        return LossOutput(total, metrics, new_state or None)

    stateful = [p[0] for p in parts if p[0].stateful]
    return Loss(
        name="+".join(f"{w:g}*{loss.name}" for loss, w, _ in parts),
        kind=parts[0][0].kind,
        compute=compute,
        validate=validate,
        defaults={"training": True} if any("training" in lhp for _, _, lhp in parts) else {},
        needs_reference=any(p[0].needs_reference for p in parts),
        formula=" + ".join(f"{w:g}·L_{loss.name}" for loss, w, _ in parts),
        source="weighted combination",
        aggregation="per term",
        extras=lambda hp: tuple(dict.fromkeys(e for loss, _, lhp in parts for e in loss.extras(lhp))),
        init_state=(lambda: {s.name: s.init_state() for s in stateful}) if stateful else None,
    )


def paired_loss(
    name: str,
    compute: Callable[[Any, Any, dict], LossOutput],
    *,
    defaults: dict,
    needs_reference: bool,
    formula: str,
    source: str,
    aggregation: str,
    extras: Callable[[dict], tuple[str, ...]] = lambda hp: (),
    check: Callable[[dict], None] | None = None,
    init_state: Callable[[], Any] | None = None,
    notes: str = "",
) -> Loss:
    """Register a loss over `PairLogps`: validation of the pair and of the declared extras is shared."""

    def validate(x: Any, hp: dict) -> None:
        validate_pair(f"loss {name!r}", x, needs_reference=needs_reference, extras=extras(hp))

    return register(
        Loss(
            name=name,
            kind=InputKind.PAIRS,
            compute=compute,
            validate=validate,
            defaults=defaults,
            needs_reference=needs_reference,
            formula=formula,
            source=source,
            aggregation=aggregation,
            extras=extras,
            check=all_of(positive("beta"), *([check] if check else [])) if "beta" in defaults else (check or _no_check),
            init_state=init_state,
            notes=notes,
        )
    )


def _no_check(hp: dict) -> None:
    return None
