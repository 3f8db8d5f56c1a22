"""The Pallas GPU (Triton) flash kernel, run in interpret mode on CPU, equals dense attention over the mask of
`mask.visible`: values and gradients of q, k and v on packed prefix-shared rows with padding, grouped kv
heads, Gemma 2 soft-capping, Mistral sliding windows and head_dim 256, in float32 and bfloat16; it computes
exactly the non-empty tiles (counted inside its loops against the mask's own tiles); it runs in the model
under shard_map on the 8-device mesh; and Pallas lowers all three kernels to Triton for CUDA from this host."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import config, models
from prefopt_jax.models import attention, flash_gpu
from prefopt_jax.models.mask import visible
from tests.models.attention_cases import model_equals_dense_alone_and_under_a_mesh, packed_rows, reference


def qkv(rows, heads, kv_heads, length, dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(rows, heads, length, dim)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(rows, kv_heads, length, dim)), dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize(
    "heads,kv_heads,dim,window,softcap,dtype",
    [
        (4, 2, 64, 0, None, jnp.float32),
        (2, 2, 128, 70, None, jnp.float32),
        (3, 1, 64, 0, 20.0, jnp.float32),
        (4, 2, 256, 50, 30.0, jnp.float32),
        (4, 1, 128, 0, None, jnp.bfloat16),
    ],
    ids=["gqa", "window", "softcap_mqa", "gemma2_dim256", "bf16"],
)
def test_kernel_equals_dense_attention_values_and_gradients(heads, kv_heads, dim, window, softcap, dtype):
    length = 384
    tok = packed_rows(2, length, seed=heads + dim)
    q, k, v = qkv(2, heads, kv_heads, length, dim, dtype)
    w, scale = jnp.int32(window), dim**-0.5
    block = flash_gpu.block_for(length, dim)
    assert block == (64 if dim > 128 else 128)
    real = (tok.segment_ids > 0)[:, None, :, None]
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    kernel = lambda q, k, v: flash_gpu.flash_attention(q, k, v, *tok, w, scale, softcap, block, True)
    # the reference in float32 from the same (possibly rounded) inputs
    dense = lambda q, k, v: reference(*(a.astype(jnp.float32) for a in (q, k, v)), tok, w, scale, softcap)
    loss = lambda f: lambda *a: jnp.sum(jnp.where(real, f(*a).astype(jnp.float32), 0) * weights)
    got = (kernel(q, k, v), *jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v))
    want = (dense(q, k, v), *jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v))
    # float32: to rounding; bfloat16: relative error (to the largest entry) <= 1e-2, gradients included
    tol = 2e-5 if dtype == jnp.float32 else 1e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        a = jnp.where(real, a, 0) if name == "out" else a
        b = jnp.where(real, b, 0) if name == "out" else b
        err = float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b).max())
        assert err <= tol, (name, err)


def test_the_kernels_compute_exactly_the_non_empty_tiles():
    """Counted inside the kernels' loops: each query block's forward and dq programs visit the key blocks
    in which some real query sees some key (from the dense mask, tile by tile), each key block's dk/dv
    program those query blocks once per query head of its group; fewer than the causal triangle. Forward
    tiles of 128, backward tiles of 64 (`BACKWARD_BLOCK`)."""
    rows, length, heads, kv_heads = 3, 512, 4, 2
    tok = packed_rows(rows, length, seed=9)
    q, k, v = qkv(rows, heads, kv_heads, length, 32, jnp.float32)
    idx = jnp.broadcast_to(jnp.arange(length), tok.segment_ids.shape)

    def non_empty(mask, block):  # [R, query block, key block], and the tiles themselves
        n = length // block
        tiles = mask.reshape(rows, n, block, n, block).transpose(0, 1, 3, 2, 4)
        return tiles.any(axis=(3, 4)), tiles

    for window in (0, 40):
        mask = np.asarray(visible(tok, idx, tok, idx, window) & (tok.segment_ids > 0)[:, :, None])
        got = flash_gpu.tiles_visited(q, k, v, *tok, jnp.int32(window), 0.2, None, 128)
        forward, _ = non_empty(mask, 128)
        backward, tiles = non_empty(mask, flash_gpu.BACKWARD_BLOCK)
        n = length // flash_gpu.BACKWARD_BLOCK
        np.testing.assert_array_equal(got["fwd"], np.broadcast_to(forward.sum(2)[:, None], (rows, heads, 4)))
        np.testing.assert_array_equal(got["dq"], np.broadcast_to(backward.sum(2)[:, None], (rows, heads, n)))
        want_k = np.broadcast_to(backward.sum(1)[:, None] * (heads // kv_heads), (rows, kv_heads, n))
        np.testing.assert_array_equal(got["dkv"], want_k)
        assert backward.sum() < rows * n * (n + 1) // 2  # skipping is real: fewer than a causal triangle
        kinds = np.asarray(flash_gpu.tile_kinds(*tok, window, flash_gpu.BACKWARD_BLOCK))
        np.testing.assert_array_equal(kinds == flash_gpu.FULL, tiles.all(axis=(3, 4)))
        np.testing.assert_array_equal(kinds != flash_gpu.EMPTY, backward)


def test_gpu_kernel_in_the_model_and_under_a_mesh_equals_dense():
    model_equals_dense_alone_and_under_a_mesh("pallas_gpu", head_dim=16)


def test_requests_and_defaults():
    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=256, attn_logit_softcap=50.0)  # fmt: skip
    assert attention.resolve("pallas_gpu", "gpu", cfg, "bfloat16") == "pallas_gpu"
    assert attention.resolve("auto", "gpu", cfg, "bfloat16") == "dense"  # until the device run times the kernel
    with pytest.raises(ValueError, match="cannot run on tpu"):
        attention.resolve("pallas_gpu", "tpu", cfg, "bfloat16")
    with pytest.raises(ValueError, match="cannot run on gpu"):  # head_dim 80 is not a power of two
        attention.resolve("pallas_gpu", "gpu", dataclasses.replace(cfg, head_dim=80), "bfloat16")
    assert flash_gpu.block_for(384, 128) == 128 and flash_gpu.block_for(96, 128) == 32
    assert flash_gpu.block_for(512, 512) is None  # a 512-wide tile would not fit shared memory
    assert config.ATTENTION == ("auto", *attention.IMPLEMENTATIONS)


def test_pallas_lowers_the_three_kernels_to_triton_for_cuda():
    """Forward and backward, bfloat16, Llama-3-8B's heads on 2,048-token rows and Gemma 2's head_dim 256 with
    soft-capping and a window: Pallas' Triton lowering (the GPU compiler's input) accepts every kernel."""
    t, sds = 2048, jax.ShapeDtypeStruct
    for heads, kv_heads, dim, softcap in ((32, 8, 128, None), (16, 8, 256, 50.0)):
        args = [sds((1, heads, t, dim), jnp.bfloat16), *[sds((1, kv_heads, t, dim), jnp.bfloat16)] * 2]
        args += [sds((1, t), jnp.int32)] * 3 + [sds((), jnp.int32)]
        kernel = functools.partial(
            flash_gpu.flash_attention, scale=dim**-0.5, softcap=softcap, block=flash_gpu.block_for(t, dim)
        )
        loss = lambda q, k, v, *rest, kernel=kernel: jnp.sum(kernel(q, k, v, *rest).astype(jnp.float32))
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",))
        text = lowered.as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3
        assert all(f"prefopt_flash_gpu_{k}" in text for k in ("fwd", "dq", "dkv"))
