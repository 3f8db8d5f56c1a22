"""Per-token log-probs from hidden states and the unembedding, a chunk of tokens at a time, so the
[B,T,V] float32 logits never exist (in the forward pass, or saved for the backward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_logps(
    hidden_BxTxD: Array,
    unembed_DxV: Array,
    targets_BxT: Array,
    pred_index_BxT: Array | None = None,
    *,
    chunk: int = 128,
    softcap: float | None = None,
) -> Array:
    """log p(targets[b, t] | the hidden state at pred_index[b, t]) as float32 [B,T].

    `pred_index` says which position's output predicts each token (t - 1 in a plain row; the prompt's
    last token for the first token of every completion in a packed row). Tokens are processed `chunk`
    at a time under `jax.checkpoint`, so only [B, chunk, V] logits are ever live."""
    b, t, d = hidden_BxTxD.shape
    if pred_index_BxT is None:
        pred_index_BxT = jnp.maximum(jnp.arange(t) - 1, 0)[None].repeat(b, 0)
    h = jnp.take_along_axis(hidden_BxTxD, pred_index_BxT[..., None].astype(jnp.int32), axis=1)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    y = jnp.pad(targets_BxT.astype(jnp.int32), ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h_c, y_c = args
        logits = jnp.einsum("bcd,dv->bcv", h_c, unembed_DxV.astype(h_c.dtype)).astype(jnp.float32)
        if softcap:
            logits = jnp.tanh(logits / softcap) * softcap
        picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    out = jax.lax.map(one, (h, y))  # [n, B, chunk]
    return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def gather_completions(logps_BxT: Array, index_GxKxL: Array, mask_GxKxL: Array) -> Array:
    """Per-token log-probs of each completion, [G,K,L], from the flat (row * T + t) indices of a Batch;
    positions outside the mask are 0."""
    flat = logps_BxT.reshape(-1)
    return jnp.where(mask_GxKxL, flat[index_GxKxL], 0.0)
