"""notebooks/: the quickstart and the loss explorer run top to bottom on CPU (the quickstart as a 3-step
smoke run); the TPU notebook, which needs a TPU runtime, is checked to be valid and to compile."""

import ast
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, workdir: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run a notebook in a fresh kernel, which inherits this environment (HF_HOME, offline hub, CPU JAX)
    except the 8 simulated devices: a notebook user has the one CPU device."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    monkeypatch.setenv("PREFOPT_NOTEBOOK_SMALL", "1")
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    monkeypatch.setenv("XLA_FLAGS", flags)
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return book


def outputs(book, kind="stream") -> str:
    return "".join(
        o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == kind
    )


def images(book) -> int:
    return sum("image/png" in o.get("data", {}) for c in book.cells if c.cell_type == "code" for o in c.outputs)


def test_quickstart_runs(tmp_path, monkeypatch):
    book = execute("quickstart.ipynb", tmp_path, monkeypatch)
    text = outputs(book)
    assert "task accuracy:" in text and "answer" in text
    assert images(book) == 1
    assert (tmp_path / "runs" / "quickstart" / "summary.json").is_file()


def test_loss_explorer_runs(tmp_path, monkeypatch):
    book = execute("loss_explorer.ipynb", tmp_path, monkeypatch)
    assert "losses swept" in outputs(book) and images(book) == 3


@pytest.mark.parametrize("name", ["quickstart.ipynb", "loss_explorer.ipynb", "tpu_colab.ipynb"])
def test_notebooks_are_valid_and_start_with_the_install_cell(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(book)
    code = [c.source for c in book.cells if c.cell_type == "code"]
    assert "pip" in code[0] and "install" in code[0]
    for source in code:
        ast.parse(source)  # no cell has a syntax error
        assert "def " not in source and "class " not in source  # notebooks define no library code
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code")  # committed without outputs
