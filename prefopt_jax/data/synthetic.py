"""A preference set with a verifiable ground truth, generated here (no download): "which of two numbers is
larger?". The chosen answer is the larger number alone; the rejected one is the smaller number, or the
right number inside a sentence. The knowledge is already in the model; what DPO must teach is to answer
correctly and in the asked-for form, which greedy answers on held-out pairs (operand pairs never trained
on) show directly."""

from __future__ import annotations

import numpy as np

SYSTEM = "Reply with the number only."


def _question(a: int, b: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Which is larger, {a} or {b}?"}]


def comparison_pairs(n_train: int = 512, n_eval: int = 64, seed: int = 0, max_value: int = 99) -> tuple[list, list]:
    """(train rows, held-out rows) in the conversational preference format, each with its `answer`. The
    split is over unordered operand pairs, so a held-out question is never trained on in either order."""
    rng = np.random.default_rng(seed)
    operands = [(a, b) for a in range(10, max_value + 1) for b in range(a + 1, max_value + 1)]
    if n_train + n_eval > len(operands):
        raise ValueError(f"only {len(operands)} distinct operand pairs for {n_train} + {n_eval} rows")
    rows = []
    for i in rng.permutation(len(operands))[: n_train + n_eval]:
        small, big = operands[i]
        a, b = (small, big) if rng.random() < 0.5 else (big, small)
        wrong = str(small) if rng.random() < 0.5 else f"The larger number is {big}."
        rows.append({"prompt": _question(a, b), "chosen": str(big), "rejected": wrong, "answer": str(big)})
    return rows[:n_train], rows[n_train:]
