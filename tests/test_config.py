"""Configs load from YAML with overrides, and every mistake fails at load naming the key."""

from pathlib import Path

import pytest

from prefopt_jax import losses
from prefopt_jax.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_are_the_default_config_file():
    builtin, shipped = load_config(), load_config(ROOT / "configs" / "default.yaml")
    assert builtin.model == shipped.model and builtin.train == shipped.train and builtin.data == shipped.data
    assert builtin.loss.names == shipped.loss.names == ("dpo", "sft")  # RPO: DPO + the chosen answers' NLL
    assert builtin.loss.weights == shipped.loss.weights and builtin.loss.hparams == shipped.loss.hparams


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_starts_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert path.read_text().splitlines()[0] == f"# prefopt-jax train --config configs/{path.name}"


def test_overrides_are_typed():
    cfg = load_config(
        None, ["train.steps=7", "train.learning_rate=3e-4", "loss.name=dpo", "loss.beta=0.25", "data.layout=padded"]
    )
    assert cfg.train.steps == 7 and cfg.train.learning_rate == 3e-4 and cfg.data.layout == "padded"
    assert cfg.loss.hparams == {"beta": 0.25} and cfg.loss.weights is None  # the mixture's weights left with it
    mix = load_config(None, ["loss.name=dpo,sft", "loss.weights=[1.0, 0.5]", "loss.dpo.beta=0.3"]).loss.build()[0]
    assert mix.name == "1*dpo+0.5*sft" and mix.needs_reference
    assert load_config(None, ["train.lora_targets=q,v"]).train.lora_targets == ("q", "v")
    # one member of the built-in mixture chosen alone: its own hyperparameters become the loss's, overrides win
    default = Path(__file__).parents[1] / "configs" / "default.yaml"  # hparams: {dpo: {beta: 0.1}}
    assert load_config(default, ["loss.name=dpo"]).loss.hparams == {"beta": 0.1}
    assert load_config(default, ["loss.name=dpo", "loss.beta=0.2"]).loss.hparams == {"beta": 0.2}
    # a file's flat hyperparameters replaced from the command line by a YAML mapping, for a mixture
    kto = Path(__file__).parents[1] / "configs" / "kto.yaml"
    rpo = ["loss.name=dpo,sft", "loss.weights=1,1", "loss.hparams={dpo: {beta: 0.2}, sft: {}}"]
    assert load_config(kto, rpo).loss.build()[0].name == "1*dpo+1*sft"
    with pytest.raises(ConfigError, match=r"loss.hparams: '\{dpo: \[' is not a YAML mapping"):
        load_config(kto, ["loss.hparams={dpo: ["])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["train.stpes=3"], r"train: unknown key\(s\) \['stpes'\]; valid keys: \['steps'"),
        (["trian.steps=3"], r"unknown config section\(s\) \['trian'\]"),
        (["train.steps=many"], r"train.steps: expected an integer, got 'many'"),
        (["train.steps"], r"expected section.key=value"),
        (["train.micro_batches=2"], r"train.micro_batches was removed: a step holds exactly train.batch_size"),
        (["output.log_every=0"], r"output.log_every must be >= 1, got 0"),
        (["train.learning_rate=0"], r"train.learning_rate must be > 0.0, got 0.0"),
        (["data.eval_fraction=1.5"], r"data.eval_fraction must be in \[0.0, 1.0\], got 1.5"),
        (["data.layout=ragged"], r"data.layout='ragged'; valid: \['padded', 'packed', 'shared', 'packed_unshared'\]"),
        (["train.profile_steps=3,2"], r"train.profile_steps must be \[first, last\] steps .*got \[3, 2\]"),
        (["train.profile_steps=1,x"], r"train.profile_steps: '1,x' is not a tuple\[int, ...\]"),
        (["train.profile_steps=[3, 2]"], r"1 <= first <= last, got \[3, 2\]"),
        (["train.profile_steps=[40, 50]"], r"train.profile_steps=\[40, 50\] goes past train.steps=48"),
        (["mesh.data=-1"], r"at most one may be -1"),
    ],
)  # fmt: skip
def test_mistakes_fail_at_load_naming_the_key(overrides, match):
    """Reading a config (no trainer, no jax) refuses what each section's own rules refuse."""
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["loss.name=dop"], r"unknown loss 'dop'; registered losses"),
        (["loss.dpo.bta=1"], r"unknown hyperparameter\(s\) \['bta'\]"),
        (["loss.name=dpo", "loss.bta=1"], r"unknown hyperparameter\(s\) \['bta'\]"),
        (["loss.beta=1"], r"a mixture's hyperparameters go under a member of \['dpo', 'sft'\], e.g. loss.dpo.beta"),
        (["loss.weights=[1.0]"], r"loss.weights has 1 entries for the 2 losses"),
        (["loss.name=simpo"], r"loss 'simpo' needs no reference: set train.reference=none"),
        (["train.reference=none"], r"loss '1\*dpo\+1\*sft' needs a reference"),
        (["train.lora_rank=0"], r"lora_base needs LoRA"),
        (["loss.name=kto", "train.reference=precomputed"], r"loss 'kto' needs the reference inside the step"),
        (["train.reference=precomputed", "train.ref_sync_every=4"], r"ref_sync_every \(TR-DPO\) needs"),
        (["train.lora_dropout=1.5"], r"train.lora_dropout must be in \[0, 1\)"),
        (["mesh.fsdp=16"], r"does not fit the 8 devices"),
    ],
)  # fmt: skip
def test_impossible_runs_fail_when_resolved_naming_the_key(overrides, match):
    """What only the trainer can judge (the loss and its hyperparameters, the reference, LoRA, the mesh on 8
    devices) passes reading and fails when an entry point resolves the run, before any work."""
    from prefopt_jax.train import build

    cfg = load_config(None, overrides)
    with pytest.raises((ConfigError, losses.LossInputError), match=match):
        build.resolve(cfg, devices=8)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line 2, column 1: invalid YAML: expected ',' or ']'"):
        load_config(bad)
    cases = {  # one line naming the key, never a traceback from inside the reader
        "beta: 0.1\n": r"top-level key 'beta' is not a section; sections: \['model', 'mesh', 'data'",
        "train: 5\n": r"section 'train' must be a mapping of its keys, got 5",
        "loss: dpo\n": r"section 'loss' must be a mapping of its keys, got 'dpo'",
        "- 1\n- 2\n": r"the top level must be a mapping of sections",
    }
    for text, match in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config(bad)
