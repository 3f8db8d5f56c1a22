"""The built-in preference set: correct by construction, deterministic, held-out questions unseen."""

from prefopt_jax import data
from prefopt_jax.data.synthetic import comparison_pairs


def test_comparison_pairs_are_correct_deterministic_and_disjoint():
    train, held = comparison_pairs(200, 40, seed=5)
    assert (train, held) == comparison_pairs(200, 40, seed=5)
    question = lambda r: r["prompt"][-1]["content"]
    operands = lambda r: tuple(
        int(x) for x in question(r).removeprefix("Which is larger, ").removesuffix("?").split(" or ")
    )
    assert not {question(r) for r in train} & {question(r) for r in held}
    # nor the same question the other way round: (a, b) held out while (b, a) is trained on
    assert not {frozenset(operands(r)) for r in train} & {frozenset(operands(r)) for r in held}
    train64, held64 = comparison_pairs(512, 64, seed=0)  # the built-in job's split
    assert not {frozenset(operands(r)) for r in train64} & {frozenset(operands(r)) for r in held64}
    for r in train + held:
        a, b = operands(r)
        assert r["chosen"] == r["answer"] == str(max(a, b)) and r["rejected"] != r["chosen"]
    records, report = data.read_records(train)
    assert report.used == 200 and isinstance(records[0], data.Pair)
