"""`margin_sweep` (what the loss-explorer notebook plots) against hand-derived curves."""

import numpy as np
import pytest

from prefopt_jax import losses
from prefopt_jax.losses.examples import margin_sweep

M = np.linspace(-6.0, 6.0, 13)


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_dpo_curve_and_gradient_weight():
    loss, grad = margin_sweep("dpo", M, beta=0.2)
    np.testing.assert_allclose(loss, -log_sigmoid(0.2 * M), rtol=1e-5)
    np.testing.assert_allclose(grad, -0.2 * sigmoid(-0.2 * M), rtol=1e-5)


def test_ipo_is_a_parabola_around_its_target():
    loss, grad = margin_sweep("ipo", M, beta=0.25)  # target margin 1 / (2 beta) = 2
    np.testing.assert_allclose(loss, (M - 2.0) ** 2, rtol=1e-5)
    np.testing.assert_allclose(grad, 2.0 * (M - 2.0), rtol=1e-5, atol=1e-6)


def test_simpo_margin_is_in_average_log_prob_units():
    loss, grad = margin_sweep("simpo", M, beta=2.0, gamma_beta_ratio=0.5)  # one-token completions
    np.testing.assert_allclose(loss, -log_sigmoid(2.0 * (M - 0.5)), rtol=1e-5)
    np.testing.assert_allclose(grad, -2.0 * sigmoid(-2.0 * (M - 0.5)), rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in losses.names() if n != "r_dpo"])
def test_every_loss_sweeps_to_finite_values(name):
    loss, grad = margin_sweep(name, M)
    assert loss.shape == grad.shape == M.shape
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
