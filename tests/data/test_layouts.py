"""The four layouts give the same per-token log-probs for every completion as plain forwards of each prompt
and completion alone (a tiny random model runs them), with the mask derived from the batch's per-token
arrays; the packed layout runs fewer tokens; micro-batches have the geometry's fixed shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import data, models
from prefopt_jax.logprobs import token_logps, token_stats
from prefopt_jax.models.mask import Tokens, visible

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


def geometry(groups, layout, rows=16, length=64):
    k = len(groups[0][1])
    return data.Geometry(rows=rows, length=length, groups=len(groups), completions=k, width=16, scored=length)


def completion_logps(model, b: data.Batch, layout: str):
    """Each completion's log-probs from a whole-row forward, read at the flat positions the batch gives
    (the token before each completion token predicts it; a completion's first token, the prompt's end)."""
    params = model.params()
    hidden = models.forward_hidden(CFG, params, **{k: jnp.asarray(v) for k, v in b.model_inputs().items()})
    logits = models.logits_from_hidden(CFG, params, hidden)
    logp = np.asarray(jax.nn.log_softmax(logits, -1)).reshape(-1, CFG.vocab_size)
    ids = b.input_ids.reshape(-1)
    out = {}
    for g in range(b.completion_start.shape[0]):
        for j in range(b.completion_start.shape[1]):
            start, n = int(b.completion_start[g, j]), int(b.completion_length[g, j])
            if not n:
                continue
            # the prompt's last token predicts the first completion token, in every layout
            pos = np.arange(start, start + n)
            shared = layout in ("packed", "shared")
            first_pred = int(b.completion_start[g, 0]) - 1 if shared else start - 1
            pred = np.concatenate([[first_pred], pos[:-1]])
            out[g, j] = logp[pred, ids[pos]]
    return out


def packed(groups, layout, **kw):
    return data.pack(groups, geometry(groups, layout, **kw), layout)


@jax.jit
def _logits(params, ids):
    return models.logits_from_hidden(CFG, params, models.forward_hidden(CFG, params, ids))


def direct_logps(model, prompt, completion):
    """The completion's log-probs from a plain unpadded forward of prompt + completion alone."""
    ids = np.concatenate([prompt, completion])[None]
    logits = np.asarray(_logits(model.params(), jnp.asarray(ids)), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    return np.array([logp[len(prompt) + i - 1, t] for i, t in enumerate(completion)])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_layout_matches_plain_forwards(model, k):
    groups = random_groups(k, k=k)
    rows = len(groups) * k  # the padded layout's row per completion
    built = {layout: packed(groups, layout, rows=rows) for layout in data.LAYOUTS}
    for layout, b in built.items():
        lp = completion_logps(model, b, layout)
        for g, (prompt, completions) in enumerate(groups):
            for j, c in enumerate(completions):
                np.testing.assert_allclose(lp[g, j], direct_logps(model, prompt, c), atol=2e-5, err_msg=layout)
        assert b.input_ids.shape == (rows, 64)  # the geometry's fixed shape, whatever the groups
    assert built["packed"].num_tokens == built["shared"].num_tokens  # the prompt once per group
    assert built["padded"].num_tokens == built["packed_unshared"].num_tokens  # once per completion
    if k > 1:
        assert built["packed"].num_tokens < built["padded"].num_tokens
    used = lambda b: int((b.segment_ids > 0).any(1).sum())
    assert used(built["packed"]) < used(built["shared"]) == len(groups)  # packing shares rows
    assert used(built["padded"]) == k * len(groups)


def test_packed_mask_structure_from_the_token_arrays():
    prompt, c1, c2 = np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8])
    groups = [(prompt, [c1, c2]), (np.array([9]), [np.array([10]), np.array([11])])]
    b = packed(groups, "packed", rows=1, length=32)
    tok = Tokens(*(jnp.asarray(a[0], jnp.int32) for a in (b.segment_ids, b.branch, b.positions)))
    idx = jnp.arange(32)
    a = np.asarray(visible(tok, idx, tok, idx, 0))
    # rejected (c2) tokens see the prompt and themselves, never the chosen ones
    assert a[5, :3].all() and not a[5, 3:5].any() and a[5, 5] and not a[5, 6:].any()
    assert a[4, :5].all() and not a[4, 5:].any()  # chosen sees prompt and its own past
    assert not a[8, :8].any() and a[8, 8]  # the second pair's prompt sees nothing of the first pair
    np.testing.assert_array_equal(b.positions[0, :8], [0, 1, 2, 3, 4, 3, 4, 5])
    np.testing.assert_array_equal(b.branch[0, :8], [0, 0, 0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(b.completion_start[0], [3, 5])
    np.testing.assert_array_equal(b.completion_length, [[2, 3], [1, 1]])
    assert not a[20, :11].any()  # padding (segment 0) sees only padding


def test_a_group_that_does_not_fit_is_refused_with_its_sizes():
    groups = random_groups(3, n=4)
    with pytest.raises(ValueError, match="does not fit"):
        data.pack(groups, geometry(groups, "shared", rows=2), "shared")  # a row per group, 2 rows


def test_row_budgets_hold_scored_tokens_and_tiles():
    rng = np.random.default_rng(5)
    groups = [(rng.integers(1, 9, 20), [rng.integers(1, 9, 30), rng.integers(1, 9, 30)]) for _ in range(3)]
    g = data.Geometry(rows=4, length=256, groups=3, completions=2, width=30, scored=70, tiles=0)
    b = data.pack(groups, g, "packed")
    scored = ((b.branch > 0) & (b.segment_ids > 0)).sum(1)
    assert scored.max() <= 70 and (b.segment_ids.max(1) <= 1).all()  # 60 scored per group: one per row
    tight = data.Geometry(rows=4, length=256, groups=3, completions=2, width=30, scored=256, tiles=60)
    b = data.pack(groups, tight, "packed")
    for r in range(4):
        bound = 0
        for seg in np.unique(b.segment_ids[r][b.segment_ids[r] > 0]):
            at = np.flatnonzero(b.segment_ids[r] == seg)
            prompt = int((b.branch[r, at] == 0).sum())
            bound += data.tile_bound(int(at[0]), prompt, [30, 30])
        assert bound <= 60


def test_kl_pairs_rotate_completions_and_response_only_drops_the_prompt():
    ex = [
        data.TokenizedUnpaired(np.array([i + 1]), np.array([10 * (i + 1), 10 * (i + 1) + 1]), i % 2 == 0, 1.0, None)
        for i in range(3)
    ]
    spec = data.batch_spec(ex, layout="padded", batch_size=3, rows=3, max_length=16, length_multiple=32)
    host = data.host_arrays(spec, data.packer(spec, ex, shuffle=False).next_micro(), ex)
    kl = host["kl"]
    # (prompt_i, completion_{i-1}): prompt 1 gets completion 3's tokens, prompt 2 gets completion 1's
    np.testing.assert_array_equal(kl.input_ids[0, :3], [1, 30, 31])
    np.testing.assert_array_equal(kl.input_ids[1, :3], [2, 10, 11])
    assert host["label"].tolist() == [True, False, True]
    pairs = [data.TokenizedPair(np.array([1, 2]), np.array([5, 6, 7]), np.array([8, 9]), 1.0, None)]
    spec = data.batch_spec(pairs, layout="padded", batch_size=1, max_length=16, response_only=True, length_multiple=32)
    alone = data.host_arrays(spec, data.packer(spec, pairs, shuffle=False).next_micro(), pairs)["response_only"]
    np.testing.assert_array_equal(alone.input_ids[0, :3], [5, 6, 7])  # no prompt, no BOS
    assert alone.completion_length[0, 0] == 2  # the first response token is context only
    assert alone.completion_length[1, 0] == 1  # the rejected one, in the second half of the group slots


def test_ranked_examples_group_every_response():
    rng = np.random.default_rng(1)
    ex = [
        data.TokenizedRanked(
            rng.integers(1, 9, 3), tuple(rng.integers(1, 9, 2 + j) for j in range(3)), (0.1, 0.9, 0.5), 1.0, None
        )
        for _ in range(2)
    ]
    for layout in ("padded", "packed"):
        spec = data.batch_spec(ex, layout=layout, batch_size=2, rows=6, max_length=32, length_multiple=32)
        host = data.host_arrays(spec, data.packer(spec, ex, shuffle=False).next_micro(), ex)
        assert host["main"].completion_length.tolist() == [[2, 3, 4], [2, 3, 4]]
        assert host["scores"].shape == (2, 3)


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


def test_chunks_with_no_active_position_are_skipped_and_the_rest_are_exact():
    """With an active mask (the scored slots a row uses), chunks where no row has an active position are
    not computed (their values are 0: a computed log-prob never is), the others equal the full softmax, and
    the gradient of the active positions' sum is the full one's."""
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 30)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 30, (2, 16)))
    active = jnp.asarray(np.arange(16)[None] < np.array([[5], [3]]))  # rows use 5 and 3 slots: chunks 0 and 1
    pred = jnp.broadcast_to(jnp.arange(16), (2, 16))
    full = lambda h, w: jnp.take_along_axis(jax.nn.log_softmax(h @ w), y[..., None], -1)[..., 0]
    part = lambda h, w: token_stats(h, w, y, pred, chunk=4, active_BxT=active)["logps"]
    got = part(h, w)
    np.testing.assert_allclose(np.where(active, got, 0), np.where(active, full(h, w), 0), atol=1e-5)
    assert (np.asarray(got[:, 8:]) == 0).all() and (np.asarray(got[:, :8]) != 0).all()  # chunks 2, 3 skipped
    g1 = jax.grad(lambda h, w: jnp.where(active, full(h, w), 0).sum(), argnums=(0, 1))(h, w)
    g2 = jax.grad(lambda h, w: jnp.where(active, part(h, w), 0).sum(), argnums=(0, 1))(h, w)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
