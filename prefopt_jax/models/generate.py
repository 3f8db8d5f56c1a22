"""Greedy decoding for short task-level checks. No KV cache: each new token re-runs the fixed-size
padded batch (one compiled shape), which is cheap for the few-token answers it is used for."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefopt_jax.models.config import ModelConfig
from prefopt_jax.models.decoder import forward_hidden, logits_from_hidden


def greedy_generate(
    cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int | None
) -> list[list[int]]:
    """The greedy continuation of each prompt (without the prompt), stopping at EOS."""
    lengths = np.asarray([len(p) for p in prompts])
    total = int(lengths.max()) + max_new_tokens
    ids = np.zeros((len(prompts), total), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p

    @jax.jit
    def next_token(ids, lengths):
        valid = jnp.arange(total)[None, :] < lengths[:, None]
        hidden = forward_hidden(cfg, params, ids, mask=valid)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
        return jnp.argmax(logits_from_hidden(cfg, params, last)[:, 0], axis=-1).astype(jnp.int32)

    done = np.zeros(len(prompts), bool)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        tok = np.asarray(next_token(jnp.asarray(ids), jnp.asarray(lengths)))
        for i in np.flatnonzero(~done):
            out[i].append(int(tok[i]))
            ids[i, lengths[i]] = tok[i]
            done[i] = eos_id is not None and tok[i] == eos_id
        lengths = np.where(done, lengths, lengths + 1)
        if done.all():
            break
    return [o[:-1] if o and o[-1] == eos_id else o for o in out]
