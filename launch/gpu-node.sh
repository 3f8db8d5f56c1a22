#!/usr/bin/env bash
# One prefopt-jax process per GPU node (it drives all of that node's GPUs), joined by jax.distributed.
# Run it on every node with the same arguments and that node's rank; under SLURM, launch/gpu-slurm.sbatch
# does this for you. --dry-run prints the environment and command instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
Usage: launch/gpu-node.sh [options] [-- prefopt-jax train arguments]

Options (flag, or environment variable; all required):
  --coordinator HOST:PORT  COORDINATOR_ADDRESS  node 0's address and a free port, the same on every node
  --num-nodes N            NUM_NODES            how many nodes (processes) take part
  --node-rank I            NODE_RANK            this node's rank, 0 .. N-1 (node 0 hosts the coordinator)
  --python PATH            PREFOPT_PYTHON       the Python of the environment prefopt_jax is installed in
  --dry-run                DRY_RUN=1            print what would run
  -h, --help

Example, two 8xH100 nodes (run on each; NODE_RANK=0 on the first):
  launch/gpu-node.sh --coordinator node0:12355 --num-nodes 2 --node-rank 0 --python .venv/bin/python \
    -- --config configs/recipes/llama3-8b-instruct-dpo.yaml output.dir=/shared/runs/llama3-dpo
EOF_USAGE
}

die() {
  echo "launch/gpu-node.sh: $*" >&2
  exit 2
}

COORDINATOR=${COORDINATOR_ADDRESS:-}
NUM_NODES=${NUM_NODES:-}
NODE_RANK=${NODE_RANK:-}
PYTHON=${PREFOPT_PYTHON:-}
DRY_RUN=${DRY_RUN:-0}
TRAIN_ARGS=()

value() {
  [[ -n ${2:-} && ${2:0:2} != "--" ]] || die "$1 needs a value"
  printf '%s' "$2"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --coordinator) COORDINATOR=$(value "$1" "${2:-}"); shift 2 ;;
    --num-nodes) NUM_NODES=$(value "$1" "${2:-}"); shift 2 ;;
    --node-rank) NODE_RANK=$(value "$1" "${2:-}"); shift 2 ;;
    --python) PYTHON=$(value "$1" "${2:-}"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (--help lists them)" ;;
  esac
done

[[ -n $COORDINATOR ]] || die "needs --coordinator HOST:PORT (or COORDINATOR_ADDRESS)"
[[ $COORDINATOR == *:* ]] || die "--coordinator must be HOST:PORT, got '$COORDINATOR'"
[[ $NUM_NODES =~ ^[1-9][0-9]*$ ]] || die "needs --num-nodes N >= 1 (or NUM_NODES), got '$NUM_NODES'"
[[ $NODE_RANK =~ ^[0-9]+$ ]] || die "needs --node-rank I (or NODE_RANK), got '$NODE_RANK'"
((NODE_RANK < NUM_NODES)) || die "--node-rank $NODE_RANK is not below --num-nodes $NUM_NODES"
[[ -n $PYTHON ]] || die "needs --python PATH (or PREFOPT_PYTHON): the environment prefopt_jax is installed in"

# read by prefopt_jax.sharding.initialize_distributed -> jax.distributed.initialize(...)
export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_NODES JAX_PROCESS_ID=$NODE_RANK
command=("$PYTHON" -m prefopt_jax.cli train "${TRAIN_ARGS[@]}")
if [[ $DRY_RUN == 1 ]]; then
  echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES JAX_PROCESS_ID=$JAX_PROCESS_ID"
  printf '%q ' "${command[@]}" | sed 's/ $//'
  echo
else
  exec "${command[@]}"
fi
