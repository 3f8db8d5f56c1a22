"""Write TRL's own values for every loss TRL implements to trl_golden.json (read by test_trl_golden.py).

Runs TRL itself under torch CPU; the tests need no torch. Two environments (TRL 1.x removed BCO and
cDPO's label smoothing, which only TRL <= 0.28 has):

    python -m venv /tmp/trl116 && /tmp/trl116/bin/pip install torch==2.13.0 trl==1.16.0
    python -m venv /tmp/trl028 && /tmp/trl028/bin/pip install torch==2.13.0 trl==0.28.0 \
        "transformers<5" "datasets<4.5" joblib scikit-learn   # TRL 0.28 predates transformers 5
    /tmp/trl116/bin/python tests/losses/golden/make_trl_golden.py current
    /tmp/trl028/bin/python tests/losses/golden/make_trl_golden.py legacy

Each call rewrites its own section of the JSON. The inputs are drawn here from a fixed seed and
stored next to TRL's outputs, so the test feeds prefopt_jax exactly what TRL saw. TRL's trainer
methods are called on a stub `self` holding just the attributes they read, with a fake model that
returns fixed per-token log-probs (zero outside the completion, as TRL's fused head does for
labels = -100): that is TRL's loss code path, without a real network.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).with_name("trl_golden.json")
B, T = 6, 9  # pairs, tokens per row (prompt + completion + padding); TRL scores T-1 shifted positions
V = 11  # vocab for the CE-based NLL terms


def make_batch(seed: int) -> dict:
    """Pairs in TRL's layout: rows [chosen_0..B-1, rejected_0..B-1], completion_mask over tokens."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, 4, size=B)  # prompt tokens per pair (shared by chosen and rejected)
    comp = np.zeros((2 * B, T), np.int64)
    for i in range(2 * B):
        p = prompt[i % B]
        n = rng.integers(1, T - p + 1)  # completion length 1..T-p, rest is padding
        comp[i, p : p + n] = 1
    logps = -rng.uniform(0.05, 2.5, size=(2 * B, T - 1))
    ref = logps + rng.normal(0.0, 0.4, size=logps.shape)
    ref = np.minimum(ref, -0.01)
    lss = rng.uniform(-2.0, -0.2, size=logps.shape)  # log Σ_v p(v)², for WPO
    f = np.float32  # TRL runs in float32 (its f-divergence clamp table has no float64 entry)
    return {"completion_mask": comp, "logps": logps.astype(f), "ref_logps": ref.astype(f), "log_sum_sq": lss.astype(f)}


def as_inputs(batch: dict) -> dict:
    """What prefopt_jax receives: per-token arrays split into chosen/rejected with shifted masks."""
    m = batch["completion_mask"][:, 1:].astype(bool)
    return {
        "policy_chosen": batch["logps"][:B].tolist(),
        "policy_rejected": batch["logps"][B:].tolist(),
        "ref_chosen": batch["ref_logps"][:B].tolist(),
        "ref_rejected": batch["ref_logps"][B:].tolist(),
        "chosen_mask": m[:B].tolist(),
        "rejected_mask": m[B:].tolist(),
        "wpo_aligned_chosen": (batch["logps"] - batch["log_sum_sq"])[:B].tolist(),
        "wpo_aligned_rejected": (batch["logps"] - batch["log_sum_sq"])[B:].tolist(),
    }


class FakeModel(torch.nn.Module):
    def __init__(self, logps: torch.Tensor, mask: torch.Tensor, lss: torch.Tensor):
        super().__init__()
        self.logps, self.mask, self.lss = logps, mask, lss
        self.is_gradient_checkpointing = False

    def forward(self, **kwargs):
        lp = self.logps * self.mask  # TRL's fused head yields 0 where labels == -100
        n = lp.shape
        return types.SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros(n),
            mean_logits=torch.zeros(n),
            is_top1=torch.zeros(n, dtype=torch.bool),
            log_sum_sq_probs=self.lss,
            aux_loss=None,
        )


class FakeAccelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x if torch.is_tensor(x) else torch.tensor(x)

    gather = gather_for_metrics

    def unwrap_model(self, m):
        return m

    def autocast(self):
        return contextlib.nullcontext()


