"""Step features beyond plain DPO, each against a hand-written computation: TDPO's and the logged per-token
KL (full-vocabulary softmax per sequence), WPO's weights, KTO's mismatched pairs, TR-DPO's reference sync,
LoRA dropout, and log-probs computed only at completion positions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prefopt_jax import data, losses, models, sharding
from prefopt_jax.config import ConfigError, load_config
from prefopt_jax.train import batches as batches_lib
from prefopt_jax.train import build
from prefopt_jax.train import lora as lora_lib
from prefopt_jax.train import step as step_lib
from tests.train.test_step import CFG, as_batch, make_spec, pairs, seq_logp


@pytest.fixture(scope="module")
def base():
    return models.create_model(CFG, seed=0).params()


def perturbed(params, scale=0.05):
    return jax.tree.map(lambda a: a + scale * jnp.sin(jnp.arange(a.size).reshape(a.shape) * 0.7), params)


def seq_logsoftmax(params, prompt, completion):
    """Full-vocabulary log-softmax at the positions predicting each completion token, [len, V]."""
    ids = jnp.asarray(np.concatenate([prompt, completion]))[None]
    logits = models.logits_from_hidden(CFG, params, models.forward_hidden(CFG, params, ids))[0]
    rows = len(prompt) - 1 + jnp.arange(len(completion))
    return jax.nn.log_softmax(logits, -1)[rows]


def token_logps(logp, completion):
    return logp[jnp.arange(len(completion)), jnp.asarray(completion)]


@pytest.mark.parametrize("tdpo2", [False, True])
def test_tdpo_step_equals_the_formula_with_full_vocabulary_kl(base, tdpo2):
    examples, beta, alpha = pairs(11), 0.4, 0.5
    policy = perturbed(base)

    def unfused(params):
        terms = []
        for e in examples:
            s = {}
            for name, c in (("c", e.chosen), ("r", e.rejected)):
                lp, lr = seq_logsoftmax(params, e.prompt, c), seq_logsoftmax(base, e.prompt, c)
                s[name] = token_logps(lp, c).sum() - token_logps(lr, c).sum()
                s["kl" + name] = jnp.sum(jnp.exp(lr) * (lr - lp))  # KL(ref || policy) summed over tokens
            kc = jax.lax.stop_gradient(s["klc"]) if tdpo2 else s["klc"]
            margin = (s["c"] - s["r"]) - (alpha if tdpo2 else 1.0) * (s["klr"] - kc)
            terms.append(-jax.nn.log_sigmoid(beta * margin))
        return sum(terms) / len(terms)

    spec = make_spec("tdpo", {"beta": beta, "alpha": alpha, "tdpo2": tdpo2}, examples, "packed")
    batch = jax.tree.map(lambda a: a[0], as_batch(examples, "packed"))
    fn = step_lib.make_loss_fn(CFG, spec)
    (value, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(policy, None, base, batch, None)
    want, want_grads = jax.jit(jax.value_and_grad(unfused))(policy)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_logged_per_token_kl_is_the_full_vocabulary_kl(base):
    examples = pairs(12)
    policy = perturbed(base, 0.2)
    kls, n = 0.0, 0
    for e in examples:
        for c in (e.chosen, e.rejected):
            lp, lr = seq_logsoftmax(policy, e.prompt, c), seq_logsoftmax(base, e.prompt, c)
            kls += float(jnp.sum(jnp.exp(lp) * (lp - lr)))  # KL(policy || ref)
            n += len(c)
    spec = make_spec("dpo", {}, examples)
    batch = jax.tree.map(lambda a: a[0], as_batch(examples))
    _, (metrics, _) = jax.jit(step_lib.make_loss_fn(CFG, spec))(policy, None, base, batch, None)
    assert kls / n > 1e-3
    np.testing.assert_allclose(metrics["kl/per_token"], kls / n, rtol=1e-4)


def test_wpo_weights_come_from_the_full_softmax(base):
    examples, beta = pairs(13), 0.3
    policy = perturbed(base, 0.1)

    def weight(params, e, c):
        lp = seq_logsoftmax(params, e.prompt, c)
        aligned = token_logps(lp, c) - jax.nn.logsumexp(2 * lp, axis=-1)  # log p(y) - log sum_v p(v)^2
        return jnp.exp(jnp.mean(aligned))

    def unfused(params):
        terms = []
        for e in examples:
            lc = token_logps(seq_logsoftmax(params, e.prompt, e.chosen), e.chosen).sum()
            lr = token_logps(seq_logsoftmax(params, e.prompt, e.rejected), e.rejected).sum()
            rc = token_logps(seq_logsoftmax(base, e.prompt, e.chosen), e.chosen).sum()
            rr = token_logps(seq_logsoftmax(base, e.prompt, e.rejected), e.rejected).sum()
            w = jax.lax.stop_gradient(weight(params, e, e.chosen) * weight(params, e, e.rejected))
            terms.append(-jax.nn.log_sigmoid(beta * ((lc - rc) - (lr - rr))) * w)
        return sum(terms) / len(terms)

    spec = make_spec("dpo", {"beta": beta, "use_weighting": True}, examples, "packed")
    batch = jax.tree.map(lambda a: a[0], as_batch(examples, "packed"))
    value, _ = jax.jit(step_lib.make_loss_fn(CFG, spec))(policy, None, base, batch, None)
    np.testing.assert_allclose(value, jax.jit(unfused)(policy), rtol=1e-5)


def test_kto_step_equals_the_formula_with_mismatched_pairs(base):
    examples = data.unpaired_from_pairs(pairs(14, n=3))  # 6 examples: desirable, undesirable, ...
    beta = 0.2
    policy = perturbed(base, 0.1)

    def seq(params, prompt, completion):
        return token_logps(seq_logsoftmax(params, prompt, completion), completion).sum()

    n = len(examples)
    # KL reference point: prompt i with the previous example's completion (rotation within the batch)
    z = np.mean(
        [
            seq(policy, e.prompt, examples[(i - 1) % n].completion)
            - seq(base, e.prompt, examples[(i - 1) % n].completion)
            for i, e in enumerate(examples)
        ]
    )
    z = max(z, 0.0)
    want = []
    for e in examples:
        r = seq(policy, e.prompt, e.completion) - seq(base, e.prompt, e.completion)
        want.append(1 - jax.nn.sigmoid(beta * (r - z)) if e.label else 1 - jax.nn.sigmoid(beta * (z - r)))
    batch = jax.tree.map(lambda a: a[0], as_batch(examples))
    assert "kl" in batch and "label" in batch
    spec = make_spec("kto", {"beta": beta}, examples)
    value, (metrics, _) = jax.jit(step_lib.make_loss_fn(CFG, spec))(policy, None, base, batch, None)
    np.testing.assert_allclose(value, np.mean(want), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], z, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_tr_dpo_moves_the_reference_toward_the_policy_every_tau_steps(base, lora):
    alpha, tau = 0.25, 2
    opt = optax.sgd(0.5)
    examples = pairs(15)
    batch = as_batch(examples)
    if lora:
        adapters = jax.tree.map(lambda a: a + 0.01, lora_lib.init_lora(CFG, rank=2, seed=3))
        spec = make_spec(
            "dpo", {}, examples, reference="lora_base", lora_scale=1.0, ref_sync_every=tau, ref_sync_alpha=alpha
        )
        # the reference's own adapters start elsewhere, so mixing factors and mixing weights differ visibly
        state = step_lib.init_state(adapters, opt, spec.loss, reference=jax.tree.map(lambda a: a - 0.02, adapters))
        frozen = base
    else:
        spec = make_spec("dpo", {}, examples, ref_sync_every=tau, ref_sync_alpha=alpha)
        state = step_lib.init_state(perturbed(base), opt, spec.loss, reference=jax.tree.map(jnp.copy, base))
        frozen = None
    train = step_lib.make_train_step(CFG, spec, opt)
    ref0 = jax.tree.map(np.asarray, state["reference"])
    state, _ = train(state, frozen, None, batch)  # step 1: no sync
    for a, b in zip(jax.tree.leaves(state["reference"]), jax.tree.leaves(ref0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    state, _ = train(state, frozen, None, batch)  # step 2: ref <- alpha * policy + (1 - alpha) * ref
    if not lora:  # full fine-tuning: the weights themselves are mixed
        for r, p, r0 in zip(
            jax.tree.leaves(state["reference"]), jax.tree.leaves(state["trainable"]), jax.tree.leaves(ref0), strict=True
        ):
            np.testing.assert_allclose(np.asarray(r), alpha * np.asarray(p) + (1 - alpha) * r0, rtol=1e-6, atol=1e-7)
    else:  # LoRA: the factors are mixed, so the reference's weight delta is the product of the mixed factors
        pol = state["trainable"]["q"]
        a_mix = alpha * np.asarray(pol["a"]) + (1 - alpha) * ref0["q"]["a"]
        b_mix = alpha * np.asarray(pol["b"]) + (1 - alpha) * ref0["q"]["b"]
        want = np.einsum("ldr,lrhe->ldhe", a_mix, b_mix)  # the q projection's delta, layer by layer
        merged = lambda ad: lora_lib.merge_lora(base, ad, 1.0)["layers"]["q"] - base["layers"]["q"]
        np.testing.assert_allclose(merged(state["reference"]), want, rtol=1e-5, atol=1e-7)
        weight_mix = alpha * merged(state["trainable"]) + (1 - alpha) * merged(jax.tree.map(jnp.asarray, ref0))
        # not the weight mix for alpha < 1 (documented): off by -alpha (1 - alpha) (A - A_ref)(B - B_ref)
        cross = np.einsum(
            "ldr,lrhe->ldhe", np.asarray(pol["a"]) - ref0["q"]["a"], np.asarray(pol["b"]) - ref0["q"]["b"]
        )
        assert np.abs(cross).max() > 1e-4
        np.testing.assert_allclose(want - weight_mix, -alpha * (1 - alpha) * cross, atol=1e-6)
    # and the step uses the synced reference: the loss equals DPO against it
    fused = jax.jit(step_lib.make_loss_fn(CFG, spec))
    mb = jax.tree.map(lambda a: a[0], batch)
    value, _ = fused(state["trainable"], frozen, state["reference"], mb, None)
    ref_params = lora_lib.with_lora(base, state["reference"], 1.0) if lora else state["reference"]
    plain = make_spec("dpo", {}, examples)
    pol = lora_lib.with_lora(base, state["trainable"], 1.0) if lora else state["trainable"]
    want, _ = jax.jit(step_lib.make_loss_fn(CFG, plain))(pol, None, ref_params, mb, None)
    np.testing.assert_allclose(value, want, rtol=1e-6)


def test_lora_dropout_masks_adapter_inputs_and_is_reproducible(base):
    adapters = jax.tree.map(lambda a: a + 0.05, lora_lib.init_lora(CFG, rank=2, seed=4))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 40, (2, 9)))
    key = jax.random.PRNGKey(7)
    plain = models.forward_hidden(CFG, lora_lib.with_lora(base, adapters, 1.0), ids)
    none = models.forward_hidden(CFG, lora_lib.with_lora(base, adapters, 1.0, dropout=0.0, key=key), ids)
    np.testing.assert_array_equal(plain, none)
    d1 = models.forward_hidden(CFG, lora_lib.with_lora(base, adapters, 1.0, dropout=0.5, key=key), ids)
    d2 = models.forward_hidden(CFG, lora_lib.with_lora(base, adapters, 1.0, dropout=0.5, key=key), ids)
    d3 = models.forward_hidden(
        CFG, lora_lib.with_lora(base, adapters, 1.0, dropout=0.5, key=jax.random.PRNGKey(8)), ids
    )
    np.testing.assert_array_equal(d1, d2)
    assert not np.allclose(d1, plain) and not np.allclose(d1, d3)
    # one projection: dropout keeps the adapter's input unbiased (inputs scaled by 1/(1-p)), so the average
    # adapter update over many masks approaches the update without dropout
    from prefopt_jax.models.decoder import _proj

    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, CFG.hidden_size)), jnp.float32)
    p = {"q": base["layers"]["q"][0], "lora": {"q": {"a": adapters["q"]["a"][0], "b": adapters["q"]["b"][0]}}}
    y = jnp.tensordot(x, p["q"], 1)
    exact = _proj(p, "q", x, 1) - y
    draws = jax.vmap(lambda k: _proj({**p, "lora_dropout": {"rate": jnp.asarray(0.5), "key": k}}, "q", x, 1) - y)(
        jax.random.split(jax.random.PRNGKey(1), 4000)
    )
    assert not np.allclose(draws[0], exact, atol=1e-3)
    np.testing.assert_allclose(draws.mean(0), exact, atol=0.05 * float(jnp.abs(exact).max()))
    with pytest.raises(ConfigError, match="lora_dropout needs LoRA"):  # refused when the run is resolved
        build.resolve(load_config(None, ["train.lora_dropout=0.1", "train.lora_rank=0", "train.reference=frozen"]))


def test_log_probs_at_completion_positions_only_equal_plain_forwards(base):
    """The step scores completion positions only, with the scored positions and their predictors derived on
    the device from the batch's token arrays: each completion's log-probs equal a plain forward of its prompt
    and itself alone (an independent full-vocabulary log-softmax), in every layout."""
    examples = pairs(16)
    for layout in data.LAYOUTS:
        spec = make_spec("dpo", {}, examples, layout)
        b = jax.tree.map(lambda a: a[0], as_batch(examples, layout))["main"]
        got, mask = step_lib.completion_logps(CFG, base, b, spec.geometries["main"], spec.attention_for("main"))
        for g, e in enumerate(examples):
            for j, c in enumerate((e.chosen, e.rejected)):
                want = token_logps(seq_logsoftmax(base, e.prompt, c), c)
                assert int(mask[g, j].sum()) == len(c)
                np.testing.assert_allclose(got[g, j, : len(c)], want, atol=1e-5, err_msg=layout)


def alpha_dpo_by_hand(policy, ref, examples, hp, mu, sigma):
    """AlphaDPO written out per pair (LOSSES.md): M = (avg policy gap) − (avg reference gap), standardised
    by the given moments."""
    terms, gaps = [], []
    for e in examples:
        lc, lr = len(e.chosen), len(e.rejected)
        u = seq_logp(policy, e.prompt, e.chosen) / lc - seq_logp(policy, e.prompt, e.rejected) / lr
        g = u - (seq_logp(ref, e.prompt, e.chosen) / lc - seq_logp(ref, e.prompt, e.rejected) / lr)
        margin = hp["gamma_beta_ratio"] + hp["alpha"] * (g - mu) / (sigma + 1e-8)
        terms.append(-jax.nn.log_sigmoid(hp["beta"] * (u - margin)))
        gaps.append(g)
    return float(np.mean(terms)), np.asarray(gaps)


@pytest.mark.parametrize("mixture", [False, True])
@pytest.mark.parametrize("update_in_eval", [False, True])
def test_evaluation_runs_alpha_dpo_in_eval_mode(base, mixture, update_in_eval):
    examples, policy = pairs(21, n=6), perturbed(base, 0.1)
    hp = {"beta": 2.0, "gamma_beta_ratio": 0.25, "alpha": 0.5, "momentum": 0.9, "update_in_eval": update_in_eval}
    stored = {"mu": jnp.float32(0.3), "sigma": jnp.float32(0.7)}
    if mixture:  # the mixture's evaluation mode reaches its AlphaDPO member
        loss, loss_hp, state = losses.combine([("alpha_dpo", 1.0, hp), ("sft", 0.0)]), {}, {"alpha_dpo": stored}
    else:
        loss, loss_hp, state = losses.get("alpha_dpo"), hp, stored
    spec = make_spec("alpha_dpo", hp, examples, reference="frozen")
    spec = step_lib.StepSpec(loss, loss_hp, spec.geometries, spec.attention, chunk=8, reference="frozen")
    batch = jax.tree.map(lambda a: a[0], as_batch(examples))
    metrics, new_state = step_lib.make_eval_step(CFG, spec)(policy, None, base, batch, state)
    new = new_state["alpha_dpo"] if mixture else new_state

    _, gaps = alpha_dpo_by_hand(policy, base, examples, hp, 0.0, 1.0)
    if update_in_eval:  # the authors' behaviour: the held-out batch moves the moments before use
        mu, sigma = 0.9 * 0.3 + 0.1 * gaps.mean(), 0.9 * 0.7 + 0.1 * gaps.std(ddof=1)
    else:  # read, never moved
        mu, sigma = 0.3, 0.7
    want, _ = alpha_dpo_by_hand(policy, base, examples, hp, mu, sigma)
    np.testing.assert_allclose([new["mu"], new["sigma"]], [mu, sigma], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    # while training, the moments always move
    train_fn = step_lib.make_loss_fn(CFG, spec)
    _, (_, trained) = jax.jit(train_fn)(policy, None, base, batch, state)
    trained = trained["alpha_dpo"] if mixture else trained
    np.testing.assert_allclose(trained["mu"], 0.9 * 0.3 + 0.1 * gaps.mean(), rtol=1e-5)


def test_evaluation_reads_bco_running_shift_without_moving_it(base):
    examples = pairs(22, n=3)
    unpaired = [
        data.TokenizedUnpaired(e.prompt, c, label, 1.0, None)
        for e in examples
        for c, label in ((e.chosen, True), (e.rejected, False))
    ]
    policy = perturbed(base, 0.1)
    spec = make_spec("bco", {"beta": 0.1}, unpaired, reference="frozen")
    batch = jax.tree.map(lambda a: a[0], as_batch(unpaired))
    stored = losses.get("bco").init_state() | {"mean": jnp.float32(0.05)}
    metrics, new_state = step_lib.make_eval_step(CFG, spec)(policy, None, base, batch, stored)
    np.testing.assert_allclose(metrics["delta"], 0.05)
    jax.tree.map(np.testing.assert_array_equal, new_state, stored)


def test_bco_udm_weights_undesirable_examples_by_the_clamped_density_ratio(base):
    """BCO-UDM through the step: the host lays each example's p(desirable | prompt) into its group slot, and
    the loss equals BCO by hand with each undesirable term times clip(p / (1 - p), 0.5, 10)."""
    examples = data.unpaired_from_pairs(pairs(15, n=3))  # desirable, undesirable, ... (6)
    beta, policy = 0.3, perturbed(base, 0.1)
    probs = np.array([0.2, 0.9, 0.5, 0.97, 0.1, 0.3], np.float32)  # ratios 0.25 -> 0.5, 9, 1, 32 -> 10, 0.11, 0.43

    def seq(params, e):
        return token_logps(seq_logsoftmax(params, e.prompt, e.completion), e.completion).sum()

    r = np.asarray([beta * (seq(policy, e) - seq(base, e)) for e in examples])
    delta = r.mean()  # the running mean, updated with this batch before use, from the empty state
    ratio = np.clip(probs / (1 - probs), 0.5, 10.0)
    want = [
        -jax.nn.log_sigmoid(x - delta) if e.label else -jax.nn.log_sigmoid(-(x - delta)) * w
        for x, e, w in zip(r, examples, ratio, strict=True)
    ]
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    bspec = data.batch_spec(examples, layout="packed", batch_size=len(examples), rows=len(examples), max_length=32,
                            tiles=True, length_multiple=data.TILE)  # fmt: skip
    plans = [data.packer(bspec, examples, shuffle=False).next_micro()]
    host = batches_lib.host_step(bspec, plans, examples, mesh, 0, {"udm_prob": probs[::-1].copy()}, micro_batches=1)
    np.testing.assert_array_equal(host["udm_prob"][0], probs[::-1][list(plans[0].examples)])  # by example index
    batch = jax.tree.map(lambda a: jnp.asarray(a[0]), host) | {"udm_prob": jnp.asarray(probs)}
    hp = {"beta": beta, "udm": True}
    step = make_spec("bco", hp, examples, "packed")
    assert "udm_prob" in step.extras
    loss = losses.get("bco")
    value, (metrics, _) = jax.jit(step_lib.make_loss_fn(CFG, step))(policy, None, base, batch, loss.init_state())
    np.testing.assert_allclose(value, np.mean(want), rtol=1e-5)
    np.testing.assert_allclose(metrics["delta"], delta, rtol=1e-5)
    plain, _ = jax.jit(step_lib.make_loss_fn(CFG, make_spec("bco", {"beta": beta}, examples, "packed")))(
        policy, None, base, batch, loss.init_state()
    )
    assert abs(float(plain) - float(value)) > 1e-3  # the weights change the loss
