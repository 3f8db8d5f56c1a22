"""DPO training throughput and memory: prefopt_jax (the `prefopt-jax train` loop) against TRL's DPOTrainer
(torch CPU) on the same work, each run in its own process, runs alternating.

The work (issue 5): SmolLM2-135M-Instruct weights, the first 64 pairs of the helpful rows of
../shared/data/hh_rlhf_test.jsonl, max length 512, 8 pairs per step, DPO sigmoid (beta 0.1), fp32, full
fine-tuning and LoRA (r 8, alpha 16, q/k/v/o/gate/up/down). Each run: `--steps` steps (8: the 64 pairs once;
`--side-steps` for the reference runs). Figures: the whole run's wall time (loading, compilation and every
step: what a user waits for) and the median step time after the first (every step's time is printed too).
Peak resident memory is the process's ru_maxrss. MFU counts the work's useful FLOPs (prefopt_jax's analytic
count for the packed layout, the same for both) against this machine's measured fp32 matmul peak.

    python benchmarks/dpo_vs_trl.py --trl-python /path/to/venv-with-trl/bin/python [--steps 8] [--main-only]

TRL runs need a Python with trl, peft and torch (CPU) installed; `--skip-trl` runs only prefopt_jax.
Also printed: TRL in bf16 for reference, each of prefix sharing / packing / precomputed reference log-probs
on its own, and the reference-free losses (SimPO, RMiPO) next to DPO.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh_rlhf_test.jsonl"
HELPFUL_START = 2303  # rows 2303.. are the helpful splits (see ../shared/data/README.md)
PAIRS, BATCH, MAX_LENGTH = 64, 8, 512
MAX_PROMPT = 384  # ours keeps a prompt's end (at most this long), then the completion up to MAX_LENGTH in all;
# TRL keeps the start of prompt + completion up to MAX_LENGTH: the same token budget per sequence
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
MAIN = ("trl full", "full", "trl lora", "lora")  # the comparison itself; the rest is for reference
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- children ------------------------------------------------------------------------------------------


def child_ours(work: Path, steps: int, variant: dict) -> dict:
    start = time.perf_counter()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from prefopt_jax.config import load_config
    from prefopt_jax.train.loop import train
    from prefopt_jax.train.reference_cache import precompute

    overrides = [
        f"model.source={work / 'hf'}",
        f"data.source={work / 'pairs.jsonl'}",
        "data.eval_fraction=0.0",
        f"data.max_length={MAX_LENGTH}",
        f"data.max_prompt_length={MAX_PROMPT}",
        f"data.layout={variant.get('layout', 'packed')}",
        f"model.remat={variant.get('remat', 'full')}",
        f"loss.name={variant.get('loss', 'dpo')}",
        f"train.steps={steps}",
        f"train.batch_size={BATCH}",
        "train.warmup_steps=1",
        "train.learning_rate=1e-6",
        f"train.lora_rank={8 if variant.get('lora') else 0}",
        f"train.reference={variant['reference']}",
        f"train.reference_cache={work / 'ref_cache'}",
        "mesh.fsdp=1",
        "eval.generate=false",
        f"output.dir={work / 'runs' / variant['name'].replace(' ', '_')}",
        "output.resume=false",
        "output.tensorboard=false",
        *[f"loss.{k}={v}" for k, v in variant.get("hparams", {}).items()],
    ]
    cfg = load_config(None, overrides)
    if variant["reference"] == "precomputed":
        precompute(cfg)  # once, not timed (a separate command in practice)
        start = time.perf_counter()
    _, history = train(cfg)
    timed = history[1:]
    summary = json.loads((Path(cfg.output.dir) / "summary.json").read_text())
    return {
        "wall_s": time.perf_counter() - start,
        "compilations": summary["compilations"],
        "step_s": statistics.median(h["step_time"] for h in timed),
        "step_times": [round(h["step_time"], 1) for h in history],
        "flops": statistics.median(h["flops"] for h in timed),
        "tokens": statistics.median(h["num_tokens"] for h in timed),
        "peak_rss_gib": peak_rss_gib(),
        "loss": [h["loss"] for h in history],
    }


def child_trl(work: Path, steps: int, variant: dict) -> dict:
    start = time.perf_counter()
    import torch
    import transformers
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if variant.get("bf16") else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "hf")
    ds = load_dataset("json", data_files=str(work / "pairs_trl.jsonl"), split="train")
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    peft_config = None
    if variant.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=HF_TARGETS, task_type="CAUSAL_LM")
    args = DPOConfig(
        output_dir=str(work / "trl_out"),
        per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH,
        max_steps=steps,
        learning_rate=1e-6,
        beta=0.1,
        loss_type=["sigmoid"],
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=bool(variant.get("bf16")),
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "wall_s": time.perf_counter() - start,
        "step_s": statistics.median(times[1:]),
        "step_times": [round(t, 1) for t in times],
        "peak_rss_gib": peak_rss_gib(),
        "loss": losses,
    }


# ---- parent --------------------------------------------------------------------------------------------


def prepare(work: Path) -> None:
    """The 64 pairs (ours: messages; TRL: conversational prompt/chosen/rejected) and the weights as a
    Hugging Face folder both sides load."""
    from prefopt_jax import models

    rows = [json.loads(line) for line in DATA.read_text().splitlines()[HELPFUL_START : HELPFUL_START + PAIRS]]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trl_rows = [
        {
            "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]
    (work / "pairs_trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    model = models.load_pretrained("smollm2-135m-instruct")
    models.save_pretrained(model, work / "hf", tokenizer=models.load_tokenizer("smollm2-135m-instruct"))


def run_child(python: str, kind: str, work: Path, steps: int, variant: dict) -> dict:
    cmd = [
        python,
        __file__,
        "--child",
        kind,
        "--work",
        str(work),
        "--steps",
        str(steps),
        "--variant",
        json.dumps(variant),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"{kind} {variant['name']} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps of the main runs (8: the 64 pairs once)")
    parser.add_argument("--side-steps", type=int, default=2, help="timed steps of TRL bf16 and the ablations")
    parser.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON"), help="a Python with trl + peft + torch")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--main-only", action="store_true", help="only the four runs of the comparison itself")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        fn = child_ours if args.child == "ours" else child_trl
        print("RESULT " + json.dumps(fn(Path(args.work), args.steps, json.loads(args.variant))), flush=True)
        return
    if not DATA.exists():
        sys.exit(f"{DATA} not found (the shared data folder)")
    if not args.skip_trl and not args.trl_python:
        sys.exit("give --trl-python (a Python with trl, peft and CPU torch) or --skip-trl")
    work = Path(args.work or tempfile.mkdtemp(prefix="dpo_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    from prefopt_jax.train.flops import measured_peak_flops

    peak = measured_peak_flops(n=2048, repeats=10)
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"work: {PAIRS} pairs, {BATCH} per step, max length {MAX_LENGTH}")

    full = {"name": "full", "reference": "frozen"}
    lora = {"name": "lora", "reference": "lora_base", "lora": True}
    # alternating: TRL, ours, TRL, ours
    plan = [
        ("trl", {**full, "name": "trl full"}),
        ("ours", full),
        ("trl", {**lora, "name": "trl lora"}),
        ("ours", lora),
    ]
    plan += [("trl", {**full, "name": "trl full bf16", "bf16": True})]
    plan += [
        ("ours", {"name": "padded (no sharing, no packing)", "reference": "frozen", "layout": "padded"}),
        ("ours", {"name": "prefix sharing only", "reference": "frozen", "layout": "shared"}),
        ("ours", {"name": "packing only", "reference": "frozen", "layout": "packed_unshared"}),
        ("ours", {"name": "packed + precomputed ref", "reference": "precomputed"}),
        ("ours", {"name": "simpo (no reference)", "reference": "none", "loss": "simpo"}),
        ("ours", {"name": "rmipo (no reference)", "reference": "none", "loss": "rmipo"}),
    ]
    results = {}
    for kind, variant in plan:
        if (kind == "trl" and args.skip_trl) or (args.main_only and variant["name"] not in MAIN):
            continue
        python = args.trl_python if kind == "trl" else sys.executable
        name = variant["name"]
        steps = args.steps if variant["name"] in MAIN else args.side_steps
        r = run_child(python, kind, work, steps, variant)
        results[name] = r
        rate = BATCH / r["step_s"]
        print(
            f"{name:<34} whole run {r['wall_s']:6.0f} s  {r['step_s']:7.1f} s/step  {rate:6.3f} pairs/s  "
            f"peak RSS {r['peak_rss_gib']:5.2f} GiB  {r.get('compilations', '')} (every step: {r['step_times']})",
            flush=True,
        )

    flops = results["full"]["flops"]
    print("\n| run | whole run s | s/step (median after the first) | pairs/s | peak RSS GiB | MFU |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        f = r.get("flops", flops if "lora" not in name else results.get("lora", {}).get("flops", flops))
        mfu = f / r["step_s"] / peak
        print(
            f"| {name} | {r['wall_s']:.0f} | {r['step_s']:.1f} | {BATCH / r['step_s']:.3f} | "
            f"{r['peak_rss_gib']:.2f} | {mfu:.1%} |"
        )
    for mode in ("full", "lora"):
        if f"trl {mode}" in results:
            ours, trl = results[mode], results[f"trl {mode}"]
            print(
                f"{mode}: prefopt_jax {trl['wall_s'] / ours['wall_s']:.2f}x faster over the whole run, "
                f"{trl['step_s'] / ours['step_s']:.2f}x TRL's pairs/s per step, at "
                f"{ours['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x its peak memory"
            )


if __name__ == "__main__":
    main()
