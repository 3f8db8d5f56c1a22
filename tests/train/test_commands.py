"""precompute-ref, eval, export and plot, and the TensorBoard output, through the loop on a tiny model."""

import io
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import cli, models
from prefopt_jax.config import ConfigError, load_config
from prefopt_jax.train import reference_cache
from prefopt_jax.train.evaluation import evaluate_checkpoint
from prefopt_jax.train.export import export
from prefopt_jax.train.loop import train
from tests.support import quick

STEPS = ["train.steps=3", "eval.generate=false"]


def test_precomputed_reference_trains_like_the_fused_one(tiny_model_dir, tmp_path, capsys):
    cache = f"train.reference_cache={tmp_path / 'cache'}"
    _, fused = train(quick(None, tiny_model_dir, tmp_path / "fused", *STEPS))
    pre_cfg = quick(None, tiny_model_dir, tmp_path / "pre", *STEPS, "train.reference=precomputed", cache)
    with pytest.raises(reference_cache.ReferenceCacheError, match="precompute-ref"):
        train(pre_cfg)
    where = reference_cache.precompute(pre_cfg)
    meta = json.loads((tmp_path / "cache" / where.rsplit("/", 1)[-1] / "meta.json").read_text())
    assert meta["splits"]["train"]["examples"] == 16 and meta["splits"]["train"]["completions"] == 32
    assert reference_cache.precompute(pre_cfg) == where  # complete: not recomputed
    assert "already cached" in capsys.readouterr().out
    _, pre = train(pre_cfg)
    np.testing.assert_allclose([h["loss"] for h in pre], [h["loss"] for h in fused], rtol=1e-5)
    assert "kl/per_token" not in pre[0]  # no reference forward in the step at all
    # other data: another key, so the cache is never stale
    other = quick(
        None, tiny_model_dir, tmp_path / "x", *STEPS, "train.reference=precomputed", cache, "data.num_train=24"
    )
    with pytest.raises(reference_cache.ReferenceCacheError, match="no precomputed reference"):
        train(other)


def test_the_cache_key_follows_content():
    from prefopt_jax.data import TokenizedPair

    a = [TokenizedPair(np.array([1, 2]), np.array([3]), np.array([4, 5]), 1.0, None)]
    b = [TokenizedPair(np.array([1, 2]), np.array([3]), np.array([4, 6]), 1.0, None)]
    key = reference_cache.cache_key("m", "float32", {"train": a, "eval": []})
    assert key == reference_cache.cache_key("m", "float32", {"train": list(a), "eval": []})
    assert key != reference_cache.cache_key("m", "float32", {"train": b, "eval": []})
    assert key != reference_cache.cache_key("m", "bfloat16", {"train": a, "eval": []})
    assert key != reference_cache.cache_key("m2", "float32", {"train": a, "eval": []})


