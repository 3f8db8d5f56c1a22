"""The fused train step: policy forward/backward, reference forward and the loss in one `jit`.

The step is built per configuration (reference mode, LoRA or full fine-tuning, what the loss declares),
never branched on flags inside the compiled function. Batches are the data pipeline's contract
(`prefopt_jax.data.Batch` arrays: rows, `pred_index`, completion indices), so padded and packed
layouts run through the same step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prefopt_jax.logprobs import gather_completions, token_stats
from prefopt_jax.losses import Loss, PairLogps, UnpairedLogps
from prefopt_jax.models.block_sparse import attention_blocks, causal_mask, tile_buckets
from prefopt_jax.models.config import ModelConfig
from prefopt_jax.models.decoder import forward_hidden, no_constraint, unembedding
from prefopt_jax.train.lora import with_lora

sg = jax.lax.stop_gradient
LENGTH_EDGES = (64, 128, 256, 512, 1024)  # accuracy-by-length buckets: [0, 64), [64, 128), ..., [1024, inf)
REFERENCE_MODES = ("frozen", "lora_base", "precomputed", "none")
# the extras the step computes: RMiPO's response-only pass, TDPO's KL, WPO's weights
STEP_EXTRAS = {
    "response_only_chosen_avg",
    "response_only_rejected_avg",
    "seq_kl_chosen",
    "seq_kl_rejected",
    "wpo_aligned_chosen",
    "wpo_aligned_rejected",
}


def scored_positions(batch, multiple: int = 64) -> np.ndarray:
    """[R, C] int32: in each row, the positions of completion tokens (the only ones whose log-probs the
    loss reads), padded with -1 to at least `multiple`, in 1.5x steps, so few shapes compile. Log-probs are computed
    at these positions only: prompt tokens never meet the unembedding."""
    r, t = batch.input_ids.shape
    flat = batch.completion_index[batch.completion_mask]
    rows, cols = flat // t, flat % t
    counts = np.bincount(rows, minlength=r)
    width = tile_buckets(max(int(counts.max(initial=1)), multiple))  # 64, 96, 128, 192, ...: few shapes
    out = np.full((r, width), -1, np.int32)
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    out[rows, slot] = cols
    return out


def batch_arrays(batch, *, tiles: bool = False) -> dict:
    """The arrays of a `data.Batch` the step needs, as a dict (a pytree jit can take); with `tiles`, the
    non-empty attention tiles for block-sparse attention (when the rows tile)."""
    out = {
        "input_ids": batch.input_ids,
        "positions": batch.positions,
        "segment_ids": batch.segment_ids,
        "pred_index": batch.pred_index,
        "scored": scored_positions(batch),
        "completion_index": batch.completion_index,
        "completion_mask": batch.completion_mask,
    }
    if batch.attention is not None:
        out["mask"] = batch.attention
    if tiles:
        mask = batch.attention if batch.attention is not None else causal_mask(batch.segment_ids)
        listed = attention_blocks(mask)
        if listed is not None:
            out["tiles"] = listed
    return out


def _hidden(
    cfg: ModelConfig, params: dict, b: dict, remat: str = "none", dtype: Any = jnp.float32, constrain=no_constraint
) -> jax.Array:
    return forward_hidden(
        cfg,
        params,
        b["input_ids"],
        b["positions"],
        b["segment_ids"],
        b.get("mask"),
        remat=remat,
        dtype=dtype,
        constrain=constrain,
        tiles=b.get("tiles"),
    )


def completion_stats(
    cfg: ModelConfig,
    params: dict,
    b: dict,
    *,
    reference: dict | None = None,
    sum_sq: bool = False,
    chunk: int = 128,
    remat: str = "none",
    dtype: Any = jnp.float32,
    constrain=no_constraint,
) -> dict[str, jax.Array]:
    """`token_stats` of every completion of a batch, each [G, K, L] (0 outside the completion). With
    `reference` parameters, their log-probs and the per-token KLs too (no gradient into the reference).
    `dtype` is the layers' compute dtype (weights are cast at use); log-softmax is always float32.
    `constrain` (`sharding.activation_constraint`) keeps activations and each layer's weights on the mesh."""
    scored = b["scored"]  # [R, C] positions of completion tokens, -1 = none
    at = jnp.maximum(scored, 0)
    pred = jnp.take_along_axis(b["pred_index"], at, axis=1)  # the positions whose outputs predict them

    def picked(hidden):  # [R, C, D]: only these hidden states meet the unembedding
        return jnp.take_along_axis(hidden, pred[..., None], axis=1)

    ref = None
    if reference is not None:
        ref = (
            sg(picked(_hidden(cfg, reference, b, dtype=dtype, constrain=constrain))),
            sg(unembedding(cfg, reference)),
        )
    stats = token_stats(
        picked(_hidden(cfg, params, b, remat, dtype, constrain)),
        unembedding(cfg, params),
        jnp.take_along_axis(b["input_ids"], at, axis=1),
        jnp.broadcast_to(jnp.arange(scored.shape[1]), scored.shape),
        reference=ref,
        sum_sq=sum_sq,
        chunk=chunk,
        softcap=cfg.final_logit_softcap,
    )
    rows = jnp.arange(scored.shape[0])[:, None]
    cols = jnp.where(scored >= 0, scored, b["input_ids"].shape[1])  # out of bounds: dropped by the scatter

    def per_row(v):  # [R, C] -> [R, T], 0 at unscored positions
        return jnp.zeros(b["input_ids"].shape, v.dtype).at[rows, cols].set(v, mode="drop")

    return {k: gather_completions(per_row(v), b["completion_index"], b["completion_mask"]) for k, v in stats.items()}


