#!/usr/bin/env bash
# Cloud TPU VM lifecycle for prefopt-jax: create, setup, run, logs, resume, delete.
# Every setting is a flag or an environment variable; nothing is assumed. --dry-run prints the exact
# gcloud commands instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND [options] [-- prefopt-jax train arguments]

Commands:
  create   create the TPU VM (a queued resource with --queued; spot capacity with --spot)
  setup    on every worker (--worker=all): clone the repository at --ref, install it with TPU JAX,
           copy --copy files (e.g. a config) and the Hugging Face token
  run      start `prefopt-jax train ARGS output.dir=OUTPUT` on every worker at once, detached, with
           jax.distributed initialised from the TPU metadata (PREFOPT_DISTRIBUTED=1); log in ~/prefopt.log
  logs     stream worker 0's log
  resume   after a preemption: recreate and set up the slice if it is not READY, then run again; the
           run continues from the newest checkpoint in OUTPUT/checkpoints
  delete   delete the TPU VM (and its queued resource)

Options (flag, or environment variable):
  --name NAME              TPU_NAME          TPU VM (and queued resource) name            all
  --zone ZONE              TPU_ZONE          e.g. us-west4-a (v5e), us-east5-a (v5p)      all
  --project PROJECT        TPU_PROJECT       Google Cloud project                          all
  --accelerator-type TYPE  TPU_TYPE          e.g. v5litepod-16, v5p-64, v6e-16             create, resume
  --runtime-version V      TPU_RUNTIME       e.g. v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p)
                                                                                           create, resume
  --spot                   TPU_SPOT=1        spot (preemptible) capacity                   create, resume
  --queued                 TPU_QUEUED=1      create through a queued resource (TRC, spot)  create, resume, delete
  --repo URL               PREFOPT_REPO      git URL of prefopt_jax                        setup, resume
  --ref REF                PREFOPT_REF       git branch, tag or commit to install          setup, resume
  --copy FILE              PREFOPT_COPY      a local file copied into the checkout's configs/ (repeatable;
                                             the variable: space-separated)               setup, resume
  --hf-token-file FILE     HF_TOKEN_FILE     copied to ~/.cache/huggingface/token (gated models)
                                                                                           setup, resume (optional)
  --output GS_DIR          PREFOPT_OUTPUT    gs://bucket/path: checkpoints, metrics, summary  run, resume
  --dry-run                DRY_RUN=1         print the commands, run nothing
  -h, --help                                 this text

Example (v5e-16, 4 hosts):
  export TPU_NAME=dpo-v5e TPU_ZONE=us-west4-a TPU_PROJECT=my-project
  launch/tpu.sh create --accelerator-type v5litepod-16 --runtime-version v2-alpha-tpuv5-lite --spot --queued
  launch/tpu.sh setup --repo https://github.com/ORG/prefopt_jax.git --ref main --hf-token-file ~/.hf_token
  launch/tpu.sh run --output gs://my-bucket/runs/llama3-dpo -- --config configs/recipes/llama3-8b-instruct-dpo.yaml
  launch/tpu.sh logs
EOF
}

die() {
  echo "launch/tpu.sh: $*" >&2
  exit 2
}

# settings: environment first, flags override
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
TYPE=${TPU_TYPE:-}
RUNTIME=${TPU_RUNTIME:-}
SPOT=${TPU_SPOT:-0}
QUEUED=${TPU_QUEUED:-0}
REPO=${PREFOPT_REPO:-}
REF=${PREFOPT_REF:-}
read -r -a COPY <<<"${PREFOPT_COPY:-}"
HF_TOKEN_FILE=${HF_TOKEN_FILE:-}
OUTPUT=${PREFOPT_OUTPUT:-}
DRY_RUN=${DRY_RUN:-0}
TRAIN_ARGS=()

[[ $# -gt 0 ]] || {
  usage
  exit 2
}
COMMAND=$1
shift
case $COMMAND in
  -h | --help)
    usage
    exit 0
    ;;
  create | setup | run | logs | resume | delete) ;;
  *) die "unknown command '$COMMAND' (create, setup, run, logs, resume, delete; --help)" ;;
esac