def run_dpo(batch: dict, loss_types, loss_weights=None, **cfg) -> dict:
    from trl.trainer.dpo_trainer import DPOTrainer

    mask = torch.tensor(batch["completion_mask"][:, 1:], dtype=torch.float32)
    logps = torch.tensor(batch["logps"], requires_grad=True)
    lss = torch.tensor(batch["log_sum_sq"])
    t = DPOTrainer.__new__(DPOTrainer)
    t.__dict__.update(
        model=FakeModel(logps, mask, lss),
        ref_model=FakeModel(torch.tensor(batch["ref_logps"]), mask, lss),
        accelerator=FakeAccelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=cfg.pop("discopop_tau", 0.05)),
        ld_alpha=cfg.pop("ld_alpha", None),
        f_divergence_type=cfg.pop("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=cfg.pop("f_alpha_divergence_coef", 0.5),
        loss_types=list(loss_types),
        loss_weights=list(loss_weights or [1.0] * len(loss_types)),
        beta=cfg.pop("beta", 0.1),
        label_smoothing=cfg.pop("label_smoothing", 0.0),
        use_weighting=cfg.pop("use_weighting", False),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    assert not cfg, cfg
    comp = torch.tensor(batch["completion_mask"])
    inputs = {"input_ids": torch.ones_like(comp), "attention_mask": torch.ones_like(comp), "completion_mask": comp}
    loss = t._compute_loss(t.model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in t._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
    out = {"loss": float(loss.detach()), "metrics": metrics}
    try:
        loss.backward()
    except RuntimeError as e:  # TRL 1.16: `*=` on relu's output breaks backward for hinge + WPO
        out["backward_error"] = str(e).split(":")[0]
        return out
    grad = logps.grad.numpy() * batch["completion_mask"][:, 1:]
    return out | {"grad_chosen": grad[:B].tolist(), "grad_rejected": grad[B:].tolist()}


def current_cases() -> list[dict]:
    batch = make_batch(0)
    cases = []

    def dpo(name, loss, trl_types, hp, weights=None, **trl_cfg):
        res = run_dpo(batch, trl_types, weights, **trl_cfg)
        cases.append({"name": name, "loss": loss, "hp": hp, "kind": "paired", "trl": res})

    dpo("dpo", "dpo", ["sigmoid"], {"beta": 0.1})
    dpo("dpo_beta0.5", "dpo", ["sigmoid"], {"beta": 0.5}, beta=0.5)
    dpo("robust", "robust", ["robust"], {"beta": 0.1, "label_smoothing": 0.1}, label_smoothing=0.1)
    dpo("ipo", "ipo", ["ipo"], {"beta": 0.1})
    dpo("hinge", "hinge", ["hinge"], {"beta": 0.3}, beta=0.3)
    dpo("exo_pair", "exo_pair", ["exo_pair"], {"beta": 0.1, "label_smoothing": 1e-3}, label_smoothing=1e-3)
    dpo("nca_pair", "nca_pair", ["nca_pair"], {"beta": 0.1})
    dpo("bco_pair", "bco_pair", ["bco_pair"], {"beta": 0.1})
    dpo("sppo_hard", "sppo_hard", ["sppo_hard"], {"beta": 0.1})
    dpo("aot", "aot", ["aot"], {"beta": 0.1, "label_smoothing": 0.1}, label_smoothing=0.1)
    dpo("aot_unpaired", "aot_unpaired", ["aot_unpaired"], {"beta": 0.1})
    dpo("apo_zero", "apo_zero", ["apo_zero"], {"beta": 0.1})
    dpo("apo_down", "apo_down", ["apo_down"], {"beta": 0.1})
    dpo("discopop", "discopop", ["discopop"], {"beta": 0.1, "discopop_tau": 0.05})
    dpo("sigmoid_norm", "sigmoid_norm", ["sigmoid_norm"], {"beta": 0.1})
    dpo("sft", "sft", ["sft"], {})
    # modifiers
    for kind in ("forward_kl", "js_divergence", "alpha_divergence"):
        dpo(f"dpo_{kind}", "dpo", ["sigmoid"], {"f_divergence_type": kind}, f_divergence_type=kind)
    dpo("ipo_js", "ipo", ["ipo"], {"f_divergence_type": "js_divergence"}, f_divergence_type="js_divergence")
    dpo(
        "sigmoid_norm_alpha0.3",
        "sigmoid_norm",
        ["sigmoid_norm"],
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.3,
    )
    dpo("dpo_ld0.5", "dpo", ["sigmoid"], {"ld_alpha": 0.5}, ld_alpha=0.5)
    dpo("ipo_ld0.3", "ipo", ["ipo"], {"ld_alpha": 0.3}, ld_alpha=0.3)
    dpo("dpo_wpo", "dpo", ["sigmoid"], {"beta": 0.5, "use_weighting": True}, beta=0.5, use_weighting=True)
    dpo("hinge_wpo", "hinge", ["hinge"], {"use_weighting": True}, use_weighting=True)
    # weighted combinations: RPO and MPO
    dpo("rpo", [["dpo", 1.0], ["sft", 0.5]], ["sigmoid", "sft"], {}, [1.0, 0.5])
    dpo("mpo", [["dpo", 0.8], ["bco_pair", 0.2], ["sft", 1.0]], ["sigmoid", "bco_pair", "sft"], {}, [0.8, 0.2, 1.0])
    cases += kto_cases() + cpo_orpo_cases()
    return cases


def kto_cases() -> list[dict]:
    from trl.trainer.kto_trainer import KTOTrainer

    rng = np.random.default_rng(1)
    n, t = 8, 7
    comp = np.zeros((n, t), np.int64)
    for i in range(n):
        p = rng.integers(1, 3)
        comp[i, p : p + rng.integers(1, t - p + 1)] = 1
    logps = -rng.uniform(0.05, 2.5, size=(n, t - 1)).astype(np.float32)
    ref = np.minimum(logps + rng.normal(0, 0.5, size=logps.shape), -0.01).astype(np.float32)
    kl_pol = -rng.uniform(5, 15, size=n).astype(np.float32)
    cases = []
    for name, loss_type, label, kl_ref_shift, weights in [
        ("kto", "kto", [1, 0, 1, 1, 0, 0, 1, 0], -2.0, (1.0, 1.0)),
        ("kto_weighted", "kto", [1, 1, 1, 0, 0, 1, 1, 0], -2.0, (1.0, 1.33)),
        ("kto_kl_clamped", "kto", [1, 0, 1, 1, 0, 0, 1, 0], +3.0, (1.0, 1.0)),  # mean KL < 0 -> z = 0
        ("kto_all_desirable", "kto", [1] * 8, -2.0, (1.0, 1.0)),
        ("apo_zero_unpaired", "apo_zero_unpaired", [1, 0, 1, 1, 0, 0, 1, 0], 0.0, (1.0, 1.0)),
    ]:
        kl_ref = (kl_pol + kl_ref_shift + rng.normal(0, 0.3, size=n)).astype(np.float32)
        mask = torch.tensor(comp[:, 1:], dtype=torch.float32)
        lp = torch.tensor(logps, requires_grad=True)
        tr = KTOTrainer.__new__(KTOTrainer)
        tr.__dict__.update(
            model=FakeModel(lp, mask, None),
            ref_model=None,
            accelerator=FakeAccelerator(),
            aux_loss_enabled=False,
            precompute_ref_logps=True,
            calculate_KL=loss_type == "kto",
            loss_type=loss_type,
            beta=0.1,
            desirable_weight=weights[0],
            undesirable_weight=weights[1],
            args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
            _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
        )
        tr._compute_kl_logps = lambda model, batch, _kl=kl_pol: torch.tensor(_kl)
        batch = {
            "input_ids": torch.ones_like(torch.tensor(comp)),
            "attention_mask": torch.ones_like(torch.tensor(comp)),
            "completion_mask": torch.tensor(comp),
            "label": torch.tensor(label, dtype=torch.bool),
            "ref_logps": torch.tensor((ref * comp[:, 1:]).sum(1)),
            "ref_KL_logps": torch.tensor(kl_ref),
        }
        loss = tr._compute_loss(tr.model, batch, return_outputs=False)
        loss.backward()
        metrics = {k: v[-1] for k, v in tr._metrics["train"].items() if k.startswith(("rewards/", "logps/", "kl"))}
        cases.append(
            {
                "name": name,
                "loss": loss_type,
                "kind": "unpaired",
                "hp": {"desirable_weight": weights[0], "undesirable_weight": weights[1]},
                "inputs": {
                    "policy": logps.tolist(),
                    "ref": ref.tolist(),
                    "mask": comp[:, 1:].astype(bool).tolist(),
                    "label": [bool(v) for v in label],
                    "kl_policy": kl_pol.tolist(),
                    "kl_ref": kl_ref.tolist(),
                },
                "trl": {"loss": float(loss), "grad": (lp.grad.numpy() * comp[:, 1:]).tolist(), "metrics": metrics},
            }
        )
    return cases


def _ce_batch(seed: int):
    """Random logits over a small vocab; CE-based NLL exactly as TRL's CPO/ORPO compute it."""
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.normal(0, 2.0, size=(2 * B, T, V)), dtype=torch.float32)
    ids = torch.tensor(rng.integers(0, V, size=(2 * B, T)))
    d = make_batch(seed)
    comp = torch.tensor(d["completion_mask"])
    attn = comp.clone()
    for i in range(2 * B):  # prompt = everything before the first completion token
        first = int(comp[i].nonzero()[0])
        attn[i, :first] = 1
    per_tok = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return logits, ids, comp, attn, per_tok


def _ce(logits, ids, label_mask):
    labels = ids.masked_fill(label_mask == 0, -100)
    return torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))


