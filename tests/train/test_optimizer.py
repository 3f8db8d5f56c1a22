"""The learning-rate schedules against their formulas (Hugging Face's, written out here without optax), and
the FLOP count against a hand count."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prefopt_jax import data, models
from prefopt_jax.config import load_config
from prefopt_jax.train import flops
from prefopt_jax.train.build import learning_rate, make_optimizer


def hf_rate(schedule, peak, warmup, steps, t, min_lr_rate=0.0):
    """transformers' get_{constant,linear,cosine}_schedule_with_warmup (and cosine_with_min_lr's
    `factor * (1 - min_lr_rate) + min_lr_rate`) at update t."""
    if t < warmup:
        return peak * t / max(1, warmup)
    progress = (t - warmup) / max(1, steps - warmup)
    if schedule == "cosine":
        return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - min_lr_rate) + min_lr_rate)
    if schedule == "linear":
        return peak * max(0.0, (steps - t) / max(1, steps - warmup))
    return peak


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_equal_the_formulas(schedule, warmup):
    rate = learning_rate(schedule, 2e-4, warmup, 10)
    for t in range(10):  # updates 0 .. steps - 1
        assert float(rate(t)) == pytest.approx(hf_rate(schedule, 2e-4, warmup, 10, t), rel=1e-6, abs=1e-12), t
    if warmup == 0:
        assert float(rate(0)) == pytest.approx(2e-4)  # the first update uses the configured rate


def test_cosine_with_a_floor_equals_cosine_with_min_lr():
    rate = learning_rate("cosine", 2e-4, 3, 10, min_ratio=0.1)
    for t in range(12):  # past the end: the floor, not zero
        assert float(rate(t)) == pytest.approx(hf_rate("cosine", 2e-4, 3, 10, min(t, 10), 0.1), rel=1e-6), t
    assert float(rate(10)) == pytest.approx(2e-5)


def test_the_first_update_moves_by_the_learning_rate_without_warmup():
    """Adam's first step is lr·sign(g) (bias-corrected moments): with warmup_steps=0 it is not zero."""
    cfg = load_config(None, ["train.warmup_steps=0", "train.learning_rate=0.01", "train.schedule=constant"], devices=1)
    opt = make_optimizer(cfg.train)
    params = {"w": jnp.ones(3)}
    updates, _ = opt.update({"w": jnp.asarray([0.5, -0.2, 0.1])}, opt.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], [0.99, 1.01, 0.99], rtol=1e-5)


def test_flop_count_equals_a_hand_count():
    cfg = models.ModelConfig(
        family="llama", vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=2,
    )  # fmt: skip
    geometry = data.Geometry(rows=1, length=32, groups=1, completions=2, width=4, scored=32)
    plan = data.RowPlan(geometry, "packed")
    assert plan.place(3, (2, 4), slot=0)  # [prompt 3 | chosen 2 | rejected 4]: 9 tokens
    # per token and layer, multiply-adds: q 4x(2x2) = 16, k 4x2 = 8, v 8, o 16, gate/up/down 3 x 4x6 = 72:
    # 120, so 240 FLOPs; 9 tokens, 2 layers: 4320
    # attention: each visible (query, key) pair costs 2·H·E for q·k and 2·H·E for p·v = 16 FLOPs per layer;
    # visible pairs: prompt 1+2+3 = 6, chosen (3+1)+(3+2) = 9, rejected (3+1)+(3+2)+(3+3)+(3+4) = 22 -> 37
    # -> 37 x 16 x 2 layers = 1184; unembedding of the 6 scored tokens: 2 x 4 x 10 x 6 = 480
    assert flops.plan_counts(plan) == (9.0, 37.0, 6.0)
    forward = 4320 + 1184 + 480
    assert flops.forward_flops(cfg, 9, 37, 6) == forward
    step = [data.MicroPlan([0], {"main": plan})]
    assert flops.step_flops(cfg, step, lora=False, reference_in_step=True) == 4 * forward  # 3 policy + 1 reference
    assert flops.step_flops(cfg, step, lora=True, reference_in_step=False) == 2 * forward


def test_simulated_cpu_devices_share_one_measured_peak(monkeypatch):
    monkeypatch.setattr(flops, "measured_peak_flops", lambda: 1e11)
    assert flops.total_peak(None, 8, "cpu") == 1e11  # 8 simulated devices, one host's cores
    assert flops.total_peak(459e12, 4, "tpu") == 4 * 459e12
