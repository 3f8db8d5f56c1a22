"""Pairwise losses that need no reference model: SFT/NLL, SimPO, CPO (with AlphaPO rewards), ORPO,
the original SLiC-HF, and RRHF (pairwise or k-candidate ranking)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefopt_jax.kinds import InputKind
from prefopt_jax.losses.inputs import (
    LossInputError,
    PairLogps,
    RankedLogps,
    batch_mean,
    example_valid,
    f32,
    lengths,
    masked_sum,
    policy_sums,
    token_mean_nll,
    validate_pair,
    validate_ranked,
)
from prefopt_jax.losses.primitives import log1mexp, reward_metrics, sg, smoothed_logistic
from prefopt_jax.losses.registry import (
    Loss,
    LossOutput,
    all_of,
    in_range,
    one_of,
    paired_loss,
    positive,
    register,
)

Array = jax.Array
NLL_REDUCTIONS = ("token", "sequence")
_log_sigmoid = jax.nn.log_sigmoid


def _sft(x: PairLogps, state, hp: dict) -> LossOutput:
    nll = token_mean_nll(x.policy_chosen, x.chosen_mask, hp["nll_reduction"])
    return LossOutput(nll, {"nll_loss": batch_mean(sg(nll), example_valid(x))}, None)


paired_loss(
    "sft",
    _sft,
    defaults={"nll_reduction": "token"},
    needs_reference=False,
    formula="−Σ_b pc_b / Σ_b Lc_b (token mean over the batch's chosen completions)",
    source="TRL DPOTrainer `sft` loss type",
    aggregation="token mean",
    check=one_of("nll_reduction", NLL_REDUCTIONS),
    notes="Combine with a preference loss for RPO (`[('dpo', 1), ('sft', α)]`) or MPO. "
    "nll_reduction='sequence' averages each row's own token mean instead.",
)


def _simpo(x: PairLogps, state, hp: dict) -> LossOutput:
    s = policy_sums(x)
    beta = hp["beta"]
    z = beta * (s.avg_c - s.avg_r - hp["gamma_beta_ratio"])
    loss = jax.nn.relu(1.0 - z) if hp["loss_variant"] == "hinge" else smoothed_logistic(z, hp["label_smoothing"])
    v = example_valid(x)
    metrics = {
        **reward_metrics(beta * s.avg_c, beta * s.avg_r, v),
        "logps/chosen": batch_mean(sg(s.avg_c), v),
        "logps/rejected": batch_mean(sg(s.avg_r), v),
    }
    return LossOutput(loss, metrics, None)


paired_loss(
    "simpo",
    _simpo,
    defaults={"beta": 2.0, "gamma_beta_ratio": 0.25, "label_smoothing": 0.0, "loss_variant": "sigmoid"},
    needs_reference=False,
    formula="−logσ(β·(pc/Lc − pr/Lr − γ/β)) (label-smoothed; or hinge max(0, 1 − z))",
    source="princeton-nlp/SimPO@1b3e8f3 `simpo_loss`",
    aggregation="avg",
    check=all_of(in_range("label_smoothing", 0.0, 1.0), one_of("loss_variant", ("sigmoid", "hinge"))),
    notes="SimPO (Meng et al. 2024, arXiv 2405.14734). Defaults from simpo_config.py; the README suggests "
    "starting at γ/β = 0.5. TRL's CPOTrainer(loss_type='simpo') takes the absolute γ (`simpo_gamma`).",
)


def _cpo(x: PairLogps, state, hp: dict) -> LossOutput:
    s = policy_sums(x)
    beta, variant, a = hp["beta"], hp["loss_variant"], hp["alpha"]
    lc, lr = (s.avg_c, s.avg_r) if variant in ("ipo", "simpo") else (s.pc, s.pr)
    if a != 0.0:  # AlphaPO reward (1 - p^-a)/a with p = exp(logp)
        lc, lr = (1.0 - jnp.exp(-a * lc)) / a, (1.0 - jnp.exp(-a * lr)) / a
    logits = lc - lr
    if variant == "simpo":
        loss = smoothed_logistic(beta * (logits - hp["simpo_gamma"] / beta), hp["label_smoothing"])
    elif variant == "sigmoid":
        loss = smoothed_logistic(beta * logits, hp["label_smoothing"])
    elif variant == "hinge":
        loss = jax.nn.relu(1.0 - beta * logits)
    else:  # ipo
        loss = (logits - 1.0 / (2.0 * beta)) ** 2
    v = example_valid(x)
    metrics = {
        **reward_metrics(beta * lc, beta * lr, v),
        "logps/chosen": batch_mean(sg(s.avg_c if variant in ("ipo", "simpo") else s.pc), v),
        "logps/rejected": batch_mean(sg(s.avg_r if variant in ("ipo", "simpo") else s.pr), v),
    }
    if hp["cpo_alpha"] != 0.0:
        nll = token_mean_nll(x.policy_chosen, x.chosen_mask, hp["nll_reduction"])
        loss = loss + hp["cpo_alpha"] * nll
        metrics["nll_loss"] = batch_mean(sg(nll), v)
    return LossOutput(loss, metrics, None)


paired_loss(
    "cpo",
    _cpo,
    defaults={
        "beta": 0.1,
        "cpo_alpha": 1.0,
        "label_smoothing": 0.0,
        "loss_variant": "sigmoid",
        "simpo_gamma": 0.5,
        "alpha": 0.0,
        "nll_reduction": "token",
    },
    needs_reference=False,
    formula="−logσ(β·(pc − pr)) + cpo_alpha·NLL(chosen); AlphaPO: rewards (1 − p^−α)/α",
    source="TRL experimental/cpo `cpo_loss` (trl 1.16)",
    aggregation="sum (avg for loss_variant ipo/simpo)",
    check=all_of(
        in_range("label_smoothing", 0.0, 1.0),
        one_of("loss_variant", ("sigmoid", "hinge", "ipo", "simpo")),
        one_of("nll_reduction", NLL_REDUCTIONS),
    ),
    notes="CPO (Xu et al. 2024, arXiv 2401.08417). AlphaPO (arXiv 2501.03884) is loss_variant='simpo', "
    "cpo_alpha=0, alpha≠0 (paper, Mistral-Instruct: α=0.25, β=2.5, γ=0.1).",
)


def _orpo(x: PairLogps, state, hp: dict) -> LossOutput:
    s = policy_sums(x)
    a, b = s.avg_c, s.avg_r
    log_odds = (a - b) - (log1mexp(a) - log1mexp(b))
    ratio = _log_sigmoid(log_odds)
    if hp["nll_over_prompt"]:
        nll = token_mean_nll(x.extras["full_chosen"], x.extras["full_chosen_mask"], hp["nll_reduction"])
    else:
        nll = token_mean_nll(x.policy_chosen, x.chosen_mask, hp["nll_reduction"])
    beta, v = hp["beta"], example_valid(x)
    metrics = {
        **reward_metrics(beta * a, beta * b, v),
        "logps/chosen": batch_mean(sg(a), v),
        "logps/rejected": batch_mean(sg(b), v),
        "nll_loss": batch_mean(sg(nll), v),
        "log_odds_ratio": batch_mean(sg(ratio), v),
        "log_odds_chosen": batch_mean(sg(log_odds), v),
    }
    return LossOutput(nll - beta * ratio, metrics, None)


paired_loss(
    "orpo",
    _orpo,
    defaults={"beta": 0.1, "nll_over_prompt": True, "nll_reduction": "token"},
    needs_reference=False,
    formula="NLL − β·logσ(log odds(pc/Lc) − log odds(pr/Lr)), odds(a) = e^a/(1 − e^a)",
    source="TRL experimental/orpo `odds_ratio_loss` (trl 1.16)",
    aggregation="avg (NLL: token mean)",
    extras=lambda hp: ("full_chosen", "full_chosen_mask") if hp["nll_over_prompt"] else (),
    check=one_of("nll_reduction", NLL_REDUCTIONS),
    notes="ORPO (Hong et al. 2024, arXiv 2403.07691); β is λ. TRL's NLL covers prompt + chosen "
    "(nll_over_prompt=True, extras full_chosen/full_chosen_mask); False uses the chosen completion only.",
)


def _slic(x: PairLogps, state, hp: dict) -> LossOutput:
    s = policy_sums(x)
    loss = jax.nn.relu(hp["delta"] - s.pc + s.pr) - hp["lambda_coef"] * s.pc
    v = example_valid(x)
    metrics = {
        **reward_metrics(s.pc, s.pr, v),
        "logps/chosen": batch_mean(sg(s.pc), v),
        "logps/rejected": batch_mean(sg(s.pr), v),
    }
    return LossOutput(loss, metrics, None)


paired_loss(
    "slic_hf",
    _slic,
    defaults={"delta": 1.0, "lambda_coef": 0.1},
    needs_reference=False,
    formula="max(0, δ − pc + pr) − λ·pc",
    source="ContextualAI/HALOs@4831988 `SLiCTrainer`, config/loss/slic.yaml",
    aggregation="sum",
    check=all_of(positive("delta"), in_range("lambda_coef", 0.0, float("inf"))),
    notes="SLiC-HF (Zhao et al. 2023, arXiv 2305.10425): rank calibration + NLL regulariser on the chosen "
    "(y_ref) completion. Rewards are the summed policy log-probs. TRL's `hinge` is the RSO variant.",
)


# ---- RRHF ------------------------------------------------------------------------------------------


def _rrhf_scores(logps: Array, mask: Array, length_penalty: float) -> Array:
    return masked_sum(logps, mask) / lengths(mask) ** length_penalty


def _rrhf_ft(logps: Array, mask: Array, reduction: str) -> Array:
    """Fine-tune term on the best candidate: the completion's token mean, or (the author's code) the
    mean over the row's full padded length T, zeros included."""
    denom = lengths(mask) if reduction == "token" else jnp.float32(logps.shape[-1])
    return -masked_sum(logps, mask) / denom


