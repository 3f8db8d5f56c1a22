"""The fused train step: policy forward/backward, reference forward and the loss in one `jit`.

The step is built per configuration (reference mode, LoRA or full fine-tuning, what the loss declares),
never branched on flags inside the compiled function. A micro-batch is the data pipeline's integer-only
contract (`prefopt_jax.data.Batch`: per token its id, position, segment id and branch; per completion its
start and length), of one fixed geometry per run, so the step compiles once. Everything else is derived
here, on the device: the attention mask (inside attention), which positions are scored, which position
predicts each scored token, and every completion's per-token values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from prefopt_jax.data.batching import Geometry
from prefopt_jax.kinds import InputKind
from prefopt_jax.logprobs import token_stats
from prefopt_jax.losses import EXTRAS, Loss, PairLogps, Provider, RankedLogps, UnpairedLogps
from prefopt_jax.models.attention import AttentionSpec
from prefopt_jax.models.config import ModelConfig
from prefopt_jax.models.decoder import forward_hidden, no_constraint, unembedding
from prefopt_jax.train.lora import with_lora
from prefopt_jax.train.metrics import LENGTH_EDGES

sg = jax.lax.stop_gradient
# metrics that add up over a step's micro-batches (and the length_bucket/ counts); the others are means
SUMMED = ("num_tokens", "num_completion_tokens", "num_groups")


def token_layout(b: dict, scored: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From a micro-batch's token arrays: the scored positions of each row [R, C] (completion tokens, in
    order; -1 past the last), each token's rank among its row's scored tokens [R, T], and the position whose
    output predicts each token [R, T] (the previous one within a completion; the prompt's last token for a
    completion's first)."""
    seg, branch = b["segment_ids"], b["branch"].astype(jnp.int32)
    r, t = seg.shape
    idx = jnp.arange(t, dtype=jnp.int32)
    is_scored = (branch > 0) & (seg > 0)
    rank = jnp.cumsum(is_scored, axis=1, dtype=jnp.int32) - 1
    rows = jnp.arange(r)[:, None]
    slot = jnp.where(is_scored, rank, scored)  # out of bounds: dropped by the scatter
    positions = jnp.full((r, scored), -1, jnp.int32).at[rows, slot].set(jnp.broadcast_to(idx, (r, t)), mode="drop")
    continues = (branch[:, 1:] == branch[:, :-1]) & (seg[:, 1:] == seg[:, :-1])
    continues = jnp.concatenate([jnp.zeros((r, 1), bool), continues], axis=1)
    last_prompt = jax.lax.cummax(jnp.where(branch == 0, idx, -1), axis=1)
    return positions, rank, jnp.where(continues, idx - 1, jnp.maximum(last_prompt, 0))


def completion_mask(b: dict, width: int) -> jax.Array:
    """bool [G, k, L]: the completion tokens of every group slot."""
    return jnp.arange(width) < b["completion_length"][..., None]


def per_completion(values_RxC: jax.Array, rank_RxT: jax.Array, b: dict, width: int) -> jax.Array:
    """Per-scored-position values [R, C] laid out per completion [G, k, L] (0 past each completion)."""
    t = rank_RxT.shape[1]
    steps = jnp.arange(width)
    mask = steps < b["completion_length"][..., None]
    flat = jnp.where(mask, b["completion_start"][..., None] + steps, 0)
    rows, cols = flat // t, flat % t
    return jnp.where(mask, values_RxC[rows, rank_RxT[rows, cols]], 0.0)


