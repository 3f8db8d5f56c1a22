"""MetricsWriter in a bucket (gs://), where files cannot be appended to: metrics.jsonl is rewritten whole,
and a resumed run keeps the earlier records. The bucket is a local folder that names itself gs://."""

import json
import pathlib

from prefopt_jax.train.metrics import MetricsWriter


class Bucket(pathlib.PosixPath):
    def __str__(self) -> str:
        return "gs://bucket" + super().__str__()

    def __fspath__(self) -> str:
        return super().__str__()


def read(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_bucket_metrics_are_rewritten_and_kept_on_resume(tmp_path):
    run = Bucket(tmp_path)
    w = MetricsWriter(run, append=False, tensorboard=False)
    assert w.jsonl is None and w.remote is not None
    for step in (1, 2):
        w.write(step, {"step": step, "loss": 1.0 / step})
    w.close()
    assert read(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    resumed = MetricsWriter(run, append=True, tensorboard=False)
    resumed.write(3, {"step": 3, "loss": 0.25})
    assert [r["step"] for r in read(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    fresh = MetricsWriter(run, append=False, tensorboard=False)
    fresh.write(1, {"step": 1, "loss": 2.0})
    assert read(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]


def test_secondary_hosts_write_nothing(tmp_path):
    w = MetricsWriter(Bucket(tmp_path), append=False, tensorboard=False, primary=False)
    w.write(1, {"step": 1})
    w.close()
    assert not (tmp_path / "metrics.jsonl").exists()