def wandb_records(path):
    """The protobuf records of a W&B run file (LevelDB's log format: 32 KiB blocks of checksummed chunks
    after a 7-byte `:W&B` header); read here so the test needs no W&B server or sync."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_tensorboard_events_wandb_offline_and_plots(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(quick(None, tiny_model_dir, tmp_path, *STEPS, "output.wandb=true"))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()

    # W&B: the same scalars under the same names and steps as TensorBoard, and the run's config
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    logged, config = {}, None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            logged[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "run":
            config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.run.config.update}
    tags = set(acc.Tags()["scalars"])
    assert set().union(*(r.keys() for r in logged.values())) == tags
    for tag in tags:
        got = {step: r[tag] for step, r in logged.items() if tag in r}
        assert got == pytest.approx({e.step: e.value for e in acc.Scalars(tag)}, rel=1e-6), tag
    assert config["train"]["steps"] == 3 and config["loss"]["name"] == ["dpo", "sft"]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("eval/rewards/accuracies")] == [0, 3]
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in jsonl if "loss" in r]
    np.testing.assert_allclose([e.value for e in acc.Scalars("loss")], losses, rtol=1e-6)
    assert cli.main(["plot", str(tmp_path)]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert {"loss.png", "reward_accuracy.png", "mfu.png"} <= set(written)
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 2


def test_eval_and_export_of_the_trained_checkpoint(tiny_model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    cfg = quick(None, tiny_model_dir, tmp_path / "run", *STEPS)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export(cfg, tmp_path / "hf")
    state, _ = train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    again = evaluate_checkpoint(cfg)
    assert again["eval/rewards/accuracies"] == pytest.approx(summary["after"]["eval/rewards/accuracies"])
    assert again["eval/rewards/margins"] == pytest.approx(summary["after"]["eval/rewards/margins"], rel=1e-5)
    export(cfg, tmp_path / "hf", dtype="float32")
    # the exported folder in transformers = our base model with the trained adapters applied
    from prefopt_jax.train.lora import with_lora

    base = models.load_pretrained(str(tiny_model_dir))
    adapted = with_lora(base.params(), state["trainable"], cfg.train.lora_alpha / cfg.train.lora_rank)
    ids = np.random.default_rng(0).integers(1, 49152, (2, 12))
    ours = models.logits_from_hidden(
        base.config, adapted, models.forward_hidden(base.config, adapted, jnp.asarray(ids))
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    assert (
        np.abs(
            np.asarray(ours)
            - np.asarray(
                models.logits_from_hidden(
                    base.config, base.params(), models.forward_hidden(base.config, base.params(), jnp.asarray(ids))
                )
            )
        ).max()
        > 1e-6
    )
    np.testing.assert_allclose(theirs, ours, atol=2e-5)
    assert (tmp_path / "hf" / "tokenizer.json").exists() or (tmp_path / "hf" / "tokenizer_config.json").exists()

    # the default: bfloat16 shards with their index, and a model card
    export(cfg, tmp_path / "bf16", max_shard_size="500KB")
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert hf16.dtype == torch.bfloat16
    with torch.no_grad():
        theirs16 = hf16.float()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs16, ours, atol=0.02 * np.abs(ours).max())
    card = (tmp_path / "bf16" / "README.md").read_text()
    assert card.startswith("---\nbase_model: " + str(tiny_model_dir))
    for text in ("1·dpo + 1·sft", f"{summary['data']['train']} train", "Held-out figures", "| rewards/accuracies |"):
        assert text in card, text
    assert f"| {summary['after']['eval/rewards/accuracies']:.4g} |" in card


def test_eval_and_export_read_only_what_they_need(tiny_model_dir, tmp_path, monkeypatch):
    """`eval` tokenises the held-out split only and `export` no data at all; neither allocates Adam's moments
    (the optimizer state is shapes only, and the checkpoint's is not read)."""
    import jax

    from prefopt_jax.train import run

    cfg = quick(None, tiny_model_dir, tmp_path / "run", *STEPS, "data.num_train=16", "data.num_eval=8")
    tokenised = []
    real_prepare = run.batches.data.prepare
    monkeypatch.setattr(
        run.batches.data,
        "prepare",
        lambda rows, *a, **kw: tokenised.append(kw.get("splits")) or real_prepare(rows, *a, **kw),
    )
    parts = run.setup(cfg, io.StringIO(), splits=("eval",), optimizer_state=False)
    assert parts.prepared.train == [] and len(parts.prepared.eval) == 8
    assert tokenised == [(), ("train",)]  # the built-in set: its train rows untouched, its held-out rows tokenised
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(parts.state["opt_state"]))
    assert not any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(parts.state["trainable"]))
    tokenised.clear()
    run.setup(cfg, io.StringIO(), splits=(), optimizer_state=False)
    assert tokenised == [(), ()]


def test_push_to_hub_offline_fails_before_any_work(tmp_path, monkeypatch):
    from prefopt_jax.train import export as export_lib
    from prefopt_jax.train import hub

    monkeypatch.setattr(export_lib, "setup", lambda *a, **k: pytest.fail("export started work"))
    cfg = load_config(None, [f"output.dir={tmp_path}"])
    with pytest.raises(hub.HubError, match=r"offline .*huggingface-cli upload me/model DIR"):
        export(cfg, tmp_path / "hf", push_to_hub="me/model")
    with pytest.raises(hub.HubError, match="expected a repository id"):
        export(cfg, tmp_path / "hf", push_to_hub="model")
    assert cli.main(["export", str(tmp_path / "hf"), "--push-to-hub", "me/model"]) == 2


