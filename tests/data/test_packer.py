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
    assert first.epoch == 1 and state["next_index"] > 103
    expected = [summary(first.next_micro()) for _ in range(10)]
    resumed = data.packer(spec, ex, seed=7, state=state)
    assert [summary(resumed.next_micro()) for _ in range(10)] == expected
    with pytest.raises(ValueError, match="saved for 103 examples, seed 7"):
        data.packer(spec, ex, seed=8, state=state)


def test_each_epoch_is_a_fresh_permutation_of_every_example():
    order = data.Order(103, seed=7)
    epochs = [order.epoch(e) for e in range(3)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(103))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    np.testing.assert_array_equal(data.Order(103, seed=7).epoch(1), epochs[1])  # a function of (seed, epoch)
    assert not np.array_equal(data.Order(103, seed=8).epoch(0), epochs[0])


def test_the_grain_pipeline_resumes_at_the_exact_next_step():
    """Through Grain's batching, mapping and thread prefetch (as the train loop reads it), the state taken
    after a step restores a fresh pipeline to the very next step, though the old one had built ahead."""
    import grain

    ex = examples()
    spec = spec_for(ex, rows=2)

    def pipeline():
        steps = data.micro_batches(spec, ex, seed=4).batch(3, batch_fn=list).map(lambda ps: [summary(p) for p in ps])
        return iter(grain.experimental.ThreadPrefetchIterDataset(steps, prefetch_buffer_size=2))

    first = pipeline()
    for _ in range(6):
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(4)]
    first.close()
    resumed = pipeline()
    resumed.set_state(state)
    assert [next(resumed) for _ in range(4)] == expected
    resumed.close()
    direct = data.packer(spec, ex, seed=4)  # the same plans as the packer read by hand
    assert [[summary(p) for p in direct.next_step(3)] for _ in range(10)][6:] == expected
    with pytest.raises(ValueError, match="saved by an earlier version"):
        data.packer(spec, ex, seed=4, state={"epoch": 1, "position": 3, "deferred": []})


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
    handed = [packer.order[p] for p in range(packer.cursor)]
    counts = np.bincount(seen + packer.deferred, minlength=len(ex))
    np.testing.assert_array_equal(counts, np.bincount(handed, minlength=len(ex)))


def test_no_micro_batch_holds_an_example_twice():
    """A tight geometry on a small set: the lookahead keeps reaching into the next epoch, whose examples are
    also still held or waiting; a micro-batch never takes one twice."""
    ex = examples(9)
    spec = spec_for(ex, groups=4, rows=1)
    packer = data.packer(spec, ex, seed=3)
    for _ in range(40):
        plan = packer.next_micro()
        assert len(set(plan.examples)) == len(plan.examples), plan.examples


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


def test_a_mixture_draws_each_source_by_its_weight_and_every_example_of_a_source_equally():
    ex = examples(90)
    source_of = np.array([0] * 60 + [1] * 20 + [2] * 10)
    weights = [1.0, 1.0, 2.0]  # source 2 (10 examples) gets half the stream: each drawn ~4.5x per epoch
    spec = spec_for(ex)
    packer = data.packer(spec, ex, seed=5, mixture=(source_of, weights))
    taken = []
    while packer.epoch < 4:
        taken += packer.next_micro().examples
    counts = np.bincount(source_of[taken], minlength=3) / len(taken)
    np.testing.assert_allclose(counts, [0.25, 0.25, 0.5], atol=0.03)
    per_example = np.bincount(np.concatenate([packer.order.epoch(e) for e in range(4)]), minlength=90)
    for s in range(3):  # the stream draws every example of a source as often as any other, give or take one
        drawn = per_example[source_of == s]
        assert drawn.max() - drawn.min() <= 1, (s, drawn)
    a, b = (data.packer(spec, ex, seed=5, mixture=(source_of, weights)) for _ in range(2))
    assert [summary(a.next_micro()) for _ in range(5)] == [summary(b.next_micro()) for _ in range(5)]
    state = packer.state()
    expected = [summary(packer.next_micro()) for _ in range(6)]
    resumed = data.packer(spec, ex, seed=5, mixture=(source_of, weights), state=state)
    assert [summary(resumed.next_micro()) for _ in range(6)] == expected
    with pytest.raises(ValueError, match=r"mixture weights \[1.0, 1.0, 2.0\]"):
        data.packer(spec, ex, seed=5, mixture=(source_of, [1.0, 1.0, 1.0]), state=state)
    with pytest.raises(ValueError, match=r"mixture sources \[2\] have no training examples"):
        data.packer(spec, ex, mixture=(np.minimum(source_of, 1), weights))


class Recorded:
    """A token array that records who reads its tokens (not its length, which every process plans with)."""

    def __init__(self, ids, key, log):
        self.ids, self.key, self.log = ids, key, log

    def __len__(self):
        return len(self.ids)

    def __array__(self, dtype=None, copy=None):
        self.log.append(self.key)
        return self.ids if dtype is None else self.ids.astype(dtype)


def test_eight_processes_read_each_example_once_and_only_their_share():
    """A simulated 8-host run (8 row shares of every micro-batch): over one pass every prompt's and
    completion's tokens are read by exactly one process, and each process reads exactly the tokens its rows
    hold (first-fit packing makes those shares uneven; they are not balanced)."""
    base = examples(160, seed=2)
    logs = [[] for _ in range(8)]
    spec = data.batch_spec(base, layout="packed", groups=16, max_length=100, row_multiple=8, length_multiple=32)
    rows = spec.geometries["main"].rows // 8
    plans = []
    packer = data.packer(spec, base, shuffle=False)
    while (plan := packer.next_micro()) is not None:
        plans.append(plan)
    for h in range(8):
        ex = [
            data.TokenizedPair(
                Recorded(e.prompt, (i, "p"), logs[h]),
                Recorded(e.chosen, (i, "c"), logs[h]),
                Recorded(e.rejected, (i, "r"), logs[h]),
                1.0,
                i,
            )
            for i, e in enumerate(base)
        ]
        for plan in plans:
            data.host_arrays(spec, plan, ex, rows={"main": slice(h * rows, (h + 1) * rows)})
    read = [k for log in logs for k in log]
    assert sorted(read) == sorted((i, c) for i in range(160) for c in "pcr")  # each read exactly once
    tokens = np.array([sum(len(getattr(base[i], {"p": "prompt", "c": "chosen", "r": "rejected"}[c])) for i, c in log)
                       for log in logs])  # fmt: skip
    planned = np.zeros(8, np.int64)  # the tokens of the units the plans put in each process's rows
    for plan in plans:
        for u, row, _ in plan.parts["main"].placed:
            planned[row // rows] += u.size
    np.testing.assert_array_equal(tokens, planned)  # each process reads its rows' tokens and nothing else
