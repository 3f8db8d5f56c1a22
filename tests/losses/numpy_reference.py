"""An independent NumPy transcription of ../shared/LOSSES.md, written from the spec, not from the
library: per-pair losses from per-sequence statistics in float64. Used only by the tests."""

import math

import numpy as np


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def smoothed(z, eps):
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def stats(pc_tok, pr_tok, mc, mr, rc_tok=None, rr_tok=None):
    """Sums and lengths from per-token arrays (numpy), the way §1 defines them."""
    s = {
        "pc": np.where(mc, pc_tok, 0).sum(1),
        "pr": np.where(mr, pr_tok, 0).sum(1),
        "Lc": np.maximum(mc.sum(1), 1).astype(float),
        "Lr": np.maximum(mr.sum(1), 1).astype(float),
    }
    if rc_tok is not None:
        s["rc"] = np.where(mc, rc_tok, 0).sum(1)
        s["rr"] = np.where(mr, rr_tok, 0).sum(1)
    return s


def dpo_family(name, s, beta=0.1, eps=0.0, **kw):
    pc, pr, rc, rr, Lc, Lr = (s[k] for k in ("pc", "pr", "rc", "rr", "Lc", "Lr"))
    cw, cl = pc - rc, pr - rr
    d = cw - cl
    if name == "dpo":
        return -logsig(beta * d)
    if name == "cdpo":
        return -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    if name == "robust":
        return (-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps)
    if name == "ipo":
        return (cw / Lc - cl / Lr - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return np.maximum(0, 1 - beta * d)
    if name == "exo_pair":
        z = beta * d
        return sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))
    if name == "nca_pair":
        return -logsig(beta * cw) - 0.5 * logsig(-beta * cw) - 0.5 * logsig(-beta * cl)
    if name == "bco_pair":
        return -logsig(beta * cw) - logsig(-beta * cl)
    if name == "sppo_hard":
        return (cw - 1 / (2 * beta)) ** 2 + (cl + 1 / (2 * beta)) ** 2
    if name == "aot":
        return smoothed(beta * (np.sort(pc - pr) - np.sort(rc - rr)), eps)
    if name == "aot_unpaired":
        return smoothed(beta * (np.sort(cw) - np.sort(cl)), eps)
    if name == "apo_zero":
        return (1 - sig(beta * cw)) + sig(beta * cl)
    if name == "apo_down":
        return sig(beta * cw) + (1 - sig(beta * d))
    if name == "discopop":
        z = beta * d
        m = sig(z / kw.get("tau", 0.05))
        return (1 - m) * -logsig(z) + m * np.exp(-z)
    if name == "sigmoid_norm":
        return -logsig(beta * (cw / Lc - cl / Lr))
    if name == "r_dpo":
        return -logsig(beta * d + kw["alpha"] * (Lc - Lr))
    if name == "tdpo":
        kc, kr = kw["kc"], kw["kr"]
        a = kw.get("alpha", 1.0)
        return -logsig(beta * (d - a * (kr - kc)))
    raise KeyError(name)


def sft(s):
    return np.full_like(s["pc"], -s["pc"].sum() / s["Lc"].sum())


def simpo(s, beta=2.0, gbr=0.25, eps=0.0):
    return smoothed(beta * (s["pc"] / s["Lc"] - s["pr"] / s["Lr"] - gbr), eps)


def cpo(s, beta=0.1, cpo_alpha=1.0):
    return smoothed(beta * (s["pc"] - s["pr"]), 0.0) + cpo_alpha * (-s["pc"].sum() / s["Lc"].sum())


def orpo(s, beta=0.1):
    a, b = s["pc"] / s["Lc"], s["pr"] / s["Lr"]
    log_odds = (a - b) - (np.log(1 - np.exp(a)) - np.log(1 - np.exp(b)))
    return -s["pc"].sum() / s["Lc"].sum() - beta * logsig(log_odds)


def slic_hf(s, delta=1.0, lam=0.1):
    return np.maximum(0, delta - s["pc"] + s["pr"]) - lam * s["pc"]


def rrhf_pair(s, w=1.0, Tc=None):
    sc, sr = s["pc"] / s["Lc"], s["pr"] / s["Lr"]
    ft = -s["pc"] / (s["Lc"] if Tc is None else Tc)
    return w * np.maximum(0, sr - sc) + ft


def mipo(s, beta=20.0):
    k = s["rc"] / s["Lc"] - s["rr"] / s["Lr"]
    f = s["pc"] / s["Lc"] - s["pr"] / s["Lr"]
    return -logsig(beta * (f - np.log1p(np.exp(k))))


def alpha_dpo(s, mu, sigma, beta, gbr, alpha, eps=0.0):
    """One call from state (mu, sigma): returns (loss, new mu, new sigma)."""
    u = s["pc"] / s["Lc"] - s["pr"] / s["Lr"]
    M = u - (s["rc"] / s["Lc"] - s["rr"] / s["Lr"])
    mu = 0.9 * mu + 0.1 * M.mean()
    sigma = 0.9 * sigma + 0.1 * M.std(ddof=1)
    m = gbr + alpha * (M - mu) / sigma
    return smoothed(beta * (u - m), eps), mu, sigma


def rmipo(s, qc, qr, beta=2.0, gmin=0.3, gmax=1.6):
    u = s["pc"] / s["Lc"] - s["pr"] / s["Lr"]
    dpmi = (s["pc"] / s["Lc"] - qc) - (s["pr"] / s["Lr"] - qr)
    m = gmin + (gmax - gmin) * np.exp(-np.maximum(dpmi, 0))
    return -logsig(beta * (u - m))


def kto(r, label, kl_pol, kl_ref, beta=0.1, wd=1.0, wu=1.0):
    z = max(np.mean(kl_pol - kl_ref), 0.0)
    return np.where(label, wd * (1 - sig(beta * (r - z))), wu * (1 - sig(beta * (z - r))))


def bco(r_beta, label, mean=0.0, var=1.0, count=1e-24):
    """One training call from running moments: returns (loss, new mean)."""
    n = r_beta.size
    delta = r_beta.mean() - mean
    tot = count + n
    new_mean = mean + delta * n / tot
    loss = np.where(label, -logsig(r_beta - new_mean), -logsig(-(r_beta - new_mean)))
    return loss, new_mean