def cpo_orpo_cases() -> list[dict]:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits, ids, comp, attn, per_tok = _ce_batch(2)
    m = comp[:, 1:].bool()
    sums = (per_tok * m).sum(1)
    avgs = sums / m.sum(1)
    inputs = {
        "policy_chosen": per_tok[:B].tolist(),
        "policy_rejected": per_tok[B:].tolist(),
        "chosen_mask": m[:B].tolist(),
        "rejected_mask": m[B:].tolist(),
        "full_chosen": per_tok[:B].tolist(),
        "full_chosen_mask": attn[:B, 1:].bool().tolist(),
    }
    cases = []
    for name, cfg in [
        ("cpo", {"loss_type": "sigmoid", "cpo_alpha": 1.0, "alpha": 0.0, "label_smoothing": 0.0}),
        ("cpo_smoothed", {"loss_type": "sigmoid", "cpo_alpha": 0.5, "alpha": 0.0, "label_smoothing": 0.1}),
        ("cpo_hinge", {"loss_type": "hinge", "cpo_alpha": 1.0, "alpha": 0.0, "label_smoothing": 0.0}),
        ("cpo_ipo", {"loss_type": "ipo", "cpo_alpha": 1.0, "alpha": 0.0, "label_smoothing": 0.0}),
        ("cpo_simpo", {"loss_type": "simpo", "cpo_alpha": 0.0, "alpha": 0.0, "label_smoothing": 0.0}),
        ("cpo_alphapo", {"loss_type": "simpo", "cpo_alpha": 0.0, "alpha": 0.25, "label_smoothing": 0.0}),
    ]:
        beta = 2.5 if cfg["loss_type"] == "simpo" else 0.1
        stub = types.SimpleNamespace(
            accelerator=FakeAccelerator(), beta=beta, simpo_gamma=0.1 if cfg["alpha"] else 0.5, **cfg
        )
        use_avg = cfg["loss_type"] in ("ipo", "simpo")
        pc, pr = (avgs[:B], avgs[B:]) if use_avg else (sums[:B], sums[B:])
        losses, _, _ = CPOTrainer.cpo_loss(stub, pc, pr)
        nll = _ce(logits[:B], ids[:B], comp[:B]) if cfg["cpo_alpha"] else torch.tensor(0.0)
        loss = losses.mean() + cfg["cpo_alpha"] * nll
        variant = cfg["loss_type"]
        hp = {"beta": beta, "cpo_alpha": cfg["cpo_alpha"], "alpha": cfg["alpha"], "loss_variant": variant}
        hp |= {"label_smoothing": cfg["label_smoothing"], "simpo_gamma": stub.simpo_gamma}
        cases.append(
            {
                "name": name,
                "loss": "cpo",
                "kind": "paired",
                "hp": hp,
                "inputs": inputs,
                "trl": {"loss": float(loss), "nll": float(nll)},
            }
        )
    for beta in (0.1, 0.5):
        stub = types.SimpleNamespace(accelerator=FakeAccelerator(), beta=beta)
        losses, _, _, ratio, log_odds = ORPOTrainer.odds_ratio_loss(stub, avgs[:B], avgs[B:])
        nll = _ce(logits[:B], ids[:B], attn[:B])  # TRL: the whole chosen sequence, prompt included
        loss = nll - losses.mean()
        cases.append(
            {
                "name": f"orpo_beta{beta}",
                "loss": "orpo",
                "kind": "paired",
                "hp": {"beta": beta},
                "inputs": inputs,
                "trl": {
                    "loss": float(loss),
                    "nll": float(nll),
                    "log_odds_ratio": float(ratio),
                    "log_odds_chosen": float(log_odds),
                },
            }
        )
    return cases


