"""The built-in preference set: correct by construction, deterministic, held-out questions unseen."""

from prefopt_jax import data
from prefopt_jax.data.synthetic import comparison_pairs


def test_comparison_pairs_are_correct_deterministic_and_disjoint():
    train, held = comparison_pairs(200, 40, seed=5)
    assert (train, held) == comparison_pairs(200, 40, seed=5)
    question = lambda r: r["prompt"][-1]["content"]
    assert not {question(r) for r in train} & {question(r) for r in held}
    for r in train + held:
        a, b = (int(x) for x in question(r).removeprefix("Which is larger, ").removesuffix("?").split(" or "))
        assert r["chosen"] == r["answer"] == str(max(a, b)) and r["rejected"] != r["chosen"]
    records, report = data.read_records(train)
    assert report.used == 200 and isinstance(records[0], data.Pair)
