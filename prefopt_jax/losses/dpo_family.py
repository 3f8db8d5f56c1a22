"""The reference-based pairwise family of TRL's DPOTrainer (sigmoid, IPO, hinge, EXO, NCA, BCO-pair,
SPPO, AOT, APO, DiscoPOP, sigmoid_norm, robust), legacy cDPO, R-DPO and TDPO, with the modifiers
that apply across them: LD-DPO (`ld_alpha`), f-divergence scores and WPO weighting.

Every loss here sees `DPOTerms`: the (possibly LD-scaled) summed log-probs, lengths, log-ratios
`cw`/`cl`, and their f-divergence scores `sw`/`sl`. Rewards are β·cw and β·cl as in TRL."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from prefopt_jax.losses.inputs import (
    LossInputError,
    PairLogps,
    batch_mean,
    example_valid,
    f32,
    ld_sums,
    lengths,
    masked_mean,
    masked_sum,
)
from prefopt_jax.losses.primitives import (
    EXP_CLAMP,
    F_DIVERGENCES,
    f_divergence_score,
    reward_metrics,
    running_moments_init,
    running_moments_update,
    sg,
    smoothed_logistic,
)
from prefopt_jax.losses.registry import REQUIRED, Loss, LossOutput, all_of, in_range, one_of, paired_loss, positive

Array = jax.Array

TRL = "TRL DPOTrainer (trl 1.16 `_compute_loss`)"

# Modifiers every loss of the family accepts (TRL's names and defaults).
MODIFIERS = {
    "ld_alpha": None,  # LD-DPO: None = off; in [0, 1]
    "ld_on_reference": True,  # TRL 1.x scales the reference too; legacy TRL did not
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "use_weighting": False,  # WPO
    "wpo_clamp": False,  # legacy TRL clamped w_c·w_r at 1; TRL 1.x does not
}


class DPOTerms(NamedTuple):
    valid: Array  # bool [B]: not a padding slot
    pc: Array  # policy chosen summed log-prob [B] (LD-scaled when ld_alpha is set)
    pr: Array
    rc: Array  # reference chosen summed log-prob [B]
    rr: Array
    len_c: Array  # completion lengths [B], >= 1
    len_r: Array
    sw: Array  # f-divergence score of cw (= cw for reverse KL)
    sl: Array

    @property
    def cw(self) -> Array:
        return self.pc - self.rc

    @property
    def cl(self) -> Array:
        return self.pr - self.rr

    @property
    def delta(self) -> Array:
        return self.sw - self.sl


def dpo_terms(x: PairLogps, hp: dict) -> DPOTerms:
    if hp["ld_alpha"] is None:
        pc, pr = masked_sum(x.policy_chosen, x.chosen_mask), masked_sum(x.policy_rejected, x.rejected_mask)
        rc, rr = masked_sum(x.ref_chosen, x.chosen_mask), masked_sum(x.ref_rejected, x.rejected_mask)
    else:
        a = hp["ld_alpha"]
        shared = jnp.minimum(jnp.sum(x.chosen_mask, -1), jnp.sum(x.rejected_mask, -1))
        pc = ld_sums(x.policy_chosen, x.chosen_mask, shared, a)
        pr = ld_sums(x.policy_rejected, x.rejected_mask, shared, a)
        ra = a if hp["ld_on_reference"] else 1.0
        rc = ld_sums(x.ref_chosen, x.chosen_mask, shared, ra)
        rr = ld_sums(x.ref_rejected, x.rejected_mask, shared, ra)
    rc, rr = sg(rc), sg(rr)
    kind, coef = hp["f_divergence_type"], hp["f_alpha_divergence_coef"]
    return DPOTerms(
        example_valid(x),
        pc,
        pr,
        rc,
        rr,
        lengths(x.chosen_mask),
        lengths(x.rejected_mask),
        f_divergence_score(pc - rc, kind, coef),
        f_divergence_score(pr - rr, kind, coef),
    )


def wpo_weight(x: PairLogps, clamp: bool) -> Array:
    """WPO: w(yc)·w(yr), w(y) = exp(mean_t [log p(y_t) - log Σ_v p(v)²]), never differentiated."""
    w_c = jnp.exp(masked_mean(x.extras["wpo_aligned_chosen"], x.chosen_mask))
    w_r = jnp.exp(masked_mean(x.extras["wpo_aligned_rejected"], x.rejected_mask))
    w = w_c * w_r
    return sg(jnp.minimum(w, 1.0) if clamp else w)


def _check_modifiers(name: str, f_div: bool, wpo: bool) -> Callable[[dict], None]:
    def check(hp: dict) -> None:
        one_of("f_divergence_type", F_DIVERGENCES)(hp)
        if hp["f_divergence_type"] != "reverse_kl" and not f_div:
            raise LossInputError(
                f"loss {name!r}: f_divergence_type={hp['f_divergence_type']!r} is not defined for this loss "
                "(it uses the raw log-ratios); use 'reverse_kl'"
            )
        if hp["use_weighting"] and not wpo:
            raise LossInputError(f"loss {name!r}: WPO weighting (use_weighting=True) is not defined for this loss")
        if hp["ld_alpha"] is not None:
            in_range("ld_alpha", 0.0, 1.0, hi_open=False)(hp)

    return check


def _dpo_loss(
    name: str,
    core: Callable,
    *,
    defaults: dict,
    formula: str,
    source: str = TRL,
    check: Callable[[dict], None] | None = None,
    f_div: bool = False,
    wpo: bool = True,
    extras: tuple[str, ...] = (),
    aggregation: str = "sum",
    init_state: Callable | None = None,
    notes: str = "",
) -> Loss:
    """Register a member of the family. `core(terms, inputs, state, hp)` returns the per-pair loss
    [B], or a LossOutput when it has its own metrics or state."""

    def needed(hp: dict) -> tuple[str, ...]:
        return extras + (("wpo_aligned_chosen", "wpo_aligned_rejected") if hp["use_weighting"] else ())

    def compute(x: PairLogps, state, hp: dict) -> LossOutput:
        t = dpo_terms(x, hp)
        out = core(t, x, state, hp)
        if not isinstance(out, LossOutput):
            out = LossOutput(out, {}, None)
        loss = out.loss * wpo_weight(x, hp["wpo_clamp"]) if hp["use_weighting"] else out.loss
        beta = hp["beta"]
        metrics = {
            **reward_metrics(beta * t.cw, beta * t.cl, t.valid),
            "logps/chosen": batch_mean(sg(t.pc), t.valid),
            "logps/rejected": batch_mean(sg(t.pr), t.valid),
            **out.metrics,
        }
        return LossOutput(loss, metrics, out.state)

    checks = [_check_modifiers(name, f_div, wpo)] + ([check] if check else [])
    return paired_loss(
        name,
        compute,
        defaults={**defaults, **MODIFIERS},
        needs_reference=True,
        formula=formula,
        source=source,
        aggregation=aggregation,
        extras=needed,
        check=all_of(*checks),
        init_state=init_state,
        notes=notes,
    )


_log_sigmoid = jax.nn.log_sigmoid

_dpo_loss(
    "dpo",
    lambda t, x, s, hp: -_log_sigmoid(hp["beta"] * t.delta),
    defaults={"beta": 0.1},
    formula="−logσ(β·Δ), Δ = (pc−rc) − (pr−rr)",
    f_div=True,
    notes="TRL `sigmoid`. Rafailov et al. 2023 (arXiv 2305.18290).",
)

_dpo_loss(
    "cdpo",
    lambda t, x, s, hp: smoothed_logistic(hp["beta"] * t.delta, hp["label_smoothing"]),
    defaults={"beta": 0.1, "label_smoothing": 0.2},
    formula="−(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)",
    source="TRL ≤ 0.28 `sigmoid` with label_smoothing; ε default from HALOs config/loss/cdpo.yaml",
    check=in_range("label_smoothing", 0.0, 1.0),
    f_div=True,
    notes="Conservative DPO (Mitchell 2023). ε = 0 is DPO.",
)

_dpo_loss(
    "robust",
    lambda t, x, s, hp: (
        (
            -(1 - hp["label_smoothing"]) * _log_sigmoid(hp["beta"] * t.delta)
            + hp["label_smoothing"] * _log_sigmoid(-hp["beta"] * t.delta)
        )
        / (1 - 2 * hp["label_smoothing"])
    ),
    defaults={"beta": 0.1, "label_smoothing": 0.1},
    formula="[−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)] / (1−2ε)",
    check=in_range("label_smoothing", 0.0, 0.5),
    f_div=True,
    notes="Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409); ε = 0.1 is the paper's setting.",
)


def _ipo(t: DPOTerms, x, s, hp) -> Array:
    if hp["length_normalize"]:
        d = t.sw / t.len_c - t.sl / t.len_r
    else:
        d = t.delta
    return (d - 1.0 / (2.0 * hp["beta"])) ** 2


_dpo_loss(
    "ipo",
    _ipo,
    defaults={"beta": 0.1, "length_normalize": True},
    formula="(cw/Lc − cl/Lr − 1/(2β))²",
    aggregation="avg (length_normalize=True, TRL) or sum",
    f_div=True,
    notes="IPO (Azar et al. 2023, arXiv 2310.12036). TRL divides each log-ratio by its length "
    "(confirmed with the authors); length_normalize=False uses the summed log-ratios.",
)

_dpo_loss(
    "hinge",
    lambda t, x, s, hp: jax.nn.relu(1.0 - hp["beta"] * t.delta),
    defaults={"beta": 0.1},
    formula="max(0, 1 − β·Δ)",
    f_div=True,
    notes="RSO hinge-norm (Liu et al. 2023, arXiv 2309.06657); β is the reciprocal margin (RSO: 0.05).",
)


def _exo(t: DPOTerms, x, s, hp) -> Array:
    z, eps = hp["beta"] * t.delta, hp["label_smoothing"]
    return jax.nn.sigmoid(z) * (_log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        _log_sigmoid(-z) - jnp.log(eps)
    )


_dpo_loss(
    "exo_pair",
    _exo,
    defaults={"beta": 0.1, "label_smoothing": 1e-3},
    formula="σ(z)(logσ(z) − log(1−ε)) + σ(−z)(logσ(−z) − log ε), z = βΔ",
    check=in_range("label_smoothing", 0.0, 1.0, lo_open=True),
    f_div=True,
    notes="EXO pairwise (Ji et al. 2024, arXiv 2402.00856, Eq. 16): KL(q‖p_ε) ≥ 0.",
)

_dpo_loss(
    "nca_pair",
    lambda t, x, s, hp: (
        -_log_sigmoid(hp["beta"] * t.cw)
        - 0.5 * _log_sigmoid(-hp["beta"] * t.cw)
        - 0.5 * _log_sigmoid(-hp["beta"] * t.cl)
    ),
    defaults={"beta": 0.1},
    formula="−logσ(β·cw) − ½·logσ(−β·cw) − ½·logσ(−β·cl)",
    notes="NCA (Chen et al. 2024, arXiv 2402.05369); paper β = 0.01.",
)


def _bco_pair(t: DPOTerms, x, state, hp) -> LossOutput:
    rw, rl = hp["beta"] * t.cw, hp["beta"] * t.cl
    if not hp["running_shift"]:
        return LossOutput(-_log_sigmoid(rw) - _log_sigmoid(-rl), {}, state)
    if hp["update_state"]:
        state = running_moments_update(state, sg(batch_mean((rw + rl) / 2.0, t.valid))[None], jnp.any(t.valid)[None])
    delta = sg(state["mean"])
    return LossOutput(-_log_sigmoid(rw - delta) - _log_sigmoid(-(rl - delta)), {"delta": delta}, state)


_dpo_loss(
    "bco_pair",
    _bco_pair,
    defaults={"beta": 0.1, "running_shift": False, "update_state": True},
    formula="−logσ(β·cw − δ) − logσ(−(β·cl − δ)); δ = 0 (TRL 1.x) or a running reward mean (legacy)",
    init_state=running_moments_init,
    notes="BCO pairwise (Jung et al. 2024, arXiv 2404.04656); paper β = 0.01. running_shift=True is "
    "TRL ≤ 0.28: δ is the running mean of mean(β·cw, β·cl), updated before use (state).",
)

_dpo_loss(
    "sppo_hard",
    lambda t, x, s, hp: (t.cw - 0.5 / hp["beta"]) ** 2 + (t.cl + 0.5 / hp["beta"]) ** 2,
    defaults={"beta": 0.1},
    formula="(cw − 1/(2β))² + (cl + 1/(2β))²",
    notes="SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675); paper β = 1e-3.",
)


def _sorted_gap(a: Array, b: Array, valid: Array) -> Array:
    """sort(a) − sort(b) over the valid examples, padding sorted last and given a gap of 0."""
    last = lambda v: jnp.sort(jnp.where(valid, v, jnp.inf))
    ranked_valid = jnp.arange(valid.shape[0]) < jnp.sum(valid)
    return jnp.where(ranked_valid, last(a) - last(b), 0.0)


def _aot(t: DPOTerms, x, s, hp) -> Array:
    d = _sorted_gap(t.pc - t.pr, t.rc - t.rr, t.valid)
    return smoothed_logistic(hp["beta"] * d, hp["label_smoothing"])


def _aot_unpaired(t: DPOTerms, x, s, hp) -> Array:
    d = _sorted_gap(t.cw, t.cl, t.valid)
    return smoothed_logistic(hp["beta"] * d, hp["label_smoothing"])


_AOT_NOTE = (
    "AOT (Melnyk et al. 2024, arXiv 2406.05882); paper β = 0.01. Sorting couples the batch: under jit it "
    "sorts the whole global batch, where TRL sorts each device's batch. The loss is indexed by rank: padding "
    "examples sort last and get the last losses, which are those of a zero gap."
)
_dpo_loss(
    "aot",
    _aot,
    defaults={"beta": 0.1, "label_smoothing": 0.0},
    formula="smoothed −logσ(β·δ), δ = sort(pc−pr) − sort(rc−rr) over the batch",
    check=in_range("label_smoothing", 0.0, 1.0),
    wpo=False,
    notes=_AOT_NOTE,
)
_dpo_loss(
    "aot_unpaired",
    _aot_unpaired,
    defaults={"beta": 0.1, "label_smoothing": 0.0},
    formula="smoothed −logσ(β·δ), δ = sort(cw) − sort(cl) over the batch",
    check=in_range("label_smoothing", 0.0, 1.0),
    wpo=False,
    notes=_AOT_NOTE,
)

_dpo_loss(
    "apo_zero",
    lambda t, x, s, hp: (1.0 - jax.nn.sigmoid(hp["beta"] * t.cw)) + jax.nn.sigmoid(hp["beta"] * t.cl),
    defaults={"beta": 0.1},
    formula="(1 − σ(β·cw)) + σ(β·cl)",
    notes="APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266): chosen better than the model's outputs.",
)
_dpo_loss(
    "apo_down",
    lambda t, x, s, hp: jax.nn.sigmoid(hp["beta"] * t.cw) + (1.0 - jax.nn.sigmoid(hp["beta"] * (t.cw - t.cl))),
    defaults={"beta": 0.1},
    formula="σ(β·cw) + (1 − σ(β·(cw − cl)))",
    notes="APO-down (arXiv 2408.06266): chosen worse than the model's outputs.",
)


def _discopop(t: DPOTerms, x, s, hp) -> Array:
    z = hp["beta"] * t.delta
    mix = jax.nn.sigmoid(z / hp["discopop_tau"])
    return (1.0 - mix) * -_log_sigmoid(z) + mix * jnp.exp(jnp.minimum(-z, EXP_CLAMP))


_dpo_loss(
    "discopop",
    _discopop,
    defaults={"beta": 0.1, "discopop_tau": 0.05},
    formula="(1 − m)·(−logσ(z)) + m·e^(−z), z = βΔ, m = σ(z/τ)",
    check=positive("discopop_tau"),
    f_div=True,
    notes="DiscoPOP / LRML (Chris Lu et al. 2024, arXiv 2406.08414); paper β = 0.05. e^(−z) is clamped at e^80.",
)

_dpo_loss(
    "sigmoid_norm",
    lambda t, x, s, hp: -_log_sigmoid(hp["beta"] * (t.sw / t.len_c - t.sl / t.len_r)),
    defaults={"beta": 0.1},
    formula="−logσ(β·(cw/Lc − cl/Lr))",
    aggregation="avg",
    f_div=True,
    notes="Length-normalised DPO (SimPO App. I, Tülu 3).",
)

_dpo_loss(
    "r_dpo",
    lambda t, x, s, hp: -_log_sigmoid(hp["beta"] * t.delta + hp["alpha"] * (t.len_c - t.len_r)),
    defaults={"beta": 0.1, "alpha": REQUIRED},
    formula="−logσ(β·Δ + α·(Lc − Lr))",
    f_div=True,
    notes="R-DPO (Park et al. 2024, arXiv 2403.19159). Not in TRL. The sign follows from r = β·log π/π_ref "
    "+ α|y|; the paper's α values are unverified, so α has no default (α = 0 is DPO).",
)


def _tdpo(t: DPOTerms, x: PairLogps, s, hp) -> LossOutput:
    kc, kr = f32(x.extras["seq_kl_chosen"]), f32(x.extras["seq_kl_rejected"])
    if hp["tdpo2"]:
        logits = t.delta - hp["alpha"] * (kr - sg(kc))
    else:
        logits = t.delta - (kr - kc)
    beta = hp["beta"]
    metrics = {
        **reward_metrics(beta * (t.cw + kc), beta * (t.cl + kr), t.valid),
        "kl/chosen": batch_mean(sg(kc), t.valid),
        "kl/rejected": batch_mean(sg(kr), t.valid),
    }
    return LossOutput(-_log_sigmoid(beta * logits), metrics, None)


_dpo_loss(
    "tdpo",
    _tdpo,
    defaults={"beta": 0.1, "alpha": 0.5, "tdpo2": False},
    formula="−logσ(β·(Δ − (KLr − KLc))) [TDPO1]; −logσ(β·(Δ − α·(KLr − sg(KLc)))) [TDPO2]",
    source="Vance0124/Token-level-Direct-Preference-Optimization@2a736ec `tdpo_loss`",
    f_div=True,
    extras=("seq_kl_chosen", "seq_kl_rejected"),
    notes="TDPO (Zeng et al. 2024, arXiv 2404.11999). KL = Σ_t KL(π_ref‖π_θ) over the completion; "
    "rewards β(cw + KLc), β(cl + KLr). Defaults from config/loss/tdpo.yaml (TDPO1).",
)
