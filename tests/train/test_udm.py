"""BCO-UDM's prompt classifier against scikit-learn's (the one TRL's BCOTrainer fits), and a run of BCO-UDM
on the real unpaired set through the trainer."""

import json

import numpy as np
import pytest

from prefopt_jax import models, sharding
from prefopt_jax.config import ConfigError
from prefopt_jax.train import udm
from prefopt_jax.train.loop import train
from tests.support import quick


def test_the_classifier_is_scikit_learns_balanced_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6))
    y = x @ rng.normal(size=6) + 0.8 * rng.normal(size=90) > 0.7  # unbalanced, not separable
    assert 0.2 < y.mean() < 0.45
    w, b = udm.fit_logistic(x, y)
    ref = sklearn.LogisticRegression(C=1.0, class_weight="balanced", tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, ref.intercept_[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs desirable and undesirable"):
        udm.fit_logistic(x, np.ones(90, bool))


def test_prompt_embeddings_are_the_mean_hidden_state_of_each_prompt_alone():
    cfg = models.ModelConfig(family="llama", vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=4)  # fmt: skip
    params = models.create_model(cfg, seed=0).params()
    prompts = [np.array([3, 5, 7], np.int32), np.arange(1, 40, dtype=np.int32), np.array([9], np.int32)]
    mesh = sharding.make_mesh(1, 1, 1)
    got = udm.prompt_embeddings(cfg, params, prompts, mesh, rows=2)  # two forwards, padded to 32 and 64
    for p, e in zip(prompts, got, strict=True):
        alone = np.asarray(models.forward_hidden(cfg, params, p[None]))[0].mean(0)
        np.testing.assert_allclose(e, alone, rtol=2e-5, atol=2e-6)


def test_bco_udm_trains_on_the_unpaired_set(tiny_model_dir, tmp_path, shared_file, capsys):
    path = shared_file("llamafactory_kto_en_demo.jsonl")
    run = ("loss.name=bco", "loss.weights=null", "loss.hparams={udm: true}", "eval.generate=false",
           "train.batch_size=4", "data.max_length=160", "data.max_prompt_length=96", "data.on_error=skip")  # fmt: skip
    _, history = train(quick(None, tiny_model_dir, tmp_path / "run", f"data.source={path}", *run))
    assert [h["step"] for h in history] == [1, 2] and all(h["compilations"] == 1 for h in history)
    assert "udm: prompt classifier p(desirable)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"eval/delta", "eval/rewards/chosen", "eval/rewards/rejected"} <= set(summary["after"])
    desirable = [line for line in path.read_text().splitlines() if json.loads(line)["label"]]
    (tmp_path / "desirable.jsonl").write_text("\n".join(desirable))
    with pytest.raises(ConfigError, match="classifier of desirable vs undesirable training prompts: it needs both"):
        train(quick(None, tiny_model_dir, tmp_path / "one", f"data.source={tmp_path / 'desirable.jsonl'}", *run))
