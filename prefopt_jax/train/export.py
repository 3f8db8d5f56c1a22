"""`prefopt-jax export`: a checkpoint's policy as a Hugging Face folder (or LoRA adapters in PEFT's format),
with its model card, to a local folder, a bucket or the hub."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO

import jax
import jax.numpy as jnp
import numpy as np

from prefopt_jax import model_card, models
from prefopt_jax.config import Config, ConfigError, ModelSection
from prefopt_jax.train import checkpoint
from prefopt_jax.train import hub as hub_lib
from prefopt_jax.train import lora as lora_lib
from prefopt_jax.train import metrics as metrics_lib
from prefopt_jax.train.run import setup

DTYPES = {"bfloat16": jnp.bfloat16, "float32": np.float32}


def check_request(model: ModelSection, lora_rank: int, dtype: str, max_shard_size: str | int, adapters: bool) -> int:
    """The largest shard in bytes, once the request is known to be possible (a ConfigError otherwise)."""
    if dtype not in DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: expected one of {list(DTYPES)}")
    try:
        max_bytes = models.parse_size(max_shard_size)
    except ValueError as e:
        raise ConfigError(f"export --max-shard-size: {e}") from None
    if adapters and not lora_rank:
        raise ConfigError("export --adapters needs a LoRA run (train.lora_rank > 0); without it export the model")
    base = str(model.source)
    if adapters and (base in models.SHORT_NAMES or base.endswith(".gguf")):
        raise ConfigError(
            f"export --adapters: model.source={base} is a GGUF file, which transformers and PEFT cannot use as the "
            "base; export the merged model instead"
        )
    return max_bytes


def export(
    cfg: Config,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    push_to_hub: str | None = None,
    adapters: bool = False,
    out: IO | None = None,
) -> Path:
    """`prefopt-jax export`: the newest checkpoint's policy (LoRA merged into the base) as a Hugging Face
    folder: safetensors shards of at most `max_shard_size` in `dtype` with their index, config.json,
    generation_config.json, the tokenizer and chat template, and a model card. Reads no data and builds
    no optimizer state; in a multi-host run every process takes part and process 0 writes (to a `gs://`
    destination through a local staging folder). `push_to_hub`
    uploads the folder to that hub repository (created if missing). `adapters`: a LoRA run's adapters
    alone, in PEFT's format over `model.source` (which must be a Hugging Face folder or hub id)."""
    out = out or sys.stdout
    max_bytes = check_request(cfg.model, cfg.train.lora_rank, dtype, max_shard_size, adapters)
    hub = hub_lib.preflight(push_to_hub) if push_to_hub else None  # offline or logged out: fail before any work
    run = setup(cfg, out, splits=(), optimizer_state=False)
    run_dir = checkpoint.run_path(cfg.output.dir)
    mgr = checkpoint.manager(run_dir / "checkpoints", keep=cfg.output.keep)
    restored = checkpoint.restore_latest(mgr, run.state, skip=("opt_state",))
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'} to export")
    state, meta = restored
    trainable = state["trainable"]
    primary = jax.process_index() == 0
    destination = str(out_dir)
    remote = "://" in destination  # a bucket: written here first, then copied
    out_dir = Path(tempfile.mkdtemp(prefix="prefopt-export-")) if remote else Path(out_dir)
    if adapters:
        t, base = cfg.train, str(cfg.model.source)
        if Path(base).expanduser().exists():
            base = str(Path(base).expanduser().resolve())
        models.peft.save_adapters(
            trainable, out_dir, rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout, base=base,
            dtype=DTYPES[dtype], write=primary,
        )  # fmt: skip
        files = [out_dir / "adapter_model.safetensors"]
    else:
        files = save_merged(run, trainable, out_dir, DTYPES[dtype], max_bytes, write=primary, out=out)
    if primary:
        run.tokenizer.save_pretrained(str(out_dir))
        model_card.write(cfg, run_dir, meta["history"], out_dir, dtype=dtype, adapters=adapters)
        if hub is not None:
            print(f"uploaded to {hub_lib.upload(hub, push_to_hub, out_dir)}", file=out)
        if remote:
            copy_folder(out_dir, destination)
            shutil.rmtree(out_dir)
        print(
            f"exported the policy at step {len(meta['history'])} to {destination} ({len(files)} shard(s), {dtype})",
            file=out,
        )
    return checkpoint.run_path(destination) if remote else out_dir


def save_merged(run, trainable: dict, out_dir: Path, dtype, max_bytes: int, *, write: bool, out: IO) -> list[Path]:
    """The policy (LoRA merged into the base) as safetensors shards (every process takes part; those that
    `write` write), with a progress bar in bytes on the writer's terminal."""
    scale = run.spec.lora_scale
    params = trainable if scale is None else lora_lib.merge_lora(run.frozen, trainable, scale)
    bar = metrics_lib.progress_bar(sum(a.size for a in jax.tree.leaves(params)) * np.dtype(dtype).itemsize, "export",
                                   out if write else None, unit="B")  # fmt: skip
    files = models.save_hf_folder(run.model_cfg, params, out_dir, dtype=dtype, max_shard_bytes=max_bytes,
                                  write=write, progress=bar.update)  # fmt: skip
    bar.close()
    return files


def copy_folder(local: Path, destination: str) -> None:
    """Every file of `local` into `destination` (a bucket URL), streamed in 64 MiB pieces."""
    target = checkpoint.run_path(destination)
    target.mkdir(parents=True, exist_ok=True)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            (target / f.relative_to(local)).parent.mkdir(parents=True, exist_ok=True)
            with f.open("rb") as src, (target / f.relative_to(local)).open("wb") as dst:
                shutil.copyfileobj(src, dst, 64 << 20)
