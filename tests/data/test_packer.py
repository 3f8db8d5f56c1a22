"""The plan of micro-batches: deterministic, resumable, nothing dropped, the same on every process, and each
process builds only its own rows."""

import numpy as np
import pytest

from prefopt_jax import data


def examples(n=103, seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(1, 50, rng.integers(lo, hi)).astype(np.int32)
    return [data.TokenizedPair(ids(1, 40), ids(1, 60), ids(1, 60), 1.0, i) for i in range(n)]


def spec_for(ex, groups=8, rows=None):
    return data.batch_spec(ex, layout="packed", groups=groups, max_length=100, rows=rows, length_multiple=32)


def summary(plan):
    return plan.examples, [(u.group, row, off) for u, row, off in plan.parts["main"].placed]


def test_resume_continues_at_the_exact_next_micro_batch():
    ex = examples()
    spec = spec_for(ex)
    first = data.packer(spec, ex, seed=7)
    for _ in range(17):  # crosses the epoch boundary (about 13 micro-batches per epoch)
        first.next_micro()
    state = first.state()
    assert state["epoch"] == 1
    expected = [summary(first.next_micro()) for _ in range(10)]
    resumed = data.packer(spec, ex, seed=7, state=state)
    assert [summary(resumed.next_micro()) for _ in range(10)] == expected
    with pytest.raises(ValueError, match="saved for 103 examples and seed 7"):
        data.packer(spec, ex, seed=8, state=state)


def test_nothing_is_dropped_and_capacities_hold():
    """A tight geometry defers examples; every example the stream has handed out is either in a
    micro-batch or waiting, exactly once per time it was handed out."""
    ex = examples()
    spec = spec_for(ex, rows=2)
    g = spec.geometries["main"]
    packer = data.packer(spec, ex, seed=3)
    seen, waited = [], 0
    while packer.epoch < 3:
        plan = packer.next_micro()
        seen += plan.examples
        waited = max(waited, len(packer.deferred))
        rp = plan.parts["main"]
        assert len(plan.examples) <= g.groups and (rp.fill <= g.length).all() and (rp.scored <= g.scored).all()
    assert waited > 0  # the geometry was tight enough to defer some
    handed = [int(i) for e in range(packer.epoch) for i in packer.order(e)]
    handed += [int(i) for i in packer.order(packer.epoch)[: packer.position]]
    counts = np.bincount(seen + packer.deferred, minlength=len(ex))
    np.testing.assert_array_equal(counts, np.bincount(handed, minlength=len(ex)))


def test_a_single_pass_places_every_example_once_in_order():
    ex = examples(37)
    spec = spec_for(ex, rows=2)
    packer = data.packer(spec, ex, shuffle=False)
    seen = []
    while (plan := packer.next_micro()) is not None:
        seen += plan.examples
    assert sorted(seen) == list(range(37))


def test_the_plan_is_the_same_for_any_host_and_hosts_build_only_their_rows():
    ex = examples(64)
    spec = spec_for(ex, groups=16)
    g = spec.geometries["main"]
    plans = [data.packer(spec, ex, seed=1).next_micro() for _ in range(8)]  # 8 hosts, each its own packer
    assert len({str(summary(p)) for p in plans}) == 1
    full = data.host_arrays(spec, plans[0], ex)
    whole = full["main"]
    hosts = 2 if g.rows % 2 == 0 else 1
    share = g.rows // hosts
    pieces = [
        data.host_arrays(spec, plans[h], ex, rows={"main": slice(h * share, (h + 1) * share)}) for h in range(hosts)
    ]
    for name in ("input_ids", "positions", "segment_ids", "branch"):
        assert getattr(pieces[0]["main"], name).shape[0] == share  # only its own rows are built
        np.testing.assert_array_equal(np.concatenate([getattr(p["main"], name) for p in pieces]), getattr(whole, name))
    for p in pieces:  # the group arrays are whole on every host
        np.testing.assert_array_equal(p["main"].completion_start, whole.completion_start)
        np.testing.assert_array_equal(p["weight"], full["weight"])


def test_an_example_too_long_for_the_geometry_is_an_error():
    ex = examples(10)
    spec = spec_for(ex)
    long = data.TokenizedPair(np.ones(40, np.int32), np.ones(200, np.int32), np.ones(3, np.int32), 1.0, None)
    with pytest.raises(data.TooLarge, match="example 10 does not fit an empty micro-batch"):
        data.packer(spec, [*ex, long], shuffle=False).next_step(3)
    with pytest.raises(data.TooLarge, match="example 0 "):
        data.packer(spec, [long, *ex], seed=0, shuffle=True).next_step(50)  # raised, not deferred forever