def completion_logps(
    cfg: ModelConfig, params: dict, b: dict, *, chunk: int = 128, remat: str = "none", dtype: Any = jnp.float32
) -> jax.Array:
    """Per-token log-probs of every completion of a batch, [G, K, L] (0 outside the completion)."""
    return completion_stats(cfg, params, b, chunk=chunk, remat=remat, dtype=dtype)["logps"]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What one step computes. `loss` is a registered Loss with its hyperparameters bound in `hp`.

    `ref_sync_every` > 0 turns on TR-DPO: every that many steps, inside the step, the reference moves to
    `ref_sync_alpha`·policy + (1 − α)·reference (with LoRA: the reference's own adapters, mixed factor
    by factor; exact for α = 1). `lora_dropout` drops out adapter inputs while training, with a key drawn
    from `seed` and the step number (so a resumed run draws the same masks)."""

    loss: Loss
    hp: dict
    reference: str = "frozen"  # frozen | lora_base | precomputed | none
    lora_scale: float | None = None  # None: full fine-tuning
    lora_dropout: float = 0.0
    ref_sync_every: int = 0
    ref_sync_alpha: float = 1.0
    chunk: int = 128
    remat: str = "none"
    seed: int = 0
    compute_dtype: str = "float32"  # the layers' matmuls (bfloat16 on accelerators; parameters keep their dtype)
    constrain: Callable = no_constraint  # sharding.activation_constraint(mesh, rules): activations and weights

    def __post_init__(self) -> None:
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference mode {self.reference!r}; modes: {', '.join(REFERENCE_MODES)}")
        if self.loss.needs_reference and self.reference == "none":
            raise ValueError(f"loss {self.loss.name!r} needs a reference; choose a reference mode other than 'none'")
        if self.reference == "lora_base" and self.lora_scale is None:
            raise ValueError("reference 'lora_base' needs LoRA (the base is the reference)")
        if self.loss.kind not in ("paired", "unpaired", "paired or ranked"):
            raise ValueError(f"loss {self.loss.name!r} is {self.loss.kind}; the step runs paired and unpaired losses")
        if self.ref_sync_every and self.reference not in ("frozen", "lora_base"):
            raise ValueError("reference sync (TR-DPO) needs a reference computed in the step: frozen or lora_base")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_dropout and self.lora_scale is None:
            raise ValueError("lora_dropout needs LoRA")
        missing = set(self.loss.required_extras(**self.hp)) - STEP_EXTRAS
        if missing:
            raise ValueError(f"loss {self.loss.name!r} needs extras {sorted(missing)} the step does not compute")
        if self.reference == "precomputed" and {"seq_kl_chosen"} & set(self.extras):
            raise ValueError("TDPO's per-token KL needs the reference's full distribution: not with precomputed")

    @property
    def extras(self) -> tuple[str, ...]:
        return self.loss.required_extras(**self.hp)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def reference_in_step(self) -> bool:
        return self.loss.needs_reference and self.reference in ("frozen", "lora_base")


def policy_params(spec: StepSpec, trainable: dict, frozen: dict | None, key: jax.Array | None = None) -> dict:
    """The policy's parameter tree: the trained parameters, or the frozen base with the trained adapters
    (with dropout when a `key` is given and the spec asks for it)."""
    if spec.lora_scale is None:
        return trainable
    rate = spec.lora_dropout if key is not None else 0.0
    return with_lora(frozen, trainable, spec.lora_scale, dropout=rate, key=key)


def reference_params(spec: StepSpec, frozen: dict | None, reference: dict | None) -> dict | None:
    """The reference's parameter tree in the step: the frozen copy (or its synced state), or the LoRA base
    (with the synced reference adapters under TR-DPO)."""
    if not spec.reference_in_step:
        return None
    if spec.reference == "lora_base":
        return frozen if reference is None else with_lora(frozen, reference, spec.lora_scale)
    return reference


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _common_metrics(stats: dict, mask: jax.Array, main: dict) -> dict:
    lengths = mask.sum(-1)
    out = {"num_tokens": jnp.sum(main["segment_ids"] > 0), "num_completion_tokens": jnp.sum(mask)}
    if "kl_policy_ref" in stats:
        out["kl/per_token"] = _masked_mean(sg(stats["kl_policy_ref"]), mask)
    out["lengths/mean"] = jnp.mean(lengths)
    return out


def _paired_inputs(spec: StepSpec, cfg: ModelConfig, params, stats: dict, batch: dict) -> tuple[PairLogps, dict]:
    main = batch["main"]
    mask = main["completion_mask"]
    policy = stats["logps"]
    reference = batch["ref_logps"] if spec.reference == "precomputed" else stats.get("ref_logps")
    extras = {}
    if "response_only_chosen_avg" in spec.extras:  # RMiPO: the policy's avg log-prob of each response alone
        alone = sg(completion_logps(cfg, params, batch["response_only"], chunk=spec.chunk, dtype=spec.dtype))
        alone_mask = batch["response_only"]["completion_mask"]
        avg = alone.sum(-1)[:, 0] / jnp.maximum(alone_mask.sum(-1)[:, 0], 1)
        half = avg.shape[0] // 2
        extras |= {"response_only_chosen_avg": avg[:half], "response_only_rejected_avg": avg[half:]}
    if "seq_kl_chosen" in spec.extras:  # TDPO: sequence KL(ref || policy), differentiable in the policy
        kl = stats["kl_ref_policy"].sum(-1)
        extras |= {"seq_kl_chosen": kl[:, 0], "seq_kl_rejected": kl[:, 1]}
    if "wpo_aligned_chosen" in spec.extras:  # WPO: log p(y_t) - log sum_v p(v)^2, no gradient
        aligned = sg(policy - stats["log_sum_sq"])
        extras |= {"wpo_aligned_chosen": aligned[:, 0], "wpo_aligned_rejected": aligned[:, 1]}
    ref_c, ref_r = (None, None) if reference is None else (reference[:, 0], reference[:, 1])
    x = PairLogps(policy[:, 0], policy[:, 1], mask[:, 0], mask[:, 1], ref_c, ref_r, extras)
    lengths = mask.sum(-1)
    metrics = {"lengths/chosen": jnp.mean(lengths[:, 0]), "lengths/rejected": jnp.mean(lengths[:, 1])}
    if reference is not None:  # likelihood displacement: how far the chosen log-prob moved
        metrics["logps/chosen_drift"] = jnp.mean(sg(policy[:, 0].sum(-1) - reference[:, 0].sum(-1)))
        margin = (policy - reference).sum(-1)  # reward accuracy by the pair's length (chosen + rejected tokens)
        bucket = jnp.searchsorted(jnp.asarray(LENGTH_EDGES), lengths.sum(-1), side="right")
        onehot = jax.nn.one_hot(bucket, len(LENGTH_EDGES) + 1)
        metrics["length_bucket/correct"] = jnp.sum(onehot * sg(margin[:, 0] > margin[:, 1])[:, None], axis=0)
        metrics["length_bucket/count"] = jnp.sum(onehot, axis=0)
    return x, metrics


def _unpaired_inputs(spec: StepSpec, cfg: ModelConfig, params, ref, stats: dict, batch: dict):
    mask = batch["main"]["completion_mask"][:, 0]
    ref_logps = batch["ref_logps"] if spec.reference == "precomputed" else stats.get("ref_logps")
    kl_policy = kl_ref = None
    if spec.loss.needs_kl:  # KTO's reference point: the mismatched (prompt_i, completion_j) pairs
        kl = batch["kl"]
        kl_policy = sg(completion_logps(cfg, params, kl, chunk=spec.chunk, dtype=spec.dtype)).sum(-1)[:, 0]
        if spec.reference == "precomputed":
            kl_ref = batch["kl_ref_logps"].sum(-1)[:, 0]
        else:
            kl_ref = sg(completion_logps(cfg, ref, kl, chunk=spec.chunk, dtype=spec.dtype)).sum(-1)[:, 0]
    x = UnpairedLogps(
        stats["logps"][:, 0],
        mask,
        batch["label"],
        None if ref_logps is None else ref_logps[:, 0],
        kl_policy,
        kl_ref,
    )
    return x, {}


def make_loss_fn(cfg: ModelConfig, spec: StepSpec) -> Callable:
    """(trainable, frozen, reference, batch, loss_state, key) -> (loss, (metrics, new loss state)).

    `reference` is the frozen reference copy (full fine-tuning), the reference adapters (LoRA under
    TR-DPO) or None; `key` drives LoRA dropout (None: no dropout, as in evaluation)."""

    def loss_fn(trainable, frozen, reference, batch, loss_state, key=None):
        params = policy_params(spec, trainable, frozen, key)
        ref = reference_params(spec, frozen, reference)
        main = batch["main"]
        stats = completion_stats(
            cfg,
            params,
            main,
            reference=ref,
            sum_sq="wpo_aligned_chosen" in spec.extras,
            chunk=spec.chunk,
            remat=spec.remat,
            dtype=spec.dtype,
            constrain=spec.constrain,
        )
        if spec.loss.kind != "unpaired":  # pairs (RRHF on pairs: two ranked candidates)
            x, extra_metrics = _paired_inputs(spec, cfg, params, stats, batch)
        else:
            x, extra_metrics = _unpaired_inputs(spec, cfg, params, ref, stats, batch)
        out = spec.loss(x, state=loss_state, **spec.hp)
        w = batch["weight"]
        value = jnp.sum(out.loss * w) / jnp.maximum(jnp.sum(w), 1e-8)
        metrics = {**out.metrics, **extra_metrics, **_common_metrics(stats, main["completion_mask"], main)}
        metrics["loss"] = value
        return value, (metrics, out.state)

    return loss_fn


def init_state(trainable: Any, optimizer: optax.GradientTransformation, loss: Loss, reference: Any = None) -> dict:
    """The train state. `reference` (TR-DPO only) is the reference the step keeps moving toward the policy."""
    state = {
        "trainable": trainable,
        "opt_state": optimizer.init(trainable),
        "loss_state": loss.init_state() if loss.stateful else None,
        "step": jnp.zeros((), jnp.int32),
        "skipped": jnp.zeros((), jnp.int32),
    }
    if reference is not None:
        state["reference"] = reference
    return state


def make_train_step(cfg: ModelConfig, spec: StepSpec, optimizer: optax.GradientTransformation) -> Callable:
    """`step(state, frozen, ref_params, batch) -> (state, metrics)`, jitted, the state donated.

    `batch` holds micro-batches stacked on a leading axis (gradient accumulation inside the step: a scan
    that sums gradients). A step whose loss or gradients are not finite leaves the parameters as they
    were and counts itself in `state["skipped"]`. Under TR-DPO the reference lives in the state."""
    grad_fn = jax.value_and_grad(make_loss_fn(cfg, spec), has_aux=True)

    def step(state, frozen, ref_params, batch):
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        reference = state.get("reference", ref_params)
        step_key = jax.random.fold_in(jax.random.PRNGKey(spec.seed), state["step"])

        def one(mb, i, loss_state):
            key = jax.random.fold_in(step_key, i) if spec.lora_dropout else None
            (_, (metrics, loss_state)), grads = grad_fn(state["trainable"], frozen, reference, mb, loss_state, key)
            return grads, loss_state, metrics

        if n_micro == 1:  # no accumulator: one gradient tree in memory, not two
            grads, loss_state, metrics = one(jax.tree.map(lambda a: a[0], batch), 0, state["loss_state"])
        else:

            def micro(carry, xs):
                grads_acc, loss_state = carry
                grads, loss_state, metrics = one(*xs, loss_state)
                return (jax.tree.map(jnp.add, grads_acc, grads), loss_state), metrics

            zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
            carry = (zeros, state["loss_state"])
            (grads, loss_state), metrics = jax.lax.scan(micro, carry, (batch, jnp.arange(n_micro)))
            grads = jax.tree.map(lambda g: g / n_micro, grads)
        metrics = {k: jnp.mean(v) for k, v in metrics.items() if not k.startswith("length_bucket/")}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        new_params = optax.apply_updates(state["trainable"], updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "trainable": keep(new_params, state["trainable"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "loss_state": keep(loss_state, state["loss_state"]) if state["loss_state"] is not None else None,
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        if "reference" in state:  # TR-DPO soft update, every ref_sync_every steps
            due = new_state["step"] % spec.ref_sync_every == 0
            a = spec.ref_sync_alpha
            new_state["reference"] = jax.tree.map(
                lambda p, r: jnp.where(due, (a * p + (1.0 - a) * r).astype(r.dtype), r),
                new_state["trainable"],
                state["reference"],
            )
        return new_state, {**metrics, "grad_norm": grad_norm, "skipped": new_state["skipped"]}

    return jax.jit(step, donate_argnums=(0,))


def make_eval_step(cfg: ModelConfig, spec: StepSpec) -> Callable:
    """`eval(trainable, frozen, reference, batch, loss_state) -> metrics` (one micro-batch, no update)."""
    loss_fn = make_loss_fn(cfg, spec)

    def evaluate(trainable, frozen, reference, batch, loss_state):
        _, (metrics, _) = loss_fn(trainable, frozen, reference, batch, loss_state)
        return metrics

    return jax.jit(evaluate)
