"""Resumable, host-sharded, prefetched iteration."""

import numpy as np
import pytest

from prefopt_jax import data

EXAMPLES = list(range(103))  # stand-ins: the iterator never looks inside an example


def collect(it, n):
    return [next(it) for _ in range(n)]


def test_resume_continues_at_the_exact_next_batch():
    first = data.BatchIterator(EXAMPLES, list, global_batch=8, seed=7)
    seen = collect(first, 17)  # crosses the epoch boundary (12 batches per epoch)
    state = first.state()
    assert state["epoch"] == 1 and state["step"] == 5
    expected = collect(first, 10)
    resumed = data.BatchIterator(EXAMPLES, list, global_batch=8, seed=7, state=state)
    assert collect(resumed, 10) == expected
    assert seen[0] != seen[12]  # each epoch has its own order


def test_prefetch_does_not_change_batches_or_state():
    with_prefetch = data.BatchIterator(EXAMPLES, list, global_batch=8, seed=1, prefetch=3)
    without = data.BatchIterator(EXAMPLES, list, global_batch=8, seed=1, prefetch=0)
    assert collect(with_prefetch, 30) == collect(without, 30)
    assert with_prefetch.state() == without.state()


def test_hosts_together_see_every_row_once_per_epoch():
    hosts = [data.BatchIterator(EXAMPLES, list, global_batch=8, seed=2, host_index=h, host_count=2) for h in range(2)]
    one = data.BatchIterator(EXAMPLES, list, global_batch=8, seed=2)
    rows = []
    for _ in range(12):  # one epoch
        a, b = next(hosts[0]), next(hosts[1])
        assert a + b == next(one)  # the same global batch as a single host's
        rows += a + b
    assert len(rows) == len(set(rows)) == 96  # 103 // 8 * 8: the last partial batch is left out


def test_errors_in_the_batch_function_surface_and_bad_settings_are_refused():
    def boom(batch):
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        next(data.BatchIterator(EXAMPLES, boom, global_batch=8))
    with pytest.raises(ValueError, match="not divisible by host_count=3"):
        data.BatchIterator(EXAMPLES, list, global_batch=8, host_count=3)
    with pytest.raises(ValueError, match="saved for 50 examples"):
        data.BatchIterator(EXAMPLES, list, global_batch=8, state={"epoch": 0, "step": 1, "num_examples": 50})


def test_iterating_real_batches_with_a_collator():
    rng = np.random.default_rng(0)
    pairs = [
        data.TokenizedPair(rng.integers(1, 9, 3), rng.integers(1, 9, 4), rng.integers(1, 9, 2), 1.0, None)
        for _ in range(20)
    ]
    it = data.BatchIterator(pairs, data.PairCollator("packed", 32, buckets=(16, 32)), global_batch=4)
    batch = next(it)
    assert batch["batch"].completion_index.shape[:2] == (4, 2) and batch["weight"].shape == (4,)
