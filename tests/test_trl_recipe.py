"""TRL / alignment-handbook recipes: published key sets converted key by key, TRL's defaults where a recipe is
silent (read from TRL's trl/trainer/dpo_config.py and transformers' TrainingArguments: beta 0.1, max_length
1024, loss_type ["sigmoid"], learning_rate 1e-6, num_train_epochs 3, per_device_train_batch_size 8,
gradient_accumulation_steps 1, lr_scheduler_type linear, warmup 0, max_grad_norm 1.0, seed 42, logging_steps 10,
save_steps 500), and every key that would change the run refused by name."""

import re

import pytest
import yaml

from prefopt_jax import cli
from prefopt_jax.config import ConfigError, load_config
from prefopt_jax.trl_recipe import apply_overrides, convert, looks_like_recipe, trainer_of
from tests import trl_recipes


def _recipe(name, drop=(), **changes):
    raw = yaml.safe_load(getattr(trl_recipes, name))
    for key in drop:
        del raw[key]
    return raw | changes


def _refused(raw, path=None):
    with pytest.raises(ConfigError) as e:
        convert(raw, path)
    return {line.split(":")[0].strip() for line in str(e.value).splitlines()[1:]}


def test_zephyr_dpo_full_refuses_what_it_cannot_map_and_names_it():
    raw = _recipe("ZEPHYR_DPO_FULL")
    assert looks_like_recipe(raw) and trainer_of(raw, "recipes/zephyr-7b-beta/dpo/config_full.yaml") == "dpo"
    native, lines = convert(raw)  # the recipe as published: nothing refused
    assert native["data"]["eval_rows"] == 2000  # test_split_size: 2000 rows held out in all
    assert native["eval"] == {"every": 100}  # eval_strategy: steps, eval_steps: 100
    share, _ = convert(raw | {"dataset_mixture": {**raw["dataset_mixture"], "test_split_size": 0.03}})
    assert share["data"]["eval_fraction"] == 0.03 and "eval_rows" not in share["data"]
    assert _refused(raw | {"eval_steps": 0.1}) >= {"eval_strategy/eval_steps"}  # a fraction of the run
    d = native["data"]
    assert d["source"] == ["HuggingFaceH4/ultrafeedback_binarized"] * 2  # both splits, mixed as the handbook does
    assert d["source_splits"] == ["train_prefs", "test_prefs"] and "keep_fractions" not in d  # weight 1.0: whole
    assert "dataset_mixture.seed: ignored" in "\n".join(lines)


def test_handbook_mixture_weights_are_the_share_of_each_dataset_kept():
    raw = _recipe("ZEPHYR_DPO_FULL", drop=["eval_steps"], eval_strategy="no")
    datasets = [{"id": "a.jsonl", "weight": 0.25}, {"id": "b.jsonl", "weight": 1.0}]
    native, lines = convert(raw | {"dataset_mixture": {"datasets": datasets}})
    assert native["data"]["source"] == ["a.jsonl", "b.jsonl"] and native["data"]["keep_fractions"] == [0.25, 1.0]
    assert "weights" not in native["data"]  # not shares of the stream
    assert "share of each dataset kept" in "\n".join(lines)
    assert _refused(raw | {"dataset_mixture": {"datasets": [{"id": "a.jsonl", "weight": 1.5}]}}) == {
        "dataset 1 (a.jsonl)"
    }
    cfg = load_config(None, ["data.source=['a.jsonl','b.jsonl']", "data.keep_fractions=[0.25,1.0]"])
    assert cfg.data.keep_fractions == (0.25, 1.0)
    with pytest.raises(ConfigError, match=r"data\.keep_fractions has 1 entries for the 2"):
        load_config(None, ["data.source=['a.jsonl','b.jsonl']", "data.keep_fractions=[0.5]"])
    with pytest.raises(ConfigError, match=r"data.keep_fractions must each lie in \(0, 1\]"):
        load_config(None, ["data.source=a.jsonl", "data.keep_fractions=[0]"])


