"""Greedy decoding with a KV cache, for task-level checks during and after training.

Prompts are laid out from slot 0 of a fixed-size cache (one compiled shape for prefill, one for each
decoding step); position = slot, so no left padding. A row's padding slots past its prompt are written
during prefill but never attended: each new token is written to the row's next slot before it is read."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefopt_jax.models.config import ModelConfig
from prefopt_jax.models.decoder import (
    attend,
    block,
    embed_tokens,
    logits_from_hidden,
    qkv,
    rms_norm,
    rope_tables,
)


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> dict:
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def forward_cached(cfg: ModelConfig, params: dict, ids_BxT, slots_BxT, cache: dict) -> tuple[jax.Array, dict]:
    """Final-norm hidden states of new tokens `ids` at cache slots (= positions) `slots`, attending to
    every earlier slot of their row; returns (hidden [B,T,D], the cache with their keys and values)."""
    rope = rope_tables(cfg, slots_BxT)
    windows = jnp.asarray(cfg.windows, jnp.int32)
    n_slots = cache["k"].shape[2]
    key_pos = jnp.broadcast_to(jnp.arange(n_slots), (ids_BxT.shape[0], n_slots))
    causal = key_pos[:, None, :] <= slots_BxT[:, :, None]  # [B,T,S]
    rows = jnp.arange(ids_BxT.shape[0])[:, None]

    def body(h, layer):
        p, window, ck, cv = layer

        def attention(hn):
            q, k, v = qkv(cfg, p, hn, rope)
            ck2 = ck.at[rows, slots_BxT].set(k.astype(ck.dtype))
            cv2 = cv.at[rows, slots_BxT].set(v.astype(cv.dtype))
            visible = causal & ((window == 0) | (slots_BxT[:, :, None] - key_pos[:, None, :] < window))
            return attend(cfg, p, q, ck2.astype(q.dtype), cv2.astype(q.dtype), visible), (ck2, cv2)

        return block(cfg, h, p, attention)

    x = embed_tokens(cfg, params, ids_BxT)
    x, (k, v) = jax.lax.scan(body, x, (params["layers"], windows, cache["k"], cache["v"]))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset), {"k": k, "v": v}


def _next_token(cfg: ModelConfig, params: dict, hidden, at):
    last = jnp.take_along_axis(hidden, at[:, None, None], axis=1)
    return jnp.argmax(logits_from_hidden(cfg, params, last)[:, 0], axis=-1).astype(jnp.int32)


# compiled once per model config and shape; parameters are arguments, not constants (they may be sharded over
# devices of other processes)
@functools.partial(jax.jit, static_argnums=0)
def _prefill(cfg: ModelConfig, params: dict, cache: dict, ids, lengths):
    slots = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden, cache = forward_cached(cfg, params, ids, slots, cache)
    return _next_token(cfg, params, hidden, lengths - 1), cache


@functools.partial(jax.jit, static_argnums=0)
def _decode(cfg: ModelConfig, params: dict, cache: dict, tok, slot):
    hidden, cache = forward_cached(cfg, params, tok[:, None], slot[:, None], cache)
    return _next_token(cfg, params, hidden, jnp.zeros_like(slot)), cache


def generate(
    cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int | None
) -> list[list[int]]:
    """The greedy continuation of each prompt (without the prompt), stopping at EOS."""
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    width = int(lengths.max())
    ids = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    cache = init_cache(cfg, len(prompts), width + max_new_tokens)
    tok, cache = _prefill(cfg, params, cache, ids, lengths)
    out = np.zeros((len(prompts), max_new_tokens), np.int32)
    slot = lengths
    for j in range(max_new_tokens):
        out[:, j] = np.asarray(tok)
        if eos_id is not None and (out[:, : j + 1] == eos_id).any(axis=1).all():
            out = out[:, : j + 1]
            break
        if j + 1 < max_new_tokens:
            tok, cache = _decode(cfg, params, cache, tok, slot)
            slot = slot + 1
    results = []
    for row in out.tolist():
        results.append(row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    return results
