"""Packed preference rows and a written-out dense attention, shared by the flash kernels' tests."""

import jax
import jax.numpy as jnp
import numpy as np

from prefopt_jax import data, models, sharding
from prefopt_jax.models.attention import AttentionSpec
from prefopt_jax.models.mask import Tokens, visible


def packed_rows(rows, length, seed):
    """Token arrays of rows packed with random [prompt | chosen | rejected] groups and padding at the end."""
    rng = np.random.default_rng(seed)
    groups = []
    while len(groups) < 40:
        groups.append(
            (np.ones(rng.integers(3, 60), np.int32), [np.ones(rng.integers(1, 90), np.int32) for _ in (0, 1)])
        )
    plan = data.RowPlan(data.Geometry(rows, length, 40, 2, 90, length), "packed")
    for slot, (p, cs) in enumerate(groups):
        plan.place(len(p), [len(c) for c in cs], slot)
    b = data.batching.build(plan, groups)
    return Tokens(*(jnp.asarray(a, jnp.int32) for a in (b.segment_ids, b.branch, b.positions)))


def reference(q, k, v, tok, window, scale, softcap):
    """Dense attention, written out: every (query, key) score, the mask, a softmax."""
    g = q.shape[1] // k.shape[1]
    kk, vv = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
    s = jnp.einsum("rhqe,rhke->rhqk", q, kk) * scale
    if softcap:
        s = jnp.tanh(s / softcap) * softcap
    idx = jnp.broadcast_to(jnp.arange(q.shape[2]), tok.segment_ids.shape)
    s = jnp.where(visible(tok, idx, tok, idx, window)[:, None], s, -jnp.inf)
    return jnp.einsum("rhqk,rhke->rhqe", jax.nn.softmax(s, -1), vv)


def model_equals_dense_alone_and_under_a_mesh(impl: str, head_dim: int) -> None:
    """A 2-layer model with attention `impl` (interpret mode) equals the dense one on packed rows, on one
    device and on the 8-device mesh (rows over data x fsdp, kv heads over tensor), where the kernel runs
    under shard_map."""
    cfg = models.ModelConfig(
        family="llama", vocab_size=64, hidden_size=4 * head_dim, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=head_dim,
    )  # fmt: skip
    tok = packed_rows(8, 256, seed=3)
    ids = jnp.asarray(np.random.default_rng(2).integers(1, 64, tok.segment_ids.shape), jnp.int32)
    args = dict(positions=tok.positions, segment_ids=tok.segment_ids, branch=tok.branch)
    params = models.create_model(cfg, seed=0).params()
    real = (tok.segment_ids > 0)[..., None]
    spec = AttentionSpec(impl, interpret=True)
    want = models.forward_hidden(cfg, params, ids, **args, attention=AttentionSpec("dense"))
    got = models.forward_hidden(cfg, params, ids, **args, attention=spec)
    np.testing.assert_allclose(jnp.where(real, got, 0), jnp.where(real, want, 0), atol=1e-5)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = models.create_model(cfg, seed=0, mesh=mesh, rules="fsdp_tp").params()
    constrain = sharding.activation_constraint(mesh, sharding.rules_for("fsdp_tp"))
    forward = jax.jit(lambda p, i: models.forward_hidden(cfg, p, i, **args, attention=spec, constrain=constrain))
    np.testing.assert_allclose(jnp.where(real, forward(sharded, ids), 0), jnp.where(real, want, 0), atol=1e-5)
    assert "manual_computation" in forward.lower(sharded, ids).as_text()  # the kernel ran under shard_map
