"""Bad input gets an error that names what is wrong."""

import jax.numpy as jnp
import pytest

from prefopt_jax import losses
from tests.losses.test_formulas import as_pairs, random_pairs
from tests.losses.test_properties import example

X = as_pairs(*random_pairs(0))


def raises(match):
    return pytest.raises(losses.LossInputError, match=match)


def test_unknown_loss_lists_the_valid_ones():
    with raises(r"unknown loss 'dop'.*dpo, cdpo"):
        losses.get("dop")


def test_unknown_hyperparameter_lists_the_valid_ones():
    with raises(r"unknown hyperparameter\(s\) \['bta'\]; valid: \['beta'"):
        losses.get("dpo")(X, bta=0.1)


def test_missing_reference():
    with raises("needs reference log-probs"):
        losses.get("dpo")(X._replace(ref_chosen=None, ref_rejected=None))
    with raises("both `ref_chosen` and `ref_rejected`"):
        losses.get("simpo")(X._replace(ref_rejected=None))
    u = example("kto")
    with raises("needs reference log-probs"):
        losses.get("kto")(u._replace(ref=None))


def test_reference_free_losses_run_without_reference():
    out = losses.get("simpo")(X._replace(ref_chosen=None, ref_rejected=None))
    assert out.loss.shape == (5,)


def test_shape_mismatches():
    with raises(r"`chosen_mask` has shape \(5, 6\), expected \(5, 7\)"):
        losses.get("dpo")(X._replace(chosen_mask=X.chosen_mask[:, :6]))
    with raises("batch sizes differ"):
        losses.get("dpo")(X._replace(policy_rejected=X.policy_rejected[:4], rejected_mask=X.rejected_mask[:4]))
    with raises(r"`ref_chosen` has shape"):
        losses.get("dpo")(X._replace(ref_chosen=X.ref_chosen[:, :3]))
    with raises("must be a 2-D array"):
        losses.get("dpo")(X._replace(policy_chosen=X.policy_chosen[0]))
    with raises("must be bool"):
        losses.get("dpo")(X._replace(chosen_mask=X.chosen_mask.astype(jnp.float32)))
    with raises("expects PairLogps"):
        losses.get("dpo")(example("kto"))
    u = example("kto")
    with raises(r"`label` has shape"):
        losses.get("kto")(u._replace(label=u.label[:3]))


def test_missing_or_misshapen_extra():
    with raises(r"missing extra input\(s\) \['seq_kl_chosen', 'seq_kl_rejected'\]"):
        losses.get("tdpo")(X)
    with raises(r"missing extra.*wpo_aligned_chosen"):
        losses.get("dpo")(X, use_weighting=True)
    with raises(r"extras\['seq_kl_chosen'\]` has shape \(3,\), expected \(5,\)"):
        losses.get("tdpo")(X._replace(extras={"seq_kl_chosen": jnp.zeros(3), "seq_kl_rejected": jnp.zeros(5)}))
    with raises("needs `kl_policy`"):
        losses.get("kto")(example("kto")._replace(kl_policy=None))
    assert losses.get("orpo").required_extras() == ("full_chosen", "full_chosen_mask")
    assert losses.get("orpo").required_extras(nll_over_prompt=False) == ()


@pytest.mark.parametrize(
    "name,hp,match",
    [
        ("robust", {"label_smoothing": 0.5}, r"label_smoothing=0.5 must lie in \[0.0, 0.5\)"),
        ("exo_pair", {"label_smoothing": 0.0}, r"label_smoothing=0.0 must lie in \(0.0, 1.0\)"),
        ("dpo", {"beta": 0.0}, "beta=0.0 must be > 0"),
        ("simpo", {"beta": -1.0}, "beta=-1.0 must be > 0"),
        ("dpo", {"ld_alpha": 1.5}, r"ld_alpha=1.5 must lie in \[0.0, 1.0\]"),
        ("dpo", {"f_divergence_type": "kl"}, "must be one of"),
        ("nca_pair", {"f_divergence_type": "js_divergence"}, "not defined for this loss"),
        ("aot", {"use_weighting": True}, "WPO weighting"),
        ("sft", {"nll_reduction": "mean"}, "must be one of"),
        ("r_dpo", {}, r"\['alpha'\] must be given"),
        ("cpo", {"loss_variant": "alphapo"}, "must be one of"),
    ],
)
def test_hyperparameters_out_of_range(name, hp, match):
    with raises(match):
        losses.get(name)(X, **hp)


def test_combine_errors():
    with raises("unknown loss"):
        losses.combine([("dpo", 1.0), ("nope", 1.0)])
    with raises("cannot mix input kinds"):
        losses.combine([("dpo", 1.0), ("kto", 1.0)])
    with raises("appears twice"):
        losses.combine([("dpo", 1.0), ("dpo", 0.5)])
    with raises("unknown hyperparameter"):
        losses.combine([("dpo", 1.0, {"gamma": 1.0})])
