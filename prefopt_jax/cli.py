"""prefopt-jax: Offline preference optimization (DPO and its family, KTO, CPO, ORPO, SimPO, ...) of language models.

prefopt-jax train                          the built-in job: SmolLM2-135M + LoRA + RPO (DPO + NLL), offline
prefopt-jax train --config configs/X.yaml train.steps=100 loss.beta=0.2
prefopt-jax precompute-ref --config configs/X.yaml   reference log-probs once, for train.reference=precomputed
prefopt-jax eval --config configs/X.yaml            held-out metrics of the newest checkpoint
prefopt-jax export --config configs/X.yaml OUT_DIR  Hugging Face folder (LoRA merged)
prefopt-jax plot RUN_DIR                            PNG curves of a run's metrics
prefopt-jax plan --config configs/X.yaml --target v5e-16   per-device memory and step time, compiled ahead
prefopt-jax train --config trl_recipe.yaml --beta 0.2   a TRL / alignment-handbook recipe, converted
prefopt-jax config --from-trl trl_recipe.yaml -o native.yaml   the recipe's native config
prefopt-jax losses                         every loss evaluated on a built-in batch
prefopt-jax losses --set r_dpo.alpha=0.05 --markdown docs/losses.md
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def _parse_sets(items: list[str]) -> dict[str, dict]:
    """`name.key=value` overrides, values read as Python literals (numbers, bools, strings)."""
    out: dict[str, dict] = {}
    for item in items:
        head, sep, raw = item.partition("=")
        name, dot, key = head.partition(".")
        if not sep or not dot or not key:
            raise SystemExit(f"--set expects LOSS.KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.setdefault(name, {})[key] = value
    return out


def cmd_losses(args: argparse.Namespace) -> int:
    from prefopt_jax import losses
    from prefopt_jax.losses.docs import render_markdown
    from prefopt_jax.losses.examples import example_inputs, loss_and_grad_norm

    if args.markdown:
        Path(args.markdown).write_text(render_markdown())
        print(f"wrote {args.markdown}")
        return 0
    overrides = _parse_sets(args.set)
    for name, hp in overrides.items():
        losses.get(name).hyperparameters(**hp)  # unknown names, keys or bad values fail here, by name
    print(f"every registered loss on a built-in batch of {args.batch} synthetic pairs (seed {args.seed})")
    print(f"{'loss':<18} {'ref':<4} {'loss':>10} {'reward acc':>10} {'|grad|':>10}  extra inputs")
    for name in losses.names():
        loss = losses.get(name)
        hp = overrides.get(name, {})
        ref = "yes" if loss.needs_reference else "no"
        try:
            extras = ", ".join(loss.required_extras(**hp)) or "-"
        except losses.LossInputError as e:
            print(f"{name:<18} {ref:<4} {'-':>10} {'-':>10} {'-':>10}  ({e})")
            continue
        x = example_inputs(name, b=args.batch, seed=args.seed)
        value, gnorm = loss_and_grad_norm(name, x, **hp)
        acc = loss(x, **hp).metrics.get("rewards/accuracies")
        acc_s = f"{float(acc):>10.3f}" if acc is not None else f"{'-':>10}"
        print(f"{name:<18} {ref:<4} {float(value):>10.4f} {acc_s} {float(gnorm):>10.4f}  {extras}")
    return 0


def load_config(path: str | None, overrides, extra: list[str] | None = None, trl_devices: int = 1, **kw):
    """The config of `--config`: a native YAML, or a TRL / alignment-handbook recipe converted key by key (the
    mapping printed once; TRL-style `--key value` overrides in `extra` applied to the recipe first;
    `trl_devices`: the data-parallel ranks the recipe's per-device batch was written for)."""
    from prefopt_jax import config, trl_recipe

    raw = _read_yaml(path) if path else None
    if not trl_recipe.looks_like_recipe(raw):
        if extra:
            raise config.ConfigError(f"unrecognised arguments {extra}: native configs take SECTION.KEY=VALUE")
        return config.load_config(path, overrides, **kw)
    recipe = trl_recipe.apply_overrides(raw, extra or [])
    native, lines = trl_recipe.convert(recipe, path, devices=trl_devices)
    print("\n".join(lines), flush=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        converted = Path(tmp) / "native.yaml"
        converted.write_text(trl_recipe.to_yaml(native, []))
        try:
            return config.load_config(converted, overrides, **kw)
        except config.ConfigError as e:
            msg = str(e).replace(str(converted), "the converted config")
            raise config.ConfigError(f"{path} (converted from TRL): {msg}") from None


def _run_config(args: argparse.Namespace):
    """The config of a command that runs one (train, precompute-ref, eval, export)."""
    return load_config(args.config, args.overrides, args.extra, args.trl_devices)


def _read_yaml(path: str):
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except (FileNotFoundError, yaml.YAMLError):
        return None  # config.load_config reports these with the line


def cmd_config(args: argparse.Namespace) -> int:
    from prefopt_jax import trl_recipe
    from prefopt_jax.config import ConfigError

    raw = _read_yaml(args.from_trl)
    if not trl_recipe.looks_like_recipe(raw):
        raise ConfigError(f"{args.from_trl}: not a TRL / alignment-handbook recipe (or not readable YAML)")
    recipe = trl_recipe.apply_overrides(raw, args.extra or [])
    native, lines = trl_recipe.convert(recipe, args.from_trl, devices=args.trl_devices)
    text = f"# prefopt-jax train --config {args.out or 'THIS_FILE'}\n" + trl_recipe.to_yaml(native, lines)
    if args.out:
        Path(args.out).write_text(text)
        print("\n".join(lines))
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from prefopt_jax.train.loop import train

    train(_run_config(args))
    return 0


def cmd_precompute_ref(args: argparse.Namespace) -> int:
    from prefopt_jax.train.reference_cache import precompute

    precompute(_run_config(args))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from prefopt_jax.train.evaluation import evaluate_checkpoint

    evaluate_checkpoint(_run_config(args))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from prefopt_jax.train.export import export

    export(
        _run_config(args),
        args.out_dir,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        push_to_hub=args.push_to_hub,
        adapters=args.adapters,
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from prefopt_jax.train.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from prefopt_jax.train import plan

    tgt = plan.target(args.target)
    needed = plan.simulated_devices_needed(tgt)
    if needed:  # must happen before anything starts jax's CPU backend
        import jax

        jax.config.update("jax_num_cpu_devices", needed)
    from prefopt_jax.config import load_config

    cfg = load_config(args.config, args.overrides, devices=tgt.devices)
    result = plan.plan(cfg, args.target, mfu=args.mfu)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0 if result["fits"] is not False else 1


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see configs/); defaults to the built-in job")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="e.g. train.steps=100 loss.beta=0.2")


def build_parser() -> argparse.ArgumentParser:
    """The `prefopt-jax` parser: every subcommand, its options and help."""
    # over 60 lines, and reads better whole: a flat, declarative list of the subcommands, one block each
    parser = argparse.ArgumentParser(
        prog="prefopt-jax",
        description=__doc__.splitlines()[0].removeprefix("prefopt-jax: "),
        epilog="examples:\n" + "\n".join("  " + line for line in __doc__.splitlines()[2:] if line),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("losses", help="list every registered loss, evaluated on a built-in batch")
    p.add_argument("--set", action="append", default=[], metavar="LOSS.KEY=VALUE", help="hyperparameter override")
    p.add_argument("--batch", type=int, default=8, help="pairs in the built-in batch (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", metavar="PATH", help="write the loss reference page instead")
    p.set_defaults(func=cmd_losses)
    p = sub.add_parser(
        "train",
        help="train a policy (no arguments: the built-in job, SmolLM2-135M + LoRA + RPO on a generated task)",
        description="Train a policy as configured: a YAML file (configs/) and SECTION.KEY=VALUE overrides, e.g. "
        "`prefopt-jax train --config configs/rpo.yaml loss.name=dpo data.source=my_pairs.jsonl`. Without "
        "--config: the built-in job (SmolLM2-135M-Instruct, LoRA, RPO on a generated task, offline). Running the "
        "same command again resumes from the newest checkpoint in output.dir.",
    )
    _config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("precompute-ref", help="compute the reference's log-probs once (train.reference=precomputed)")
    _config_args(p)
    p.set_defaults(func=cmd_precompute_ref)
    p = sub.add_parser("eval", help="held-out reward accuracy, margins and task accuracy of the newest checkpoint")
    _config_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("export", help="write the trained policy as a Hugging Face folder (LoRA merged)")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weights' dtype (bfloat16)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (5GB)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this hub repository")
    p.add_argument("--adapters", action="store_true", help="LoRA runs: the adapters alone, in PEFT's format")
    _config_args(p)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    p.add_argument("run_dir", help="the run's output.dir")
    p.add_argument("--out", help="where to write the PNGs (default RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser(
        "plan",
        help="compile the train step ahead of time for a slice: memory per device, FLOPs and step time",
    )
    p.add_argument(
        "--target", required=True, help="v5e-16, v5e-32, v5p-8, v5p-64, 8xH100, ..., cpu:N, or local (this machine)"
    )
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step time (default 0.4)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    _config_args(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser(
        "config",
        help="convert a TRL / alignment-handbook recipe (DPO, KTO, CPO, ORPO, SimPO) to a native config YAML",
        description="Write the native config equivalent to a TRL recipe, the mapping of every key as comments; "
        "keys that would change the run and have no native equivalent are refused, naming each. TRL-style "
        "`--key value` overrides apply to the recipe first. `prefopt-jax train --config RECIPE` converts the "
        "same way.",
    )
    p.add_argument("--from-trl", required=True, metavar="RECIPE", help="the TRL / handbook recipe YAML")
    p.add_argument("-o", "--out", help="where to write the native YAML (default: print it)")
    p.add_argument("--trl-devices", type=int, default=1, help="GPUs the recipe's per-device batch was for (1)")
    p.set_defaults(func=cmd_config)
    return parser


def _trl_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(the arguments argparse knows, TRL-style `--key value` / `--key=value` / `--flag` ones it does not) for
    the commands that take a recipe; a value is the next word unless it is an option or SECTION.KEY=VALUE."""
    import re

    subs = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    if not argv or argv[0] not in ("train", "precompute-ref", "eval", "export", "config"):
        return argv, []
    actions = {o: a for a in subs[argv[0]]._actions for o in a.option_strings}
    keep, extra, i = argv[:1], [], 1
    while i < len(argv):
        word, name = argv[i], argv[i].split("=", 1)[0]
        takes = name in actions and actions[name].nargs != 0 and "=" not in word
        if name in actions or not word.startswith("--"):
            keep += argv[i : i + 1 + takes]
            i += 1 + takes
            continue
        extra.append(word)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if "=" not in word and nxt is not None and not nxt.startswith("--") and not re.match(r"^\w+\.\w+=", nxt):
            extra.append(nxt)
            i += 1
        i += 1
    return keep, extra


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, extra = _trl_arguments(parser, sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    args.extra = extra  # TRL-style --key value overrides of a recipe
    args.trl_devices = getattr(args, "trl_devices", 1)  # `config` parses it; the commands that run a recipe:
    if "--trl-devices" in extra:
        i = extra.index("--trl-devices")
        args.trl_devices, args.extra = int(extra[i + 1]), extra[:i] + extra[i + 2 :]
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in ("train", "precompute-ref", "eval", "export"):
        from prefopt_jax.sharding import initialize_distributed

        initialize_distributed()  # multi-host: every process runs the same command (see launch/)
    try:
        return args.func(args)
    except user_errors() as e:  # bad configuration or data: a message, not a traceback (bugs keep theirs)
        print(f"prefopt-jax: error: {e}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "fix your config, data or files", each naming what is wrong."""
    from prefopt_jax.config import ConfigError
    from prefopt_jax.data import DataError, TooLarge
    from prefopt_jax.losses import LossInputError
    from prefopt_jax.models import CheckpointError, ModelConfigError
    from prefopt_jax.sharding import ShardingError
    from prefopt_jax.train.hub import HubError
    from prefopt_jax.train.reference_cache import ReferenceCacheError

    return (
        ConfigError, DataError, TooLarge, LossInputError, CheckpointError, ModelConfigError, ShardingError,
        ReferenceCacheError, HubError, FileNotFoundError, FloatingPointError,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