def _rrhf(x: PairLogps | RankedLogps, state, hp: dict) -> LossOutput:
    w, lp, v = hp["rrhf_weight"], hp["length_penalty"], example_valid(x)
    if isinstance(x, PairLogps):
        s_c = _rrhf_scores(x.policy_chosen, x.chosen_mask, lp)
        s_r = _rrhf_scores(x.policy_rejected, x.rejected_mask, lp)
        rank = jax.nn.relu(s_r - s_c)
        ft = _rrhf_ft(x.policy_chosen, x.chosen_mask, hp["ft_reduction"])
        metrics = reward_metrics(s_c, s_r, v)
    else:
        s = _rrhf_scores(x.policy, x.mask, lp)  # [B,K]
        r = f32(x.scores)
        worse_BxKxK = r[:, :, None] < r[:, None, :]  # candidate i ranked below j
        rank = jnp.sum(jnp.where(worse_BxKxK, jax.nn.relu(s[:, :, None] - s[:, None, :]), 0.0), axis=(1, 2))
        best = jnp.argmax(r, axis=1)
        pick = jax.vmap(lambda a, i: a[i])
        ft = _rrhf_ft(pick(x.policy, best), pick(x.mask, best), hp["ft_reduction"])
        # ranking accuracy: of the candidate pairs the scores order, the share the model's s orders alike
        above = r[:, :, None] > r[:, None, :]
        pairs = jnp.sum(above, axis=(1, 2))
        agree = jnp.sum(above & (s[:, :, None] > s[:, None, :]), axis=(1, 2)) / jnp.maximum(pairs, 1)
        metrics = {
            "rrhf/best_score": batch_mean(sg(pick(s, best)), v),
            "rrhf/rank_accuracy": batch_mean(sg(agree), v & (pairs > 0)),  # rows with all scores tied say nothing
        }
    metrics = {**metrics, "rrhf/rank_loss": batch_mean(sg(rank), v), "rrhf/ft_loss": batch_mean(sg(ft), v)}
    return LossOutput(w * rank + ft, metrics, None)


