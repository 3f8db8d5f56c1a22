"""Every shipped config runs a few steps end to end (a tiny random model with the SmolLM2 tokenizer stands
in for the weights), and the loop logs, evaluates and refuses what it cannot do."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import prefopt_jax
from prefopt_jax import losses
from prefopt_jax.train import runtime
from prefopt_jax.train.loop import train
from tests.support import quick

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_runs_a_few_steps(path, tiny_model_dir, tmp_path, capsys):
    cfg = quick(path, tiny_model_dir, tmp_path)
    sources = (cfg.data.source,) if isinstance(cfg.data.source, str) else cfg.data.source
    builtin = sources == ("builtin:compare",)
    if not builtin:
        if not all(Path(s).exists() for s in sources):
            pytest.skip(f"{sources} not found (the shared data folder)")
        # a file's real rows, in fewer and shorter sequences: the tiny model's 49k-word logits dominate otherwise
        short = ("train.batch_size=4", "data.max_length=160", "data.max_prompt_length=96", "data.on_error=skip")
        cfg = quick(path, tiny_model_dir, tmp_path, *short)
    _, history = train(cfg)
    assert [h["step"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in history)
    assert all(h["compilations"] == 1 for h in history)  # one shape for the whole run
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # train steps
    held_out = "eval/rrhf/rank_accuracy" if cfg.data.ranked_from_pairs else "eval/rewards/margins"
    assert [r["step"] for r in records if held_out in r] == [0, 2]  # held-out before and after
    summary = json.loads((tmp_path / "summary.json").read_text())
    if builtin:  # held-out pairs and the task's answers
        assert {"eval/rewards/accuracies", "eval/task_accuracy"} <= set(summary["after"])
    elif cfg.loss.build()[0].kind is losses.InputKind.UNPAIRED:  # held-out unpaired examples, scored by the loss itself
        own = {"kto": "eval/kl", "bco": "eval/delta"}[cfg.loss.names[0]]  # KTO's reference point, BCO's shift
        assert {"eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", own} <= set(summary["after"])
    elif cfg.data.ranked_from_pairs:  # held-out ranked sets: how many of the scores' orderings the model keeps
        assert 0 <= summary["after"]["eval/rrhf/rank_accuracy"] <= 1
    else:
        assert "eval/rewards/accuracies" in summary["after"]
    if len(sources) > 1:  # a mixture: each source accounted for, and what the run drew from each
        shares = summary["data"]["sources"]
        assert [s["name"] for s in shares] == list(sources) and all(s["tokenised_cache"] for s in shares)
        assert sum(s["examples_trained_on"] for s in shares) == 2 * cfg.train.batch_size
    assert summary["compilations"] == {"train_step": 1, "eval_step": 1}
    out = capsys.readouterr().out
    assert "before training:" in out and "after training:" in out


def test_full_finetuning_with_a_frozen_reference_and_accumulation(tiny_model_dir, tmp_path):
    cfg = quick(
        None, tiny_model_dir, tmp_path, "train.lora_rank=0", "train.reference=frozen", "data.layout=padded",
    )  # fmt: skip
    state, history = prefopt_jax.train(cfg)  # the Python entry point
    assert "lora" not in state["trainable"].get("layers", {}) and history[-1]["step"] == 2
    assert history[-1]["compilations"] == 1  # the donated full state comes back in the same layout
    with pytest.raises(TypeError, match="Config or a YAML path"):
        prefopt_jax.train({"train": {}})


def test_a_stopped_run_resumes_exactly(tiny_model_dir, tmp_path):
    """Stopped after step 2 (as a preemption would) and restarted: steps 3-5 equal the uninterrupted run,
    LoRA dropout masks included (they follow from the seed and the step). Each step's 8 pairs fill three
    micro-batches of 3 rows unevenly (3 + 3 + 2: a row per pair in the shared layout)."""
    steps = ["train.steps=5", "eval.generate=false", "data.num_eval=8", "train.lora_dropout=0.2"]
    steps += ["data.layout=shared", "data.micro_batch_rows=3"]
    _, straight = train(quick(None, tiny_model_dir, tmp_path / "a", *steps))
    _, first = train(quick(None, tiny_model_dir, tmp_path / "b", *steps), stop_after=2)
    assert len(first) == 2
    state, resumed = train(quick(None, tiny_model_dir, tmp_path / "b", *steps))
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5]
    assert all(h["micro_batches"] == 3 and h["num_groups"] == 8 for h in resumed)  # exactly 8 pairs per step
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]  # nothing lost, nothing twice
    assert [r["step"] for r in records if "eval/rewards/accuracies" in r] == [0, 5]
    assert int(state["step"]) == 5


@pytest.mark.parametrize("mesh", [["mesh.fsdp=8"], ["mesh.data=2", "mesh.fsdp=4", "mesh.rules=dp"]])
def test_the_mesh_is_a_config_change(tiny_model_dir, tmp_path, mesh):
    steps = ["train.steps=3", "eval.generate=false", "train.lora_rank=0", "train.reference=frozen"]
    _, single = train(quick(None, tiny_model_dir, tmp_path / "one", *steps, "mesh.fsdp=1"))
    _, sharded = train(quick(None, tiny_model_dir, tmp_path / "many", *steps, *mesh))
    np.testing.assert_allclose([h["loss"] for h in sharded], [h["loss"] for h in single], rtol=1e-5)


def test_a_run_killed_during_a_save_resumes_from_the_last_complete_checkpoint(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    steps = ["train.steps=5", "eval.generate=false", "output.checkpoint_every=1"]
    _, straight = train(quick(None, tiny_model_dir, tmp_path / "a", *steps))
    cfg = quick(None, tiny_model_dir, tmp_path / "b", *steps)
    args = [f"{k}={v}" for k, v in [
        ("model.source", tiny_model_dir), ("mesh.fsdp", 1), ("train.warmup_steps", 1), ("data.num_train", 16),
        ("data.num_eval", 8), ("output.dir", tmp_path / "b"), ("train.steps", 5), ("eval.generate", "false"),
        ("output.checkpoint_every", 1),
    ]]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = Path(__file__).with_name("killed_worker.py")
    proc = subprocess.run([sys.executable, str(worker), "3", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]  # died by SIGKILL
    ckpts = tmp_path / "b" / "checkpoints"
    leftovers = [p.name for p in ckpts.iterdir()]
    assert "3" not in leftovers and any(name.startswith("3.") for name in leftovers), leftovers  # mid-save
    _, resumed = train(cfg)
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]


def test_held_out_evaluation_counts_every_example(tiny_model_dir, tmp_path, smollm2_tokenizer):
    """7 held-out pairs and micro-batches of 8: the partial micro-batch counts (its empty slot does not)."""
    from prefopt_jax import data
    from prefopt_jax.data.synthetic import comparison_pairs

    cfg = quick(None, tiny_model_dir, tmp_path, "data.num_eval=7", "eval.generate=false", "train.steps=1")
    train(cfg)
    held = data.prepare(comparison_pairs(16, 7, seed=0)[1], smollm2_tokenizer, max_length=256).train
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["after"]["eval/lengths/chosen"] == pytest.approx(np.mean([len(e.chosen) for e in held]))
    assert summary["after"]["eval/lengths/rejected"] == pytest.approx(np.mean([len(e.rejected) for e in held]))


def test_held_out_evaluation_every_n_steps(tiny_model_dir, tmp_path, capsys):
    """eval.every=2 over 5 steps (TRL's eval_steps): held-out records at steps 0, 2, 4 and 5 (the end), each
    of the policy after that step; the progress says so; training records are untouched."""
    cfg = quick(None, tiny_model_dir, tmp_path, "eval.every=2", "train.steps=5", "eval.generate=false")
    _, history = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    held = [r["step"] for r in records if "eval/rewards/margins" in r]
    assert held == [0, 2, 4, 5] and [h["step"] for h in history] == [1, 2, 3, 4, 5]
    out = capsys.readouterr().out
    assert "held-out at step 2:" in out and "held-out at step 4:" in out and "held-out at step 5" not in out
    margins = {r["step"]: r["eval/rewards/margins"] for r in records if "eval/rewards/margins" in r}
    assert margins[0] != margins[2] != margins[4]  # the policy moved between evaluations


def test_a_run_that_keeps_diverging_stops_and_keeps_the_last_finite_parameters(tiny_model_dir, tmp_path):
    """A learning rate of 1e30: the first update makes the weights overflow, every later step is non-finite,
    is skipped (parameters unchanged) and counted, and the run stops after max_skipped_in_a_row of them."""
    cfg = quick(
        None, tiny_model_dir, tmp_path, "train.learning_rate=1e30", "train.warmup_steps=0", "train.steps=8",
        "train.max_skipped_in_a_row=3", "eval.generate=false",
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss or gradient"):
        train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["skipped"] for r in steps][-3:] == [1, 2, 3] and len(steps) <= 6


def test_profile_steps_write_a_trace_that_names_the_step(tiny_model_dir, tmp_path, capsys):
    train(quick(None, tiny_model_dir, tmp_path, "train.steps=3", "train.profile_steps=[2, 3]", "eval.generate=false"))
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1
    assert b"train_step" in traces[0].read_bytes()  # the StepTraceAnnotation of each traced step
    assert "profile of steps 2-3" in capsys.readouterr().out


def test_a_second_run_loads_its_programs_from_the_compilation_cache(tiny_model_dir, tmp_path):
    import jax

    hits = []

    def listen(name, **kw):
        if "cache_hits" in name:
            hits.append(name)

    jax.monitoring.register_event_listener(listen)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        cache = f"output.compilation_cache={tmp_path / 'xla'}"
        _, first = train(quick(None, tiny_model_dir, tmp_path / "a", cache, "eval.generate=false"))
        written = sorted((tmp_path / "xla").iterdir())
        assert written and not hits  # compiled and stored
        _, second = train(quick(None, tiny_model_dir, tmp_path / "b", cache, "eval.generate=false"))
        assert len(hits) >= 2  # at least the train and eval steps came from the cache
        assert sorted((tmp_path / "xla").iterdir()) == written  # nothing compiled anew
        np.testing.assert_allclose([h["loss"] for h in second], [h["loss"] for h in first], rtol=1e-6)
    finally:  # later tests get the session's default back
        jax.monitoring.unregister_event_listener(listen)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        runtime.use_compilation_cache(None)


def ranked_rows(shared_file, n=24):
    """Ranked candidate sets made from real HH-RLHF pairs: the chosen answer (score 2), the rejected one
    (1) and the next row's chosen answer, which answers another question (0)."""
    rows = [
        json.loads(line) for line in shared_file("hh_rlhf_test.jsonl").read_text().splitlines()[2303 : 2303 + n + 1]
    ]
    return [
        {"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], nxt["chosen"]], "scores": [2, 1, 0]}
        for r, nxt in itertools.pairwise(rows)
    ]


def test_rrhf_trains_on_ranked_candidates_and_other_losses_refuse_them(tiny_model_dir, tmp_path, shared_file, capsys):
    rows = ranked_rows(shared_file)
    path = tmp_path / "ranked.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ranked_run = ("loss.name=rrhf", "loss.weights=null", "train.reference=none", "data.max_length=160",
                  "data.max_prompt_length=96", "train.batch_size=4", "eval.generate=false", "data.eval_fraction=0.25")  # fmt: skip
    cfg = quick(None, tiny_model_dir, tmp_path / "run", f"data.source={path}", *ranked_run)
    _, history = train(cfg)
    assert [h["step"] for h in history] == [1, 2] and all(h["compilations"] == 1 for h in history)
    assert "rank acc" in capsys.readouterr().out  # the progress line says what a ranked run measures
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["after"]["eval/rrhf/rank_accuracy"] <= 1.0 and "eval/rrhf/rank_loss" in summary["after"]
    with pytest.raises(prefopt_jax.config.ConfigError, match=r"loss 'dpo' trains on pairs, but .* ranked candidates"):
        train(quick(None, tiny_model_dir, tmp_path / "dpo", f"data.source={path}", *ranked_run[3:], "loss.name=dpo",
                    "loss.weights=null"))  # fmt: skip
    uneven = tmp_path / "uneven.jsonl"
    uneven.write_text("\n".join(json.dumps(r) for r in [*rows[:5], {**rows[5], "responses": rows[5]["responses"][:2],
                                                                     "scores": [2, 1]}]))  # fmt: skip
    with pytest.raises(prefopt_jax.data.DataError, match=r"uneven\.jsonl, line 6: 2 candidates, but .* has 3"):
        train(quick(None, tiny_model_dir, tmp_path / "uneven", f"data.source={uneven}", *ranked_run))
