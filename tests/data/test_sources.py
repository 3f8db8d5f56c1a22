"""Every format, every source kind, and every bad-input case, each error naming the file and row."""

import json

import numpy as np
import pytest

from prefopt_jax import data


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


MSG = [{"role": "user", "content": "hi"}]


def test_formats_are_detected_and_normalised():
    standard, _ = data.read_records([{"prompt": "p", "chosen": "a", "rejected": "b", "weight": 0.5}])
    assert standard[0] == data.Pair("p", "a", "b", 0.5, data.Origin("in-memory rows", 0, "index"))
    conv, _ = data.read_records([{"prompt": MSG, "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}])
    assert conv[0].prompt == (("user", "hi"),) and conv[0].chosen == "a"
    implicit, _ = data.read_records(
        [
            {
                "chosen": [*MSG, {"role": "assistant", "content": "good"}],
                "rejected": [*MSG, {"role": "assistant", "content": "bad"}],
            }
        ]
    )
    assert implicit[0].prompt == (("user", "hi"),) and (implicit[0].chosen, implicit[0].rejected) == ("good", "bad")
    unpaired, _ = data.read_records([{"prompt": MSG, "completion": "c", "label": False}])
    assert isinstance(unpaired[0], data.Unpaired) and unpaired[0].label is False
    ranked, _ = data.read_records([{"prompt": "p", "responses": ["x", "y", "z"], "scores": [1, 3, 2]}])
    assert ranked[0].responses == ("x", "y", "z") and ranked[0].scores == (1.0, 3.0, 2.0)
    system, _ = data.read_records([{"system": "be brief", "prompt": "p", "chosen": "a", "rejected": "b"}])
    assert system[0].prompt == (("system", "be brief"), ("user", "p"))


def test_ultrafeedback_rows_take_the_prompt_from_the_conversation():
    """princeton-nlp/llama3-ultrafeedback-armorm and friends: a prompt string plus whole conversations
    (user turn, assistant turn) as chosen and rejected, and extra columns."""
    row = {
        "prompt_id": "abc",
        "prompt": "What is 2+2?",
        "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
        "all_generated_responses": ["4", "5"],
        "all_rm_scores": [0.9, 0.1],
    }
    pairs, _ = data.read_records([row])
    assert pairs[0].prompt == (("user", "What is 2+2?"),) and (pairs[0].chosen, pairs[0].rejected) == ("4", "5")


def test_format_override_and_unknown_format():
    with pytest.raises(data.DataError, match=r"in-memory rows\[0\]: missing field 'label' for the unpaired format"):
        data.read_records([{"prompt": "p", "chosen": "a", "rejected": "b"}], format="unpaired")
    with pytest.raises(data.DataError, match="unknown format 'pairs'"):
        data.read_records([], format="pairs")
    with pytest.raises(
        data.DataError, match=r"in-memory rows\[0\]: cannot tell the format from the keys \['question'\]"
    ):
        data.read_records([{"question": "?"}])


def test_file_sources_json_jsonl_parquet_and_globs(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    write_jsonl(tmp_path / "a.jsonl", rows[:2])
    (tmp_path / "b.json").write_text(json.dumps(rows[2:]))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    got, report = data.read_records(str(tmp_path / "*"))
    assert [r.prompt for r in got] == ["p0", "p1", "p2", "p3", "p0", "p1", "p2", "p3"]
    assert got[2].origin == data.Origin(str(tmp_path / "b.json"), 0, "row")
    assert report.read == report.used == 8
    with pytest.raises(data.DataError, match="no data file matches"):
        data.read_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(data.DataError, match=r"'nobody/no-such-set' is neither a local file nor a loadable hub"):
        data.read_records("nobody/no-such-set")  # offline in tests


@pytest.mark.parametrize(
    "line,match,reason",
    [
        ('{"prompt": "p", "chosen": "a", "rejected": ', r"bad\.jsonl, line 2: malformed JSON", "malformed JSON"),
        ('{"prompt": "p", "chosen": "a"}', r"bad\.jsonl, line 2: missing field 'rejected'", "missing field"),
        ('{"prompt": "p", "chosen": "", "rejected": "b"}', r"bad\.jsonl, line 2: empty chosen completion", "empty completion"),
        ('{"prompt": "p", "chosen": "same", "rejected": "same"}', r"bad\.jsonl, line 2: chosen and rejected are identical", "identical pair"),
        ('{"prompt": "p", "chosen": 3, "rejected": "b"}', r"bad\.jsonl, line 2: `chosen` must be a string", "invalid row"),
        ('{"prompt": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"}', r"line 2: `prompt\[0\]\.content` must be a string", "invalid row"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "weight": -1}', r"line 2: `weight` must be a non-negative number", "invalid row"),
        ('[1, 2]', r"bad\.jsonl, line 2: a row must be a JSON object", "invalid row"),
    ],
)  # fmt: skip
def test_bad_rows_name_the_file_and_row_or_are_counted(tmp_path, line, match, reason):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line, good])
    with pytest.raises(data.DataError, match=match):
        data.read_records(path)
    records, report = data.read_records(path, on_error="skip")
    assert len(records) == 2 and report.read == 3 and report.used == 2 and report.dropped == {reason: 1}
    assert reason in report.summary()


def test_split_is_deterministic_and_disjoint():
    records, _ = data.read_records([{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(50)])
    train, held = data.split_records(records, 0.2, seed=3)
    again = data.split_records(records, 0.2, seed=3)
    assert (train, held) == again and len(held) == 10 and len(train) == 40
    assert {r.prompt for r in train}.isdisjoint({r.prompt for r in held})
    assert data.split_records(records, 0.2, seed=4)[1] != held


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


def test_files_as_editors_and_spreadsheets_save_them_load(tmp_path):
    """A UTF-8 byte-order mark, CRLF line ends, blank lines and any Unicode are valid; lines are 1-based
    and count the blank ones."""
    rows = [
        {"prompt": "naïve café? 日本語", "chosen": "😀 ok", "rejected": "مرحبا"},
        {"prompt": [{"role": "user", "content": "hi\r\nthere"}], "chosen": "a", "rejected": "b"},
    ]
    text = "\r\n".join([json.dumps(rows[0], ensure_ascii=False), "", "   ", json.dumps(rows[1])]) + "\r\n"
    path = tmp_path / "saved.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    records, report = data.read_records(path)
    assert [r.prompt for r in records] == ["naïve café? 日本語", (("user", "hi\r\nthere"),)]
    assert records[0].chosen == "😀 ok" and report.read == report.used == 2
    assert [str(r.origin) for r in records] == [f"{path}, line 1", f"{path}, line 4"]
    as_json = tmp_path / "saved.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False).encode("utf-8"))
    assert [r.chosen for r in data.read_records(as_json)[0]] == ["😀 ok", "a"]


def test_bytes_that_are_not_utf8_name_the_line_and_column_and_can_be_skipped(tmp_path):
    path = tmp_path / "latin1.jsonl"
    bad = json.dumps({"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), bad, json.dumps(GOOD).encode()]) + b"\n")
    column = bad.index(b"\xe9") + 1
    with pytest.raises(data.DataError, match=rf"latin1\.jsonl, line 2: byte 0xe9 at column {column} is not UTF-8"):
        data.read_records(path)
    records, report = data.read_records(path, on_error="skip")
    assert len(records) == 2 and report.dropped == {"not UTF-8": 1}
    assert "not UTF-8; first: " in report.summary() and "line 2" in report.summary()
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b"[\n" + json.dumps(GOOD).encode() + b",\n" + bad + b"\n]")
    with pytest.raises(data.DataError, match=rf"latin1\.json, line 3: byte 0xe9 at column {column} is not UTF-8"):
        data.read_records(whole)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(json.dumps(GOOD).encode("utf-16"))
    with pytest.raises(data.DataError, match=r"utf16\.jsonl: the file is UTF-16; save it as UTF-8"):
        data.read_records(utf16)


def test_json_errors_are_1_based_lines(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "p", "chosen": "a", "rejected": "b"},\n  {"prompt": oops}\n]')
    with pytest.raises(data.DataError, match=r"broken\.json, line 3: malformed JSON"):
        data.read_records(path)


@pytest.mark.parametrize(
    "write,match",
    [
        (lambda p: p.write_text(""), r"empty\.jsonl: the file holds no rows"),
        (lambda p: p.write_text("\n \r\n\n"), r"empty\.jsonl: the file holds no rows"),
        (lambda p: p.with_suffix(".json").write_text("[]"), r"empty\.json: the file holds no rows"),
        (lambda p: p.with_suffix(".json").write_text(""), r"empty\.json: the file holds no rows"),
    ],
)
def test_an_empty_file_is_an_error_not_zero_examples(tmp_path, write, match):
    write(tmp_path / "empty.jsonl")
    with pytest.raises(data.DataError, match=match):
        data.read_records(str(tmp_path / "empty.*"))
    with pytest.raises(data.DataError, match=match):  # skipping rows does not skip an empty file
        data.read_records(str(tmp_path / "empty.*"), on_error="skip")


def test_no_rows_and_no_usable_rows_are_errors(tmp_path):
    with pytest.raises(data.DataError, match="in-memory rows: no rows"):
        data.read_records([])
    path = write_jsonl(tmp_path / "all_bad.jsonl", ["{", '{"prompt": "p"}', "[1]"])
    with pytest.raises(data.DataError, match=r"all_bad\.jsonl: none of its 3 rows can be used \(1 invalid row"):
        data.read_records(path, on_error="skip")


@pytest.mark.parametrize(
    "messages,match",
    [
        ([{"role": "human", "content": "hi"}], r"`prompt\[0\]\.role` is 'human'.*rename 'human' to 'user'"),
        (
            [{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}],
            r"`prompt\[1\]\.role` is 'narrator'",
        ),
    ],
)
def test_a_role_chat_templates_do_not_know_is_refused(tmp_path, messages, match):
    path = write_jsonl(tmp_path / "roles.jsonl", [GOOD, {"prompt": messages, "chosen": "a", "rejected": "b"}])
    with pytest.raises(data.DataError, match=r"roles\.jsonl, line 2: " + match):
        data.read_records(path)
    records, report = data.read_records(path, on_error="skip")
    assert len(records) == 1 and report.dropped == {"unknown role": 1}
    implicit = {"chosen": [{"role": "gpt", "content": "x"}], "rejected": [{"role": "gpt", "content": "y"}]}
    with pytest.raises(data.DataError, match=r"`chosen\[0\]\.role` is 'gpt'.*rename 'gpt' to 'assistant'"):
        data.read_records([implicit])


def test_pairs_sharing_a_prompt_become_ranked_sets_scored_by_wins_minus_losses():
    ids = lambda *t: np.asarray(t, np.int32)
    o = lambda i: data.Origin("f.jsonl", i, "line")
    a, b, c = ids(5, 6), ids(7), ids(8, 9, 9)
    pairs = [
        data.TokenizedPair(ids(1, 2), a, b, 1.0, o(1)),  # prompt 1: a > b, a > c, b > c: scores 2, 0, -2
        data.TokenizedPair(ids(3), a, b, 1.0, o(2)),  # prompt 2: only two responses
        data.TokenizedPair(ids(1, 2), a, c, 0.5, o(3)),
        data.TokenizedPair(ids(1, 2), b, c, 1.5, o(4)),
        data.TokenizedPair(ids(4), a, b, 1.0, o(5)),  # prompt 4: a cycle, every response scored 0
        data.TokenizedPair(ids(4), b, c, 1.0, o(6)),
        data.TokenizedPair(ids(4), c, a, 1.0, o(7)),
    ]
    sets, left = data.ranked_from_pairs(pairs, 3)
    assert [s.origin.index for s in sets] == [1, 5] and [(e.origin.index, n) for e, n in left] == [(2, 2)]
    first = sets[0]
    assert [r.tolist() for r in first.responses] == [[5, 6], [7], [8, 9, 9]] and first.scores == (2.0, 0.0, -2.0)
    assert first.weight == 1.0 and first.prompt.tolist() == [1, 2]
    assert sets[1].scores == (0.0, 0.0, 0.0)
    assert data.ranked_from_pairs(pairs, 2)[0][0].origin.index == 2


def test_ranked_sets_from_a_real_file_are_split_by_prompt(shared_file, smollm2_tokenizer, tmp_path):
    """PandaLM's test set through the loader with data.ranked_from_pairs=5: as many sets as the file has
    instructions with exactly 5 distinct responses (counted here from the JSON), none held out and trained
    on at once, every other row accounted as dropped."""
    from prefopt_jax.config import load_config
    from prefopt_jax.losses import get
    from prefopt_jax.train.batches import load_data

    path = shared_file("pandalm_testset.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    responses: dict[str, set] = {}
    for r in rows:
        responses.setdefault(r["prompt"], set()).update([r["chosen"], r["rejected"]])
    want = sum(len(v) == 5 for v in responses.values())
    want_rows = sum(len(responses[r["prompt"]]) == 5 for r in rows)
    cfg = load_config(None, [f"data.source={path}", "data.ranked_from_pairs=5", "data.max_length=4096",
                             f"data.cache={tmp_path}", "loss.name=rrhf", "loss.weights=null", "train.reference=none",
                             "data.eval_fraction=0.2"])  # fmt: skip
    prepared, _ = load_data(cfg.data, cfg.train.seed, smollm2_tokenizer, get("rrhf"))
    assert len(prepared.train) + len(prepared.eval) == want and len(prepared.eval) == round(0.2 * want)
    assert all(len(s.responses) == 5 and len(set(map(bytes, s.responses))) == 5 for s in prepared.train)
    prompt = lambda s: bytes(np.asarray(s.prompt))
    assert not {prompt(s) for s in prepared.train} & {prompt(s) for s in prepared.eval}
    report = prepared.report
    assert report.read == len(rows) and report.dropped["not in a set of 5"] == len(rows) - want_rows
    report.check()