def _rrhf_validate(x, hp: dict) -> None:
    if isinstance(x, RankedLogps):
        validate_ranked("loss 'rrhf'", x)
    elif isinstance(x, PairLogps):
        validate_pair("loss 'rrhf'", x, needs_reference=False, extras=())
    else:
        raise LossInputError(f"loss 'rrhf': expects PairLogps or RankedLogps, got {type(x).__name__}")


register(
    Loss(
        name="rrhf",
        kind=InputKind.RANKED,
        compute=_rrhf,
        validate=_rrhf_validate,
        defaults={"rrhf_weight": 1.0, "length_penalty": 1.0, "ft_reduction": "padded"},
        needs_reference=False,
        formula="w·Σ_{r_i<r_j} max(0, s_i − s_j) − mean_t log p(y_best), s = Σ log p / L^lp",
        source="GanjinZero/RRHF@e1a2b61 `RRHFTrainer` (train.py, train.sh)",
        aggregation="avg (L^length_penalty)",
        check=all_of(in_range("rrhf_weight", 0.0, float("inf")), one_of("ft_reduction", ("padded", "token"))),
        notes="RRHF (Yuan et al. 2023, arXiv 2304.05302). rrhf_weight 1 as in the released train.sh (the "
        "dataclass default is 100). ft_reduction='padded' is the author's code (mean over the full padded "
        "row, so it depends on padding); 'token' is the completion's token mean.",
    )
)
