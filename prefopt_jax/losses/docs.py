"""The loss reference page (docs/losses.md), rendered from the registry so it cannot drift."""

from __future__ import annotations

from prefopt_jax.kinds import InputKind
from prefopt_jax.losses.registry import REQUIRED, Loss, get, names

HEADER = """# Losses

Generated from the registry by `prefopt-jax losses --markdown docs/losses.md`; a test fails when this
page and the code disagree. The exact specification, with the sources read, is LOSSES.md in the
project's shared folder; the formulas below use its notation:
`pc, pr` summed policy log-probs of the chosen/rejected completion, `rc, rr` the reference's, `Lc, Lr`
completion lengths, `cw = pc − rc`, `cl = pr − rr`, `Δ = cw − cl`, `sg` stop-gradient.

Every loss is called as `losses.get(name)(inputs, state=None, **hyperparameters)` and returns
`LossOutput(loss=[B], metrics, state)`; the objective is `mean(loss)`. The reference-based pairwise
losses (the DPO family) also take the modifiers `ld_alpha` (LD-DPO), `ld_on_reference`,
`f_divergence_type`, `f_alpha_divergence_coef` (f-DPO), `use_weighting` and `wpo_clamp` (WPO).
"""


def _fmt(v: object) -> str:
    return "*required*" if v is REQUIRED else f"`{v!r}`"


def _defaults(loss: Loss, skip: set[str]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in loss.defaults.items() if k not in skip) or "—"


def render_markdown() -> str:
    from prefopt_jax.losses.dpo_family import MODIFIERS

    lines = [
        HEADER,
        "| loss | trains on | reference | aggregation | extra inputs | stateful |",
        "|---|---|---|---|---|---|",
    ]
    for name in names():
        loss = get(name)
        hp = {k: (1.0 if v is REQUIRED else v) for k, v in loss.defaults.items()}
        extras = ", ".join(f"`{e}`" for e in loss.extras(hp)) or "—"
        reads = ", ".join(k.value for k in InputKind if loss.kind.reads(k))
        lines.append(
            f"| [`{name}`](#{name}) | {reads} | {'yes' if loss.needs_reference else 'no'} | "
            f"{loss.aggregation} | {extras} | {'yes' if loss.stateful else 'no'} |"
        )
    lines.append("")
    for name in names():
        loss = get(name)
        lines += [
            f"## {name}",
            "",
            f"`{loss.formula}`",
            "",
            f"- defaults: {_defaults(loss, set(MODIFIERS))}",
            f"- reference model: {'yes' if loss.needs_reference else 'no'}",
            f"- source: {loss.source}",
        ]
        if loss.notes:
            lines.append(f"- {loss.notes}")
        lines.append("")
    return "\n".join(lines)