def test_zephyr_dpo_full_maps_every_other_key():
    raw = _recipe("ZEPHYR_DPO_FULL", drop=["dataset_mixture", "eval_steps"], eval_strategy="no")
    native, lines = convert(raw | {"dataset_name": "pairs.jsonl"})
    assert native["model"] == {"source": "alignment-handbook/zephyr-7b-sft-full", "compute_dtype": "bfloat16",
                               "remat": "full"}  # fmt: skip
    assert native["loss"] == {"name": "dpo", "hparams": {"beta": 0.01}}
    assert native["data"] == {"source": "pairs.jsonl", "max_length": 1024, "max_prompt_length": 512}
    t = native["train"]
    assert (t["learning_rate"], t["epochs"], t["batch_size"]) == (5e-7, 1.0, 16)  # 8 per device x 2 accumulated
    assert (t["schedule"], t["warmup_ratio"], t["seed"], t["max_grad_norm"]) == ("cosine", 0.1, 42, 1.0)
    assert (t["lora_rank"], t["reference"]) == (0, "frozen")  # no PEFT: full fine-tuning against a frozen copy
    o = native["output"]
    assert (o["dir"], o["checkpoint_every"], o["keep"], o["log_every"]) == ("data/zephyr-7b-dpo-full", 100, 1, 10)
    text = "\n".join(lines)
    for ignored in ("hub_model_id", "push_to_hub", "gradient_checkpointing_kwargs", "log_level", "dataset_num_proc"):
        assert re.search(rf"^  {ignored}: ignored, ", text, re.M), ignored
    assert "no accumulation knob" in text


def test_zephyr_orpo():
    raw = _recipe("ZEPHYR_ORPO")
    assert trainer_of(raw, "recipes/zephyr-141b-A35b/orpo/config_full.yaml") == "orpo"
    path = "recipes/zephyr-141b-A35b/orpo/config_full.yaml"
    assert _refused(raw, path) == {"chat_template", "lr_scheduler_type", "optim"}  # inverse_sqrt, adamw_bnb_8bit
    native, _ = convert(_recipe("ZEPHYR_ORPO", drop=["chat_template", "lr_scheduler_type", "optim"]), path)
    assert native["loss"] == {"name": "orpo", "hparams": {"beta": 0.05}}
    assert native["model"]["dtype"] == "bfloat16"
    t = native["train"]
    assert (t["warmup_steps"], t["batch_size"], t["epochs"], t["schedule"]) == (100, 1, 3.0, "linear")  # TRL default
    assert "reference" not in t  # reference-free
    assert native["output"]["tensorboard"] and native["output"]["wandb"]
    assert native["output"]["checkpoint_every"] == 0  # save_strategy: "no"


def test_smollm3_apo():
    raw = _recipe("SMOLLM3_APO")
    assert _refused(raw) == {
        "model_revision",  # it-SFT
        "dataset 1 (HuggingFaceTB/smoltalk2)",  # config Preference, weight 0.5: a fraction kept
        "dataset 2 (HuggingFaceTB/smoltalk2)",
        "save_steps",  # 0.5 of the run
    }
    keep = _recipe("SMOLLM3_APO", drop=["model_revision", "dataset_mixture"])
    native, _ = convert(keep | {"dataset_name": "p.jsonl", "save_steps": 100})
    assert (native["train"]["schedule"], native["train"]["min_lr_ratio"]) == ("cosine", 0.1)  # cosine_with_min_lr
    assert _refused(keep | {"dataset_name": "p.jsonl", "save_steps": 100, "lr_scheduler_kwargs": {"power": 2}}) == {
        "lr_scheduler_type"  # cosine_with_min_lr without its floor
    }
    assert native["loss"] == {"name": "apo_zero", "hparams": {"beta": 0.05}}
    assert native["train"]["max_grad_norm"] == 0.2 and native["train"]["batch_size"] == 2


def test_princeton_simpo():
    raw = _recipe("SIMPO_LLAMA3")
    assert trainer_of(raw) == "simpo"
    native, _ = convert(raw)
    assert native["eval"] == {"every": 400}  # the older spelling, evaluation_strategy: steps
    assert native["loss"] == {
        "name": "simpo", "hparams": {"beta": 2.5, "loss_variant": "sigmoid", "gamma_beta_ratio": 0.55}
    }  # fmt: skip
    assert native["data"]["source"] == "princeton-nlp/llama3-ultrafeedback"  # dataset_mixer at 1.0, split train
    assert native["train"]["batch_size"] == 32  # 2 x 16


def test_silence_means_trl_defaults():
    native, lines = convert({"model_name_or_path": "m", "dataset_name": "p.jsonl"})
    assert native["loss"] == {"name": "dpo", "hparams": {"beta": 0.1}}
    assert native["data"]["max_length"] == 1024
    t = native["train"]
    assert (t["learning_rate"], t["epochs"], t["batch_size"], t["schedule"]) == (1e-6, 3.0, 8, "linear")
    assert (t["warmup_ratio"], t["warmup_steps"], t["seed"], t["max_grad_norm"], t["weight_decay"]) == (
        0.0, 0, 42, 1.0, 0.0
    )  # fmt: skip
    o = native["output"]
    assert (o["resume"], o["checkpoint_every"], o["log_every"]) == (False, 500, 10)
    assert "TRL default" in "\n".join(lines)


