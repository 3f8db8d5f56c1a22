"""Every attention implementation equals dense attention over the mask of `mask.visible`: values and
gradients, padded and packed rows, sliding windows and logit soft-caps (block-sparse tiles on CPU; the Pallas
TPU kernel is in test_flash_tpu.py). The device's tile list covers exactly the mask and never overflows the
packer's budget; query-chunked dense attention equals whole rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import data, models
from prefopt_jax.models import attention, block_sparse, decoder
from prefopt_jax.models.attention import AttentionSpec
from prefopt_jax.models.mask import Tokens, visible

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


def batch_for(layout, seed, tiles=0):
    g = groups(seed)
    rows = 2 * len(g) if layout == "padded" else 4
    geometry = data.Geometry(rows=rows, length=64, groups=len(g), completions=2, width=14, scored=64, tiles=tiles)
    return data.pack(g, geometry, layout)


def inputs_of(b):
    return {k: jnp.asarray(v) for k, v in b.model_inputs().items()}


def tiles_per_row(b, block=8):
    """The exact number of non-empty tiles of the busiest row (what the packer budgets for)."""
    tok = Tokens(*(jnp.asarray(a, jnp.int32) for a in (b.segment_ids, b.branch, np.zeros_like(b.positions))))
    idx = jnp.broadcast_to(jnp.arange(b.input_ids.shape[1]), b.input_ids.shape)
    mask = np.asarray(visible(tok, idx, tok, idx, 0) & (tok.segment_ids > 0)[:, :, None])
    r, t, _ = mask.shape
    return int(mask.reshape(r, t // block, block, t // block, block).any(axis=(2, 4)).sum(axis=(1, 2)).max()), mask


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_block_sparse_equals_dense_values_and_gradients(name, layout):
    cfg = CONFIGS[name]
    params = models.create_model(cfg, seed=1).params()
    b = batch_for(layout, seed=3)
    inputs = inputs_of(b)
    real = jnp.asarray(b.segment_ids > 0)[..., None]
    budget = tiles_per_row(b, block_sparse.BLOCK)[0]

    def forward(spec):
        return lambda p: models.forward_hidden(cfg, p, **inputs, attention=spec)

    dense, sparse = forward(AttentionSpec("dense")), forward(AttentionSpec("block_sparse", tiles_per_row=budget))
    np.testing.assert_allclose(jnp.where(real, sparse(params), 0), jnp.where(real, dense(params), 0), atol=1e-5)
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(*b.input_ids.shape, cfg.hidden_size)), jnp.float32)
    objective = lambda f: lambda p: jnp.sum(jnp.where(real, f(p), 0) * weights)
    g_dense, g_sparse = jax.grad(objective(dense))(params), jax.grad(objective(sparse))(params)
    for a, c in zip(jax.tree.leaves(g_sparse), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(a, c, atol=2e-6 * float(np.abs(c).max()) + 1e-6, rtol=1e-4)


def test_tiles_from_tokens_cover_exactly_the_mask_within_the_budget():
    b = batch_for("packed", seed=4)
    need, mask = tiles_per_row(b, block=8)
    tok = Tokens(*(jnp.asarray(a, jnp.int32) for a in (b.segment_ids, b.branch, b.positions)))
    tiles = jax.tree.map(np.asarray, block_sparse.tiles_from_tokens(tok, need, block=8))
    rebuilt = np.zeros_like(mask)
    for row, q, k, m in zip(tiles["row"], tiles["q"], tiles["k"], tiles["mask"], strict=True):
        rebuilt[row, q * 8 : (q + 1) * 8, k * 8 : (k + 1) * 8] |= m
    np.testing.assert_array_equal(rebuilt, mask)
    t = b.input_ids.shape[1]
    assert need < (t // 8) * (t // 8 + 1) // 2  # fewer than the dense causal tiles of a row


def test_the_packers_tile_bound_is_never_below_the_tiles_on_the_device():
    """Random groups packed under a tile budget: the device's exact count of every row's non-empty tiles is
    within the budget the packer enforced (so `tiles_from_tokens` never drops a tile)."""
    rng = np.random.default_rng(7)
    for trial in range(20):
        n = int(rng.integers(2, 9))
        g = [(rng.integers(1, 9, rng.integers(1, 40)), [rng.integers(1, 9, rng.integers(1, 40)) for _ in range(2)])
             for _ in range(n)]  # fmt: skip
        budget = int(rng.integers(40, 160))
        geometry = data.Geometry(rows=n, length=256, groups=n, completions=2, width=40, scored=256, tiles=budget)
        b = data.pack(g, geometry, "packed")
        assert tiles_per_row(b, block=data.TILE)[0] <= budget, trial


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [16, 24])  # 24 does not divide the 64-token rows: the padded tail
def test_query_chunked_attention_equals_whole_rows(name, chunk, monkeypatch):
    """Long rows attend a chunk of queries at a time; the unchunked path is the one checked against
    transformers (tests/models/test_hf_parity.py). Each attention layer's output and its gradients
    (inputs and weights) agree to float32 roundoff, and so do the whole model's hidden states. (Whole-model
    gradients are not compared: the random Gemma 2 model's own gradients move 13% under a 1e-6 relative
    change of its weights, so roundoff alone would decide such a test.)"""
    cfg = CONFIGS[name]
    params = models.create_model(cfg, seed=1).params()
    b = batch_for("packed", seed=5)
    inputs = inputs_of(b)
    tokens = Tokens(inputs["segment_ids"], inputs["branch"], inputs["positions"])
    rope = decoder.rope_tables(cfg, inputs["positions"])
    real = jnp.asarray(b.segment_ids > 0)[..., None]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(*b.input_ids.shape, cfg.hidden_size)), jnp.float32)
    spec = AttentionSpec("dense")

    def layer_loss(x, p, window):
        out = decoder._attention(cfg, p, x, tokens, window, rope, decoder.no_constraint, spec)
        return jnp.sum(jnp.where(real, out, 0.0) ** 2)

    grad = jax.value_and_grad(layer_loss, argnums=(0, 1))
    layers = [(jax.tree.map(lambda a, i=i: a[i], params["layers"]), cfg.windows[i]) for i in range(cfg.num_layers)]
    whole = [grad(x, p, w) for p, w in layers]
    whole_hidden = models.forward_hidden(cfg, params, **inputs)
    monkeypatch.setattr(attention, "QUERY_CHUNK", chunk)
    for (p, w), expected in zip(layers, whole, strict=True):
        for a, c in zip(jax.tree.leaves(expected), jax.tree.leaves(grad(x, p, w)), strict=True):
            np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))
    chunked = models.forward_hidden(cfg, params, **inputs)
    np.testing.assert_allclose(jnp.where(real, chunked, 0), jnp.where(real, whole_hidden, 0), rtol=1e-4, atol=1e-5)


def test_cudnn_wrapper_with_the_derived_mask_equals_dense():
    """The GPU path's call of jax.nn.dot_product_attention with the device-derived mask, run with XLA's
    implementation here (cuDNN itself needs a GPU)."""
    cfg = CONFIGS["mistral_window"]
    b = batch_for("packed", seed=6)
    inputs = inputs_of(b)
    tokens = Tokens(inputs["segment_ids"], inputs["branch"], inputs["positions"])
    rng = np.random.default_rng(1)
    shape = (*b.input_ids.shape, cfg.num_kv_heads)
    q = jnp.asarray(rng.normal(size=(*shape, 2, cfg.head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(*shape, cfg.head_dim)), jnp.float32) for _ in range(2))
    real = jnp.asarray(b.segment_ids > 0)[..., None, None]
    want = attention.dense(cfg, q, k, v, tokens, 5)
    got = attention._cudnn(cfg, q, k, v, tokens, 5, implementation="xla")
    np.testing.assert_allclose(jnp.where(real, got, 0), jnp.where(real, want, 0), atol=1e-5)
