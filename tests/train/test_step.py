"""The fused step against a hand-written unfused computation, reference modes, LoRA, accumulation."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prefopt_jax import data, losses, models
from prefopt_jax.config import ConfigError, load_config
from prefopt_jax.data.tokenize import completions_of
from prefopt_jax.models.attention import AttentionSpec
from prefopt_jax.train import batches as batches_lib
from prefopt_jax.train import build
from prefopt_jax.train import lora as lora_lib
from prefopt_jax.train import step as step_lib

CFG = models.ModelConfig(
    family="llama", vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=4,
)  # fmt: skip


def pairs(seed, n=4):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(1, 40, rng.integers(lo, hi)).astype(np.int32)
    return [data.TokenizedPair(ids(2, 6), ids(1, 7), ids(1, 7), 1.0, None) for _ in range(n)]


def batch_spec(examples, layout="padded", micro=1, response_only=True, groups=None):
    """Micro-batches of `groups` examples (default: the examples over `micro` micro-batches): a row per unit."""
    groups = groups or len(examples) // micro
    k = max(len(completions_of(e)) for e in examples)
    return data.batch_spec(
        examples, layout=layout, batch_size=groups, rows=k * groups, max_length=32,
        response_only=response_only and isinstance(examples[0], data.TokenizedPair), tiles=True,
        length_multiple=data.TILE,
    )  # fmt: skip


def as_batch(examples, layout="padded", micro=1, response_only=True, groups=None):
    """The examples in order as one step's micro-batches (stacked on a leading axis), through the real
    packer and host builder."""
    spec = batch_spec(examples, layout, micro, response_only, groups)
    packer = data.packer(spec, examples, shuffle=False)
    plans = [packer.next_micro() for _ in range(micro)]
    parts = [batches_lib.step_arrays(data.host_arrays(spec, p, examples)) for p in plans]
    return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *parts)


def make_spec(name, hp, examples, layout="padded", micro=1, attention="block_sparse", **kw):
    """A StepSpec over the geometry `as_batch` builds for these examples."""
    geometries = batch_spec(examples, layout, micro).geometries
    return step_lib.StepSpec(losses.get(name), hp, geometries, AttentionSpec(attention), chunk=8, **kw)


@pytest.fixture(scope="module")
def base():
    return models.create_model(CFG, seed=0).params()


def seq_logp(p, prompt, completion, cfg=CFG):
    """A completion's summed log-prob from a plain forward of prompt + completion alone."""
    ids = jnp.asarray(np.concatenate([prompt, completion]))[None]
    logits = models.logits_from_hidden(cfg, p, models.forward_hidden(cfg, p, ids))[0]
    logp = jax.nn.log_softmax(logits, -1)
    rows = len(prompt) - 1 + jnp.arange(len(completion))  # the logits at t - 1 predict token t
    return jnp.sum(logp[rows, jnp.asarray(completion)])


def unfused_margins(params, ref_params, examples):
    """Each pair's DPO log-ratio margin (pc - rc) - (pr - rr), written out per sequence."""
    out = []
    for e in examples:
        pc, pr = seq_logp(params, e.prompt, e.chosen), seq_logp(params, e.prompt, e.rejected)
        rc, rr = seq_logp(ref_params, e.prompt, e.chosen), seq_logp(ref_params, e.prompt, e.rejected)
        out.append((pc - rc) - (pr - rr))
    return jnp.stack(out)