def per_prompt(values_RxT: jax.Array, b: dict) -> tuple[jax.Array, jax.Array]:
    """Per-position values [R, T] laid out per group's prompt [G, T], and the mask of the prompt tokens
    that have a predictor (all but the first). A group's prompt ends where its first completion starts
    (in every layout), and its length is that completion's first position."""
    t = values_RxT.shape[1]
    start0 = b["completion_start"][:, 0]
    length = jnp.where(b["completion_length"][:, 0] > 0, b["positions"].reshape(-1)[start0], 0)
    steps = jnp.arange(t)
    mask = (steps >= 1) & (steps < length[:, None])
    flat = jnp.where(mask, (start0 - length)[:, None] + steps, 0)
    return jnp.where(mask, values_RxT[flat // t, flat % t], 0.0), mask


def _hidden(
    cfg: ModelConfig, params, b, attention: AttentionSpec, remat="none", dtype=jnp.float32, constrain=no_constraint
):
    return forward_hidden(
        cfg,
        params,
        b["input_ids"],
        b["positions"],
        b["segment_ids"],
        b["branch"],
        remat=remat,
        dtype=dtype,
        constrain=constrain,
        attention=attention,
    )


def completion_stats(
    cfg: ModelConfig,
    params: dict,
    b: dict,
    geometry: Geometry,
    attention: AttentionSpec,
    *,
    reference: dict | None = None,
    sum_sq: bool = False,
    prompts: bool = False,
    chunk: int = 128,
    remat: str = "none",
    dtype: Any = jnp.float32,
    constrain=no_constraint,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """(`token_stats` of every completion of a micro-batch, each [G, K, L] (0 outside the completion), and
    the completion mask [G, K, L]). Log-probs are computed at the scored positions only: prompt tokens never
    meet the unembedding. With `reference` parameters, their log-probs and the per-token KLs too (no
    gradient into the reference). `dtype` is the layers' compute dtype (weights are cast at use); log-softmax
    is always float32. `constrain` (`sharding.activation_constraint`) keeps activations and each layer's
    weights on the mesh."""
    b = {**b, **{k: b[k].astype(jnp.int32) for k in ("positions", "segment_ids", "branch")}}  # sent narrow
    scored, rank, predictor = token_layout(b, geometry.scored)
    at = jnp.maximum(scored, 0)
    pred = jnp.take_along_axis(predictor, at, axis=1)

    def picked(hidden):  # [R, C, D]: only these hidden states meet the unembedding
        return jnp.take_along_axis(hidden, pred[..., None], axis=1)

    ref = None
    if reference is not None:
        hidden_ref = _hidden(cfg, reference, b, attention, dtype=dtype, constrain=constrain)
        ref = (sg(picked(hidden_ref)), sg(unembedding(cfg, reference)))
    hidden = _hidden(cfg, params, b, attention, remat, dtype, constrain)
    stats = token_stats(
        picked(hidden),
        unembedding(cfg, params),
        jnp.take_along_axis(b["input_ids"], at, axis=1),
        jnp.broadcast_to(jnp.arange(scored.shape[1]), scored.shape),
        reference=ref,
        sum_sq=sum_sq,
        chunk=min(chunk, scored.shape[1]),  # rows with few scored slots: no padded chunk of logits
        softcap=cfg.final_logit_softcap,
        active_BxT=scored >= 0,  # the budget's chunks past every row's last scored token are skipped
    )
    out = {k: per_completion(v, rank, b, geometry.width) for k, v in stats.items()}
    if prompts:  # every token predicted by the one before it (prompt tokens have no other predictor)
        every = token_stats(
            hidden, unembedding(cfg, params), b["input_ids"], chunk=chunk, softcap=cfg.final_logit_softcap
        )
        out["prompt_logps"], out["prompt_mask"] = per_prompt(every["logps"], b)
    return out, completion_mask(b, geometry.width)


def completion_logps(
    cfg: ModelConfig, params: dict, b: dict, geometry: Geometry, attention: AttentionSpec, **kw
) -> tuple[jax.Array, jax.Array]:
    """(per-token log-probs of every completion [G, K, L], completion mask [G, K, L])."""
    stats, mask = completion_stats(cfg, params, b, geometry, attention, **kw)
    return stats["logps"], mask


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What one step computes. `loss` is a registered Loss with its hyperparameters bound in `hp`.

    `ref_sync_every` > 0 turns on TR-DPO: every that many steps, inside the step, the reference moves to
    `ref_sync_alpha`·policy + (1 − α)·reference. Full fine-tuning mixes the weights themselves. With LoRA the
    reference keeps its own adapters and the mix is factor by factor (A_ref ← αA + (1−α)A_ref, B_ref likewise),
    so its weight delta becomes scale·(αB + (1−α)B_ref)(αA + (1−α)A_ref): the weight mix only for α = 1 (the
    reference copies the policy) or equal factors; a rank-r adapter cannot hold the exact mix.
    `lora_dropout` drops out adapter inputs while training, with a key drawn from `seed` and the step
    number (so a resumed run draws the same masks). `geometries` are the micro-batch
    parts' fixed shapes (`data.BatchSpec.geometries`), `attention` the implementation the layers use.
    `train.build.step_spec` makes one from a config (`train.build.resolve` refuses what cannot work)."""

    loss: Loss
    hp: dict
    geometries: Mapping[str, Geometry]
    attention: AttentionSpec = dataclasses.field(default_factory=AttentionSpec)
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

    @property
    def extras(self) -> tuple[str, ...]:
        return self.loss.required_extras(**self.hp)

    @property
    def scores_prompts(self) -> bool:
        """The unembedding scores the prompt's tokens too (ORPO's NLL over prompt + chosen, as TRL trains it)."""
        return "full_chosen" in self.extras

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def reference_in_step(self) -> bool:
        return self.loss.needs_reference and self.reference in ("frozen", "lora_base")

    def attention_for(self, part: str) -> AttentionSpec:
        """The attention spec of a micro-batch part (block-sparse tile budgets differ per part)."""
        return dataclasses.replace(self.attention, tiles_per_row=self.geometries[part].tiles)


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
    out = {
        "num_tokens": jnp.sum(main["segment_ids"] > 0),
        "num_completion_tokens": jnp.sum(mask),
        "num_groups": jnp.sum(main["completion_length"][:, 0] > 0),
    }
    if "kl_policy_ref" in stats:
        out["kl/per_token"] = _masked_mean(sg(stats["kl_policy_ref"]), mask)
    lengths = mask.sum(-1)
    out["lengths/mean"] = _masked_mean(lengths.astype(jnp.float32), lengths > 0)
    return out


def host_extras(spec: StepSpec, batch: dict) -> dict:
    """The extras the host computed before training, carried in the batch (`losses.Provider.HOST`)."""
    return {k: batch[k] for k in spec.extras if EXTRAS[k].provider is Provider.HOST}


def _paired_inputs(spec: StepSpec, stats: dict, mask: jax.Array, batch: dict, alone) -> tuple[PairLogps, dict]:
    policy = stats["logps"]
    reference = batch["ref_logps"] if spec.reference == "precomputed" else stats.get("ref_logps")
    valid = mask[:, 0].any(-1)
    extras = host_extras(spec, batch)
    if alone is not None:  # RMiPO: the policy's avg log-prob of each response alone (chosen slots, then rejected)
        logps, alone_mask = alone
        avg = logps.sum(-1)[:, 0] / jnp.maximum(alone_mask.sum(-1)[:, 0], 1)
        half = avg.shape[0] // 2
        extras |= {"response_only_chosen_avg": avg[:half], "response_only_rejected_avg": avg[half:]}
    if "seq_kl_chosen" in spec.extras:  # TDPO: sequence KL(ref || policy), differentiable in the policy
        kl = stats["kl_ref_policy"].sum(-1)
        extras |= {"seq_kl_chosen": kl[:, 0], "seq_kl_rejected": kl[:, 1]}
    if "full_chosen" in spec.extras:  # ORPO as TRL: the NLL over prompt + chosen
        extras |= {
            "full_chosen": jnp.concatenate([stats["prompt_logps"], policy[:, 0]], axis=1),
            "full_chosen_mask": jnp.concatenate([stats["prompt_mask"], mask[:, 0]], axis=1),
        }
    if "wpo_aligned_chosen" in spec.extras:  # WPO: log p(y_t) - log sum_v p(v)^2, no gradient
        aligned = sg(policy - stats["log_sum_sq"])
        extras |= {"wpo_aligned_chosen": aligned[:, 0], "wpo_aligned_rejected": aligned[:, 1]}
    ref_c, ref_r = (None, None) if reference is None else (reference[:, 0], reference[:, 1])
    x = PairLogps(policy[:, 0], policy[:, 1], mask[:, 0], mask[:, 1], ref_c, ref_r, extras)
    lengths = mask.sum(-1)
    metrics = {
        "lengths/chosen": _masked_mean(lengths[:, 0].astype(jnp.float32), valid),
        "lengths/rejected": _masked_mean(lengths[:, 1].astype(jnp.float32), valid),
    }
    if reference is not None:  # likelihood displacement: how far the chosen log-prob moved
        metrics["logps/chosen_drift"] = _masked_mean(sg(policy[:, 0].sum(-1) - reference[:, 0].sum(-1)), valid)
        margin = (policy - reference).sum(-1)  # reward accuracy by the pair's length (chosen + rejected tokens)
        bucket = jnp.searchsorted(jnp.asarray(LENGTH_EDGES), lengths.sum(-1), side="right")
        onehot = jax.nn.one_hot(bucket, len(LENGTH_EDGES) + 1) * valid[:, None]
        metrics["length_bucket/correct"] = jnp.sum(onehot * sg(margin[:, 0] > margin[:, 1])[:, None], axis=0)
        metrics["length_bucket/count"] = jnp.sum(onehot, axis=0)
    return x, metrics


def _unpaired_inputs(spec: StepSpec, stats: dict, mask: jax.Array, batch: dict, kl) -> tuple[UnpairedLogps, dict]:
    ref_logps = batch["ref_logps"] if spec.reference == "precomputed" else stats.get("ref_logps")
    kl_policy = kl_ref = None
    if kl is not None:  # KTO's reference point: the mismatched (prompt_i, completion_j) pairs
        kl_policy, kl_ref = (v.sum(-1)[:, 0] for v in kl)
    extras = host_extras(spec, batch)  # BCO-UDM's prompt classifier
    x = UnpairedLogps(
        stats["logps"][:, 0],
        mask[:, 0],
        batch["label"],
        None if ref_logps is None else ref_logps[:, 0],
        kl_policy,
        kl_ref,
        extras,
    )
    return x, {}


def make_loss_fn(cfg: ModelConfig, spec: StepSpec, *, training: bool = True) -> Callable:
    """(trainable, frozen, reference, batch, loss_state, key, total_weight) -> (objective, (metrics, new loss
    state)); `training=False` runs the loss in its evaluation mode (`Loss.evaluation`). The objective is
    this micro-batch's Σ loss·weight over `total_weight` (the whole step's weight, so a step's
    micro-batches add up to its weighted mean; default: this micro-batch's own).

    `reference` is the frozen reference copy (full fine-tuning), the reference adapters (LoRA under
    TR-DPO) or None; `key` drives LoRA dropout (None: no dropout, as in evaluation)."""

    hp = spec.hp if training else spec.loss.evaluation(spec.hp)

    def stats_of(params, part: str, b: dict, **kw):
        kw = {"chunk": spec.chunk, "dtype": spec.dtype, "constrain": spec.constrain, **kw}
        return completion_stats(cfg, params, b, spec.geometries[part], spec.attention_for(part), **kw)

    def loss_fn(trainable, frozen, reference, batch, loss_state, key=None, total_weight=None):
        params = policy_params(spec, trainable, frozen, key)
        ref = reference_params(spec, frozen, reference)
        main = batch["main"]
        sum_sq, prompts = "wpo_aligned_chosen" in spec.extras, spec.scores_prompts
        stats, mask = stats_of(params, "main", main, reference=ref, sum_sq=sum_sq, prompts=prompts, remat=spec.remat)
        if "scores" in batch:  # ranked candidate sets (RRHF with K candidates)
            x, extra_metrics = RankedLogps(stats["logps"], mask, batch["scores"]), {}
        elif spec.loss.kind is not InputKind.UNPAIRED:  # pairs (RRHF on pairs: two ranked candidates)
            alone = None
            if "response_only_chosen_avg" in spec.extras:
                logps, alone_mask = stats_of(params, "response_only", batch["response_only"])
                alone = (sg(logps["logps"]), alone_mask)
            x, extra_metrics = _paired_inputs(spec, stats, mask, batch, alone)
        else:
            kl = None
            if spec.loss.needs_kl:
                kl_policy = sg(stats_of(params, "kl", batch["kl"])[0]["logps"])
                kl = (kl_policy, sg(stats_of(ref, "kl", batch["kl"])[0]["logps"]))
            x, extra_metrics = _unpaired_inputs(spec, stats, mask, batch, kl)
        out = spec.loss(x, state=loss_state, **hp)
        w = batch["weight"]
        weighted = jnp.sum(out.loss * w)
        total = jnp.maximum(jnp.sum(w), 1e-8) if total_weight is None else total_weight
        metrics = {**out.metrics, **extra_metrics, **_common_metrics(stats, mask, main)}
        metrics["loss"] = weighted / jnp.maximum(jnp.sum(w), 1e-8)
        metrics["weight"] = jnp.sum(w)
        return weighted / total, (metrics, out.state)

    return loss_fn


def combine_metrics(stacked: dict) -> dict:
    """A step's metrics from its micro-batches' (each [M, ...]): counts add up, "loss" is the weighted mean,
    every other metric the mean over all valid groups (each micro-batch's mean weighted by its group count)."""
    groups = stacked["num_groups"].astype(jnp.float32)
    out = {}
    for k, v in stacked.items():
        if k in SUMMED or k.startswith("length_bucket/"):
            out[k] = jnp.sum(v, axis=0)
        elif k == "loss":
            out[k] = jnp.sum(v * stacked["weight"]) / jnp.maximum(jnp.sum(stacked["weight"]), 1e-8)
        elif k != "weight":
            n = jnp.where(jnp.isnan(v), 0.0, groups)
            out[k] = jnp.sum(jnp.where(jnp.isnan(v), 0.0, v) * n) / jnp.maximum(jnp.sum(n), 1.0)
    return out


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


def accumulate(one: Callable, batch: dict, used: jax.Array, trainable: Any, loss_state: Any):
    """(summed gradients, loss state, metrics stacked [M, ...]) over a step's micro-batches, `one(mb, i,
    loss_state) -> (grads, loss_state, metrics)` each: a scan whose body computes a micro-batch only where
    `used` [M] says it has groups (`lax.cond`), and otherwise passes the sums and the loss state on with zero
    metrics. The gradient is taken inside the body, so the loop itself is never differentiated."""
    n_micro = used.shape[0]
    if n_micro == 1:  # no accumulator: one gradient tree in memory, not two (a step is never empty)
        grads, loss_state, metrics = one(jax.tree.map(lambda a: a[0], batch), 0, loss_state)
        return grads, loss_state, jax.tree.map(lambda a: a[None], metrics)
    shapes = jax.eval_shape(one, jax.tree.map(lambda a: a[0], batch), 0, loss_state)[2]
    nothing = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # a skipped one's metrics

    def micro(carry, xs):
        grads_acc, loss_state = carry
        mb, i, is_used = xs

        def compute(loss_state):
            grads, loss_state, metrics = one(mb, i, loss_state)
            return jax.tree.map(jnp.add, grads_acc, grads), loss_state, metrics

        skip = lambda loss_state: (grads_acc, loss_state, nothing)
        grads_acc, loss_state, metrics = jax.lax.cond(is_used, compute, skip, loss_state)
        return (grads_acc, loss_state), metrics

    carry = (jax.tree.map(jnp.zeros_like, trainable), loss_state)
    (grads, loss_state), metrics = jax.lax.scan(micro, carry, (batch, jnp.arange(n_micro), used))
    return grads, loss_state, metrics


def make_train_step(
    cfg: ModelConfig, spec: StepSpec, optimizer: optax.GradientTransformation, out_shardings: Any = None
) -> Callable:
    """`step(state, frozen, ref_params, batch) -> (state, metrics)`, jitted, the state donated.
    `out_shardings` ((the state's shardings, the metrics'), as the run holds them) keeps the new state in
    exactly the layout the next step takes, so the step compiles once (XLA may otherwise name an
    equivalent layout differently, which is a new input signature).

    `batch` holds micro-batches stacked on a leading axis (gradient accumulation inside the step,
    `accumulate`): the step's fixed room, of which the data's plan uses as many as its examples need
    (`data.planner`). An unused micro-batch (no group in it) is skipped: no forward, no backward, the loss
    state passed on as it was. The step's objective is the weighted mean loss over all of
    its groups, however they are spread over micro-batches. A batch-coupled loss state (AlphaDPO's moments,
    BCO's running shift) moves from micro-batch to micro-batch, as TRL's moves from batch to batch. A step
    whose loss or gradients are not finite leaves the parameters as they were and counts itself in
    `state["skipped"]`. Under TR-DPO the reference lives in the state."""
    grad_fn = jax.value_and_grad(make_loss_fn(cfg, spec), has_aux=True)

    def step(state, frozen, ref_params, batch):
        reference = state.get("reference", ref_params)
        step_key = jax.random.fold_in(jax.random.PRNGKey(spec.seed), state["step"])
        total_weight = jnp.maximum(jnp.sum(batch["weight"]), 1e-8)
        used = jnp.any(batch["main"]["completion_length"] > 0, axis=(1, 2))  # [M]: micro-batches with groups

        def one(mb, i, loss_state):
            key = jax.random.fold_in(step_key, i) if spec.lora_dropout else None
            (_, (metrics, loss_state)), grads = grad_fn(
                state["trainable"], frozen, reference, mb, loss_state, key, total_weight
            )
            return grads, loss_state, metrics

        grads, loss_state, metrics = accumulate(one, batch, used, state["trainable"], state["loss_state"])
        metrics = {k: v for k, v in combine_metrics(metrics).items() if not k.startswith("length_bucket/")}
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
        out = {**metrics, "grad_norm": grad_norm, "skipped": new_state["skipped"], "micro_batches": jnp.sum(used)}
        return new_state, out

    if out_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


def make_eval_step(cfg: ModelConfig, spec: StepSpec) -> Callable:
    """`eval(trainable, frozen, reference, batch, loss_state) -> (metrics, loss state)`: one micro-batch in
    the loss's evaluation mode, no update of the parameters."""
    loss_fn = make_loss_fn(cfg, spec, training=False)

    def evaluate(trainable, frozen, reference, batch, loss_state):
        _, (metrics, loss_state) = loss_fn(trainable, frozen, reference, batch, loss_state)
        return metrics, loss_state

    return jax.jit(evaluate)