value() { # value FLAG NEXT: the flag's argument, or an error naming the flag
  [[ -n ${2:-} && ${2:0:2} != "--" ]] || die "$1 needs a value"
  printf '%s' "$2"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) NAME=$(value "$1" "${2:-}"); shift 2 ;;
    --zone) ZONE=$(value "$1" "${2:-}"); shift 2 ;;
    --project) PROJECT=$(value "$1" "${2:-}"); shift 2 ;;
    --accelerator-type) TYPE=$(value "$1" "${2:-}"); shift 2 ;;
    --runtime-version) RUNTIME=$(value "$1" "${2:-}"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --repo) REPO=$(value "$1" "${2:-}"); shift 2 ;;
    --ref) REF=$(value "$1" "${2:-}"); shift 2 ;;
    --copy) COPY+=("$(value "$1" "${2:-}")"); shift 2 ;;
    --hf-token-file) HF_TOKEN_FILE=$(value "$1" "${2:-}"); shift 2 ;;
    --output) OUTPUT=$(value "$1" "${2:-}"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (--help lists them)" ;;
  esac
done

need() { # need VAR FLAG ENV: fail naming both ways of setting it
  [[ -n ${!1} ]] || die "$COMMAND needs $2 (or $3)"
}

quote() { # one word as a shell would need it: bare when safe, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

gcloud_cmd() { # print (--dry-run, exactly as a shell takes it) or run a gcloud command
  if [[ $DRY_RUN == 1 ]]; then
    local line=gcloud arg
    for arg in "$@"; do line+=" $(quote "$arg")"; done
    echo "$line"
  else
    gcloud "$@"
  fi
}

where=()
common() {
  need NAME --name TPU_NAME
  need ZONE --zone TPU_ZONE
  need PROJECT --project TPU_PROJECT
  where=(--zone "$ZONE" --project "$PROJECT")
}

ssh_all() { # ssh_all WORKER COMMAND: one command on the given worker(s)
  gcloud_cmd compute tpus tpu-vm ssh "$NAME" "${where[@]}" "--worker=$1" --command "$2"
}

do_create() {
  need TYPE --accelerator-type TPU_TYPE
  need RUNTIME --runtime-version TPU_RUNTIME
  local spot=()
  [[ $SPOT == 1 ]] && spot=(--spot)
  if [[ $QUEUED == 1 ]]; then
    gcloud_cmd compute tpus queued-resources create "$NAME" --node-id "$NAME" "${where[@]}" \
      --accelerator-type "$TYPE" --runtime-version "$RUNTIME" "${spot[@]}"
    wait_active
  else
    gcloud_cmd compute tpus tpu-vm create "$NAME" "${where[@]}" \
      --accelerator-type "$TYPE" --version "$RUNTIME" "${spot[@]}"
  fi
}

wait_active() { # a queued resource waits for capacity: poll until it is ACTIVE (or has failed)
  local state=""
  if [[ $DRY_RUN == 1 ]]; then
    gcloud_cmd compute tpus queued-resources describe "$NAME" "${where[@]}" --format 'value(state.state)'
    echo "# (repeated every 60 s until ACTIVE)"
    return
  fi
  while [[ $state != ACTIVE ]]; do
    state=$(gcloud compute tpus queued-resources describe "$NAME" "${where[@]}" --format 'value(state.state)')
    case $state in
      FAILED | SUSPENDED) die "queued resource $NAME is $state" ;;
      ACTIVE) ;;
      *) echo "queued resource $NAME: $state; waiting" >&2; sleep 60 ;;
    esac
  done
}

do_setup() {
  need REPO --repo PREFOPT_REPO
  need REF --ref PREFOPT_REF
  local install
  install="set -e; [ -d ~/prefopt_jax ] || git clone $(printf '%q' "$REPO") ~/prefopt_jax; cd ~/prefopt_jax"
  install+="; git fetch --all --tags; git checkout $(printf '%q' "$REF")"
  install+="; python3 -m venv .venv; .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e '.[tpu,gcs]'"
  ssh_all all "$install"
  local f
  for f in "${COPY[@]}"; do
    [[ -f $f || $DRY_RUN == 1 ]] || die "--copy $f: no such file"
    gcloud_cmd compute tpus tpu-vm scp "$f" "$NAME:prefopt_jax/configs/" "${where[@]}" --worker=all
  done
  if [[ -n $HF_TOKEN_FILE ]]; then
    [[ -f $HF_TOKEN_FILE || $DRY_RUN == 1 ]] || die "--hf-token-file $HF_TOKEN_FILE: no such file"
    ssh_all all "mkdir -p ~/.cache/huggingface"
    gcloud_cmd compute tpus tpu-vm scp "$HF_TOKEN_FILE" "$NAME:.cache/huggingface/token" "${where[@]}" --worker=all
  fi
}

do_run() {
  need OUTPUT --output PREFOPT_OUTPUT
  [[ $OUTPUT == gs://* ]] || die "--output must be a gs:// directory (every worker and a resumed slice see it)"
  local args
  args=$(printf '%q ' "${TRAIN_ARGS[@]}" "output.dir=$OUTPUT")
  # every worker starts the same command; jax.distributed finds the coordinator from the TPU metadata
  ssh_all all "cd ~/prefopt_jax && PREFOPT_DISTRIBUTED=1 setsid nohup .venv/bin/prefopt-jax train ${args% } \
> ~/prefopt.log 2>&1 < /dev/null &"
}

do_logs() {
  ssh_all 0 "tail -n +1 -F ~/prefopt.log"
}

do_delete() {
  if [[ $QUEUED == 1 ]]; then
    gcloud_cmd compute tpus queued-resources delete "$NAME" "${where[@]}" --force --quiet
  else
    gcloud_cmd compute tpus tpu-vm delete "$NAME" "${where[@]}" --quiet
  fi
}

do_resume() {
  need OUTPUT --output PREFOPT_OUTPUT
  local state
  if [[ $DRY_RUN == 1 ]]; then
    gcloud_cmd compute tpus tpu-vm describe "$NAME" "${where[@]}" --format 'value(state)'
    echo "# if the state is not READY (preempted or gone):"
    state=PREEMPTED
  else
    state=$(gcloud compute tpus tpu-vm describe "$NAME" "${where[@]}" --format 'value(state)' 2>/dev/null || echo GONE)
  fi
  if [[ $state != READY ]]; then
    [[ $state == GONE ]] || do_delete
    do_create
    do_setup
  fi
  do_run
}

common
"do_$COMMAND"
