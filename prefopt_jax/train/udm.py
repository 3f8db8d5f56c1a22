"""BCO-UDM's prompt classifier (Jung et al. 2024, arXiv 2404.04656, "underlying distribution matching").

When the desirable and undesirable examples of an unpaired set come from different prompt distributions,
BCO weights each undesirable example's loss by the density ratio p(desirable | prompt) / p(undesirable |
prompt), clamped to [min_density_ratio, max_density_ratio] (the loss does that from the extra `udm_prob`).
TRL's BCOTrainer takes the probability from a logistic regression (scikit-learn, class-balanced) fitted to
the prompts' embeddings by a user-supplied embedding model. Here the embedding is the base model's own:
the mean of its final-norm hidden states over the prompt tokens (no second model to download), and the
classifier a class-balanced, L2-regularised logistic regression on the standardised embeddings (C = 1 as
scikit-learn's default), fitted by Newton's method on the training examples once before training. Every
process computes the same probabilities (the same examples, the same model, a deterministic fit).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefopt_jax.data.batching import round_up
from prefopt_jax.models.config import ModelConfig
from prefopt_jax.models.decoder import forward_hidden


def prompt_embeddings(
    cfg: ModelConfig, params: dict, prompts: Sequence[np.ndarray], mesh: Mesh, *, rows: int = 16
) -> np.ndarray:
    """[N, D] float64: each prompt's mean final-norm hidden state, `rows` prompts per forward, padded to
    the batch's longest (a multiple of 32: a few shapes, each compiled once)."""
    whole = NamedSharding(mesh, PartitionSpec())

    @jax.jit
    def pooled(ids, mask):
        hidden = forward_hidden(cfg, params, ids, mask=mask)
        return jnp.sum(hidden * mask[..., None], axis=1) / jnp.maximum(mask.sum(1, keepdims=True), 1)

    out = []
    for start in range(0, len(prompts), rows):
        chunk = prompts[start : start + rows]
        width = round_up(max(len(p) for p in chunk), 32)
        ids, mask = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
        for i, p in enumerate(chunk):
            ids[i, : len(p)], mask[i, : len(p)] = p, 1
        placed = [jax.make_array_from_callback(a.shape, whole, lambda idx, a=a: a[idx]) for a in (ids, mask)]
        out.append(np.asarray(pooled(*placed).addressable_data(0), np.float64)[: len(chunk)])
    return np.concatenate(out)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0, iterations: int = 100) -> tuple[np.ndarray, float]:
    """(w, b) minimising ½‖w‖² + C·Σ_i s_i·log(1 + exp(−ȳ_i(w·x_i + b))), ȳ = ±1, with balanced sample
    weights s_i = n / (2·n_class(i)) (scikit-learn's LogisticRegression(class_weight="balanced") objective,
    the intercept unpenalised), by Newton's method."""
    n, d = x.shape
    if y.all() or not y.any():
        raise ValueError("the prompt classifier needs desirable and undesirable examples")
    s = np.where(y, n / (2.0 * y.sum()), n / (2.0 * (~y).sum()))
    a = np.concatenate([x, np.ones((n, 1))], axis=1)
    theta = np.zeros(d + 1)
    penalty = np.ones(d + 1)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = penalty * theta + c * a.T @ (s * (p - y))
        hess = np.diag(penalty) + c * (a.T * (s * p * (1 - p))) @ a
        delta = np.linalg.solve(hess + 1e-10 * np.eye(d + 1), grad)
        theta -= delta
        if np.max(np.abs(delta)) < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def desirable_probabilities(
    cfg: ModelConfig, params: dict, splits: dict[str, Sequence], mesh: Mesh
) -> dict[str, np.ndarray]:
    """Per split, float32 [N]: p(desirable | prompt) of every example, from the classifier fitted on the
    "train" split's prompts (labels: desirable or not)."""
    x = {k: prompt_embeddings(cfg, params, [e.prompt for e in v], mesh) for k, v in splits.items() if v}
    mean, std = x["train"].mean(0), x["train"].std(0) + 1e-6
    w, b = fit_logistic((x["train"] - mean) / std, np.asarray([e.label for e in splits["train"]], bool))
    probability = lambda z: (1.0 / (1.0 + np.exp(-(((z - mean) / std) @ w + b)))).astype(np.float32)
    return {k: probability(x[k]) if k in x else np.zeros(0, np.float32) for k in splits}
