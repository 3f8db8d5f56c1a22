"""The loss reference page matches the registry, and the CLI's loss table runs end to end."""

from pathlib import Path

import pytest

from prefopt_jax import cli, losses
from prefopt_jax.losses.docs import render_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_loss_page_is_generated_from_the_registry():
    page = (ROOT / "docs" / "losses.md").read_text()
    assert page == render_markdown(), "docs/losses.md is stale: run `prefopt-jax losses --markdown docs/losses.md`"
    for name in losses.names():
        assert f"## {name}\n" in page


def test_readme_names_every_loss_and_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    for name in losses.names():
        assert f"`{name}`" in readme, name
    assert "prefopt-jax losses" in readme
    assert "python -m pytest" in readme


def test_cli_loss_table_runs(capsys):
    assert cli.main(["losses", "--batch", "4", "--set", "r_dpo.alpha=0.05"]) == 0
    out = capsys.readouterr().out
    for name in losses.names():
        assert f"\n{name} " in out
    r_dpo_row = next(line for line in out.splitlines() if line.startswith("r_dpo "))
    assert "must be given" not in r_dpo_row


def test_cli_rejects_bad_overrides_with_a_message(capsys):
    assert cli.main(["losses", "--set", "dpo.beta=0"]) == 2
    assert "beta=0 must be > 0" in capsys.readouterr().err
    assert cli.main(["losses", "--set", "dop.beta=1"]) == 2
    assert "unknown loss 'dop'" in capsys.readouterr().err


def test_cli_prints_configuration_errors_in_one_line_and_keeps_tracebacks_of_bugs(capsys, monkeypatch):
    assert cli.main(["train", "train.batch_size=0"]) == 2  # a config error: the message, exit 2
    assert "train.batch_size must be >= 1, got 0" in capsys.readouterr().err

    def bug(args):
        raise ValueError("a genuine bug deep inside")

    monkeypatch.setattr(cli, "cmd_losses", bug)
    import pytest

    with pytest.raises(ValueError, match="a genuine bug"):  # not swallowed into one line
        cli.main(["losses"])


def test_bad_data_stops_train_and_eval_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A file as a spreadsheet exports it (Latin-1 bytes on line 3): exit 2 with the file, line and column,
    no traceback, and no model loaded (the data is read before it)."""
    import json

    from prefopt_jax.train import runtime

    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    bad = tmp_path / "export.jsonl"
    bad.write_bytes(b"\r\n".join([good, good, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', good]))
    monkeypatch.setattr(runtime, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for command in ("train", "eval"):
        assert cli.main([command, f"data.source={bad}", f"output.dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert f"{bad}, line 3: byte 0xe9 at column 16 is not UTF-8; save the file as UTF-8" in err, err
        assert "Traceback" not in err
