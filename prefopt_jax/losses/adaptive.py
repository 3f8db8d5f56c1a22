"""The three adaptive-margin methods: MIPO (reference intervention modulated by the reference's own
average log-likelihood gap), AlphaDPO (adaptive margin from the policy/reference ratio, with running
standardisation) and RMiPO (margin modulated by response-level pointwise mutual information)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefopt_jax.losses.inputs import PairLogps, batch_mean, example_valid, f32, policy_sums, reference_sums
from prefopt_jax.losses.primitives import reward_metrics, sg, smoothed_logistic
from prefopt_jax.losses.registry import LossOutput, all_of, in_range, one_of, paired_loss

Array = jax.Array


def _mipo(x: PairLogps, state, hp: dict) -> LossOutput:
    s = policy_sums(x)
    rc, rr = reference_sums(x)
    ref_c, ref_r = rc / s.len_c, rr / s.len_r
    k = sg(ref_c - ref_r)
    f = s.avg_c - s.avg_r
    beta, v = hp["beta"], example_valid(x)
    metrics = {
        **reward_metrics(beta * (s.avg_c - ref_c), beta * (s.avg_r - ref_r), v),
        "logps/chosen": batch_mean(sg(s.pc), v),
        "logps/rejected": batch_mean(sg(s.pr), v),
        "logps/chosen_avg": batch_mean(sg(s.avg_c), v),
        "logps/rejected_avg": batch_mean(sg(s.avg_r), v),
        "mipo/K": batch_mean(k, v),
        "mipo/theta": batch_mean(sg(f), v),
    }
    return LossOutput(-jax.nn.log_sigmoid(beta * (f - jax.nn.softplus(k))), metrics, None)


paired_loss(
    "mipo",
    _mipo,
    defaults={"beta": 20.0},
    needs_reference=True,
    formula="−logσ(β·(pc/Lc − pr/Lr − softplus(K))), K = sg(rc/Lc − rr/Lr)",
    source="ncsoft/MIPO@7eff758 `MIPOTrainer.mipo_loss`",
    aggregation="avg",
    notes="MIPO (arXiv 2409.17545). β = 20 from configs/llama3/config.yaml (README: 5–25). The reference "
    "enters only through K. Rewards (β·avg log-ratio) are this library's choice; MIPO logs none.",
)


def alpha_dpo_init() -> dict:
    """AlphaDPO's running moments of the margin M: both start at 0, no bias correction."""
    return {"mu": jnp.zeros((), jnp.float32), "sigma": jnp.zeros((), jnp.float32)}


def _alpha_dpo(x: PairLogps, state: dict, hp: dict) -> LossOutput:
    s = policy_sums(x)
    rc, rr = reference_sums(x)
    ref_c, ref_r = rc / s.len_c, rr / s.len_r
    u = s.avg_c - s.avg_r
    m_gap = sg(u - (ref_c - ref_r))
    v = example_valid(x)
    if hp["training"] or hp["update_in_eval"]:
        mom = hp["momentum"]
        # unbiased std over the (global) batch's valid pairs; a single one has none, so it contributes 0
        n = jnp.sum(v)
        mean = batch_mean(m_gap, v)
        var = jnp.sum(jnp.where(v, (m_gap - mean) ** 2, 0.0)) / jnp.maximum(n - 1, 1)
        std = jnp.where(n > 1, jnp.sqrt(var), 0.0)
        state = {
            "mu": mom * state["mu"] + (1.0 - mom) * mean,
            "sigma": mom * state["sigma"] + (1.0 - mom) * std,
        }
    standardized = (m_gap - state["mu"]) / (state["sigma"] + hp["std_eps"])
    margin = sg(hp["gamma_beta_ratio"] + hp["alpha"] * standardized)
    beta, a = hp["beta"], hp["alpha"]
    metrics = {
        **reward_metrics(beta * (s.avg_c - a * (s.avg_c - ref_c)), beta * (s.avg_r - a * (s.avg_r - ref_r)), v),
        "logps/chosen": batch_mean(sg(s.avg_c), v),
        "logps/rejected": batch_mean(sg(s.avg_r), v),
        "logps/ref_chosen": batch_mean(ref_c, v),
        "logps/ref_rejected": batch_mean(ref_r, v),
        "alpha_dpo/margin": batch_mean(margin, v),
        "alpha_dpo/mu": state["mu"],
        "alpha_dpo/sigma": state["sigma"],
    }
    return LossOutput(smoothed_logistic(beta * (u - margin), hp["label_smoothing"]), metrics, state)


