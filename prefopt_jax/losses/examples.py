"""Synthetic inputs for every loss kind: for trying a loss out, the CLI's loss table and tests.
Host-side numpy; the log-probs are random but shaped like real ones (prompt and padding masked)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from prefopt_jax.losses.inputs import PairLogps, UnpairedLogps
from prefopt_jax.losses.registry import get


def random_pair_arrays(seed: int = 0, b: int = 5, tc: int = 7, tr: int = 4) -> tuple[np.ndarray, ...]:
    """(policy_chosen, policy_rejected, chosen_mask, rejected_mask, ref_chosen, ref_rejected) as numpy:
    each completion starts after 0-1 prompt tokens and has 1..T tokens, the rest is padding."""
    rng = np.random.default_rng(seed)

    def mask(t: int) -> np.ndarray:
        m = np.zeros((b, t), bool)
        for i in range(b):
            start = rng.integers(0, 2)
            m[i, start : start + rng.integers(1, t - start + 1)] = True
        return m

    mc, mr = mask(tc), mask(tr)
    pc = -rng.uniform(0.05, 3.0, (b, tc))
    pr = -rng.uniform(0.05, 3.0, (b, tr))
    rc = pc + rng.normal(0, 0.5, pc.shape)
    rr = pr + rng.normal(0, 0.5, pr.shape)
    return pc, pr, mc, mr, rc, rr


def as_pair_logps(pc, pr, mc, mr, rc=None, rr=None, dtype=jnp.float32, **extras) -> PairLogps:
    """PairLogps from numpy arrays (floats cast to `dtype`)."""

    def cast(a):
        return None if a is None else jnp.asarray(a, dtype)

    return PairLogps(
        cast(pc),
        cast(pr),
        jnp.asarray(mc),
        jnp.asarray(mr),
        cast(rc),
        cast(rr),
        {k: cast(v) if k != "full_chosen_mask" else jnp.asarray(v) for k, v in extras.items()},
    )


def example_inputs(name: str, b: int = 8, seed: int = 0, dtype=jnp.float32) -> PairLogps | UnpairedLogps:
    """Inputs of the right kind for loss `name`, carrying every extra input any loss may declare."""
    rng = np.random.default_rng(seed + 100)
    pc, pr, mc, mr, rc, rr = random_pair_arrays(seed, b=b)
    if get(name).kind == "unpaired":
        kl = rng.normal(-5, 1, (2, b))
        return UnpairedLogps(
            jnp.asarray(pc, dtype),
            jnp.asarray(mc),
            jnp.asarray(np.arange(b) % 3 != 1),
            jnp.asarray(rc, dtype),
            jnp.asarray(kl[0], dtype),
            jnp.asarray(kl[1] - 1.0, dtype),
            {"udm_prob": jnp.asarray(rng.uniform(0.1, 0.9, b), dtype)},
        )
    return as_pair_logps(
        pc,
        pr,
        mc,
        mr,
        rc,
        rr,
        dtype=dtype,
        seq_kl_chosen=rng.uniform(0, 2, b),
        seq_kl_rejected=rng.uniform(0, 2, b),
        response_only_chosen_avg=-rng.uniform(0.5, 3, b),
        response_only_rejected_avg=-rng.uniform(0.5, 3, b),
        wpo_aligned_chosen=pc + 0.8,
        wpo_aligned_rejected=pr + 0.8,
        full_chosen=np.concatenate([-rng.uniform(0.1, 2, (b, 3)), pc], 1),
        full_chosen_mask=np.concatenate([np.ones((b, 3), bool), mc], 1),
    )


def policy_fields(x: PairLogps | UnpairedLogps) -> tuple[str, ...]:
    """The fields of `x` that carry the policy's (differentiated) log-probs."""
    return ("policy_chosen", "policy_rejected") if isinstance(x, PairLogps) else ("policy",)


def loss_and_grad_norm(name: str, x, **hp) -> tuple[jax.Array, jax.Array]:
    """Mean loss and the global norm of its gradient with respect to the policy log-probs."""
    fn = get(name)

    def f(policy: dict) -> jax.Array:
        return jnp.mean(fn(x._replace(**policy), **hp).loss)

    value, grads = jax.value_and_grad(f)({k: getattr(x, k) for k in policy_fields(x)})
    return value, jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
