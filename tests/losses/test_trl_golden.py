"""prefopt_jax losses against values that TRL itself computed (see golden/make_trl_golden.py).

TRL's loss, its gradient with respect to the per-token log-probs, and its logged metrics are
compared for every loss TRL implements, with the modifiers (f-divergences, LD-DPO, WPO) and the
weighted combinations (RPO, MPO)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import losses

GOLDEN = json.loads((Path(__file__).parent / "golden" / "trl_golden.json").read_text())
BATCH = GOLDEN["batch"]


def _loss(case):
    name = case["loss"]
    if isinstance(name, list):
        return losses.combine([tuple(t) for t in name]), {}
    return losses.get(name), case["hp"]


def _pairs(src: dict, with_wpo: bool = False) -> losses.PairLogps:
    a = {k: jnp.asarray(np.asarray(v)) for k, v in src.items()}
    extras = {}
    if with_wpo:
        extras = {k: a[k] for k in ("wpo_aligned_chosen", "wpo_aligned_rejected")}
    if "full_chosen" in a:
        extras |= {"full_chosen": a["full_chosen"], "full_chosen_mask": a["full_chosen_mask"]}
    return losses.PairLogps(
        a["policy_chosen"],
        a["policy_rejected"],
        a["chosen_mask"],
        a["rejected_mask"],
        a.get("ref_chosen"),
        a.get("ref_rejected"),
        extras,
    )


def _cases(section, kind):
    return [pytest.param(c, id=c["name"]) for c in GOLDEN[section]["cases"] if c["kind"] == kind]


def _dpo_cases():
    return [c for c in _cases("current", "paired") if "inputs" not in c.values[0]]


@pytest.mark.parametrize("case", _dpo_cases())
def test_dpo_family_matches_trl(case):
    fn, hp = _loss(case)
    x = _pairs(BATCH, with_wpo=case["hp"].get("use_weighting", False))

    def mean_loss(pc, pr):
        out = fn(x._replace(policy_chosen=pc, policy_rejected=pr), **hp)
        return jnp.mean(out.loss), out.metrics

    (value, metrics), (g_c, g_r) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(
        x.policy_chosen, x.policy_rejected
    )
    trl = case["trl"]
    np.testing.assert_allclose(value, trl["loss"], rtol=2e-5, atol=1e-6)
    if "grad_chosen" in trl:
        np.testing.assert_allclose(g_c, trl["grad_chosen"], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(g_r, trl["grad_rejected"], rtol=1e-4, atol=1e-7)
    if case["loss"] == "sft":
        return  # TRL logs DPO rewards from its reference even for pure SFT; ours needs no reference
    for key, want in trl["metrics"].items():
        np.testing.assert_allclose(metrics[key], want, rtol=2e-5, atol=1e-6, err_msg=key)


def test_trl_hinge_with_wpo_fails_backward_but_ours_differentiates():
    """TRL 1.16 multiplies relu's output in place, so hinge + WPO cannot backpropagate there;
    the value still matches (above) and ours has a finite gradient."""
    case = next(c for c in GOLDEN["current"]["cases"] if c["name"] == "hinge_wpo")
    assert "backward_error" in case["trl"]
    x = _pairs(BATCH, with_wpo=True)
    g = jax.grad(lambda pc: jnp.mean(losses.get("hinge")(x._replace(policy_chosen=pc), use_weighting=True).loss))(
        x.policy_chosen
    )
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


@pytest.mark.parametrize("case", [c for c in _cases("current", "paired") if "inputs" in c.values[0]])
def test_cpo_orpo_match_trl(case):
    out = losses.get(case["loss"])(_pairs(case["inputs"]), **case["hp"])
    trl = case["trl"]
    np.testing.assert_allclose(jnp.mean(out.loss), trl["loss"], rtol=2e-5, atol=1e-6)
    if case["hp"].get("cpo_alpha", 1.0) or case["loss"] == "orpo":
        np.testing.assert_allclose(out.metrics["nll_loss"], trl["nll"], rtol=2e-5)
    for key in ("log_odds_ratio", "log_odds_chosen"):
        if key in trl:
            np.testing.assert_allclose(out.metrics[key], trl[key], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("case", _cases("current", "unpaired"))
def test_kto_matches_trl(case):
    a = {k: jnp.asarray(np.asarray(v)) for k, v in case["inputs"].items()}
    x = losses.UnpairedLogps(a["policy"], a["mask"], a["label"], a["ref"], a["kl_policy"], a["kl_ref"])
    fn = losses.get(case["loss"])

    def mean_loss(policy):
        out = fn(x._replace(policy=policy), **case["hp"])
        return jnp.mean(out.loss), out.metrics

    (value, metrics), grad = jax.value_and_grad(mean_loss, has_aux=True)(x.policy)
    trl = case["trl"]
    np.testing.assert_allclose(value, trl["loss"], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(grad, trl["grad"], rtol=1e-4, atol=1e-8)
    for key, want in trl["metrics"].items():
        np.testing.assert_allclose(metrics[key], want, rtol=2e-5, atol=1e-6, err_msg=key)
    for key in {"rewards/chosen", "rewards/rejected", "rewards/margins"} - set(trl["metrics"]):
        assert np.isnan(metrics[key]), f"{key}: TRL logs nothing for an empty half, we log NaN"


def _legacy(name):
    return next(c for c in GOLDEN["legacy"]["cases"] if c["name"] == name)


def test_cdpo_matches_trl_0_28():
    case = _legacy("cdpo")
    out = losses.get("cdpo")(_pairs(BATCH), **case["hp"])
    np.testing.assert_allclose(jnp.mean(out.loss), case["trl"]["loss"], rtol=2e-5)


def test_bco_pair_running_shift_matches_trl_0_28_over_two_steps():
    case = _legacy("bco_pair_running")
    fn, x = losses.get("bco_pair"), _pairs(BATCH)
    state = None
    for step in case["trl"]["steps"]:
        out = fn(x._replace(policy_chosen=x.policy_chosen * step["scale"]), state=state, **case["hp"])
        state = out.state
        np.testing.assert_allclose(jnp.mean(out.loss), step["loss"], rtol=2e-5)
        np.testing.assert_allclose(out.metrics["delta"], step["delta"], rtol=2e-5, atol=1e-7)


def test_bco_unpaired_matches_trl_0_28_including_eval_steps():
    case = _legacy("bco")
    x = _pairs(BATCH)
    u = losses.UnpairedLogps(
        policy=jnp.concatenate([x.policy_chosen, x.policy_rejected]),
        mask=jnp.concatenate([x.chosen_mask, x.rejected_mask]),
        label=jnp.asarray(case["inputs"]["label"]),
        ref=jnp.concatenate([x.ref_chosen, x.ref_rejected]),
    )
    state = None
    for step in case["trl"]["steps"]:
        out = losses.get("bco")(u, state=state, training=step["training"], **case["hp"])
        state = out.state
        np.testing.assert_allclose(jnp.mean(out.loss), step["loss"], rtol=2e-5)
        np.testing.assert_allclose(out.metrics["delta"], step["delta"], rtol=2e-5, atol=1e-7)