def unfused_dpo(params, ref_params, examples, beta):
    """DPO written out: a plain forward per sequence, full log-softmax, sums, the formula."""
    return jnp.mean(-jax.nn.log_sigmoid(beta * unfused_margins(params, ref_params, examples)))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_loss_and_gradients_equal_the_unfused_computation(base, layout):
    examples = pairs(1)
    policy = jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), base)
    spec = make_spec("dpo", {"beta": 0.5}, examples, layout, reference="frozen")
    loss_fn = step_lib.make_loss_fn(CFG, spec)
    batch = jax.tree.map(lambda a: a[0], as_batch(examples, layout))
    (value, (metrics, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(policy, None, base, batch, None)
    want, want_grads = jax.jit(jax.value_and_grad(lambda p: unfused_dpo(p, base, examples, 0.5)))(policy)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    margins = np.asarray(jax.jit(lambda p: unfused_margins(p, base, examples))(policy))
    assert 0 < (margins > 0).mean() < 1  # a batch where the accuracy says something
    np.testing.assert_allclose(metrics["rewards/accuracies"], (margins > 0).mean())
    np.testing.assert_allclose(metrics["rewards/margins"], 0.5 * margins.mean(), rtol=1e-5)


def test_lora_base_reference_starts_at_log2_and_the_base_never_moves(base):
    adapters = lora_lib.init_lora(CFG, rank=2, seed=1)
    spec = make_spec("dpo", {"beta": 0.1}, pairs(2), reference="lora_base", lora_scale=2.0)
    opt = optax.adam(1e-2)
    state = step_lib.init_state(adapters, opt, spec.loss)
    train = step_lib.make_train_step(CFG, spec, opt)
    before = jax.tree.map(np.asarray, base)
    batch = as_batch(pairs(2))
    state, m0 = train(state, base, None, batch)
    np.testing.assert_allclose(m0["loss"], math.log(2), rtol=1e-6)  # B = 0: the policy is the reference
    for _ in range(5):
        state, m = train(state, base, None, batch)
    assert m["loss"] < m0["loss"] - 1e-3 and m["rewards/accuracies"] > 0.5
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_full_finetune_reference_is_unchanged_and_loss_falls(base):
    spec = make_spec("dpo", {"beta": 0.1}, pairs(3), reference="frozen")
    opt = optax.adam(3e-3)
    policy = jax.tree.map(jnp.copy, base)
    state = step_lib.init_state(policy, opt, spec.loss)
    train = step_lib.make_train_step(CFG, spec, opt)
    ref = jax.tree.map(jnp.copy, base)
    before = jax.tree.map(np.asarray, ref)
    batch = as_batch(pairs(3))
    losses_seen = []
    for _ in range(6):
        state, m = train(state, None, ref, batch)
        losses_seen.append(float(m["loss"]))
    assert losses_seen[0] == pytest.approx(math.log(2), rel=1e-6) and losses_seen[-1] < losses_seen[0]
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_accumulating_four_micro_batches_equals_one_batch_of_four_times(base):
    opt = optax.sgd(0.1)
    examples = pairs(4, n=8)
    policy = jax.tree.map(lambda a: a * 1.1, base)
    results = []
    for micro in (4, 1):
        spec = make_spec("dpo", {"beta": 0.3}, examples, micro=micro, reference="frozen")
        train = step_lib.make_train_step(CFG, spec, opt)
        state = step_lib.init_state(jax.tree.map(jnp.copy, policy), opt, spec.loss)
        results.append(train(state, None, base, as_batch(examples, micro=micro)))
    (s1, m1), (s2, m2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["trainable"]), jax.tree.leaves(s2["trainable"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_precomputed_reference_equals_the_fused_one(base):
    examples = pairs(5)
    batch = jax.tree.map(lambda a: a[0], as_batch(examples))
    fused_spec = make_spec("ipo", {}, examples, reference="frozen")
    geometry = fused_spec.geometries["main"]
    ref_logps, _ = step_lib.completion_logps(CFG, base, batch["main"], geometry, fused_spec.attention_for("main"))
    policy = jax.tree.map(lambda a: a * 0.9, base)
    fused = jax.jit(step_lib.make_loss_fn(CFG, fused_spec))
    pre = jax.jit(step_lib.make_loss_fn(CFG, make_spec("ipo", {}, examples, reference="precomputed")))
    a, _ = fused(policy, None, base, batch, None)
    b, _ = pre(policy, None, None, {**batch, "ref_logps": ref_logps}, None)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_reference_free_and_response_only_losses_equal_their_formulas(base):
    """SimPO, CPO and RMiPO through the step against per-sequence forwards and the papers' formulas (RMiPO's
    response-only log-probs: the response alone, its first token as context)."""
    examples = pairs(6)
    policy = jax.tree.map(lambda a: a * 1.05, base)
    avg = lambda p, prompt, c: seq_logp(p, prompt, c) / len(c)
    alone = lambda p, c: seq_logp(p, c[:1], c[1:]) / (len(c) - 1) if len(c) > 1 else 0.0

    def unfused(name, p):
        terms = []
        for e in examples:
            ac, ar = avg(p, e.prompt, e.chosen), avg(p, e.prompt, e.rejected)
            if name == "simpo":  # beta 2, gamma/beta 0.25
                terms.append(-jax.nn.log_sigmoid(2.0 * (ac - ar - 0.25)))
            elif name == "cpo":  # beta 0.1 on summed log-probs + NLL (token mean over the batch's chosen)
                sc, sr = ac * len(e.chosen), ar * len(e.rejected)
                terms.append(-jax.nn.log_sigmoid(0.1 * (sc - sr)))
            else:  # rmipo: margin from the response-level PMI gap
                dpmi = (ac - alone(p, e.chosen)) - (ar - alone(p, e.rejected))
                margin = 0.3 + 1.3 * jnp.exp(-jnp.maximum(dpmi, 0.0))
                terms.append(-jax.nn.log_sigmoid(2.0 * (ac - ar - margin)))
        value = jnp.mean(jnp.stack(terms))
        if name == "cpo":
            nll = -sum(seq_logp(p, e.prompt, e.chosen) for e in examples) / sum(len(e.chosen) for e in examples)
            value = value + nll
        return value

    for name in ("simpo", "cpo", "rmipo"):
        spec = make_spec(name, {}, examples, reference="none")
        value, _ = jax.jit(step_lib.make_loss_fn(CFG, spec))(
            policy, None, None, jax.tree.map(lambda a: a[0], as_batch(examples)), None
        )
        np.testing.assert_allclose(value, jax.jit(lambda p, n=name: unfused(n, p))(policy), rtol=1e-5, err_msg=name)


def seq_nll_terms(p, prompt, completion, cfg=CFG):
    """(summed log-prob of every token of prompt + completion but the first, their count) from a plain
    forward of that sequence alone."""
    ids = np.concatenate([prompt, completion])
    logits = models.logits_from_hidden(cfg, p, models.forward_hidden(cfg, p, jnp.asarray(ids)[None]))[0]
    logp = jax.nn.log_softmax(logits, -1)
    return jnp.sum(logp[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]), len(ids) - 1


@pytest.mark.parametrize(
    ("layout", "reduction"), [("padded", "token"), ("packed", "sequence"), ("packed_unshared", "token")]
)
def test_orpo_as_trl_has_its_nll_over_prompt_and_chosen(base, layout, reduction):
    """ORPO with TRL's NLL (every token of prompt + chosen but the first, as a plain causal LM loss) through
    the step, against per-sequence forwards and the paper's formula: values and gradients."""
    examples = pairs(8)
    policy = jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), base)
    hp = {"beta": 0.25, "nll_over_prompt": True, "nll_reduction": reduction}
    spec = make_spec("orpo", hp, examples, layout, reference="none")
    assert "full_chosen" in spec.extras
    batch = jax.tree.map(lambda a: a[0], as_batch(examples, layout))

    def unfused(p):
        terms, sums, counts = [], [], []
        for e in examples:
            a, b = seq_logp(p, e.prompt, e.chosen) / len(e.chosen), seq_logp(p, e.prompt, e.rejected) / len(e.rejected)
            log_odds = (a - b) - (jnp.log1p(-jnp.exp(a)) - jnp.log1p(-jnp.exp(b)))
            terms.append(-0.25 * jax.nn.log_sigmoid(log_odds))
            total, n = seq_nll_terms(p, e.prompt, e.chosen)
            sums.append(total)
            counts.append(n)
        nll = (
            -sum(sums) / sum(counts)
            if reduction == "token"
            else -jnp.stack([s / n for s, n in zip(sums, counts, strict=True)])
        )
        return jnp.mean(jnp.stack(terms) + nll)

    value, grads = jax.jit(
        jax.value_and_grad(lambda p: step_lib.make_loss_fn(CFG, spec)(p, None, None, batch, None)[0])
    )(policy)
    want, want_grads = jax.jit(jax.value_and_grad(unfused))(policy)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    # the prompt term is really there: the completion-only NLL gives another value
    other = make_spec("orpo", {**hp, "nll_over_prompt": False}, examples, layout, reference="none")
    assert (
        abs(float(jax.jit(step_lib.make_loss_fn(CFG, other))(policy, None, None, batch, None)[0]) - float(want)) > 1e-3
    )


def ranked(seed, n=4, k=3):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(1, 40, rng.integers(lo, hi)).astype(np.int32)
    return [
        data.TokenizedRanked(
            ids(2, 6), tuple(ids(1, 7) for _ in range(k)), tuple(map(float, rng.permutation(k))), 1.0, None
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_rrhf_on_ranked_candidates_equals_the_formula(base, layout):
    """RRHF with three scored candidates per prompt through the step (packing and prefix sharing included)
    against per-sequence forwards and the paper's loss: Σ over ordered pairs of max(0, s_worse - s_better)
    plus the NLL of the best candidate, s the length-normalised log-prob."""
    examples = ranked(5)
    policy = jax.tree.map(lambda a: a + 0.05 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), base)
    hp = {"ft_reduction": "token", "rrhf_weight": 2.0}
    spec = make_spec("rrhf", hp, examples, layout, reference="none")
    batch = jax.tree.map(lambda a: a[0], as_batch(examples, layout))
    assert batch["scores"].shape == (4, 3)

    def unfused(p):
        losses_, agree = [], []
        for e in examples:
            s = [seq_logp(p, e.prompt, c) / len(c) for c in e.responses]
            pairs = [(i, j) for i in range(3) for j in range(3) if e.scores[i] < e.scores[j]]
            rank = sum(jax.nn.relu(s[i] - s[j]) for i, j in pairs)
            best = int(np.argmax(e.scores))
            losses_.append(2.0 * rank - seq_logp(p, e.prompt, e.responses[best]) / len(e.responses[best]))
            agree.append(jnp.mean(jnp.stack([(s[j] > s[i]).astype(jnp.float32) for i, j in pairs])))
        return jnp.mean(jnp.stack(losses_)), jnp.mean(jnp.stack(agree))

    (value, (metrics, _)), grads = jax.jit(jax.value_and_grad(step_lib.make_loss_fn(CFG, spec), has_aux=True))(
        policy, None, None, batch, None
    )
    want, want_grads = jax.jit(jax.value_and_grad(lambda p: unfused(p)[0]))(policy)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    agreement = jax.jit(lambda p: unfused(p)[1])(policy)
    assert 0 < agreement < 1  # a batch where the accuracy says something
    np.testing.assert_allclose(metrics["rrhf/rank_accuracy"], agreement, rtol=1e-5)


def test_non_finite_steps_are_skipped_counted_and_change_nothing(base):
    spec = make_spec("dpo", {}, pairs(7), reference="frozen")
    opt = optax.adam(0.1)
    bad = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan) if a.ndim else a, base)
    state = step_lib.init_state(bad, opt, spec.loss)
    before = jax.tree.map(np.asarray, {"trainable": state["trainable"], "opt_state": state["opt_state"]})
    state, m = step_lib.make_train_step(CFG, spec, opt)(state, None, base, as_batch(pairs(7)))
    assert int(m["skipped"]) == 1 and int(state["step"]) == 1
    kept = {"trainable": state["trainable"], "opt_state": state["opt_state"]}
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # parameters and Adam moments as they were (NaN included)


def test_bfloat16_compute_is_close_to_float32(base):
    """bfloat16 matmuls with float32 weights and log-softmax: the loss within 1% and the gradients within 5%
    (relative to their largest entry) of the float32 step."""
    examples = pairs(17, n=6)
    policy = jax.tree.map(lambda a: a * 1.1, base)
    batch = jax.tree.map(lambda a: a[0], as_batch(examples))
    results = {}
    for dtype in ("float32", "bfloat16"):
        spec = make_spec("dpo", {"beta": 0.5}, examples, reference="frozen", compute_dtype=dtype)
        fn = jax.jit(jax.value_and_grad(step_lib.make_loss_fn(CFG, spec), has_aux=True))
        (value, _), grads = fn(policy, None, base, batch, None)
        results[dtype] = (value, grads)
    (v32, g32), (v16, g16) = results["float32"], results["bfloat16"]
    np.testing.assert_allclose(v16, v32, rtol=1e-2)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.abs(b).max()))


