"""The Hugging Face export: safetensors shards within the size limit and their index, bf16 and fp32, loaded
by transformers to the same logits, written a shard at a time (the host never holds the whole model)."""

import json
import tracemalloc

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from prefopt_jax import models
from prefopt_jax.models.safetensors_io import read_safetensors

CFG = models.ModelConfig(
    family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
IDS = np.random.default_rng(0).integers(0, 256, (2, 11))


@pytest.fixture(scope="module")
def model():
    return models.create_model(CFG, seed=0)


def model_bytes(itemsize: int) -> int:
    return sum(int(np.prod(shape)) for shape, *_ in models.param_table(CFG).values()) * itemsize


@pytest.mark.parametrize(
    ("size", "want"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), (1024, 1024)]
)
def test_sizes_read_as_transformers_writes_them(size, want):
    assert models.parse_size(size) == want
    with pytest.raises(ValueError, match="size '5 parsecs'"):
        models.parse_size("5 parsecs")


def test_shards_respect_the_limit_and_the_index_names_every_tensor(model, tmp_path):
    limit = 60_000  # bytes: several shards for this ~0.3 MB float32 model
    files = models.save_hf_folder(CFG, model.params(), tmp_path, max_shard_bytes=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) > 3 and not (tmp_path / "model.safetensors").exists()
    assert [f.name for f in files] == [
        f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)
    ]
    seen = {}
    for f in files:
        tensors = read_safetensors(f)
        size = sum(t.nbytes for t in tensors.values())
        assert size <= limit or len(tensors) == 1  # a tensor over the limit sits alone
        seen |= {name: f.name for name in tensors}
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == model_bytes(4)
    assert len(seen) == 2 + 9 * CFG.num_layers + (0 if CFG.tie_embeddings else 1)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_the_export_holds_one_shard_at_a_time(model, tmp_path):
    """Peak host memory the export allocates (numpy buffers and bytes, traced) stays near one shard, far
    below the model; writing everything at once would need the whole model (and its serialised copy)."""
    params = model.params()
    limit = 40_000
    tracemalloc.start()
    models.save_hf_folder(CFG, params, tmp_path, max_shard_bytes=limit)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total = model_bytes(4)
    largest = max(
        int(np.prod(s[1:] if n.startswith("layers/") else s)) * 4 for n, (s, *_) in models.param_table(CFG).items()
    )
    assert total > 8 * limit
    print(f"peak {peak} bytes, model {total}, shard limit {limit}, largest tensor {largest}")
    assert peak < 3 * max(limit, largest) < total, (peak, total)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_export_loads_in_transformers_to_the_same_logits(model, tmp_path, dtype):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    models.save_hf_folder(CFG, model.params(), tmp_path, dtype=np_dtype, max_shard_bytes=100_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.dtype == getattr(torch, dtype)  # config.json's dtype is honoured
    with torch.no_grad():
        theirs = hf.float()(torch.tensor(IDS)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(IDS)))
    if dtype == "float32":
        np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)
    else:  # bf16 weights: ~3 significant digits per weight
        assert len(bf16_tensors(tmp_path)) == 2 + 9 * CFG.num_layers + 1
        np.testing.assert_allclose(theirs, ours, atol=0.05 * np.abs(ours).max())
        assert np.abs(theirs - ours).max() > 0  # really rounded


def bf16_tensors(folder):
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        tensors = read_safetensors(f)
        assert all(t.dtype == ml_dtypes.bfloat16 for t in tensors.values())
        out |= tensors
    return out
