"""Block-sparse attention equals dense attention: values and gradients, padded and packed rows, sliding
windows and logit softcaps, and the tile list covers exactly the mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import data, models
from prefopt_jax.models import block_sparse

CONFIGS = {
    "llama": models.ModelConfig(
        family="llama", vocab_size=60, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=4,
    ),
    "mistral_window": models.ModelConfig(
        family="mistral", vocab_size=60, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=4, layer_windows=(5, 5),
    ),
    "gemma2_softcap": models.ModelConfig(
        family="gemma2", vocab_size=60, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=4, layer_windows=(6, 0), attn_logit_softcap=5.0, final_logit_softcap=10.0,
        sandwich_norms=True, norm_offset=1.0, embed_scale=True, activation="gelu_tanh", tie_embeddings=True,
    ),
}  # fmt: skip


def groups(seed, n=7):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(1, 60, rng.integers(lo, hi)).astype(np.int32)
    return [(ids(1, 12), [ids(1, 14), ids(1, 14)]) for _ in range(n)]


def batch_for(layout, seed):
    g = groups(seed)
    if layout == "padded":
        b = data.padded_batch(g, buckets=(16, 32))
        mask = block_sparse.causal_mask(b.segment_ids)
    else:
        b = data.packed_batch(g, row_length=64, buckets=(32, 64))
        mask = b.attention
    return b, mask


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_block_sparse_equals_dense_values_and_gradients(name, layout):
    cfg = CONFIGS[name]
    params = models.create_model(cfg, seed=1).params()
    b, mask = batch_for(layout, seed=3)
    tiles = block_sparse.attention_blocks(mask, block=8)
    assert tiles is not None
    inputs = dict(
        input_ids=jnp.asarray(b.input_ids), positions=jnp.asarray(b.positions), segment_ids=jnp.asarray(b.segment_ids)
    )
    real = jnp.asarray(b.segment_ids > 0)[..., None]

    def dense(p):
        return models.forward_hidden(cfg, p, **inputs, mask=None if b.attention is None else jnp.asarray(b.attention))

    def sparse(p):
        return models.forward_hidden(cfg, p, **inputs, tiles=jax.tree.map(jnp.asarray, tiles))

    np.testing.assert_allclose(jnp.where(real, sparse(params), 0), jnp.where(real, dense(params), 0), atol=1e-5)
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(*b.input_ids.shape, cfg.hidden_size)), jnp.float32)
    objective = lambda f: lambda p: jnp.sum(jnp.where(real, f(p), 0) * weights)
    g_dense, g_sparse = jax.grad(objective(dense))(params), jax.grad(objective(sparse))(params)
    for a, c in zip(jax.tree.leaves(g_sparse), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(a, c, atol=2e-6 * float(np.abs(c).max()) + 1e-6, rtol=1e-4)


def test_tiles_cover_exactly_the_mask():
    _, mask = batch_for("packed", seed=4)
    tiles = block_sparse.attention_blocks(mask, block=8)
    r, t, _ = mask.shape
    rebuilt = np.zeros_like(mask)
    for row, q, k, m in zip(tiles["row"], tiles["q"], tiles["k"], tiles["mask"], strict=True):
        rebuilt[row, q * 8 : (q + 1) * 8, k * 8 : (k + 1) * 8] |= m
    np.testing.assert_array_equal(rebuilt, mask)
    n_nonempty = int(tiles["mask"].any(axis=(1, 2)).sum())
    assert n_nonempty < r * (t // 8) * (t // 8 + 1) // 2  # fewer than the dense causal tiles
    assert len(tiles["row"]) == block_sparse.tile_buckets(n_nonempty) >= n_nonempty
    assert block_sparse.attention_blocks(np.ones((1, 12, 12), bool), block=8) is None  # 12 does not tile by 8


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [16, 24])  # 24 does not divide the 64-token rows: the padded tail
def test_query_chunked_attention_equals_whole_rows(name, chunk, monkeypatch):
    """Long rows attend a chunk of queries at a time; the unchunked path is the one checked against
    transformers (tests/models/test_hf_parity.py). Each attention layer's output and its gradients
    (inputs and weights) agree to float32 roundoff, and so do the whole model's hidden states. (Whole-model
    gradients are not compared: the random Gemma 2 model's own gradients move 13% under a 1e-6 relative
    change of its weights, so roundoff alone would decide such a test.)"""
    from prefopt_jax.models import decoder

    cfg = CONFIGS[name]
    params = models.create_model(cfg, seed=1).params()
    b, _ = batch_for("packed", seed=5)
    ids, seg, pos = jnp.asarray(b.input_ids), jnp.asarray(b.segment_ids), jnp.asarray(b.positions)
    allowed = decoder.attention_mask(ids, seg, jnp.asarray(b.attention))
    rope = decoder.rope_tables(cfg, pos)
    real = jnp.asarray(b.segment_ids > 0)[..., None]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(*ids.shape, cfg.hidden_size)), jnp.float32)

    def layer_loss(x, p, window):
        out = decoder._attention(cfg, p, x, pos, allowed, window, rope, decoder.no_constraint, None)
        return jnp.sum(jnp.where(real, out, 0.0) ** 2)

    def hidden():
        return models.forward_hidden(cfg, params, ids, pos, seg, jnp.asarray(b.attention))

    grad = jax.value_and_grad(layer_loss, argnums=(0, 1))
    layers = [(jax.tree.map(lambda a, i=i: a[i], params["layers"]), cfg.windows[i]) for i in range(cfg.num_layers)]
    whole = [grad(x, p, w) for p, w in layers]
    whole_hidden = hidden()
    monkeypatch.setattr(decoder, "QUERY_CHUNK", chunk)
    for (p, w), expected in zip(layers, whole, strict=True):
        for a, c in zip(jax.tree.leaves(expected), jax.tree.leaves(grad(x, p, w)), strict=True):
            np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))
    np.testing.assert_allclose(jnp.where(real, hidden(), 0), jnp.where(real, whole_hidden, 0), rtol=1e-4, atol=1e-5)
