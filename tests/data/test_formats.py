"""Files as the hubs publish them: compressed JSON/JSONL, CSV/TSV, hub-style data folders and plain-string
transcripts with an implicit prompt (Anthropic HH-RLHF), each read from real rows re-written into that format
and giving the same records as the original file; errors name the file and the 1-based line."""

import csv
import gzip
import json

import pytest

from prefopt_jax import data


@pytest.fixture(scope="module")
def real(shared_file):
    """The first 40 pairs of the shared HH-RLHF file (prompt as messages) and their records."""
    path = shared_file("hh_rlhf_test.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:40]]
    return rows, data.read_records(rows)[0]


def same(records, expected):
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [(r.prompt, r.chosen, r.rejected) for r in expected]


def test_compressed_json_and_jsonl(real, tmp_path):
    rows, expected = real
    jsonl, js = tmp_path / "pairs.jsonl.gz", tmp_path / "pairs.json.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(js, "wt", encoding="utf-8") as f:
        json.dump(rows, f)
    for path in (jsonl, js):
        records, _ = data.read_records(str(path))
        same(records, expected)
    assert str(data.read_records(str(jsonl))[0][3].origin) == f"{jsonl}, line 4"


@pytest.mark.parametrize("name,delimiter", [("pairs.csv", ","), ("pairs.tsv", "\t"), ("pairs.csv.gz", ",")])
def test_csv_and_tsv(real, tmp_path, name, delimiter):
    rows, expected = real
    path = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "chosen", "rejected"], delimiter=delimiter)
        writer.writeheader()  # the prompt's messages as the JSON a spreadsheet export keeps them in
        writer.writerows({**r, "prompt": json.dumps(r["prompt"])} for r in rows)
    records, _ = data.read_records(str(path))
    same(records, expected)
    text = (tmp_path / "short.csv").open("w", encoding="utf-8", newline="")
    text.write('prompt,chosen,rejected\n"multi\nline",a,b\nq,only two\n')
    text.close()
    with pytest.raises(data.DataError, match=r"short\.csv, line 4: 3 columns expected"):
        data.read_records(str(tmp_path / "short.csv"))


