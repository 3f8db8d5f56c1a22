"""FLOPs of a preference step, counted analytically from the batch (what the model needs, not what XLA
executes: padding, recomputation under remat and masked attention entries are not counted), and the
peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from prefopt_jax.models.config import ModelConfig

# dense bf16 peak FLOP/s per device, by jax `device_kind` prefix (vendor datasheets)
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def forward_flops(cfg: ModelConfig, tokens: float, attended_pairs: float, scored: float) -> float:
    """One forward pass: the layers' matmuls for `tokens` tokens, attention (q·k and p·v) over
    `attended_pairs` visible (query, key) pairs, and the unembedding for `scored` tokens."""
    d, f, h, k, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_token = 2 * (d * e * (h + 2 * k) + h * e * d + 3 * d * f)
    return cfg.num_layers * (per_token * tokens + 4 * h * e * attended_pairs) + 2 * d * cfg.vocab_size * scored


def plan_counts(plan) -> tuple[float, float, float]:
    """(tokens, visible attention pairs, completion tokens) of a planned micro-batch part (`data.RowPlan`),
    from its units' lengths: a prompt shared by its completions is counted once, as it is computed once;
    a prompt token at position p sees p + 1 keys, a completion token its prompt and its own past."""
    tokens = pairs = scored = 0
    for u, _, _ in plan.placed:
        p = u.prompt_len
        tokens += u.size
        pairs += p * (p + 1) // 2 + sum(c * p + c * (c + 1) // 2 for c in u.completion_lens)
        scored += sum(u.completion_lens)
    return float(tokens), float(pairs), float(scored)


def step_flops(
    cfg: ModelConfig, plans: list, *, lora: bool, reference_in_step: bool, scores_prompts: bool = False
) -> float:
    """Model FLOPs of one optimizer step (`plans`: its micro-batches' `data.MicroPlan`s): the policy's forward
    and backward (full fine-tuning: 3 forwards' worth, weight and activation gradients; LoRA: 2, activation
    gradients only, adapters negligible), the reference's forward when it runs in the step, and forward-only
    side passes (RMiPO's response-only sequences: policy; KTO's mismatched pairs: policy and reference).
    `scores_prompts` (ORPO's NLL over prompt + chosen): the policy's unembedding of the prompt tokens too."""
    total = 0.0
    for plan in plans:
        tokens, pairs, scored = plan_counts(plan.parts["main"])
        fwd = forward_flops(cfg, tokens, pairs, scored)
        total += fwd * ((2 if lora else 3) + (1 if reference_in_step else 0))
        if scores_prompts:
            total += 2 * cfg.hidden_size * cfg.vocab_size * (tokens - scored) * (2 if lora else 3)
        if "response_only" in plan.parts:
            total += forward_flops(cfg, *plan_counts(plan.parts["response_only"]))
        if "kl" in plan.parts:
            total += forward_flops(cfg, *plan_counts(plan.parts["kl"])) * (2 if reference_in_step else 1)
    return total


def measured_peak_flops(n: int = 1024, repeats: int = 10, dtype=jnp.float32, random: bool = False) -> float:
    """This device's matmul FLOP/s in `dtype` (default fp32), measured (median of `repeats` timed n x n x n
    products; of random operands with `random`: a GPU multiplies all-ones matrices faster)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype) if random else jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times))


def datasheet_peak(device_kind: str) -> tuple[str, float] | None:
    """(matched prefix, dense bf16 peak FLOP/s per device) for a jax `device_kind`, or None (CPU, unknown)."""
    return next(((p, f) for p, f in PEAK_FLOPS.items() if device_kind.startswith(p)), None)


def total_peak(per_device: float | None, devices: int, platform: str) -> float:
    """Peak FLOP/s of `devices` devices together: the per-device figure times the count on accelerators;
    on CPU the measured host peak once, however many devices are simulated (they share its cores)."""
    if platform == "cpu" or per_device is None:
        return measured_peak_flops() if per_device is None else per_device
    return per_device * devices


def peak_flops(override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of all devices together, where the figure came from)."""
    devices = jax.devices()
    platform = devices[0].platform
    if override_tflops:
        return total_peak(override_tflops * 1e12, len(devices), platform), "train.peak_tflops"
    known = datasheet_peak(devices[0].device_kind)
    if known:
        return total_peak(known[1], len(devices), platform), f"{known[0]} datasheet bf16 peak"
    return total_peak(None, len(devices), platform), f"measured fp32 matmul peak of this {platform}"
