"""Long work shows progress on a terminal and stays quiet in logs: the shared bar (rate and ETA), and the
export's byte count, which adds up to the tensors it writes."""

import io

import jax
import numpy as np

from prefopt_jax import models
from prefopt_jax.train import metrics as metrics_lib


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_only():
    for out, shown in ((Terminal(), True), (io.StringIO(), False)):
        bar = metrics_lib.progress_bar(10, "held-out evaluation", out)
        for _ in range(10):
            bar.update(1)
        bar.close()
        text = out.getvalue()
        assert ("held-out evaluation" in text and "ex/s" in text and "/10 [" in text) is shown, text


def test_export_progress_counts_every_byte_written(tmp_path):
    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
    params = models.create_model(cfg, seed=0).params()
    seen = []
    files = models.save_hf_folder(cfg, params, tmp_path, dtype=np.float32, max_shard_bytes=20_000, progress=seen.append)
    from safetensors.numpy import load_file

    written = sum(a.nbytes for f in files for a in load_file(f).values())
    assert len(files) > 1 and sum(seen) == written == sum(a.size for a in jax.tree.leaves(params)) * 4