def test_unpaired_csv_reads_labels_and_weights(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label,weight\nq1,a1,true,1\nq2,a2,False,0.5\nq3,a3,1,2\n")
    records, _ = data.read_records(str(path))
    assert [(r.label, r.weight) for r in records] == [(True, 1.0), (False, 0.5), (True, 2.0)]


def test_hub_style_data_folder(real, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, expected = real
    folder = tmp_path / "dataset"
    (folder / "data").mkdir(parents=True)
    flat = [{**r, "prompt": json.dumps(r["prompt"])} for r in rows]  # any column types: strings here
    for i, part in enumerate((flat[:25], flat[25:])):
        pq.write_table(pa.Table.from_pylist(part), folder / "data" / f"train-0000{i}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(flat[:3]), folder / "data" / "test-00000-of-00001.parquet")
    (folder / "README.md").write_text("a dataset card")
    assert [p.name for p in data.sources.source_files(str(folder))] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    records, _ = data.read_records(str(folder), format="standard")
    assert [(r.chosen, r.rejected) for r in records] == [(r.chosen, r.rejected) for r in expected]
    held, _ = data.read_records(str(folder), format="standard", split="test")  # a split by its name
    assert [(r.chosen, r.rejected) for r in held] == [(r.chosen, r.rejected) for r in expected[:3]]
    with pytest.raises(data.DataError, match="a folder with no test_prefs data file"):
        data.read_records(str(folder), split="test_prefs")


def test_named_splits_and_kept_fractions_as_the_handbook_mixes(real, tmp_path, smollm2_tokenizer):
    """The zephyr recipe's mixture: train_prefs and test_prefs of one dataset, each kept in part (the handbook's
    weight: int(n · weight) rows, a seeded subset), accounted for row by row; the same seed keeps the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, _ = real
    folder = tmp_path / "ultrafeedback"
    (folder / "data").mkdir(parents=True)
    flat = [{**r, "prompt": json.dumps(r["prompt"])} for r in rows]
    pq.write_table(pa.Table.from_pylist(flat[:30]), folder / "data" / "train_prefs-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(flat[30:]), folder / "data" / "test_prefs-00000-of-00001.parquet")
    kw = dict(max_length=512, format="standard", on_error="skip", eval_fraction=0.2, seed=3)
    mix = lambda: data.prepare_mixture(
        [str(folder)] * 2, None, smollm2_tokenizer, source_splits=["train_prefs", "test_prefs"], keep=[0.5, 1.0], **kw
    )
    got = mix()
    (first, second) = got.sources
    assert first.report.not_kept == 15 and second.report.not_kept == 0  # int(30 * 0.5) of 30 kept
    assert first.report.read == 30 and second.report.read == 10
    kept = data.kept_rows(30, 0.5, seed=3)
    assert len(kept) == 15 and kept == sorted(set(kept))
    n_first = (first.train.stop - first.train.start) + (first.eval.stop - first.eval.start)
    dropped = sum(first.report.dropped.values())
    assert (
        n_first + dropped == 15
        and (
            second.train.stop
            + second.eval.stop
            - second.train.start
            - second.eval.start
            + sum(second.report.dropped.values())
        )
        == 10
    )
    assert "15 not kept" in got.report.summary()
    again = mix()
    assert [list(e.chosen) for e in again.train] == [list(e.chosen) for e in got.train]
    from prefopt_jax import losses
    from prefopt_jax.config import load_config
    from prefopt_jax.train.batches import load_data

    cfg = load_config(None, [
        f"data.source=['{folder}','{folder}']", "data.source_splits=['train_prefs','test_prefs']",
        "data.keep_fractions=[0.5,1.0]", "data.format=standard", "data.on_error=skip", "data.eval_fraction=0.2",
        "train.seed=3", "data.cache=null", "data.max_length=512",
    ])  # fmt: skip
    through_config, _ = load_data(cfg.data, cfg.train.seed, smollm2_tokenizer, losses.get("dpo"))  # the run's own path
    assert [list(e.chosen) for e in through_config.train] == [list(e.chosen) for e in got.train]
    with pytest.raises(ValueError, match=r"share of a source kept must lie in \(0, 1\]"):
        data.kept_rows(10, 0.0)


def transcript(prompt, answer):
    """A conversation as HH-RLHF publishes it: one string, each turn after a "\\n\\nHuman:"/"\\n\\nAssistant:"."""
    turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in prompt)
    return f"{turns}\n\nAssistant: {answer}"


def test_hh_transcripts_split_at_the_last_assistant_turn(real, tmp_path):
    rows, _ = real
    hh = [
        {"chosen": transcript(r["prompt"], r["chosen"]), "rejected": transcript(r["prompt"], r["rejected"])}
        for r in rows
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh))
    records, _ = data.read_records(str(path))
    # the prompt back as chat messages (stripped of the spaces around each turn), the answers as written
    want = [(tuple((m["role"], m["content"].strip()) for m in r["prompt"]), r["chosen"], r["rejected"]) for r in rows]
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == want
    # both answers start alike: a character-level common prefix would move "The answer is " into the prompt
    pair = {
        "chosen": "\n\nHuman: 2+2?\n\nAssistant: The answer is 4",
        "rejected": "\n\nHuman: 2+2?\n\nAssistant: The answer is 5",
    }
    (r,), _ = data.read_records([pair])
    assert (r.prompt, r.chosen, r.rejected) == ((("user", "2+2?"),), "The answer is 4", "The answer is 5")
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    with pytest.raises(data.DataError, match=r"rows\[1\]: implicit-prompt row: chosen and rejected differ before"):
        data.read_records([pair, bad])


def test_every_format_goes_through_the_tokenised_cache(real, tmp_path, smollm2_tokenizer):
    rows, _ = real
    path = tmp_path / "pairs.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows({**r, "prompt": json.dumps(r["prompt"])} for r in rows)
    first = data.prepare(str(path), smollm2_tokenizer, max_length=512, cache_dir=tmp_path / "cache", on_error="skip")
    again = data.prepare(str(path), smollm2_tokenizer, max_length=512, cache_dir=tmp_path / "cache", on_error="skip")
    assert [s.cache for s in first.sources] == ["written"] and [s.cache for s in again.sources] == ["hit"]
    assert [list(e.chosen) for e in again.train] == [list(e.chosen) for e in first.train] and len(first.train) > 30


def test_a_count_of_held_out_rows_is_shared_by_the_sources(tmp_path, smollm2_tokenizer):
    """eval_rows (the handbook's integer test_split_size) holds out that many rows in all: each source the
    same share of its kept rows (here 15 and 10 kept rows, 10 held out: 6 and 4)."""
    rows = lambda n, tag: [{"prompt": f"{tag} {i}?", "chosen": "yes", "rejected": "no"} for i in range(n)]
    for name, n in (("a", 30), ("b", 10)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, name)))
    sources = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    got = data.prepare_mixture(sources, None, smollm2_tokenizer, keep=[0.5, 1.0], eval_rows=10, seed=1,
                               cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert [s.eval.stop - s.eval.start for s in got.sources] == [6, 4]
    assert [s.train.stop - s.train.start for s in got.sources] == [9, 6]
    assert [s.cache for s in got.sources] == ["hit", "hit"]  # counting wrote the cache, preparing read it
    with pytest.raises(ValueError, match="40 held-out rows of 25 usable rows"):
        data.prepare_mixture(sources, None, smollm2_tokenizer, keep=[0.5, 1.0], eval_rows=40)
    from prefopt_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data\.eval_rows=5: .*\(not builtin:compare"):
        load_config(None, ["data.eval_rows=5"])
