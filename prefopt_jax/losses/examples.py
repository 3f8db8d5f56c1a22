"""Synthetic inputs for every loss kind: for trying a loss out, the CLI's loss table and tests.
Host-side numpy; the log-probs are random but shaped like real ones (prompt and padding masked)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from prefopt_jax.kinds import InputKind
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
    if get(name).kind is InputKind.UNPAIRED:
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


def margin_inputs(name: str, margins, dtype=jnp.float32) -> PairLogps | UnpairedLogps:
    """Inputs for loss `name` whose implicit-reward margin is each of `margins` [N]: one-token completions,
    the policy at -1 + m/2 (chosen) and -1 - m/2 (rejected), the reference at -1 for both, so the log-ratio
    margin and the policy's own margin are both m. Unpaired losses get desirable examples at
    log-ratio m. Extras are neutral: response-only averages and WPO alignments at -1, no sequence KL."""
    m = jnp.asarray(margins, dtype)[:, None]
    n = m.shape[0]
    one = jnp.ones((n, 1), bool)
    base = jnp.full((n, 1), -1.0, dtype)
    if get(name).kind is InputKind.UNPAIRED:
        zeros = jnp.zeros(n, dtype)
        return UnpairedLogps(-1.0 + m, one, jnp.ones(n, bool), base, zeros, zeros, {"udm_prob": zeros + 0.5})
    flat = jnp.full((n,), -1.0, dtype)
    extras = {
        "seq_kl_chosen": jnp.zeros(n, dtype),
        "seq_kl_rejected": jnp.zeros(n, dtype),
        "response_only_chosen_avg": flat,
        "response_only_rejected_avg": flat,
        "wpo_aligned_chosen": base,
        "wpo_aligned_rejected": base,
        "full_chosen": jnp.concatenate([base, -1.0 + m / 2], 1),
        "full_chosen_mask": jnp.ones((n, 2), bool),
    }
    return PairLogps(-1.0 + m / 2, -1.0 - m / 2, one, one, base, base, extras)


def margin_sweep(name: str, margins, **hp) -> tuple[np.ndarray, np.ndarray]:
    """(loss, d loss / d margin) of loss `name` at each margin of `margins` (see `margin_inputs`); the
    derivative is the weight a pair's gradient gets. Batch-coupled losses (AOT's sorting, running
    moments) see the whole sweep as one batch."""
    fn = get(name)

    def total(m):
        per = fn(margin_inputs(name, m), **hp).loss
        return jnp.sum(per), per

    grad, per = jax.grad(total, has_aux=True)(jnp.asarray(margins, jnp.float32))
    return np.asarray(per), np.asarray(grad)
