"""The documentation's examples run: every `>>>` example in the package's docstrings and in docs/*.md as a
doctest, and the README's Python example (DPO on your own file) as written, on a tiny model for 2 steps."""

import doctest
import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest

import prefopt_jax
from prefopt_jax import config

ROOT = Path(__file__).resolve().parents[1]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
MODULES = sorted(m.name for m in pkgutil.walk_packages(prefopt_jax.__path__, "prefopt_jax."))
PAGES = sorted((ROOT / "docs").glob("*.md"))


def test_docstring_examples():
    tried = {}
    for name in MODULES:
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=FLAGS, report=True)
        assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed"
        if result.attempted:
            tried[name] = result.attempted
    assert "prefopt_jax.losses.registry" in tried, tried  # an examples-free run would pass vacuously


@pytest.mark.parametrize("page", [p for p in PAGES if ">>> " in p.read_text()], ids=lambda p: p.name)
def test_docs_page_examples(page):
    result = doctest.testfile(str(page), module_relative=False, optionflags=FLAGS, report=True)
    assert result.attempted > 0 and result.failed == 0, f"{page.name}: {result}"


@pytest.mark.parametrize("page", ["README.md", "docs/training.md"])
def test_python_training_examples_run_as_written(page, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The README's block (DPO on your own file) and the training guide's (KTO from Python) run unchanged but
    for their inputs: `my_pairs.jsonl` is a small file written here, and the tiny model, 2 steps and a short
    held-out set are appended to their overrides."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S) if "train(cfg)" in b)
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(24)]
    (tmp_path / "my_pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    extra = [f"model.source={tiny_model_dir}", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
             "data.num_train=16", "data.num_eval=8", "eval.num_generate=2"]  # fmt: skip
    real = config.load_config
    monkeypatch.setattr(config, "load_config", lambda path, overrides=(): real(path, [*overrides, *extra]))
    exec(compile(block, page, "exec"), {})
    loss, second = map(float, capsys.readouterr().out.strip().splitlines()[-1].split())
    assert loss > 0 and second >= 0  # reward accuracy (DPO) or the KL reference point (KTO)
    out_dir = re.search(r"output\.dir=([\w/]+)", block).group(1)
    history = [json.loads(line) for line in (tmp_path / out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h and "eval/loss" not in h] == [1, 2]