paired_loss(
    "alpha_dpo",
    _alpha_dpo,
    defaults={
        "beta": 2.0,
        "gamma_beta_ratio": 0.25,
        "alpha": 0.0,
        "label_smoothing": 0.0,
        "momentum": 0.9,
        "training": True,
        "update_in_eval": True,
        "std_eps": 1e-8,
    },
    needs_reference=True,
    formula="−logσ(β·(u − m)), u = pc/Lc − pr/Lr, m = sg(γ/β + α·(M − μ)/σ), M = u − (rc/Lc − rr/Lr)",
    source="junkangwu/alpha-DPO@fab3209 `AlphaDPOTrainer.dpo_loss`, `update_and_sync_ref_mean_std`",
    aggregation="avg",
    check=all_of(in_range("label_smoothing", 0.0, 1.0), in_range("momentum", 0.0, 1.0), in_range("std_eps", 0, 1)),
    init_state=alpha_dpo_init,
    notes="AlphaDPO (Wu et al., arXiv 2410.10148, ICML 2025). State (μ, σ): EMA of the global batch mean and "
    "unbiased std of M, updated before use; the authors' code updates it in eval too (update_in_eval=True; "
    "pass training=False in eval). std_eps guards σ = 0 (the original has no guard). α = 0 is SimPO. "
    "Defaults from simpo_config.py; per-model settings in LOSSES.md §2.2.",
)


def _rmipo(x: PairLogps, state, hp: dict) -> LossOutput:
    s = policy_sums(x)
    q_c, q_r = f32(x.extras["response_only_chosen_avg"]), f32(x.extras["response_only_rejected_avg"])
    u = s.avg_c - s.avg_r
    dpmi = sg((s.avg_c - q_c) - (s.avg_r - q_r))
    if hp["schedule"] == "exp":
        g_lo, g_hi = hp["gamma_min"], hp["gamma_max"]
        margin = g_lo + (g_hi - g_lo) * jnp.exp(-jnp.maximum(dpmi, 0.0))
    else:  # "tanh": the repository's earlier compiled build
        margin = hp["gamma_beta_ratio"] + 0.5 * jnp.tanh(dpmi)
    beta, v = hp["beta"], example_valid(x)
    metrics = {
        **reward_metrics(beta * s.avg_c, beta * s.avg_r, v),
        "logps/chosen": batch_mean(sg(s.avg_c), v),
        "logps/rejected": batch_mean(sg(s.avg_r), v),
        "rmipo/margin": batch_mean(margin, v),
        "rmipo/delta_pmi": batch_mean(dpmi, v),
    }
    return LossOutput(smoothed_logistic(beta * (u - margin), hp["label_smoothing"]), metrics, None)


paired_loss(
    "rmipo",
    _rmipo,
    defaults={
        "beta": 2.0,
        "gamma_min": 0.3,
        "gamma_max": 1.6,
        "label_smoothing": 0.0,
        "schedule": "exp",
        "gamma_beta_ratio": 0.5,
    },
    needs_reference=False,
    formula="−logσ(β·(u − m)), m = γmin + (γmax − γmin)·e^(−max(0, ΔPMI)), ΔPMI = sg((pc/Lc − q_c) − (pr/Lr − q_r))",
    source="liavonpenn/rmipo@d21db9b `scripts/rmipo_trainer.py` (`simpo_loss`, loss_type rmipo)",
    aggregation="avg",
    extras=lambda hp: ("response_only_chosen_avg", "response_only_rejected_avg"),
    check=all_of(in_range("label_smoothing", 0.0, 1.0), one_of("schedule", ("exp", "tanh"))),
    notes="RMiPO (arXiv 2604.24804, ACL 2026 Findings). q = the policy's average log-prob of the response "
    "alone (no prompt, no BOS; first token unscored), from a no-grad forward. schedule='tanh' "
    "(m = γ/β + 0.5·tanh ΔPMI) is the repository's earlier build; gamma_beta_ratio is used only there.",
)