def test_accuracy_by_length_on_a_hand_made_batch(base):
    """Pairs of known lengths and margins: each length bucket counts its pairs and their correct ones."""
    rng = np.random.default_rng(3)
    lens = [(3, 20, 30), (3, 40, 50), (4, 2, 3), (2, 60, 70)]  # chosen + rejected: 50, 90, 5, 130 tokens
    examples = [data.TokenizedPair(*(rng.integers(1, 40, n).astype(np.int32) for n in ls), 1.0, None) for ls in lens]
    policy = jax.tree.map(lambda a: a * 1.2, base)
    spec = make_spec("dpo", {}, examples, reference="frozen")
    batch = jax.tree.map(lambda a: a[0], as_batch(examples))
    _, (metrics, _) = jax.jit(step_lib.make_loss_fn(CFG, spec))(policy, None, base, batch, None)
    correct = np.asarray(jax.jit(lambda p: unfused_margins(p, base, examples))(policy)) > 0
    # buckets [0, 64) [64, 128) [128, 256) ...: pair 0 and 2 in the first, pair 1 in the second, pair 3 in the third
    np.testing.assert_array_equal(metrics["length_bucket/count"], [2, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(
        metrics["length_bucket/correct"], [correct[0] + correct[2], correct[1], correct[3], 0, 0, 0]
    )


def test_the_resolver_refuses_impossible_combinations():
    """One place (`train.build.resolve`, once per entry point) refuses what the step cannot compute."""
    cases = [
        (["loss.name=dpo", "train.reference=none"], "needs a reference"),
        (["loss.name=dpo", "train.reference=lora_base", "train.lora_rank=0"], "lora_base needs LoRA"),
        (["loss.name=tdpo", "train.reference=precomputed"], "inside the step"),
        (["loss.name=dpo", "train.reference=precomputed", "train.ref_sync_every=4"], "TR-DPO"),
        (["loss.name=dpo", "train.reference=copy"], "train.reference='copy'"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            build.resolve(load_config(None, overrides), devices=8)
    for name in losses.names():  # every extra a loss declares has an entry saying its shape and who computes it
        loss = losses.get(name)
        hp = {k: (1.0 if v is losses.REQUIRED else v) for k, v in loss.defaults.items()}
        assert set(loss.extras(hp)) <= set(losses.EXTRAS), name


def test_merged_lora_equals_the_adapted_forward(base):
    adapters = jax.tree.map(lambda a: a + 0.1, lora_lib.init_lora(CFG, rank=3, seed=2))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 40, (2, 9)))
    adapted = models.forward_hidden(CFG, lora_lib.with_lora(base, adapters, 0.7), ids)
    merged = models.forward_hidden(CFG, lora_lib.merge_lora(base, adapters, 0.7), ids)
    np.testing.assert_allclose(adapted, merged, atol=1e-5)


@pytest.mark.parametrize("preset,mesh_shape", [("fsdp", (1, 8, 1)), ("fsdp_tp", (2, 2, 2))])
def test_sharded_training_matches_single_device_step_for_step(preset, mesh_shape):
    """Parameters sharded by the preset, batch rows over data x fsdp: the same losses for 3 steps."""
    from jax.sharding import NamedSharding, PartitionSpec

    from prefopt_jax import sharding

    cfg = models.ModelConfig(
        family="llama", vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=4,
    )  # fmt: skip
    mesh = sharding.make_mesh(*mesh_shape)
    opt = optax.adam(1e-2)
    examples = pairs(8, n=8)
    host = as_batch(examples, groups=8)

    def run(params, ref, b, spec):
        state = step_lib.init_state(params, opt, spec.loss)
        train = step_lib.make_train_step(cfg, spec, opt)
        out = []
        for _ in range(3):
            state, m = train(state, None, ref, b)
            out.append(float(m["loss"]))
        return out

    spec = make_spec("dpo", {"beta": 0.5}, examples, reference="frozen")
    single = run(models.create_model(cfg, seed=1).params(), models.create_model(cfg, seed=1).params(), host, spec)
    sharded_params = models.create_model(cfg, seed=1, mesh=mesh, rules=preset).params()
    sharded_ref = models.create_model(cfg, seed=1, mesh=mesh, rules=preset).params()
    rows = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
    sharded_batch = {
        "main": {k: jax.device_put(v, rows) if k in batches_lib.TOKEN_ARRAYS else v for k, v in host["main"].items()},
        "weight": host["weight"],
    }
    constrain = sharding.activation_constraint(mesh, sharding.rules_for(preset))
    sharded_spec = dataclasses.replace(spec, constrain=constrain)
    assert len(sharded_params["layers"]["q"].sharding.device_set) == 8
    assert single[2] < single[0]  # the steps really train
    np.testing.assert_allclose(run(sharded_params, sharded_ref, sharded_batch, sharded_spec), single, rtol=1e-5)


def test_a_step_computes_only_the_micro_batches_its_pairs_use(base):
    """A step with room for 5 micro-batches whose pairs use 3: the 2 empty ones are skipped (a callback in
    the loss runs 3 times per step, not 5; the step reports 3) and the step equals the same 3 micro-batches
    without the room (loss, gradient norm and updated weights)."""
    opt = optax.sgd(0.1)
    examples = pairs(6, n=6)
    calls = []
    dpo = losses.get("dpo")

    def counted(inputs, state, hp):  # the loss itself, and a host callback each time it is computed
        jax.debug.callback(lambda: calls.append(1))
        return dpo.compute(inputs, state, hp)

    spec = make_spec("dpo", {"beta": 0.3}, examples, micro=3, reference="frozen")
    spec = dataclasses.replace(spec, loss=dataclasses.replace(dpo, compute=counted))
    bspec = batch_spec(examples, micro=3)
    packer = data.packer(bspec, examples, shuffle=False)
    plans = [packer.next_micro() for _ in range(3)]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    policy = jax.tree.map(lambda a: a * 1.1, base)
    results = []
    for room in (5, 3):
        host = batches_lib.host_step(bspec, plans, examples, mesh, 0, micro_batches=room)
        assert host["weight"].shape[0] == room
        train = step_lib.make_train_step(CFG, spec, opt)
        state = step_lib.init_state(jax.tree.map(jnp.copy, policy), opt, spec.loss)
        calls.clear()
        state, metrics = train(state, None, base, jax.tree.map(jnp.asarray, host))
        jax.effects_barrier()
        assert len(calls) == 3 and int(metrics["micro_batches"]) == 3, (room, len(calls))
        results.append((state, metrics))
    (s5, m5), (s3, m3) = results
    np.testing.assert_allclose(m5["loss"], m3["loss"], rtol=1e-6)
    np.testing.assert_allclose(m5["grad_norm"], m3["grad_norm"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s5["trainable"]), jax.tree.leaves(s3["trainable"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)
