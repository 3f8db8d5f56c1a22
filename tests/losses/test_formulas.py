"""Every loss against the independent NumPy transcription (numpy_reference.py), hand-derived values,
and the limiting cases LOSSES.md states."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import losses
from prefopt_jax.losses.examples import as_pair_logps, random_pair_arrays
from tests.losses import numpy_reference as ref

B, TC, TR = 5, 7, 4


def random_pairs(seed=0, b=B, tc=TC, tr=TR):
    return random_pair_arrays(seed, b, tc, tr)


def as_pairs(*arrays, **extras):
    return as_pair_logps(*arrays, **extras)


def close(actual, expected, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


DPO_CASES = [
    ("dpo", {"beta": 0.1}, {}),
    ("cdpo", {"beta": 0.2, "label_smoothing": 0.3}, {"eps": 0.3}),
    ("robust", {"beta": 0.1, "label_smoothing": 0.2}, {"eps": 0.2}),
    ("ipo", {"beta": 0.5}, {}),
    ("hinge", {"beta": 0.3}, {}),
    ("exo_pair", {"beta": 0.1, "label_smoothing": 0.01}, {"eps": 0.01}),
    ("nca_pair", {"beta": 0.2}, {}),
    ("bco_pair", {"beta": 0.2}, {}),
    ("sppo_hard", {"beta": 0.5}, {}),
    ("aot", {"beta": 0.3, "label_smoothing": 0.1}, {"eps": 0.1}),
    ("aot_unpaired", {"beta": 0.3}, {}),
    ("apo_zero", {"beta": 0.1}, {}),
    ("apo_down", {"beta": 0.1}, {}),
    ("discopop", {"beta": 0.05, "discopop_tau": 0.1}, {"tau": 0.1}),
    ("sigmoid_norm", {"beta": 0.4}, {}),
    ("r_dpo", {"beta": 0.1, "alpha": 0.05}, {"alpha": 0.05}),
]


@pytest.mark.parametrize("name,hp,np_kw", DPO_CASES, ids=[c[0] for c in DPO_CASES])
def test_dpo_family_matches_numpy(name, hp, np_kw):
    arrays = random_pairs(1)
    s = ref.stats(*arrays)
    beta = hp.get("beta", 0.1)
    out = losses.get(name)(as_pairs(*arrays), **hp)
    close(out.loss, ref.dpo_family(name, s, beta=beta, **np_kw))
    close(out.metrics["rewards/margins"], np.mean(beta * ((s["pc"] - s["rc"]) - (s["pr"] - s["rr"]))))


def test_tdpo_both_variants_match_numpy():
    arrays = random_pairs(2)
    s = ref.stats(*arrays)
    kc, kr = np.array([0.5, 1.0, 0.1, 2.0, 0.3]), np.array([1.5, 0.2, 0.4, 0.0, 0.9])
    x = as_pairs(*arrays, seq_kl_chosen=kc, seq_kl_rejected=kr)
    close(losses.get("tdpo")(x).loss, ref.dpo_family("tdpo", s, kc=kc, kr=kr, alpha=1.0))
    close(losses.get("tdpo")(x, tdpo2=True, alpha=0.5).loss, ref.dpo_family("tdpo", s, kc=kc, kr=kr, alpha=0.5))


def test_reference_free_losses_match_numpy():
    arrays = random_pairs(3)
    s = ref.stats(*arrays)
    x = as_pairs(*arrays[:4])
    close(losses.get("sft")(x).loss, ref.sft(s))
    close(losses.get("simpo")(x, beta=2.5, gamma_beta_ratio=0.4, label_smoothing=0.1).loss, ref.simpo(s, 2.5, 0.4, 0.1))
    close(losses.get("cpo")(x, beta=0.2, cpo_alpha=0.7).loss, ref.cpo(s, 0.2, 0.7))
    close(losses.get("slic_hf")(x, delta=2.0, lambda_coef=0.3).loss, ref.slic_hf(s, 2.0, 0.3))
    close(losses.get("rrhf")(x, rrhf_weight=3.0, ft_reduction="token").loss, ref.rrhf_pair(s, 3.0))
    close(losses.get("rrhf")(x, ft_reduction="padded").loss, ref.rrhf_pair(s, 1.0, Tc=TC))
    orpo = losses.get("orpo")(x, beta=0.3, nll_over_prompt=False)
    close(orpo.loss, ref.orpo(s, 0.3))


def test_orpo_nll_over_prompt_uses_the_full_sequence():
    arrays = random_pairs(4)
    s = ref.stats(*arrays)
    full = -np.random.default_rng(4).uniform(0.1, 2.0, (B, 9))
    full_mask = np.ones((B, 9), bool)
    full_mask[:, -2:] = False
    x = as_pairs(*arrays[:4], full_chosen=full, full_chosen_mask=full_mask)
    nll = -full[:, :7].sum() / full_mask.sum()
    close(losses.get("orpo")(x).loss, ref.orpo(s) + s["pc"].sum() / s["Lc"].sum() + nll)


def test_adaptive_losses_match_numpy():
    arrays = random_pairs(5)
    s = ref.stats(*arrays)
    x = as_pairs(*arrays)
    close(losses.get("mipo")(x, beta=5.0).loss, ref.mipo(s, 5.0), rtol=1e-4)
    qc, qr = -np.linspace(0.5, 2.0, B), -np.linspace(1.5, 0.2, B)
    xr = as_pairs(*arrays[:4], response_only_chosen_avg=qc, response_only_rejected_avg=qr)
    close(losses.get("rmipo")(xr).loss, ref.rmipo(s, qc, qr))
    # AlphaDPO over two calls, the running moments carried in the state
    fn, state, mu, sigma = losses.get("alpha_dpo"), None, 0.0, 0.0
    for seed in (5, 6):
        arrays = random_pairs(seed)
        s = ref.stats(*arrays)
        out = fn(as_pairs(*arrays), state=state, beta=2.5, gamma_beta_ratio=0.6, alpha=0.2, std_eps=0.0)
        want, mu, sigma = ref.alpha_dpo(s, mu, sigma, 2.5, 0.6, 0.2)
        close(out.loss, want, rtol=1e-4)
        close(out.state["mu"], mu)
        close(out.state["sigma"], sigma)
        state = out.state


def test_unpaired_losses_match_numpy():
    rng = np.random.default_rng(7)
    pol = -rng.uniform(0.1, 2.0, (6, 5))
    rf = pol + rng.normal(0, 0.5, pol.shape)
    mask = rng.random((6, 5)) > 0.3
    mask[:, 0] = True
    label = np.array([1, 0, 1, 1, 0, 0], bool)
    klp, klr = -rng.uniform(5, 9, 6), -rng.uniform(5, 9, 6) - 1.0
    x = losses.UnpairedLogps(
        *(jnp.asarray(a) for a in (pol.astype(np.float32), mask, label)),
        jnp.asarray(rf, jnp.float32),
        jnp.asarray(klp, jnp.float32),
        jnp.asarray(klr, jnp.float32),
    )
    r = np.where(mask, pol, 0).sum(1) - np.where(mask, rf, 0).sum(1)
    close(losses.get("kto")(x, beta=0.2, undesirable_weight=1.3).loss, ref.kto(r, label, klp, klr, 0.2, 1.0, 1.3))
    want, mean = ref.bco(0.1 * r, label)
    out = losses.get("bco")(x)
    close(out.loss, want)
    close(out.metrics["delta"], mean)


# ---- hand-derived values ---------------------------------------------------------------------


def one_pair(cw, cl, lc=1, lr=1):
    """A single pair whose log-ratios are exactly cw and cl (reference log-probs 0)."""
    mc, mr = np.zeros((1, 4), bool), np.zeros((1, 4), bool)
    mc[0, :lc], mr[0, :lr] = True, True
    pc, pr = np.zeros((1, 4)), np.zeros((1, 4))
    pc[0, 0], pr[0, 0] = cw, cl
    return as_pairs(pc, pr, mc, mr, np.zeros((1, 4)), np.zeros((1, 4)))


def test_hand_derived_values():
    get = losses.get
    close(get("dpo")(one_pair(-1.0, -1.0)).loss, [math.log(2)])  # Δ = 0
    close(get("dpo")(one_pair(0.0, -20.0), beta=0.1).loss, [math.log1p(math.exp(-2.0))])
    close(get("ipo")(one_pair(5.0, 0.0), beta=0.1).loss, [0.0])  # Δ̄ equals the target 1/(2β) = 5
    close(get("ipo")(one_pair(4.0, 0.0, lc=2), beta=0.1).loss, [(2.0 - 5.0) ** 2])  # averaged over 2 tokens
    close(get("hinge")(one_pair(10.0, 0.0), beta=0.1).loss, [0.0])  # βΔ = 1: on the margin
    close(get("hinge")(one_pair(0.0, 0.0), beta=0.1).loss, [1.0])
    close(get("sppo_hard")(one_pair(5.0, -5.0), beta=0.1).loss, [0.0])
    close(get("apo_zero")(one_pair(0.0, 0.0)).loss, [1.0])  # (1 - ½) + ½
    close(get("exo_pair")(one_pair(0.0, 0.0), label_smoothing=0.5).loss, [0.0], atol=1e-7)  # q = p = ½
    # DiscoPOP at z = 0: mix ½ of log 2 and e^0
    close(get("discopop")(one_pair(0.0, 0.0)).loss, [0.5 * math.log(2) + 0.5])
    close(get("mipo")(one_pair(-1.0, -1.0), beta=1.0).loss, [math.log1p(math.exp(math.log(2)))])


def test_exo_is_a_kl_divergence_so_never_negative():
    arrays = random_pairs(8, b=64)
    out = losses.get("exo_pair")(as_pairs(*arrays), beta=1.0, label_smoothing=0.05)
    assert float(jnp.min(out.loss)) >= -1e-6


# ---- limiting cases ---------------------------------------------------------------------------


def test_limits_that_reduce_to_another_loss():
    arrays = random_pairs(9)
    x = as_pairs(*arrays)
    g = losses.get
    close(g("cdpo")(x, label_smoothing=0.0).loss, g("dpo")(x).loss)
    close(g("robust")(x, label_smoothing=0.0).loss, g("dpo")(x).loss)
    close(g("r_dpo")(x, alpha=0.0).loss, g("dpo")(x).loss)
    close(g("dpo")(x, ld_alpha=1.0).loss, g("dpo")(x).loss)
    close(g("dpo")(x, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0).loss, g("dpo")(x).loss)
    close(
        g("alpha_dpo")(x, alpha=0.0, beta=2.5, gamma_beta_ratio=0.3).loss,
        g("simpo")(x, beta=2.5, gamma_beta_ratio=0.3).loss,
    )
    close(
        g("cpo")(x, cpo_alpha=0.0, loss_variant="simpo", beta=2.0, simpo_gamma=0.5).loss,
        g("simpo")(x, beta=2.0, gamma_beta_ratio=0.25).loss,
    )


def test_mipo_with_very_negative_k_is_the_policy_only_term():
    pc, pr, mc, mr, _, _ = random_pairs(10)
    rc = np.where(mc, -500.0, 0.0)  # reference strongly prefers the rejected: K -> -inf
    rr = np.where(mr, -1e-3, 0.0)
    s = ref.stats(pc, pr, mc, mr)
    f = s["pc"] / s["Lc"] - s["pr"] / s["Lr"]
    close(losses.get("mipo")(as_pairs(pc, pr, mc, mr, rc, rr), beta=3.0).loss, -ref.logsig(3.0 * f), rtol=1e-5)


def test_rmipo_margin_bounds():
    arrays = random_pairs(11)
    q = np.full(B, -100.0)  # huge PMI for both, ΔPMI = u: margin between γmin and γmax
    out = losses.get("rmipo")(as_pairs(*arrays[:4], response_only_chosen_avg=q, response_only_rejected_avg=q))
    assert 0.3 <= float(out.metrics["rmipo/margin"]) <= 1.6
    qc, qr = np.full(B, 50.0), np.full(B, -50.0)  # ΔPMI very negative -> margin = γmax exactly
    out = losses.get("rmipo")(as_pairs(*arrays[:4], response_only_chosen_avg=qc, response_only_rejected_avg=qr))
    close(out.metrics["rmipo/margin"], 1.6)


def test_kto_with_an_empty_half():
    rng = np.random.default_rng(12)
    pol = jnp.asarray(-rng.uniform(0.1, 2, (4, 3)), jnp.float32)
    m = jnp.ones((4, 3), bool)
    zeros = jnp.zeros(4, jnp.float32)
    x = losses.UnpairedLogps(pol, m, jnp.ones(4, bool), pol * 0.9, zeros, zeros)
    out = losses.get("kto")(x)
    r = np.asarray(pol.sum(1) - (pol * 0.9).sum(1))
    close(out.loss, 1 - ref.sig(0.1 * r))
    assert np.isnan(out.metrics["rewards/rejected"]) and np.isfinite(out.metrics["rewards/chosen"])


def test_rrhf_ranked_with_two_candidates_equals_pairwise():
    pc, pr, mc, mr, _, _ = random_pairs(13, tc=5, tr=5)
    x = as_pairs(pc, pr, mc, mr)
    ranked = losses.RankedLogps(
        jnp.stack([x.policy_rejected, x.policy_chosen], 1),
        jnp.stack([x.rejected_mask, x.chosen_mask], 1),
        jnp.tile(jnp.array([[0.2, 0.9]]), (B, 1)),
    )
    close(losses.get("rrhf")(ranked, ft_reduction="token").loss, losses.get("rrhf")(x, ft_reduction="token").loss)


def test_rrhf_ranked_three_candidates_by_hand():
    # averages per candidate: -1, -2, -0.5; scores rank them 1 > 3 > 2 (index 0 best)
    policy = jnp.array([[[-1.0, -1.0], [-2.0, -2.0], [-0.5, -0.5]]])
    mask = jnp.ones((1, 3, 2), bool)
    scores = jnp.array([[3.0, 1.0, 2.0]])
    out = losses.get("rrhf")(losses.RankedLogps(policy, mask, scores), rrhf_weight=2.0, ft_reduction="token")
    # violations: cand 2 (score 2) beats cand 0 (score 3) in avg logp by 0.5; cand 1 is below both: fine
    close(out.loss, [2.0 * 0.5 + 1.0])


def test_combination_is_the_weighted_sum():
    arrays = random_pairs(14)
    x = as_pairs(*arrays)
    mixed = losses.combine([("dpo", 0.8), ("bco_pair", 0.2, {"beta": 0.3}), ("sft", 1.0)])
    want = 0.8 * losses.get("dpo")(x).loss + 0.2 * losses.get("bco_pair")(x, beta=0.3).loss + losses.get("sft")(x).loss
    out = mixed(x)
    close(out.loss, want)
    close(out.metrics["loss/sft"], float(jnp.mean(losses.get("sft")(x).loss)))
    assert mixed.needs_reference