def test_rpo_old_and_new_spellings_agree():
    old, _ = convert({"model_name_or_path": "m", "dataset_name": "p", "rpo_alpha": 0.5, "max_prompt_length": 256})
    new, _ = convert({"model_name_or_path": "m", "dataset_name": "p", "loss_type": ["sigmoid", "sft"],
                      "loss_weights": [1.0, 0.5]})  # fmt: skip
    assert old["loss"] == new["loss"] == {
        "name": ["dpo", "sft"], "weights": [1.0, 0.5], "hparams": {"dpo": {"beta": 0.1}, "sft": {}}
    }  # fmt: skip
    assert old["data"]["max_prompt_length"] == 256 and "max_prompt_length" not in new["data"]


def test_max_steps_win_and_peft_maps():
    native, _ = convert({"model_name_or_path": "m", "dataset_name": "p", "max_steps": 7, "num_train_epochs": 2,
                             "use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": "all-linear",
                             "precompute_ref_log_probs": True})  # fmt: skip
    t = native["train"]
    assert t["steps"] == 7 and "epochs" not in t
    assert (t["lora_rank"], t["lora_alpha"]) == (4, 8.0)
    assert t["lora_targets"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert t["reference"] == "precomputed"


@pytest.mark.parametrize(
    ("key", "value"),
    [("optim", "adafactor"), ("lr_scheduler_type", "cosine_with_min_lr"), ("resume_from_checkpoint", "ckpt/x"),
     ("lora_target_modules", ["lm_head"]), ("loss_type", "nonsense"), ("made_up_key", 1), ("fp16", True)],
)  # fmt: skip
def test_changes_to_the_run_are_refused_by_name(key, value):
    raw = {"model_name_or_path": "m", "dataset_name": "p", "use_peft": True, key: value}
    assert _refused(raw) == {key}


def test_trl_overrides_and_the_cli(tmp_path, capsys):
    assert apply_overrides({"beta": 0.1}, ["--beta", "0.3", "--bf16"]) == {"beta": 0.3, "bf16": True}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "p.jsonl", "beta": 0.2}))
    cfg = cli.load_config(str(recipe), ["train.steps=3"], ["--beta", "0.3", "--num_train_epochs", "2"])
    assert cfg.loss.hparams == {"beta": 0.3} and cfg.train.steps == 3 and cfg.train.epochs is None
    assert "a TRL DPO recipe" in capsys.readouterr().out
    out = tmp_path / "native.yaml"
    assert cli.main(["config", "--from-trl", str(recipe), "-o", str(out), "--num_train_epochs", "2"]) == 0
    native = load_config(out)
    assert native.train.epochs == 2.0 and native.loss.hparams == {"beta": 0.2} and native.model.source == "m"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: m\ndataset_name: p\noptim: lion_8bit\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "optim: 'lion_8bit'" in capsys.readouterr().err


def test_kto_and_cpo_recipes():
    # TRL's KTOConfig: loss_type "kto", beta 0.1, desirable/undesirable_weight 1.0; CPOConfig: loss_type
    # "sigmoid", cpo_alpha 1.0 (both learning_rate 1e-6, max_length 1024)
    kto, _ = convert({"model_name_or_path": "m", "dataset_name": "u.jsonl", "desirable_weight": 1.33})
    assert kto["loss"] == {"name": "kto", "hparams": {"beta": 0.1, "desirable_weight": 1.33}}
    assert kto["train"]["reference"] == "frozen" and kto["train"]["learning_rate"] == 1e-6
    cpo, _ = convert({"model_name_or_path": "m", "dataset_name": "p", "loss_type": "simpo", "cpo_alpha": 0.0,
                      "simpo_gamma": 0.7})  # fmt: skip
    assert cpo["loss"] == {
        "name": "cpo", "hparams": {"beta": 0.1, "loss_variant": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.7}
    }  # fmt: skip
    assert "reference" not in cpo["train"]


def test_trl_devices_multiply_the_per_device_batch(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ndataset_name: p.jsonl\nper_device_train_batch_size: 2\n"
                      "gradient_accumulation_steps: 4\n")  # fmt: skip
    out = tmp_path / "n.yaml"
    assert cli.main(["config", "--from-trl", str(recipe), "--trl-devices", "8", "-o", str(out)]) == 0
    assert load_config(out).train.batch_size == 2 * 4 * 8
