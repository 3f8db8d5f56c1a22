"""Greedy generation with the KV cache against transformers' own greedy `generate` (torch CPU)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")

from prefopt_jax import models  # noqa: E402
from prefopt_jax.models.generate import generate  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_kv_cache_generation_equals_transformers_greedy(tmp_path, family):
    extra = {"sliding_window": 4} if family == "mistral" else {}
    config_cls = transformers.LlamaConfig if family == "llama" else transformers.MistralConfig
    hf_cfg = config_cls(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.4,
        bos_token_id=1, eos_token_id=2, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    model = models.load_pretrained(str(tmp_path))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 97, n)) for n in (3, 7, 5)]
    ours = generate(model.config, model.params(), prompts, max_new_tokens=8, eos_id=None)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert got == out[0, len(prompt) :].tolist()


def test_generation_stops_at_eos():
    cfg = models.ModelConfig(
        family="llama", vocab_size=20, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=8,
    )  # fmt: skip
    params = models.create_model(cfg, seed=0).params()
    free = generate(cfg, params, [[3, 4, 5]], max_new_tokens=6, eos_id=None)[0]
    stopped = generate(cfg, params, [[3, 4, 5]], max_new_tokens=6, eos_id=free[2])[0]
    assert stopped == free[: free.index(free[2])]


def test_generation_compiles_prefill_and_decode_once():
    from prefopt_jax.models import generate as generate_lib

    cfg = models.ModelConfig(
        family="llama", vocab_size=21, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
        num_kv_heads=1, head_dim=8,
    )  # fmt: skip
    params = models.create_model(cfg, seed=1).params()
    before = generate_lib._prefill._cache_size(), generate_lib._decode._cache_size()
    for _ in range(3):  # the evaluation at every checkpoint calls it again with the same shapes
        generate(cfg, params, [[3, 4, 5], [6, 7]], max_new_tokens=4, eos_id=None)
    assert (generate_lib._prefill._cache_size(), generate_lib._decode._cache_size()) == (before[0] + 1, before[1] + 1)
