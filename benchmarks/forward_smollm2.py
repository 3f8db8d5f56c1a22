"""SmolLM2-135M-Instruct forward throughput: prefopt_jax (jit, XLA CPU) next to transformers (torch CPU) on the
same batch of token ids, both float32, plus load times and the logit agreement of the two.

    python benchmarks/forward_smollm2.py [--batch 4] [--length 256] [--repeats 7]

Needs torch and accelerate (transformers' GGUF loader). Prints medians over the repeats and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for jax)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch
    import transformers

    from prefopt_jax import models

    t = time.perf_counter()
    model = models.load_pretrained("smollm2-135m-instruct")
    jax_load = time.perf_counter() - t
    path = models.resolve_source("smollm2-135m-instruct")
    t = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf.eval()
    hf_load = time.perf_counter() - t

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.length))
    ids_jax, ids_torch = jnp.asarray(ids), torch.tensor(ids)
    forward = jax.jit(lambda m, x: m(x))

    def run_jax():
        forward(model, ids_jax).block_until_ready()

    def run_torch():
        with torch.no_grad():
            hf(ids_torch)

    tokens = args.batch * args.length
    s_jax = median_seconds(run_jax, args.repeats)
    s_torch = median_seconds(run_torch, args.repeats)
    with torch.no_grad():
        diff = np.abs(np.asarray(forward(model, ids_jax)) - hf(ids_torch).logits.numpy()).max()
    print(f"devices: {jax.devices()}; torch threads: {torch.get_num_threads()}")
    print(f"batch {args.batch} x {args.length} tokens, float32, median of {args.repeats}")
    print(f"load:    prefopt_jax {jax_load:6.2f} s   transformers (GGUF) {hf_load:6.2f} s")
    print(f"forward: prefopt_jax {tokens / s_jax:8.0f} tok/s   transformers {tokens / s_torch:8.0f} tok/s")
    print(f"ratio prefopt_jax / transformers: {s_torch / s_jax:.2f}x   max |Δlogit| {diff:.2e}")


if __name__ == "__main__":
    main()
