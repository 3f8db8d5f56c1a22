"""Multi-host: two processes on localhost (CPU collectives over gloo), 4 simulated devices each, train
the same run as one process with 8 devices, step for step."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from prefopt_jax.train.loop import train
from tests.support import quick

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tiny_model_dir, tmp_path):
    steps = ["train.steps=3", "train.lora_rank=0", "train.reference=frozen", "eval.num_generate=2"]
    overrides = [f"model.source={tiny_model_dir}", "mesh.fsdp=8", "train.warmup_steps=1", "data.num_train=16",
                 "data.num_eval=8", "eval.max_new_tokens=2", *steps]  # fmt: skip
    _, single = train(quick(None, tiny_model_dir, tmp_path / "one", *steps, "mesh.fsdp=8"))
    port = free_port()
    procs = []
    for pid in range(2):
        env = {
            **os.environ,
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
            "PYTHONPATH": str(ROOT),
        }
        args = [
            sys.executable,
            str(WORKER),
            str(tmp_path / f"p{pid}.json"),
            *overrides,
            f"output.dir={tmp_path / 'two'}",
        ]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads((tmp_path / f"p{pid}.json").read_text()) for pid in range(2)]
    for r in results:
        np.testing.assert_allclose(r["losses"], [h["loss"] for h in single], rtol=1e-5)
    records = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in map(json.loads, records) if "loss" in r]) == 3  # one writer, not two
