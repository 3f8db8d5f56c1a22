"""One micro-batch schema (`data.BatchSpec.fields`) makes both the host arrays a step is fed and the abstract
batch `plan` compiles against: for every kind of example, with every side input, the two agree in every
array's name, shape and dtype."""

import jax
import numpy as np
import pytest

from prefopt_jax import data, sharding
from prefopt_jax.data.tokenize import completions_of
from prefopt_jax.train import batches


def ids(rng, lo, hi):
    return rng.integers(5, 90, int(rng.integers(lo, hi))).astype(np.int32)


def make(kind: str, n: int = 12):
    rng = np.random.default_rng(0)
    if kind == "pairs":
        return [data.TokenizedPair(ids(rng, 1, 20), ids(rng, 1, 30), ids(rng, 1, 30), 1.0, i) for i in range(n)]
    if kind == "unpaired":
        return [data.TokenizedUnpaired(ids(rng, 1, 20), ids(rng, 1, 30), i % 2 == 0, 1.0, i) for i in range(n)]
    responses = lambda: tuple(ids(rng, 1, 30) for _ in range(3))
    return [data.TokenizedRanked(ids(rng, 1, 20), responses(), (3.0, 1.0, 2.0), 1.0, i) for i in range(n)]


@pytest.mark.parametrize("kind", ["pairs", "unpaired", "ranked"])
def test_host_arrays_and_abstract_batch_follow_one_schema(kind):
    examples = make(kind)
    spec = data.batch_spec(examples, layout="packed", batch_size=4, max_length=64, response_only=kind == "pairs")
    side_names = ("ref_logps", "udm_prob")
    side = {
        "ref_logps": [[np.zeros(len(c), np.float32) for c in completions_of(e)] for e in examples],
        "udm_prob": np.full(len(examples), 0.7, np.float32),
    }
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    host = batches.host_step(spec, data.packer(spec, examples, seed=0).next_step(), examples, mesh, 0, side)
    abstract = batches.abstract_batch(spec, mesh, side_names)
    got = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), host)
    want = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), abstract)
    assert got == want
    assert ("label" in host) == (kind == "unpaired") and ("scores" in host) == (kind == "ranked")
    assert set(host) >= {"main", "weight", *side_names}
