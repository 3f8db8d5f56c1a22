"""train.epochs and train.warmup_ratio: the step count and the warmup derived from the data, as TRL derives them."""

import pytest

from prefopt_jax.config import Config, ConfigError, TrainSection, load_config, train_steps, with_schedule


def _cfg(**train):
    return Config(train=TrainSection(**train))


@pytest.mark.parametrize(
    ("epochs", "batch", "n", "steps"),
    [
        (1, 8, 64, 8),  # 64 / 8
        (3, 8, 100, 36),  # 12 full steps an epoch (TRL drops none, counts floor(batches / accumulation))
        (1.5, 8, 100, 18),  # ceil(1.5 * 12)
        (0.5, 16, 8486, 265),  # hh-rlhf's 8,486 rows: 530 full steps an epoch, half of them
        (2, 32, 10, 2),  # fewer examples than a batch: one step an epoch
    ],
)
def test_epochs_give_steps(epochs, batch, n, steps):
    assert train_steps(_cfg(epochs=epochs, batch_size=batch), n) == steps


def test_without_epochs_steps_stand():
    assert train_steps(_cfg(steps=7), 1000) == 7


def test_warmup_ratio_rounds_up_as_trl():
    # TRL's TrainingArguments.get_warmup_steps: math.ceil(num_training_steps * warmup_ratio)
    c = with_schedule(_cfg(epochs=1, batch_size=8, warmup_ratio=0.1), 800)
    assert (c.train.steps, c.train.warmup_steps) == (100, 10)
    c = with_schedule(_cfg(steps=48, warmup_ratio=0.05), 10)
    assert (c.train.steps, c.train.warmup_steps) == (48, 3)  # ceil(2.4)


def test_steps_win_over_epochs_as_max_steps(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {steps: 5, epochs: 3}\n")
    cfg = load_config(f)
    assert cfg.train.epochs is None and train_steps(cfg, 1000) == 5
    # an epochs override on the command line wins over the file's steps; both overridden: steps win
    assert load_config(f, ["train.epochs=2"]).train.epochs == 2
    assert load_config(f, ["train.epochs=2", "train.steps=4"]).train.epochs is None


def test_bad_epochs_and_ratio_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(None, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"train\.warmup_ratio"):
        load_config(None, ["train.warmup_ratio=1.5"])
    with pytest.raises(ConfigError, match="no training examples"):
        train_steps(_cfg(epochs=1), 0)


def test_a_run_by_epochs_takes_the_derived_steps_and_shows_the_epoch(tiny_model_dir, tmp_path, capsys):
    from prefopt_jax.train.loop import train

    cfg = load_config(
        None,
        [f"model.source={tiny_model_dir}", "mesh.fsdp=1", "data.num_train=16", "data.num_eval=8", "eval.generate=false",
         "train.batch_size=4", "train.epochs=0.5", "train.warmup_ratio=0.5", f"output.dir={tmp_path}"],
    )  # fmt: skip
    _, history = train(cfg)
    out = capsys.readouterr().out
    # 16 examples / 4 per step = 4 steps an epoch; half an epoch = 2 steps; warmup ceil(0.5 x 2) = 1
    assert len(history) == 2
    assert "schedule: 2 steps (4 per epoch of 16 examples), warmup 1" in out
    assert "step 2/2  epoch 0.50" in out


def test_progress_line_shows_epoch_and_eta():
    import io

    from prefopt_jax.train import metrics

    out = io.StringIO()
    metrics.progress(3, 10, {"loss": 0.5, "tokens_per_s": 100.0, "epoch": 0.75, "eta_s": 125.0}, out)
    line = out.getvalue()
    assert "step 3/10  epoch 0.75  loss 0.5000" in line and line.rstrip().endswith("ETA 2:05")
