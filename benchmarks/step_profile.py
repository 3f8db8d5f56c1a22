"""Where a CPU DPO step's time goes: the pieces of one micro-batch of the CPU DPO benchmark (`dpo_vs_trl.py`:
SmolLM2-135M architecture, full fine-tuning with a frozen reference, fp32, block-sparse attention), each
jitted alone and timed (median of `--repeats` after a warm-up), with its FLOPs and its rate against this
machine's measured fp32 matmul peak.

The micro-batch is the first one the run plans (the first 64 helpful pairs of hh_rlhf_test.jsonl, 8 per
step, one CPU device: a row of T tokens); weights are random (shapes decide the time). Pieces:
- attention: the block-sparse attention op of one layer (forward + backward), times the layers;
- MLP: one layer's gated MLP (forward + backward), times the layers;
- layers: the policy's whole stack forward + backward under `remat=full` (attention and MLP forward twice, as
  the step runs it) and the reference's forward, norms, rotary and projections included;
- unembedding: the scored slots' log-probs (policy forward + backward, reference forward), chunk skipping on;
- optimizer: gradient clipping and AdamW over every parameter;
- the whole step for this one micro-batch; what the pieces do not account for is the rest (the loss, gathers,
  the accumulation loop, dispatch).
The host's share (planning and building the next step's arrays) runs in the background: the run's
`host_time` metric.

    python benchmarks/step_profile.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import timed

from prefopt_jax import data, losses, models
from prefopt_jax.logprobs import token_stats
from prefopt_jax.models import attention as attention_lib
from prefopt_jax.models import decoder
from prefopt_jax.models.mask import Tokens
from prefopt_jax.train import batches, flops
from prefopt_jax.train import step as step_lib

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_test.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"needs {DATA}", file=sys.stderr)
        return 1
    tok = models.load_tokenizer("smollm2-135m-instruct")
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[2303 : 2303 + 64]]
    pairs = data.prepare(rows, tok, max_length=512, max_prompt_length=384).train
    spec = data.batch_spec(pairs, layout="packed", batch_size=8, max_length=512, steps=8, tiles=True,
                           length_multiple=data.TILE)  # fmt: skip
    g = spec.geometries["main"]
    plan = data.packer(spec, pairs, seed=0).next_step()[0]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    host = batches.host_step(spec, [plan], pairs, mesh, tok.pad_token_id or 0, micro_batches=1)
    batch = jax.tree.map(jnp.asarray, host)
    mb = jax.tree.map(lambda a: a[0], batch["main"])

    mcfg = models.model_config("smollm2-135m-instruct")
    params = models.create_model(mcfg, seed=0).params()
    reference = jax.tree.map(jnp.copy, params)
    attn = attention_lib.AttentionSpec("block_sparse", tiles_per_row=g.tiles)
    L, D, T = mcfg.num_layers, mcfg.hidden_size, g.length
    peak = flops.measured_peak_flops(n=2048, repeats=10)
    tokens, attended, scored = flops.plan_counts(plan.parts["main"])
    print(f"micro-batch: {g.rows} x {T} tokens ({int(tokens)} real, {int(scored)} scored of {g.rows * g.scored} "
          f"slots), {len(plan.examples)} pairs; measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")  # fmt: skip

    layer = jax.tree.map(lambda a: a[0], params["layers"])
    tokens_arr = Tokens(*(mb[k].astype(jnp.int32) for k in ("segment_ids", "branch", "positions")))
    rope = decoder.rope_tables(mcfg, mb["positions"].astype(jnp.int32))
    x = jax.random.normal(jax.random.PRNGKey(0), (g.rows, T, D), jnp.float32)

    def attention_only(p, x):
        q, k, v = decoder.qkv(mcfg, p, x, rope)
        return attention_lib.attention(mcfg, attn, q, k, v, tokens_arr, 0).sum()

    def qkv_only(p, x):  # the projections alone, to take them out of the attention figure
        return sum(a.sum() for a in decoder.qkv(mcfg, p, x, rope))

    mlp = lambda p, x: decoder._mlp(mcfg, p, x, decoder.no_constraint).sum()
    grad2 = lambda f: jax.jit(jax.grad(f, argnums=(0, 1)))
    t_attn = (timed(grad2(attention_only), layer, x, repeats=args.repeats)
              - timed(grad2(qkv_only), layer, x, repeats=args.repeats)) * L  # fmt: skip
    t_mlp = timed(grad2(mlp), layer, x, repeats=args.repeats) * L

    def layers(p, ref):
        hidden = lambda w, remat: decoder.forward_hidden(
            mcfg, w, mb["input_ids"], mb["positions"].astype(jnp.int32), mb["segment_ids"].astype(jnp.int32),
            mb["branch"].astype(jnp.int32), remat=remat, attention=attn,
        )  # fmt: skip
        return hidden(p, "full").sum() + jax.lax.stop_gradient(hidden(ref, "none")).sum()

    t_layers = timed(jax.jit(jax.grad(layers)), params, reference, repeats=args.repeats)

    h_scored = jax.random.normal(jax.random.PRNGKey(1), (g.rows, g.scored, D), jnp.float32)
    y = jnp.zeros((g.rows, g.scored), jnp.int32)
    pred = jnp.broadcast_to(jnp.arange(g.scored), (g.rows, g.scored))
    active = pred < int(plan.parts["main"].scored.max())

    def unembed(p, h):
        ref = (jax.lax.stop_gradient(h), jax.lax.stop_gradient(decoder.unembedding(mcfg, reference)))
        out = token_stats(h, decoder.unembedding(mcfg, p), y, pred, reference=ref, chunk=min(128, g.scored),
                          active_BxT=active)  # fmt: skip
        return out["logps"].sum()

    t_unembed = timed(grad2(unembed), params, h_scored, repeats=args.repeats)

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6))
    opt_state = optimizer.init(params)
    update = jax.jit(lambda g_, s, p: optax.apply_updates(p, optimizer.update(g_, s, p)[0]))
    t_opt = timed(update, params, opt_state, params, repeats=args.repeats)

    step_spec = step_lib.StepSpec(losses.get("dpo"), {"beta": 0.1}, spec.geometries, attn, reference="frozen",
                                  remat="full")  # fmt: skip
    train = step_lib.make_train_step(mcfg, step_spec, optimizer)
    state = step_lib.init_state(params, optimizer, step_spec.loss)

    def one_step(state):
        return train(state, None, reference, batch)

    jax.block_until_ready(one_step(jax.tree.map(jnp.copy, state)))
    times = []
    for _ in range(args.repeats):
        fresh = jax.tree.map(jnp.copy, state)  # the step donates its state
        t0 = time.perf_counter()
        jax.block_until_ready(one_step(fresh))
        times.append(time.perf_counter() - t0)
    t_step = statistics.median(times)

    fwd = flops.forward_flops(mcfg, T * g.rows, attended, 0)
    unembed_flops = 2 * D * mcfg.vocab_size * scored * 4  # policy forward + backward (3x) and the reference's
    h, e, k = mcfg.num_heads, mcfg.head_dim, mcfg.num_kv_heads
    attn_flops = L * 4 * h * e * attended * 3  # forward + backward
    mlp_flops = L * 2 * 3 * D * mcfg.intermediate_size * T * g.rows * 3
    layer_flops = fwd * 5  # remat=full: policy forward twice + backward (2x), and the reference forward
    rows_ = [
        ("attention (fwd+bwd, all layers, once)", t_attn, attn_flops),
        ("MLP (fwd+bwd, all layers, once)", t_mlp, mlp_flops),
        ("layers: policy fwd+bwd (remat) + reference fwd", t_layers, layer_flops),
        ("unembedding: scored slots, policy fwd+bwd + reference fwd", t_unembed, unembed_flops),
        ("optimizer: clip + AdamW", t_opt, 0.0),
        ("whole step, this micro-batch", t_step, layer_flops + unembed_flops),
    ]
    print("| piece | s | GFLOP | GFLOP/s | of peak |\n|---|---|---|---|---|")
    for name, t, f in rows_:
        print(f"| {name} | {t:.2f} | {f / 1e9:.0f} | {f / t / 1e9:.0f} | {f / t / peak:.0%} |")
    rest = t_step - t_layers - t_unembed - t_opt
    print(f"| rest (loss, gathers, accumulation, dispatch) | {rest:.2f} | | | |")
    print(f"({k} kv heads of {e}; attention FLOPs count visible (query, key) pairs only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
