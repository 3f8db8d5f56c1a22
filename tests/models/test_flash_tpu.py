"""The Pallas TPU flash kernel (run in interpret mode on CPU) equals dense attention over the mask of
`mask.visible`: values and gradients of q, k and v, for packed preference rows with padding, grouped kv
heads, Gemma 2 soft-capping and sliding windows; its tile classes are exact where they claim to be; it runs
under shard_map on a mesh; and libtpu's compiler accepts it for a real TPU slice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import models
from prefopt_jax.models import attention, flash_tpu
from prefopt_jax.models.mask import visible
from tests.models.attention_cases import model_equals_dense_alone_and_under_a_mesh, packed_rows, reference


@pytest.mark.parametrize(
    "heads,kv_heads,dim,window,softcap",
    [(4, 2, 64, 0, None), (2, 2, 128, 70, None), (3, 1, 64, 0, 20.0)],
    ids=["gqa", "window", "softcap_mqa"],
)
def test_kernel_equals_dense_attention_values_and_gradients(heads, kv_heads, dim, window, softcap):
    tok = packed_rows(2, 384, seed=heads + dim)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, heads, 384, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, kv_heads, 384, dim)), jnp.float32) for _ in range(2))
    w, scale = jnp.int32(window), dim**-0.5
    real = (tok.segment_ids > 0)[:, None, :, None]
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    kernel = lambda q, k, v: flash_tpu.flash_attention(q, k, v, *tok, w, scale, softcap, 128, True)
    dense = lambda q, k, v: reference(q, k, v, tok, w, scale, softcap)
    np.testing.assert_allclose(jnp.where(real, kernel(q, k, v), 0), jnp.where(real, dense(q, k, v), 0), atol=2e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.where(real, f(*a), 0) * weights)
    got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()))


def test_tile_classes_are_exact_where_they_claim():
    """EMPTY tiles hold no visible pair and FULL tiles only visible pairs (of real queries), for every
    window; PARTIAL tiles are the rest. The classification skips tiles: fewer than a causal triangle."""
    tok = packed_rows(3, 512, seed=9)
    idx = jnp.broadcast_to(jnp.arange(512), tok.segment_ids.shape)
    for window in (0, 40, 200):
        kinds = np.asarray(flash_tpu.block_kinds(*tok, window, 128))
        mask = np.asarray(visible(tok, idx, tok, idx, window) & (tok.segment_ids > 0)[:, :, None])
        tiles = mask.reshape(3, 4, 128, 4, 128).transpose(0, 1, 3, 2, 4)
        assert not tiles[kinds == flash_tpu.EMPTY].any()
        assert tiles[kinds == flash_tpu.FULL].all()
        assert (kinds == flash_tpu.EMPTY).sum() > 3 * 6  # more than the 6 tiles above the diagonal of each row
    fetch = np.asarray(flash_tpu.fetch_order(jnp.asarray(kinds)))
    nonempty = kinds != flash_tpu.EMPTY
    np.testing.assert_array_equal(fetch[nonempty], np.broadcast_to(np.arange(4), kinds.shape)[nonempty])


def test_pallas_attention_in_the_model_and_under_a_mesh_equals_dense():
    model_equals_dense_alone_and_under_a_mesh("pallas", head_dim=8)
    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
    assert attention.resolve("auto", "tpu", cfg, "bfloat16") == "pallas"
    assert attention.resolve("auto", "gpu", cfg, "bfloat16") == "cudnn"
    assert attention.resolve("auto", "gpu", cfg, "float32") == "dense"  # cuDNN runs half precision only
    assert attention.resolve("auto", "cpu", cfg, "float32") == "block_sparse"


def test_libtpu_compiles_the_kernel_for_a_tpu_slice():
    """Forward and backward of the kernel, bfloat16, compiled by libtpu's Mosaic compiler for one v5p chip
    from this CPU host (no TPU is claimed)."""
    from prefopt_jax.train import plan

    if not plan.has_libtpu():
        pytest.skip("libtpu not installed (pip install -e '.[tpu]')")
    devices, simulated = plan.target_devices(plan.target("v5p-8"))
    assert not simulated
    mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("x",))
    one = jax.sharding.SingleDeviceSharding(devices[0])
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)
    args = [
        sds((2, 8, 1024, 128), jnp.bfloat16),
        sds((2, 2, 1024, 128), jnp.bfloat16),
        sds((2, 2, 1024, 128), jnp.bfloat16),
    ]
    args += [sds((2, 1024), jnp.int32)] * 3 + [sds((), jnp.int32)]
    loss = lambda q, k, v, *rest: jnp.sum(flash_tpu.flash_attention(q, k, v, *rest, 0.1, 50.0, 512).astype(jnp.float32))
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    text = compiled.as_text()  # the compiled TPU program holds the three Mosaic kernels
    assert "tpu_custom_call" in text and all(f"prefopt_flash_{k}" in text for k in ("fwd", "dq", "dkv"))
