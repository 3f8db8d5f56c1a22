"""What one fixed micro-batch shape costs on a small uneven set: tokens computed per trained pair.

On the DPO-vs-TRL benchmark's work (the first 64 helpful pairs of ../shared/data/hh_rlhf_test.jsonl, max
length 512, prompt at most 384, 8 pairs per micro-batch, packed with the prompt once) the packer is run for
64 micro-batches (8 epochs) under each geometry: the one `data.derive_geometry` picks, and tighter ones it
rejects because micro-batches then hold fewer than 8 pairs (the rest wait for the next). Printed per
geometry: tokens per micro-batch, the mean pairs it holds, the share of short micro-batches, and tokens
computed per trained pair; against the tokens a variable-shape micro-batch of exactly its pairs would
compute (the real tokens, what the code before fixed shapes approached with its buckets).

    python benchmarks/fixed_shapes.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from prefopt_jax import data, models
from prefopt_jax.data.planner import Packer, Part, derive_geometry

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_test.jsonl"
HELPFUL_START, PAIRS, GROUPS = 2303, 64, 8


def held(geometry: data.Geometry, prompts: np.ndarray, completions: np.ndarray, micro: int = 64) -> np.ndarray:
    sizes = lambda i, slot, g: [(slot, int(prompts[i]), tuple(int(c) for c in completions[i]))]
    packer = Packer(len(prompts), {"main": Part(geometry, "packed", sizes)}, seed=0)
    return np.asarray([len(packer.next_micro().examples) for _ in range(micro)])


def main() -> None:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[HELPFUL_START : HELPFUL_START + PAIRS]]
    examples = data.prepare(rows, models.load_tokenizer("smollm2-135m-instruct"), max_length=512, max_prompt_length=384)
    p = np.asarray([len(e.prompt) for e in examples.train])
    c = np.asarray([[len(e.chosen), len(e.rejected)] for e in examples.train])
    real = p + c.sum(1)
    print(f"{len(real)} pairs, {real.mean():.0f} tokens each (prompt once), longest {real.max()}")
    print(f"exact shapes: {real.mean():.0f} tokens per trained pair\n")
    chosen = derive_geometry(p, c, layout="packed", groups=GROUPS, tiles=True)
    print("| rows x length | tokens | pairs held (mean) | short micro-batches | tokens per trained pair |")
    print("|---|---|---|---|---|")
    for r, t in ((chosen.rows, chosen.length), (2, 1280), (2, 1152), (3, 768), (1, 2304), (1, 2048)):
        g = data.Geometry(r, t, GROUPS, 2, chosen.width, min(t, 2 * chosen.scored), 0)
        n = held(g, p, c)
        mark = " (derived)" if (r, t) == (chosen.rows, chosen.length) else ""
        print(
            f"| {r} x {t}{mark} | {g.tokens} | {n.mean():.2f} | {np.mean(n < GROUPS):.0%} | {g.tokens / n.mean():.0f} |"
        )


if __name__ == "__main__":
    main()
