"""Properties every loss must have: finite gradients, the stop-gradients LOSSES.md prescribes,
padding that never matters, jit/vmap, bf16 inputs, and the same result on a batch sharded over 8
simulated devices (batch-coupled losses included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefopt_jax import losses
from prefopt_jax.losses.examples import example_inputs, policy_fields
from tests.losses.test_formulas import close

ALL = losses.names()
# hyperparameters that make every branch of a loss active (e.g. R-DPO's required alpha)
HP = {
    "r_dpo": {"alpha": 0.05},
    "alpha_dpo": {"alpha": 0.2, "gamma_beta_ratio": 0.5},
    "bco_pair": {"running_shift": True},
}


def example(name, b=8, seed=0, dtype=jnp.float32):
    return example_inputs(name, b=b, seed=seed, dtype=dtype)


def mean_loss_fn(name, x, **hp):
    fn = losses.get(name)
    hp = {**HP.get(name, {}), **hp}

    def f(policy):
        return jnp.mean(fn(x._replace(**policy), **hp).loss)

    return f, {k: getattr(x, k) for k in policy_fields(x)}


@pytest.mark.parametrize("name", ALL)
def test_gradients_are_finite_and_nonzero(name):
    x = example(name)
    f, policy = mean_loss_fn(name, x)
    grads = jax.grad(f)(policy)
    flat = np.concatenate([np.asarray(g).ravel() for g in grads.values()])
    assert np.isfinite(flat).all()
    assert np.abs(flat).sum() > 0, "the policy must receive a gradient"


@pytest.mark.parametrize("name", [n for n in ALL if losses.get(n).needs_reference])
def test_reference_log_probs_get_no_gradient(name):
    x = example(name)
    fn, hp = losses.get(name), HP.get(name, {})
    fields = ("ref_chosen", "ref_rejected") if isinstance(x, losses.PairLogps) else ("ref",)

    def f(refs):
        return jnp.mean(fn(x._replace(**refs), **hp).loss)

    grads = jax.grad(f)({k: getattr(x, k) for k in fields})
    for k, g in grads.items():
        assert not np.asarray(g).any(), f"{name}: gradient flows into {k}"


def _extra_grad(name, key, x=None, **hp):
    x = x if x is not None else example(name)
    fn = losses.get(name)

    def f(v):
        return jnp.mean(fn(x._replace(extras={**x.extras, key: v}), **{**HP.get(name, {}), **hp}).loss)

    return np.asarray(jax.grad(f)(x.extras[key]))


def test_detached_extras_get_no_gradient():
    assert not _extra_grad("rmipo", "response_only_chosen_avg").any()  # q and ΔPMI are detached
    assert not _extra_grad("dpo", "wpo_aligned_chosen", use_weighting=True).any()  # WPO weights
    assert not _extra_grad("tdpo", "seq_kl_chosen", tdpo2=True).any()  # TDPO2 detaches SeqKL_c
    assert _extra_grad("tdpo", "seq_kl_chosen").any()  # ...TDPO1 does not
    assert _extra_grad("tdpo", "seq_kl_rejected", tdpo2=True).any()


def test_kto_reference_point_is_detached():
    x = example("kto")
    g = jax.grad(lambda kl: jnp.mean(losses.get("kto")(x._replace(kl_policy=kl)).loss))(x.kl_policy)
    assert not np.asarray(g).any()


def _per_token_grad_of_u(beta, u, m, len_c, b):
    """d mean_b[-logσ(β(u - m))] / d policy_chosen token, with m a constant: -β·σ(-β(u-m))/(Lc·B)."""
    return -beta / (1 + np.exp(beta * (u - m))) / len_c / b


@pytest.mark.parametrize("name", ["alpha_dpo", "rmipo"])
def test_adaptive_margins_are_detached(name):
    """The gradient is what you get holding the margin m constant (it depends on the policy)."""
    x = example(name)
    hp = HP.get(name, {})
    out = losses.get(name)(x, **hp)
    mc = np.asarray(x.chosen_mask)
    len_c = np.maximum(mc.sum(1), 1)
    pc = np.where(mc, np.asarray(x.policy_chosen), 0).sum(1) / len_c
    pr_m = np.asarray(x.rejected_mask)
    pr = np.where(pr_m, np.asarray(x.policy_rejected), 0).sum(1) / np.maximum(pr_m.sum(1), 1)
    u = pc - pr
    beta = losses.get(name).hyperparameters(**hp)["beta"]
    # recover the per-pair margin from the per-pair loss: loss = softplus(-β(u - m))
    m = u + np.log(np.expm1(np.asarray(out.loss, np.float64))) / beta
    f, policy = mean_loss_fn(name, x)
    g = np.asarray(jax.grad(f)(policy)["policy_chosen"])
    want = np.where(mc, _per_token_grad_of_u(beta, u, m, len_c, len(u))[:, None], 0.0)
    close(g, want, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_padding_values_never_matter(name):
    x = example(name)
    hp = HP.get(name, {})
    junk = {}
    for field, mask in (
        [
            ("policy_chosen", "chosen_mask"),
            ("policy_rejected", "rejected_mask"),
            ("ref_chosen", "chosen_mask"),
            ("ref_rejected", "rejected_mask"),
        ]
        if isinstance(x, losses.PairLogps)
        else [("policy", "mask"), ("ref", "mask")]
    ):
        junk[field] = jnp.where(getattr(x, mask), getattr(x, field), jnp.nan)
    y = x._replace(**junk)
    a, b = losses.get(name)(x, **hp), losses.get(name)(y, **hp)
    close(b.loss, np.asarray(a.loss))
    f, policy = mean_loss_fn(name, y)
    assert np.isfinite(np.concatenate([np.asarray(g).ravel() for g in jax.grad(f)(policy).values()])).all()


@pytest.mark.parametrize("name", ALL)
def test_jit_and_vmap(name):
    x = example(name)
    fn, hp = losses.get(name), HP.get(name, {})
    eager = fn(x, **hp)
    jitted = jax.jit(lambda v: fn(v, **hp))(x)
    close(jitted.loss, np.asarray(eager.loss))
    for k, v in eager.metrics.items():
        close(jitted.metrics[k], np.asarray(v))
    # vmap over independent micro-batches equals calling each one
    xs = [example(name, seed=s) for s in (1, 2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *xs)
    batched = jax.vmap(lambda v: fn(v, **hp).loss)(stacked)
    for i, xi in enumerate(xs):
        close(batched[i], np.asarray(fn(xi, **hp).loss))


@pytest.mark.parametrize("name", ALL)
def test_bf16_inputs_compute_in_float32(name):
    x16 = example(name, dtype=jnp.bfloat16)
    x32 = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, x16)
    hp = HP.get(name, {})
    out16, out32 = losses.get(name)(x16, **hp), losses.get(name)(x32, **hp)
    assert out16.loss.dtype == jnp.float32
    close(out16.loss, np.asarray(out32.loss))


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices (tests/conftest.py sets XLA_FLAGS)")
    return Mesh(np.array(jax.devices()[:8]), ("data",))


@pytest.mark.parametrize("name", ALL)
def test_sharded_batch_equals_single_device(name, mesh):
    x = example(name, b=16)
    fn, hp = losses.get(name), HP.get(name, {})
    rows = NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.tree.map(lambda a: jax.device_put(a, rows), x)
    assert len(getattr(sharded, policy_fields(x)[0]).sharding.device_set) == 8

    def step(v):
        out = fn(v, **hp)
        return (
            out.loss,
            out.metrics,
            jax.grad(lambda p: jnp.mean(fn(v._replace(**p), **hp).loss))({k: getattr(v, k) for k in policy_fields(v)}),
        )

    want = jax.jit(step)(x)
    got = jax.jit(step)(sharded)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        close(g, np.asarray(w), rtol=1e-5, atol=1e-6)


def _with_padding_examples(x, n: int):
    """The batch with `n` empty slots appended (all-False masks, arbitrary values): a fixed-shape batch's
    padding groups."""

    def grow(a):
        if a is None:
            return None
        pad = jnp.zeros((n, *a.shape[1:]), a.dtype) if a.dtype == bool else jnp.full((n, *a.shape[1:]), -7.0, a.dtype)
        return jnp.concatenate([a, pad])

    fields = {k: grow(v) for k, v in x._asdict().items() if k != "extras" and v is not None}
    if "label" in fields:
        fields["label"] = jnp.concatenate([x.label, jnp.ones(n, bool)])
    extras = {
        k: grow(v) if k != "udm_prob" else jnp.concatenate([v, jnp.full(n, 0.5, v.dtype)]) for k, v in x.extras.items()
    }
    return x._replace(**fields, extras=extras)


@pytest.mark.parametrize("name", ALL)
def test_padding_examples_change_nothing(name):
    """Appending empty example slots leaves every real example's loss, every metric, the new state and
    the gradients of the real examples as they were; the padding losses and gradients are finite, so a zero
    weight removes them. (The unpadded values are the ones checked against TRL and the formulas.)"""
    x = example(name)
    b = x.policy_chosen.shape[0] if isinstance(x, losses.PairLogps) else x.policy.shape[0]
    padded = _with_padding_examples(x, 3)
    fn, hp = losses.get(name), HP.get(name, {})
    state = fn.init_state() if fn.stateful else None
    plain, with_pad = fn(x, state=state, **hp), fn(padded, state=state, **hp)
    assert np.isfinite(np.asarray(with_pad.loss)).all()
    np.testing.assert_allclose(with_pad.loss[:b], plain.loss, rtol=2e-5, atol=1e-6)
    for k, v in plain.metrics.items():
        np.testing.assert_allclose(with_pad.metrics[k], v, rtol=2e-5, atol=1e-6, err_msg=k)
    for a, c in zip(jax.tree.leaves(with_pad.state), jax.tree.leaves(plain.state), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, err_msg="state")

    def weighted(policy, inputs, n):
        out = fn(inputs._replace(**policy), state=state, **hp)
        return jnp.sum(out.loss[:n])

    fields = policy_fields(x)
    g_plain = jax.grad(weighted)({k: getattr(x, k) for k in fields}, x, b)
    g_pad = jax.grad(weighted)({k: getattr(padded, k) for k in fields}, padded, b)
    for k in fields:
        assert np.isfinite(np.asarray(g_pad[k])).all()
        np.testing.assert_allclose(g_pad[k][:b], g_plain[k], rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("name", [n for n in ALL if losses.get(n).stateful])
def test_a_stateful_loss_returns_its_state_with_the_types_it_started_with(name):
    """The state a loss starts from and the one it returns have the same dtypes, shapes and (strong) types:
    otherwise the compiled step sees a new input signature on its second call and compiles again (BCO's
    running count started weakly typed and made every BCO run compile its step twice)."""
    fn, hp = losses.get(name), HP.get(name, {})
    start = fn.init_state()
    after = jax.jit(lambda s: fn(example(name), state=s, **hp).state)(start)
    signature = lambda tree: [(a.shape, a.dtype, a.weak_type) for a in jax.tree.leaves(jax.tree.map(jnp.asarray, tree))]
    assert signature(after) == signature(start)