def test_adapters_export_loads_in_peft_and_starts_a_run(tiny_model_dir, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    cfg = quick(None, tiny_model_dir, tmp_path / "run", *STEPS)
    state, _ = train(cfg)
    export(cfg, tmp_path / "adapters", adapters=True, dtype="float32")
    written = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert written["r"] == cfg.train.lora_rank and written["base_model_name_or_path"] == str(tiny_model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapters").eval()
    ids = np.random.default_rng(1).integers(1, 49152, (2, 12))
    with torch.no_grad():
        theirs = tuned(torch.tensor(ids)).logits.numpy()
    from prefopt_jax.train.lora import with_lora

    ours_base = models.load_pretrained(str(tiny_model_dir))
    adapted = with_lora(ours_base.params(), state["trainable"], cfg.train.lora_alpha / cfg.train.lora_rank)
    ours = models.logits_from_hidden(
        ours_base.config, adapted, models.forward_hidden(ours_base.config, adapted, jnp.asarray(ids))
    )
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=2e-5)
    assert np.abs(np.asarray(ours) - np.asarray(ours_base(jnp.asarray(ids)))).max() > 1e-4  # the adapters matter
    card = (tmp_path / "adapters" / "README.md").read_text()
    assert "library_name: peft" in card and "adapters only (PEFT)" in card

    # an adapter folder as model.source: the base with the adapters merged in
    started = models.load_pretrained(str(tmp_path / "adapters"))
    assert models.model_config(str(tmp_path / "adapters")) == started.config
    np.testing.assert_allclose(np.asarray(started(jnp.asarray(ids))), theirs, atol=2e-5)
    assert models.load_tokenizer(str(tmp_path / "adapters")).eos_token_id == started.config.eos_token_id

    # a bucket destination: staged here, then copied (the bucket is a local folder standing in for gs://)
    from prefopt_jax.train import checkpoint

    real_run_path = checkpoint.run_path
    bucket = lambda d: real_run_path(str(d).replace("gs://bucket", str(tmp_path / "bucket")))
    monkeypatch.setattr(checkpoint, "run_path", bucket)
    export(cfg, "gs://bucket/exports/adapters", adapters=True, dtype="float32")
    copied = tmp_path / "bucket" / "exports" / "adapters"
    names = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert sorted(p.name for p in copied.iterdir()) == names
    assert (copied / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "adapters" / "adapter_model.safetensors"
    ).read_bytes()

    gguf = load_config(None, [f"output.dir={tmp_path / 'run'}"])  # the built-in job: a GGUF base
    with pytest.raises(ConfigError, match="GGUF file, which transformers and PEFT cannot use"):
        export(gguf, tmp_path / "x", adapters=True)


def test_precompute_ref_for_an_unpaired_loss_on_pairs(tiny_model_dir, tmp_path):
    """BCO trains on pairs read as unpaired examples and is evaluated on the held-out pairs: the cache holds
    both kinds, and the precomputed run's losses are the fused run's."""
    cache = f"train.reference_cache={tmp_path / 'cache'}"
    over = ("loss.name=bco", "loss.hparams={}", "train.batch_size=16")
    _, fused = train(quick(None, tiny_model_dir, tmp_path / "fused", *STEPS, *over))
    pre_cfg = quick(None, tiny_model_dir, tmp_path / "pre", *STEPS, *over, "train.reference=precomputed", cache)
    reference_cache.precompute(pre_cfg)
    _, pre = train(pre_cfg)
    np.testing.assert_allclose([h["loss"] for h in pre], [h["loss"] for h in fused], rtol=1e-5)
    summary = json.loads((tmp_path / "pre" / "summary.json").read_text())
    assert "eval/rewards/accuracies" in summary["after"]
