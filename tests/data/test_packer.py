"""The plan of micro-batches: deterministic, resumable, nothing dropped, the same on every process, and each
process builds only its own rows."""

import numpy as np
import pytest

from prefopt_jax import data


def examples(n=103, seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(1, 50, rng.integers(lo, hi)).astype(np.int32)
    return [data.TokenizedPair(ids(1, 40), ids(1, 60), ids(1, 60), 1.0, i) for i in range(n)]


def spec_for(ex, batch_size=8, rows=None, steps=None, **kw):
    return data.batch_spec(
        ex, layout="packed", batch_size=batch_size, max_length=100, rows=rows, steps=steps, length_multiple=32, **kw
    )


def summary(plan):
    return plan.examples, [(u.group, row, off) for u, row, off in plan.parts["main"].placed]


def step_summary(plans):
    return [summary(p) for p in plans]


def test_resume_continues_at_the_exact_next_step():
    ex = examples()
    spec = spec_for(ex)
    first = data.packer(spec, ex, seed=7)
    for _ in range(14):  # crosses the epoch boundary (103 examples: about 13 steps of 8 per epoch)
        first.next_step()
    state = first.state()
    assert first.epoch == 1 and state["next_index"] == 14 * 8
    expected = [step_summary(first.next_step()) for _ in range(10)]
    resumed = data.packer(spec, ex, seed=7, state=state)
    assert [step_summary(resumed.next_step()) for _ in range(10)] == expected
    with pytest.raises(ValueError, match="saved for 103 examples, seed 7"):
        data.packer(spec, ex, seed=8, state=state)
    with pytest.raises(ValueError, match="and 8 per step; this run has 103, 7, None and 4"):
        data.packer(spec_for(ex, batch_size=4), ex, seed=7, state=state)


def test_each_epoch_is_a_fresh_permutation_of_every_example():
    order = data.Order(103, seed=7)
    epochs = [order.epoch(e) for e in range(3)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(103))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    np.testing.assert_array_equal(data.Order(103, seed=7).epoch(1), epochs[1])  # a function of (seed, epoch)
    assert not np.array_equal(data.Order(103, seed=8).epoch(0), epochs[0])


def test_the_grain_pipeline_resumes_at_the_exact_next_step():
    """Through Grain's mapping and thread prefetch (as the train loop reads it), the state taken after a step
    restores a fresh pipeline to the very next step, though the old one had built ahead."""
    import grain

    ex = examples()
    spec = spec_for(ex, rows=2)

    def pipeline():
        steps = data.steps(spec, ex, seed=4).map(step_summary)
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
    assert [step_summary(direct.next_step()) for _ in range(10)][6:] == expected
    with pytest.raises(ValueError, match="saved by an earlier version"):
        data.packer(spec, ex, seed=4, state={"next_index": 3, "deferred": [], "seed": 4, "num_examples": 103})


def test_every_step_holds_exactly_its_stream_positions_and_capacities_hold():
    """Step s holds the examples at stream positions [s*B, (s+1)*B): each exactly once per time the stream
    hands it out (across epoch boundaries too), nothing dropped, deferred or duplicated, and no row over its
    capacities."""
    ex = examples()
    spec = spec_for(ex, batch_size=12, rows=2, steps=30)
    g = spec.geometries["main"]
    packer = data.packer(spec, ex, seed=3)
    for s in range(30):
        plans = packer.next_step()
        held = sorted(i for p in plans for i in p.examples)
        assert held == sorted(packer.order[q] for q in range(12 * s, 12 * (s + 1))), s
        for p in plans:
            rp = p.parts["main"]
            assert 0 < len(p.examples) <= g.groups and (rp.fill <= g.length).all() and (rp.scored <= g.scored).all()
            assert sorted(u.group for u, _, _ in rp.placed) == list(range(len(p.examples)))  # a slot each
    assert packer.epoch == 3  # 360 positions: three epochs of 103 and some


def test_first_fit_decreasing_needs_few_more_micro_batches_than_the_tokens_demand():
    """The step count of micro-batches against the lower bound ceil(tokens / (R x T)): first-fit decreasing
    stays within 11/9 of the optimum plus one (its classic bound; the optimum is at least the lower bound)."""
    ex = examples(200, seed=5)
    spec = spec_for(ex, batch_size=24, rows=1, steps=40)
    g = spec.geometries["main"]
    packer = data.packer(spec, ex, seed=1)
    used, bound = [], []
    for _ in range(40):
        plans = packer.next_step()
        tokens = sum(len(ex[i].prompt) + len(ex[i].chosen) + len(ex[i].rejected) for p in plans for i in p.examples)
        used.append(len(plans))
        bound.append(-(-tokens // g.tokens))
    assert all(u <= 11 / 9 * b + 1 for u, b in zip(used, bound, strict=True)), list(zip(used, bound, strict=True))
    assert np.mean(used) <= 1.1 * np.mean(bound)  # near the bound on average, not only within the worst case


def test_the_spec_has_room_for_the_largest_step_and_micro_batch_of_the_run():
    """The step's fixed room (micro-batches) and group slots are the most the run's own steps need, found ahead
    of the run from its seeded order: replaying the run never exceeds them, and some step reaches each."""
    ex = examples(150, seed=4)
    for steps, seed in ((25, 0), (60, 9)):
        spec = spec_for(ex, batch_size=16, rows=1, steps=steps, seed=seed)
        packer = data.packer(spec, ex, seed=seed)
        plans = [packer.next_step() for _ in range(steps)]
        assert max(len(p) for p in plans) == spec.micro_batches
        assert max(len(m.examples) for p in plans for m in p) == spec.geometries["main"].groups


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
    spec = spec_for(ex, batch_size=16, rows=4)
    g = spec.geometries["main"]
    plans = [data.packer(spec, ex, seed=1).next_step()[0] for _ in range(8)]  # 8 hosts, each its own packer
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
        packer = data.packer(spec, [*ex, long], shuffle=False)
        while packer.next_micro() is not None:
            pass
    with pytest.raises(data.TooLarge, match="example 0 "):
        data.packer(spec, [long, *ex], seed=0, shuffle=True).next_step()
    with pytest.raises(ValueError, match=r"the longest example needs rows of 243 tokens; data.pack_length is 128"):
        data.batch_spec([*ex, long], layout="packed", batch_size=8, max_length=300, length=128)


def test_a_mixture_draws_each_source_by_its_weight_and_every_example_of_a_source_equally():
    ex = examples(90)
    source_of = np.array([0] * 60 + [1] * 20 + [2] * 10)
    weights = [1.0, 1.0, 2.0]  # source 2 (10 examples) gets half the stream: each drawn ~4.5x per epoch
    spec = spec_for(ex)
    packer = data.packer(spec, ex, seed=5, mixture=(source_of, weights))
    taken = []
    while packer.epoch < 4:
        taken += [i for p in packer.next_step() for i in p.examples]
    counts = np.bincount(source_of[taken], minlength=3) / len(taken)
    np.testing.assert_allclose(counts, [0.25, 0.25, 0.5], atol=0.03)
    per_example = np.bincount(np.concatenate([packer.order.epoch(e) for e in range(4)]), minlength=90)
    for s in range(3):  # the stream draws every example of a source as often as any other, give or take one
        drawn = per_example[source_of == s]
        assert drawn.max() - drawn.min() <= 1, (s, drawn)
    a, b = (data.packer(spec, ex, seed=5, mixture=(source_of, weights)) for _ in range(2))
    assert [step_summary(a.next_step()) for _ in range(5)] == [step_summary(b.next_step()) for _ in range(5)]
    state = packer.state()
    expected = [step_summary(packer.next_step()) for _ in range(6)]
    resumed = data.packer(spec, ex, seed=5, mixture=(source_of, weights), state=state)
    assert [step_summary(resumed.next_step()) for _ in range(6)] == expected
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
    spec = data.batch_spec(base, layout="packed", batch_size=16, max_length=100, row_multiple=8, length_multiple=32)
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


def tokens_at(batch, group, j=0):
    """The tokens of completion j of a group slot, read from a built micro-batch by its span."""
    start, n = int(batch.completion_start[group, j]), int(batch.completion_length[group, j])
    return batch.input_ids.reshape(-1)[start : start + n].tolist()


def test_kl_pairs_and_response_only_parts_stay_with_their_own_examples_in_uneven_micro_batches():
    """Steps packed into micro-batches holding different numbers of examples: each micro-batch's KL pairs
    are (prompt_s, completion of slot s - 1) among its own examples, and its response-only sequences are its
    own examples' responses (slot s: chosen, slot G + s: rejected), read back from the built arrays."""
    rng = np.random.default_rng(3)
    ids = lambda lo, hi: rng.integers(1, 50, rng.integers(lo, hi)).astype(np.int32)
    unpaired = [data.TokenizedUnpaired(ids(2, 30), ids(2, 60), bool(i % 2), 1.0, i) for i in range(40)]
    spec = data.batch_spec(unpaired, layout="packed", batch_size=10, max_length=100, rows=1, length_multiple=32)
    counts = set()
    packer = data.packer(spec, unpaired, seed=2)
    for _ in range(6):
        for plan in packer.next_step():
            n, host = len(plan.examples), data.host_arrays(spec, plan, unpaired)
            counts.add(n)
            for s, i in enumerate(plan.examples):
                other = unpaired[plan.examples[(s - 1) % n]]
                assert tokens_at(host["kl"], s) == other.completion.tolist()
                assert host["label"][s] == unpaired[i].label
            assert (host["kl"].completion_length[n:] == 0).all() and (host["weight"][n:] == 0).all()
    assert len(counts) >= 3, counts  # uneven: several different numbers of examples per micro-batch

    pairs = examples(40, seed=6)
    spec = data.batch_spec(
        pairs, layout="packed", batch_size=10, max_length=100, rows=1, length_multiple=32, response_only=True
    )
    g, counts = spec.geometries["main"].groups, set()
    packer = data.packer(spec, pairs, seed=2)
    for _ in range(6):
        for plan in packer.next_step():
            host = data.host_arrays(spec, plan, pairs)
            counts.add(len(plan.examples))
            for s, i in enumerate(plan.examples):
                assert tokens_at(host["main"], s, 0) == pairs[i].chosen.tolist()
                assert tokens_at(host["response_only"], s) == pairs[i].chosen[1:].tolist()  # first token: context
                assert tokens_at(host["response_only"], g + s) == pairs[i].rejected[1:].tolist()
    assert len(counts) >= 2, counts


def test_short_examples_pack_several_to_a_row_of_at_least_min_length():
    """Pairs of ~40 tokens, 8 a step: rows as long as the longest pair (64) hold one or two pairs, so a step
    takes ~7 micro-batches; with `min_length=512` a row is a step's share (320 tokens here, less than 512) and
    a step takes one. Rows that hold one unit each (the padded layout: a prompt and a completion) are not lengthened."""
    rng = np.random.default_rng(0)
    ids = lambda lo, hi: rng.integers(5, 90, int(rng.integers(lo, hi))).astype(np.int32)
    ex = [data.TokenizedPair(ids(15, 30), ids(3, 12), ids(3, 12), 1.0, i) for i in range(64)]
    used = {}
    for floor in (0, 512):
        spec = data.batch_spec(ex, layout="packed", batch_size=8, max_length=64, min_length=floor, length_multiple=32)
        packer = data.packer(spec, ex, seed=0)
        used[floor] = (spec.geometries["main"].length, [len(packer.next_step()) for _ in range(8)])
    longest = max(len(e.prompt) + len(e.chosen) + len(e.rejected) for e in ex)
    mean_step = 8 * np.mean([len(e.prompt) + len(e.chosen) + len(e.rejected) for e in ex])
    assert used[0][0] == -(-longest // 32) * 32 and min(used[0][1]) >= 5
    assert used[512][0] == -(-int(mean_step) // 32) * 32 and max(used[512][1]) <= 2
    padded = data.batch_spec(ex, layout="padded", batch_size=8, max_length=64, min_length=512, length_multiple=32)
    unit = max(len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in ex)  # a prompt and one completion
    assert padded.geometries["main"].length == -(-unit // 32) * 32