def legacy_cases() -> list[dict]:
    """TRL 0.28: cDPO's label smoothing, BCO-pair with its running shift, and unpaired BCO."""
    from trl.experimental.bco.bco_trainer import BCOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import RunningMoments

    batch = make_batch(0)
    m = batch["completion_mask"][:, 1:]
    sums = torch.tensor((batch["logps"] * m).sum(1))
    ref = torch.tensor((batch["ref_logps"] * m).sum(1))
    acc = types.SimpleNamespace(device=torch.device("cpu"), use_distributed=False)
    cases = []
    stub = types.SimpleNamespace(
        accelerator=acc, reference_free=False, f_divergence_type="reverse_kl", beta=0.1, label_smoothing=0.2
    )
    losses, _, _ = DPOTrainer.dpo_loss(stub, sums[:B], sums[B:], ref[:B], ref[B:], loss_type="sigmoid")
    cases.append(
        {
            "name": "cdpo",
            "loss": "cdpo",
            "kind": "paired",
            "hp": {"beta": 0.1, "label_smoothing": 0.2},
            "trl": {"loss": float(losses.mean())},
        }
    )
    # bco_pair with the running shift: two consecutive calls, the state carried between them
    stub = types.SimpleNamespace(
        accelerator=acc,
        reference_free=False,
        f_divergence_type="reverse_kl",
        beta=0.1,
        label_smoothing=0.0,
        running=RunningMoments(acc),
    )
    steps = []
    for scale in (1.0, 0.5):
        losses, _, _ = DPOTrainer.dpo_loss(stub, sums[:B] * scale, sums[B:], ref[:B], ref[B:], loss_type="bco_pair")
        steps.append({"scale": scale, "loss": float(losses.mean()), "delta": float(stub.running.mean)})
    cases.append(
        {
            "name": "bco_pair_running",
            "loss": "bco_pair",
            "kind": "paired",
            "hp": {"beta": 0.1, "running_shift": True},
            "trl": {"steps": steps},
        }
    )
    # unpaired BCO over the 2B rows of the batch, each labelled desirable or not
    stub = types.SimpleNamespace(beta=0.1, running=RunningMoments(acc), match_underlying_distribution=False)
    label = np.array([True, False, True, True, False, False, True, False, True, False, False, True])
    steps = []
    for do_train in (True, True, False):
        pol, rf = sums.clone(), ref.clone()
        losses, _, _, delta = BCOTrainer.bco_loss(
            stub, pol[label], pol[~label], rf[label], rf[~label], None, None, do_train=do_train
        )
        steps.append({"training": do_train, "loss": float(losses.mean()), "delta": float(delta)})
    cases.append(
        {
            "name": "bco",
            "loss": "bco",
            "kind": "unpaired",
            "hp": {"beta": 0.1},
            "inputs": {"label": label.tolist()},
            "trl": {"steps": steps},
        }
    )
    return cases


def main() -> None:
    section = sys.argv[1]
    import trl

    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    cases = current_cases() if section == "current" else legacy_cases()
    batch = make_batch(0)
    data["batch"] = as_inputs(batch)
    data[section] = {"trl_version": trl.__version__, "torch_version": torch.__version__, "cases": cases}
    OUT.write_text(json.dumps(data, indent=1, allow_nan=False))
    print(f"wrote {len(cases)} {section} cases from trl {trl.__version__} to {OUT}")
    assert all(math.isfinite(c["trl"].get("loss", 0.0)) for c in cases)


if __name__ == "__main__":
    main()
