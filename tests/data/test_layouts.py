"""Padded and packed layouts give the same per-token log-probs for every completion (a tiny random model
runs both), and the packed layout runs fewer tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import data, models
from prefopt_jax.logprobs import gather_completions, token_logps

CFG = models.ModelConfig(
    family="llama", vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return models.create_model(CFG, seed=0)


def random_groups(seed, n=6, k=2):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(1, 50, rng.integers(lo, hi)).astype(np.int32)
    return [(ids(1, 9), [ids(1, 12) for _ in range(k)]) for _ in range(n)]


def completion_logps(model, batch):
    params = model.params()
    inputs = {k: jnp.asarray(v) for k, v in batch.model_inputs().items()}
    hidden = models.forward_hidden(CFG, params, **inputs)
    logps = token_logps(
        hidden, models.unembedding(CFG, params), inputs["input_ids"], jnp.asarray(batch.pred_index), chunk=8
    )
    return np.asarray(gather_completions(logps, batch.completion_index, batch.completion_mask)), batch.completion_mask


def direct_logps(model, prompt, completion):
    """The completion's log-probs from a plain unpadded forward of prompt + completion alone."""
    ids = np.concatenate([prompt, completion])[None]
    logits = np.asarray(model(jnp.asarray(ids)), np.float64)[0]
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return np.array([logp[len(prompt) + i - 1, t] for i, t in enumerate(completion)])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_padded_and_packed_match_plain_forwards(model, k):
    groups = random_groups(k, k=k)
    padded = data.padded_batch(groups, buckets=(8, 16, 32))
    packed = data.packed_batch(groups, row_length=40, buckets=(16, 32, 40))
    lp_pad, mask = completion_logps(model, padded)
    lp_pack, mask2 = completion_logps(model, packed)
    np.testing.assert_array_equal(mask, mask2)
    for g, (prompt, completions) in enumerate(groups):
        for j, c in enumerate(completions):
            want = direct_logps(model, prompt, c)
            np.testing.assert_allclose(lp_pad[g, j, : len(c)], want, atol=2e-5)
            np.testing.assert_allclose(lp_pack[g, j, : len(c)], want, atol=2e-5)
    if k > 1:
        assert packed.num_tokens < padded.num_tokens  # the prompt runs once, not k times
    else:
        assert packed.num_tokens == padded.num_tokens
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]


def test_packed_attention_structure():
    prompt, c1, c2 = np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8])
    b = data.packed_batch([(prompt, [c1, c2]), (np.array([9]), [np.array([10]), np.array([11])])], row_length=16)
    a = b.attention[0]
    # rejected (c2) tokens see the prompt and themselves, never the chosen ones
    assert a[5, :3].all() and not a[5, 3:5].any() and a[5, 5] and not a[5, 6:].any()
    assert a[4, :5].all() and not a[4, 5:].any()  # chosen sees prompt and its own past
    assert not a[8, :8].any() and a[8, 8]  # the second pair's prompt sees nothing of the first pair
    np.testing.assert_array_equal(b.positions[0, :8], [0, 1, 2, 3, 4, 3, 4, 5])
    assert b.pred_index[0, 5] == 2  # the first rejected token is predicted by the prompt's last token
    assert b.pred_index[0, 3] == 2 and b.pred_index[0, 4] == 3


def test_padded_rows_are_completion_major_and_bucketed():
    groups = random_groups(4, n=3)
    b = data.padded_batch(groups, buckets=(8, 32))
    assert b.input_ids.shape == (6, 32)
    for g, (p, (c, r)) in enumerate(groups):
        np.testing.assert_array_equal(b.input_ids[g, : len(p) + len(c)], np.concatenate([p, c]))
        np.testing.assert_array_equal(b.input_ids[3 + g, : len(p) + len(r)], np.concatenate([p, r]))


def test_chunked_log_probs_equal_full_softmax_and_gradient():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 11, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 30)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 30, (2, 11)))
    full = lambda h, w: jnp.take_along_axis(jax.nn.log_softmax(h @ w)[:, :-1], y[:, 1:, None], -1)[..., 0]
    chunked = lambda h, w: token_logps(h, w, y, chunk=4)[:, 1:]
    np.testing.assert_allclose(chunked(h, w), full(h, w), atol=1e-5)
    g1 = jax.grad(lambda h, w: full(h, w).sum(), argnums=(0, 1))(h, w)
    g2 = jax.grad(lambda h, w: chunked(h, w).sum(), argnums=(0, 1))(h, w)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_kl_pairs_rotate_completions_and_response_only_drops_the_prompt():
    ex = [
        data.TokenizedUnpaired(np.array([i + 1]), np.array([10 * (i + 1), 10 * (i + 1) + 1]), i % 2 == 0, 1.0, None)
        for i in range(3)
    ]
    out = data.UnpairedCollator("padded", 16, buckets=(8,))(ex)
    kl = out["kl"]
    # (prompt_i, completion_{i-1}): prompt 1 gets completion 3's tokens, prompt 2 gets completion 1's
    np.testing.assert_array_equal(kl.input_ids[0, :3], [1, 30, 31])
    np.testing.assert_array_equal(kl.input_ids[1, :3], [2, 10, 11])
    pairs = [data.TokenizedPair(np.array([1, 2]), np.array([5, 6, 7]), np.array([8, 9]), 1.0, None)]
    alone = data.PairCollator("padded", 16, buckets=(8,), response_only=True)(pairs)["response_only"]
    np.testing.assert_array_equal(alone.input_ids[0, :3], [5, 6, 7])  # no prompt, no BOS
    assert alone.completion_mask[0, 0].sum() == 2  # the first response token is context only


def test_ranked_collator_groups_every_response():
    rng = np.random.default_rng(1)
    ex = [
        data.TokenizedRanked(
            rng.integers(1, 9, 3), tuple(rng.integers(1, 9, 2 + j) for j in range(3)), (0.1, 0.9, 0.5), 1.0, None
        )
        for _ in range(2)
    ]
    for layout in ("padded", "packed"):
        out = data.RankedCollator(layout, 32, buckets=(16, 32))(ex)
        assert out["batch"].completion_mask.shape[:2] == (2, 3)
        assert out["batch"].completion_mask.sum(-1).tolist() == [[2, 3, 4], [2, 3, 4]]
        assert out["scores"].shape == (2, 3)


def test_shared_and_packed_unshared_layouts_match_plain_forwards(model):
    """The two halves of `packed` on their own: prefix sharing without packing (a row per group) and
    packing without prefix sharing (each prompt once per completion)."""
    examples = [data.TokenizedPair(p, cs[0], cs[1], 1.0, None) for p, cs in random_groups(9)]
    shared = data.PairCollator("shared", 32, buckets=(16, 32))(examples)["batch"]
    unshared = data.PairCollator("packed_unshared", 32, buckets=(16, 32))(examples)["batch"]
    packed = data.PairCollator("packed", 32, buckets=(16, 32))(examples)["batch"]
    padded = data.PairCollator("padded", 32, buckets=(16, 32))(examples)["batch"]
    for b in (shared, unshared):
        lp, _ = completion_logps(model, b)
        for g, e in enumerate(examples):
            for j, c in enumerate((e.chosen, e.rejected)):
                np.testing.assert_allclose(lp[g, j, : len(c)], direct_logps(model, e.prompt, c), atol=2e-5)
    assert ((shared.segment_ids > 0).any(1)).sum() == len(examples)  # one group per (non-empty) row
    assert shared.num_tokens == packed.num_tokens < unshared.num_tokens == padded.num_tokens
    assert (unshared.segment_ids.max(1) > 1).any()  # some row holds several sequences
