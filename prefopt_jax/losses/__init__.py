"""Every preference loss as a pure function of per-token log-probs and masks.

    from prefopt_jax import losses
    out = losses.get("dpo")(losses.PairLogps(...), beta=0.1)   # LossOutput(loss=[B], metrics, state)

`names()` lists the registered losses; each `Loss` declares whether it needs a reference
(`needs_reference`) and which extra inputs (`required_extras(**hp)`); `combine` mixes them.
"""

# Importing the families registers them, in this order (the order of `names()`).
from prefopt_jax.losses import dpo_family as _dpo_family  # noqa: F401, I001
from prefopt_jax.losses import unpaired as _unpaired  # noqa: F401
from prefopt_jax.losses import reference_free as _reference_free  # noqa: F401
from prefopt_jax.losses import adaptive as _adaptive  # noqa: F401
from prefopt_jax.kinds import InputKind
from prefopt_jax.losses.inputs import EXTRAS, Extra, LossInputError, PairLogps, Provider, RankedLogps, UnpairedLogps
from prefopt_jax.losses.registry import REQUIRED, Loss, LossOutput, combine, get, names

__all__ = [
    "EXTRAS",
    "REQUIRED",
    "Extra",
    "InputKind",
    "Loss",
    "LossInputError",
    "LossOutput",
    "PairLogps",
    "Provider",
    "RankedLogps",
    "UnpairedLogps",
    "combine",
    "get",
    "names",
]
