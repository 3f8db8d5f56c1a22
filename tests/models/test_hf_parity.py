"""Every family against Hugging Face transformers (torch CPU): a tiny random transformers model saved
to a folder, loaded here, same logits; with padding and with packed segments; export round trip."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from prefopt_jax import models  # noqa: E402

V = 101
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    initializer_range=0.3,  # logits of order 1, so 1e-4 means something
)
FAMILIES = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(sliding_window=4, query_pre_attn_scalar=6, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    ),
}
T = 13


def _hf_model(family):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**(COMMON | extra))
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    hf = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, models.load_pretrained(folder), folder


def _hf_logits(hf, ids, attention_mask=None):
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return hf(torch.tensor(ids), **kw).logits.numpy()


IDS = np.random.default_rng(0).integers(0, V, (2, T))


def test_logits_match(pair):
    _, hf, ours, _ = pair
    want = _hf_logits(hf, IDS)
    got = np.asarray(ours(jnp.asarray(IDS)))
    assert np.abs(want).max() > 0.5, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_right_padding_matches(pair):
    _, hf, ours, _ = pair
    mask = np.ones((2, T), np.int64)
    mask[1, 8:] = 0
    want = _hf_logits(hf, IDS, mask)
    got = np.asarray(ours(jnp.asarray(IDS), mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1, :8], want[1, :8], atol=1e-4, rtol=1e-4)


def test_packed_segments_match_separate_sequences(pair):
    _, hf, ours, _ = pair
    a, b = IDS[0, :7], IDS[1, :6]
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 7 + [2] * 6])
    got = np.asarray(ours(jnp.asarray(packed), segment_ids=jnp.asarray(seg)))[0]
    np.testing.assert_allclose(got[:7], _hf_logits(hf, a[None])[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[7:], _hf_logits(hf, b[None])[0], atol=1e-4, rtol=1e-4)


def test_family_features_are_exercised(pair):
    """Sliding windows and soft-capping change the logits here, so matching HF tested them."""
    family, _, ours, _ = pair
    cfg = ours.config
    if family in ("mistral", "gemma2"):
        assert any(cfg.windows) and T > max(cfg.windows)
    if family == "gemma2":
        assert cfg.attn_logit_softcap and cfg.final_logit_softcap and cfg.sandwich_norms
    if family == "llama":
        assert cfg.rope.kind == "llama3"
    if family == "qwen2":
        assert cfg.qkv_bias and cfg.tie_embeddings
    if family == "qwen3":
        assert cfg.qk_norm and cfg.num_heads * cfg.head_dim != cfg.hidden_size


def test_export_round_trip(pair, tmp_path):
    _, hf, ours, _ = pair
    models.save_pretrained(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(back, IDS), _hf_logits(hf, IDS), atol=1e-5, rtol=1e-5)


def test_random_model_export_loads_in_transformers(tmp_path):
    cfg = models.from_hf_config(_hf_model("gemma2").config.to_dict())
    ours = models.create_model(cfg, seed=3)
    models.save_pretrained(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(back, IDS), np.asarray(ours(jnp.asarray(IDS))), atol=1e-4, rtol=1e-4)
