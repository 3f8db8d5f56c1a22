"""Per-token log-probs (and KL to a reference) from hidden states and the unembedding, a chunk of tokens
at a time, so the [B,T,V] float32 logits never exist (in the forward pass, or saved for the backward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def log_softmax(h_BxCxD: Array, unembed_DxV: Array, softcap: float | None) -> Array:
    """float32 log-probabilities over the vocabulary of a chunk's hidden states (Gemma 2's soft-capping applied)."""
    logits = jnp.einsum("bcd,dv->bcv", h_BxCxD, unembed_DxV.astype(h_BxCxD.dtype)).astype(jnp.float32)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return jax.nn.log_softmax(logits, axis=-1)


def token_stats(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    pred_index_BxT: Array | None = None,
    *,
    reference: tuple[Array, Array] | None = None,
    sum_sq: bool = False,
    chunk: int = 128,
    softcap: float | None = None,
    active_BxT: Array | None = None,
) -> dict[str, Array]:
    """Per-token statistics of the targets, float32 [B,T] each, computed `chunk` tokens at a time under
    `jax.checkpoint` so only [B, chunk, V] logits are ever live (forward, or saved for the backward pass).

    "logps": log p(targets[b, t] | the hidden state at pred_index[b, t]). `pred_index` says which
    position's output predicts each token (t - 1 in a plain row; the prompt's last token for the first
    token of every completion in a packed row). With `reference` = (hidden, unembedding) of a reference
    model (the caller stops its gradient), also "ref_logps" and the exact per-position KL divergences over
    the whole vocabulary, "kl_ref_policy" = KL(ref || policy) and "kl_policy_ref" = KL(policy || ref).
    With `sum_sq`, "log_sum_sq" = log sum_v p(v)^2 (WPO's weights). `active_BxT` marks the positions whose
    statistics are wanted: a chunk with none in any row is skipped (`lax.cond`: no unembedding, no backward;
    its values are 0), so a fixed-size scored budget costs what its rows use, to a chunk."""
    b, t = hidden_BxTxD.shape[:2]
    if pred_index_BxT is None:
        pred_index_BxT = jnp.maximum(jnp.arange(t) - 1, 0)[None].repeat(b, 0)
    n = -(-t // chunk)
    pad = n * chunk - t

    def chunks(h: Array) -> Array:
        h = jnp.take_along_axis(h, pred_index_BxT[..., None].astype(jnp.int32), axis=1)
        return jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, h.shape[-1]).swapaxes(0, 1)

    y = jnp.pad(targets_BxT.astype(jnp.int32), ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    live = None if active_BxT is None else jnp.pad(active_BxT, ((0, 0), (0, pad))).reshape(b, n, chunk).any(axis=(0, 2))

    def stats(h_c, y_c, ref_c):
        logp = log_softmax(h_c, unembed_DxV, softcap)
        out = {"logps": jnp.take_along_axis(logp, y_c[..., None], axis=-1)[..., 0]}
        if ref_c is not None:
            ref_logp = log_softmax(ref_c, reference[1], softcap)
            out["ref_logps"] = jnp.take_along_axis(ref_logp, y_c[..., None], axis=-1)[..., 0]
            out["kl_ref_policy"] = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
            out["kl_policy_ref"] = jnp.sum(jnp.exp(logp) * (logp - ref_logp), axis=-1)
        if sum_sq:
            out["log_sum_sq"] = jax.nn.logsumexp(2.0 * logp, axis=-1)
        return out

    @jax.checkpoint
    def one(args):
        h_c, y_c, ref_c, live_c = args
        if live_c is None:
            return stats(h_c, y_c, ref_c)
        shapes = jax.eval_shape(stats, h_c, y_c, ref_c)
        skip = lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.cond(live_c, stats, skip, h_c, y_c, ref_c)

    ref_chunks = None if reference is None else chunks(reference[0])
    out = jax.lax.map(one, (chunks(hidden_BxTxD), y, ref_chunks, live))  # each [n, B, chunk]
    return {k: v.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for k, v in out.items()}


def token_logps(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    pred_index_BxT: Array | None = None,
    *,
    chunk: int = 128,
    softcap: float | None = None,
) -> Array:
    """log p(targets[b, t] | the hidden state at pred_index[b, t]) as float32 [B,T] (see `token_stats`)."""
    return token_stats(hidden_BxTxD, unembed_DxV, targets_BxT, pred_index_BxT, chunk=chunk, softcap=softcap)["logps"]


def gather_completions(logps_BxT: Array, index_GxKxL: Array, mask_GxKxL: Array) -> Array:
    """Per-token log-probs of each completion, [G,K,L], from the flat (row * T + t) indices of a Batch;
    positions outside the mask are 0."""
    flat = logps_BxT.reshape(-1)
    return jnp.where(mask_GxKxL, flat[index_GxKxL], 0.0)
