"""The tokenised cache gives exactly what tokenising gives (examples, origins, row accounting), is rebuilt
whenever anything that decides the tokens changes, and never lets a run skip past a bad row."""

import json

import numpy as np
import pytest

from prefopt_jax import data
from prefopt_jax.data import cache


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def write_rows(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


ROWS = [
    {
        "prompt": [{"role": "user", "content": f"question {i} " + "word " * (i % 7)}],
        "chosen": f"yes {i}",
        "rejected": "no",
    }
    for i in range(40)
]
UNPAIRED = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "q", "completion": "d", "label": False}]
RANKED = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 3, 2]}]


def same(a, b):
    """Two example lists are equal field by field (token arrays by value)."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y) and x.origin == y.origin and x.weight == y.weight
        for f in ("prompt", "chosen", "rejected", "completion"):
            if hasattr(x, f):
                np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
        if hasattr(x, "responses"):
            assert len(x.responses) == len(y.responses) and x.scores == y.scores
            for r, s in zip(x.responses, y.responses, strict=True):
                np.testing.assert_array_equal(r, s)
        assert getattr(x, "label", None) == getattr(y, "label", None)


@pytest.mark.parametrize("rows", [ROWS, UNPAIRED, RANKED], ids=["pairs", "unpaired", "ranked"])
def test_a_hit_equals_tokenising(tmp_path, tok, rows):
    src = write_rows(tmp_path / "d.jsonl", rows)
    kw = dict(max_length=24, max_prompt_length=10, eval_fraction=0.25 if len(rows) > 4 else 0.0, seed=3)
    plain = data.prepare(str(src), tok, **kw)
    first = data.prepare(str(src), tok, cache_dir=str(tmp_path / "c"), **kw)
    second = data.prepare(str(src), tok, cache_dir=str(tmp_path / "c"), **kw)
    assert [s.cache for s in first.sources] == ["written"] and [s.cache for s in second.sources] == ["hit"]
    for got in (first, second):
        same(got.train, plain.train)
        same(got.eval, plain.eval)
        assert got.report == plain.report
    assert len(list((tmp_path / "c").glob("*.arrow"))) == 1
    # another seed or split fraction reads the same entry and splits it as tokenising would
    other = data.prepare(str(src), tok, cache_dir=str(tmp_path / "c"), **{**kw, "seed": 4})
    same(other.train, data.prepare(str(src), tok, **{**kw, "seed": 4}).train)
    assert other.sources[0].cache == "hit"


def test_the_eval_command_gets_the_same_accounting_from_the_cache(tmp_path, tok):
    src = write_rows(tmp_path / "d.jsonl", ROWS)
    kw = dict(max_length=64, eval_fraction=0.25, splits=("eval",))
    plain = data.prepare(str(src), tok, **kw)
    data.prepare(str(src), tok, cache_dir=str(tmp_path / "c"), **kw)  # written with every row
    hit = data.prepare(str(src), tok, cache_dir=str(tmp_path / "c"), **kw)
    assert hit.sources[0].cache == "hit" and hit.train == [] and hit.report == plain.report
    same(hit.eval, plain.eval)


def test_every_setting_that_decides_the_tokens_changes_the_key(tmp_path, tok):
    src = write_rows(tmp_path / "d.jsonl", ROWS)
    enc = lambda **kw: data.Encoder(tok, **{"max_length": 64, **kw})
    base = cache.key(str(src), None, None, enc())
    variants = [
        cache.key(str(src), None, None, enc(max_length=65)),
        cache.key(str(src), None, None, enc(max_prompt_length=8)),
        cache.key(str(src), None, None, enc(max_completion_length=8)),
        cache.key(str(src), None, None, enc(prompt_truncation="keep_start")),
        cache.key(str(src), None, None, enc(use_chat_template=False)),
        cache.key(str(src), None, "standard", enc()),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert cache.key(str(src), None, None, enc()) == base  # deterministic
    write_rows(src, [*ROWS[:-1], {**ROWS[-1], "chosen": "changed"}])  # other bytes
    assert cache.key(str(src), None, None, enc()) != base


def test_a_changed_chat_template_or_file_is_never_a_stale_hit(tmp_path, tok):
    src = write_rows(tmp_path / "d.jsonl", ROWS[:8])
    root = str(tmp_path / "c")
    first = data.prepare(str(src), tok, max_length=64, cache_dir=root)
    saved = tok.chat_template
    try:
        tok.chat_template = saved.replace("<|im_start|>", "<|im_start|> ")
        changed = data.prepare(str(src), tok, max_length=64, cache_dir=root)
        assert changed.sources[0].cache == "written"
        assert list(changed.train[0].prompt) != list(first.train[0].prompt)
    finally:
        tok.chat_template = saved
    write_rows(src, ROWS[:9])
    grown = data.prepare(str(src), tok, max_length=64, cache_dir=root)
    assert grown.sources[0].cache == "written" and len(grown.train) == 9
    assert len(list((tmp_path / "c").glob("*.arrow"))) == 3


def test_rows_dropped_by_a_skipping_run_still_stop_a_strict_one(tmp_path, tok):
    rows = [*ROWS[:6], "{broken", {"prompt": "long " * 80, "chosen": "a", "rejected": "b"}]
    src = write_rows(tmp_path / "d.jsonl", rows)
    root = str(tmp_path / "c")
    plain = data.prepare(str(src), tok, max_length=40, on_error="skip")
    skipped = data.prepare(str(src), tok, max_length=40, on_error="skip", cache_dir=root)
    again = data.prepare(str(src), tok, max_length=40, on_error="skip", cache_dir=root)
    assert again.sources[0].cache == "hit" and again.report == plain.report == skipped.report
    assert plain.report.dropped == {"malformed JSON": 1, "prompt too long": 1}
    with pytest.raises(data.DataError, match=r"d\.jsonl, line 7: malformed JSON"):
        data.prepare(str(src), tok, max_length=40, cache_dir=root)
    fixed = write_rows(tmp_path / "e.jsonl", [*ROWS[:6], rows[-1]])
    data.prepare(str(fixed), tok, max_length=40, on_error="skip", cache_dir=root)
    with pytest.raises(data.DataError, match=r"e\.jsonl, line 7: the prompt alone is \d+ tokens"):
        data.prepare(str(fixed), tok, max_length=40, cache_dir=root)


def test_a_strict_run_that_meets_a_bad_row_writes_nothing(tmp_path, tok):
    src = write_rows(tmp_path / "d.jsonl", [*ROWS[:3], {"prompt": "long " * 80, "chosen": "a", "rejected": "b"}])
    with pytest.raises(data.DataError, match="the prompt alone"):
        data.prepare(str(src), tok, max_length=40, cache_dir=str(tmp_path / "c"))
    assert not list((tmp_path / "c").glob("*.arrow"))


def test_an_unreadable_entry_is_rebuilt(tmp_path, tok):
    src = write_rows(tmp_path / "d.jsonl", ROWS[:8])
    root = tmp_path / "c"
    first = data.prepare(str(src), tok, max_length=64, cache_dir=str(root))
    (entry,) = root.glob("*.arrow")
    entry.write_bytes(entry.read_bytes()[:100])  # a truncated file (a disk that filled up)
    again = data.prepare(str(src), tok, max_length=64, cache_dir=str(root))
    assert again.sources[0].cache == "written"
    same(again.train, first.train)


def test_a_hit_maps_the_tokens_instead_of_copying_them(tmp_path, tok):
    src = write_rows(tmp_path / "d.jsonl", ROWS)
    data.prepare(str(src), tok, max_length=64, cache_dir=str(tmp_path / "c"))
    hit = data.prepare(str(src), tok, max_length=64, cache_dir=str(tmp_path / "c"))
    bases = {id(np.asarray(e.prompt).base) for e in hit.train} | {id(np.asarray(e.chosen).base) for e in hit.train}
    assert len(bases) == 1  # views of one buffer: the memory-mapped token column
    assert not hit.train[0].prompt.flags.owndata and not hit.train[0].prompt.flags.writeable


@pytest.mark.parametrize("what", ["tokens", "segments"])
def test_bytes_changed_inside_the_cache_are_never_trained_on(tmp_path, tok, what):
    """Bytes flipped inside the cached file's token values (or the lengths that cut them into prompts and
    completions), as bit rot or a bad copy would: the load reports it and tokenises the source again."""
    src = write_rows(tmp_path / "d.jsonl", ROWS)
    plain = data.prepare(str(src), tok, max_length=64)
    first = data.prepare(str(src), tok, max_length=64, cache_dir=str(tmp_path / "c"))
    (path,) = (tmp_path / "c").glob("*.arrow")
    raw = bytearray(path.read_bytes())
    e = first.train[5]
    if what == "tokens":  # the example's chosen tokens, located in the file by their bytes
        needle = np.asarray(e.chosen, np.int32).tobytes()
        at = raw.find(needle)
        raw[at] ^= 0x01  # token id + or - 1: still a valid id, silently wrong
    else:  # the segment lengths: [prompt, chosen, rejected] of each row, one int32 each
        lengths = np.asarray([len(x) for x in first.train[0:3] for x in (x.prompt, x.chosen, x.rejected)], np.int32)
        at = raw.find(lengths.tobytes())
        raw[at] ^= 0x01
    assert at >= 0
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=rf"{what if what == 'tokens' else 'segment lengths'}.* do not match"):
        again = data.prepare(str(src), tok, max_length=64, cache_dir=str(tmp_path / "c"))
    assert [s.cache for s in again.sources] == ["written"]  # tokenised again, and the cache rewritten
    same(again.train, plain.train)
    assert [s.cache for s in data.prepare(str(src), tok, max_length=64, cache_dir=str(tmp_path / "c")).sources] == [
        "hit"
    ]
