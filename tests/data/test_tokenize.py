"""Tokenisation of real rows with the SmolLM2 chat template: the ids are the tokenizer's own
`apply_chat_template` output for prompt + completion, the completion is exactly the assistant turn,
and the prompt is the same for chosen and rejected."""

import pytest

from prefopt_jax import data


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def _template_ids(tok, messages, gen=False):
    out = tok.apply_chat_template(messages, add_generation_prompt=gen)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["hh_rlhf_test.jsonl", "llamafactory_dpo_en_demo.jsonl"])
def test_real_rows_match_the_chat_template(tok, name, shared_file):
    records, report = data.read_records(shared_file(name))
    enc = data.Encoder(tok, max_length=100_000)
    step = max(1, len(records) // 25)
    for rec in records[::step]:
        ex = enc(rec, report)
        prompt = [{"role": r, "content": c} for r, c in rec.prompt]
        for text, completion in ((rec.chosen, ex.chosen), (rec.rejected, ex.rejected)):
            full = _template_ids(tok, [*prompt, {"role": "assistant", "content": text}])
            assert list(ex.prompt) + list(completion) == full, rec.origin
            assert list(ex.prompt) == _template_ids(tok, prompt, gen=True)
            # the completion mask covers exactly the assistant turn the template writes, EOS included
            assert tok.decode(completion) == text + "<|im_end|>\n"
        assert ex.prompt[0] == tok.bos_token_id and ex.prompt[1] != tok.bos_token_id  # exactly one leading BOS


@pytest.mark.integration
def test_string_prompts_become_user_turns(tok, shared_file):
    records, report = data.read_records(shared_file("pandalm_testset.jsonl"))
    ex = data.Encoder(tok)(records[0], report)
    want = _template_ids(tok, [{"role": "user", "content": records[0].prompt}], gen=True)
    assert list(ex.prompt) == want


def test_truncation_is_counted(tok):
    rows = [{"prompt": "word " * 50, "chosen": "yes " * 90, "rejected": "no"}]
    prepared = data.prepare(rows, tok, max_length=80, max_prompt_length=30)
    ex = prepared.train[0]
    assert len(ex.prompt) == 30 and len(ex.prompt) + len(ex.chosen) == 80
    assert list(ex.prompt[-3:]) == _template_ids(tok, [{"role": "user", "content": "x"}], gen=True)[-3:]  # end kept
    assert prepared.report.truncated == {"prompt": 1, "completion": 1}
    assert prepared.report.used == 1


def test_prompt_longer_than_max_length_names_the_row(tok):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "long " * 300, "chosen": "b", "rejected": "c"}]
    with pytest.raises(data.DataError, match=r"in-memory rows\[1\]: the prompt alone is \d+ tokens, max_length is 64"):
        data.prepare(rows, tok, max_length=64)
    skipped = data.prepare(rows, tok, max_length=64, on_error="skip")
    assert skipped.report.read == 2 and skipped.report.used == 1 and skipped.report.dropped == {"prompt too long": 1}


def test_raw_text_mode_adds_eos_without_template(tok):
    ex = data.prepare([{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}], tok, use_chat_template=False).train[0]
    assert list(ex.prompt) == tok("Q: 2+2?")["input_ids"]
    assert list(ex.chosen) == [*tok(" 4", add_special_tokens=False)["input_ids"], tok.eos_token_id]


@pytest.mark.integration
def test_tokenisation_rate_and_layout_figures_on_hh_rlhf(tok, shared_file):
    """Prints the figures quoted in the closing note; checks only that the accounting adds up."""
    import time

    start = time.perf_counter()
    prepared = data.prepare(shared_file("hh_rlhf_test.jsonl"), tok, max_length=1024, on_error="skip")
    seconds = time.perf_counter() - start
    r = prepared.report
    assert r.read == r.used + sum(r.dropped.values())
    pairs = prepared.train
    padded_tokens = sum(len(e.prompt) * 2 + len(e.chosen) + len(e.rejected) for e in pairs)
    packed_tokens = sum(len(e.prompt) + len(e.chosen) + len(e.rejected) for e in pairs)
    slots = {"padded": 0, "packed": 0}
    for layout in slots:  # one pass over the pairs in fixed-shape micro-batches, as many as fit
        spec = data.batch_spec(pairs, layout=layout, batch_size=8, max_length=1024)
        plans = data.packer(spec, pairs, shuffle=False)
        while plans.next_micro() is not None:
            slots[layout] += spec.geometries["main"].tokens
    print(
        f"\nhh-rlhf: {r.summary()}; {r.read / seconds:.0f} rows/s tokenised\n"
        f"tokens per pair through the model: padded {padded_tokens / len(pairs):.0f}, "
        f"packed {packed_tokens / len(pairs):.0f} ({1 - packed_tokens / padded_tokens:.1%} saved by prefix sharing)\n"
        f"padding fraction (one pass, micro-batches holding as many pairs as fit): padded {1 - padded_tokens / slots['padded']:.1%}, "
        f"packed {1 - packed_tokens / slots['packed']:.1%}"
    )


@pytest.mark.integration
def test_worker_processes_tokenise_to_the_same_examples(tok, shared_file):
    """Grain worker processes (3 chunks of 512 rows over 2 workers) give exactly the in-process examples,
    rows dropped for their length included (their DataErrors cross the process boundary)."""
    kw = dict(max_length=256, on_error="skip", eval_fraction=0.1)
    here = data.prepare(shared_file("llmbar_all.jsonl"), tok, **kw)
    pooled = data.prepare(shared_file("llmbar_all.jsonl"), tok, workers=2, **kw)
    assert here.report.dropped and pooled.report.dropped == here.report.dropped
    assert pooled.report.first == here.report.first
    for a, b in zip(here.train + here.eval, pooled.train + pooled.eval, strict=True):
        assert (a.prompt.tolist(), a.chosen.tolist(), a.rejected.tolist()) == (
            b.prompt.tolist(),
            b.chosen.tolist(),
            b.rejected.tolist(),
        )
