#!/usr/bin/env bash
# A jkd run on every worker of a Cloud TPU VM (single host or pod slice), from this machine.
#
#   launch/tpu_vm.sh [options] CONFIG WORKDIR [--config.key=value ...]
#
# 0. Plan the run here first: `python -m jkd.plan` compiles its training step for the
#    accelerator's topology with libtpu's compiler (no TPU needed; `pip install 'jax[tpu]'`
#    where this runs) and the launch stops, exit 7, when the step does not fit the chips'
#    memory. --no-plan skips it.
# 1. `gcloud compute tpus tpu-vm describe` the TPU; create it when it does not exist (start it
#    when STOPPED).
# 2. Put jkd on every worker: this checkout's files (tracked and untracked, not ignored) copied
#    with `tpu-vm scp --worker=all`, or `git clone --repo URL` there; then a Python venv
#    (uv, Python 3.11: the TPU images ship 3.10) with `pip install -e . jax[tpu]`.
# 3. `tpu-vm ssh --worker=all` runs `python -m jkd.train` on all workers at once, each one
#    process of one jax.distributed run (see --distributed).
#
# WORKDIR is a gs://bucket/run URL or a path on the workers. Checkpoints are written by every
# worker (each its shards), so on a pod slice it must be storage all workers share: a gs://
# URL, or a Filestore/NFS mount or a bucket mounted with gcsfuse.
set -euo pipefail

usage() {
  [[ $# -gt 0 ]] && echo "error: $*" >&2
  cat >&2 <<'EOF'
usage: launch/tpu_vm.sh [options] CONFIG WORKDIR [extra flags for python -m jkd.train ...]
options (environment variable; default):
  --name NAME          TPU_NAME; jkd-tpu
  --zone ZONE          TPU_ZONE; us-central2-b
  --accelerator TYPE   TPU_ACCELERATOR; v4-8 (v4-32, v5litepod-16, v6e-8, ...)
  --version VERSION    TPU_RUNTIME_VERSION; tpu-ubuntu2204-base
  --project PROJECT    TPU_PROJECT; gcloud's default project
  --spot               create a Spot TPU (TPU_SPOT=1)
  --repo URL           JKD_REPO; git clone URL on the workers instead of copying this checkout
  --ref REF            JKD_REF; the branch, tag or commit of --repo (default: its default branch)
  --remote-dir DIR     JKD_REMOTE_DIR; jkd (relative to the home directory on the workers)
  --python VERSION     JKD_PYTHON; 3.11 (installed on the workers with uv)
  --distributed MODE   JKD_DISTRIBUTED_MODE; env: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
                       JAX_PROCESS_ID from the TPU metadata server (one slice); auto:
                       JKD_DISTRIBUTED=auto, jax.distributed.initialize() detects them itself
  --skip-setup         do not copy/install jkd (already on the workers)
  --detach             run under nohup (log: ~/DIR.log on each worker) and return
  --dry-run            print the gcloud commands instead of running them
  --no-plan            JKD_PLAN=0; start without planning the run first (python -m jkd.plan)
  --plan-python PY     JKD_PLAN_PYTHON; python3 (a Python here with jkd and libtpu)
example: launch/tpu_vm.sh --accelerator v4-32 configs/kd_tiny.py /mnt/shared/kd_tiny
EOF
  exit 2
}

name=${TPU_NAME:-jkd-tpu}
zone=${TPU_ZONE:-us-central2-b}
accelerator=${TPU_ACCELERATOR:-v4-8}
version=${TPU_RUNTIME_VERSION:-tpu-ubuntu2204-base}
project=${TPU_PROJECT:-}
spot=${TPU_SPOT:-}
repo=${JKD_REPO:-}
ref=${JKD_REF:-}
remote_dir=${JKD_REMOTE_DIR:-jkd}
python_version=${JKD_PYTHON:-3.11}
mode=${JKD_DISTRIBUTED_MODE:-env}
setup=1
detach=
dry_run=
plan=${JKD_PLAN:-1}
[[ $plan == 0 ]] && plan=
plan_python=${JKD_PLAN_PYTHON:-python3}

need_value() { [[ $# -ge 2 && -n $2 ]] || usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; name=$2; shift 2 ;;
    --zone) need_value "$@"; zone=$2; shift 2 ;;
    --accelerator) need_value "$@"; accelerator=$2; shift 2 ;;
    --version) need_value "$@"; version=$2; shift 2 ;;
    --project) need_value "$@"; project=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --repo) need_value "$@"; repo=$2; shift 2 ;;
    --ref) need_value "$@"; ref=$2; shift 2 ;;
    --remote-dir) need_value "$@"; remote_dir=$2; shift 2 ;;
    --python) need_value "$@"; python_version=$2; shift 2 ;;
    --distributed) need_value "$@"; mode=$2; shift 2 ;;
    --skip-setup) setup=; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --no-plan) plan=; shift ;;
    --plan-python) need_value "$@"; plan_python=$2; shift 2 ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) usage "unknown option $1 (options come before CONFIG WORKDIR)" ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || usage "expected CONFIG WORKDIR after the options"
config=$1
workdir=$2
shift 2
[[ $mode == env || $mode == auto ]] || usage "--distributed must be env or auto (got '$mode')"
[[ $remote_dir =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ ]] ||
  usage "--remote-dir must be a plain relative path (got '$remote_dir')"
[[ -n $ref && -z $repo ]] && usage "--ref needs --repo"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z $repo && -z $dry_run ]]; then
  [[ -f $root/${config%%:*} ]] ||
    usage "config '${config%%:*}' is not a file of $root (give it relative to the checkout)"
fi

# A word as the shell reads it: plain words unquoted, the others in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi
}
quote_all() {
  local out=() word
  for word in "$@"; do out+=("$(quote "$word")"); done
  printf '%s' "${out[*]}"
}

# Runs (or, with --dry-run, prints) one command.
run() {
  if [[ -n $dry_run ]]; then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# 0. The plan: the step compiled for this accelerator's topology, here, before anything starts.
if [[ -n $plan ]]; then
  case $accelerator in
    v5litepod-*) topology=v5e-${accelerator#v5litepod-} ;;
    v4-* | v5e-* | v5p-* | v6e-*) topology=$accelerator ;;
    *) usage "cannot plan for --accelerator $accelerator (jkd.plan knows v4, v5e/v5litepod," \
             "v5p, v6e slices); pass --no-plan to start without a plan" ;;
  esac
  [[ -f $root/${config%%:*} ]] ||
    usage "cannot plan: config '${config%%:*}' is not a file of $root; pass --no-plan"
  overrides=()
  for arg in "$@"; do [[ $arg == --config.* ]] && overrides+=("$arg"); done
  plan_cmd=("$plan_python" -m jkd.plan --config "$config" --topology "$topology"
            "${overrides[@]}")
  if [[ -n $dry_run ]]; then
    echo "# the plan, run here first (the launch stops when it says the step does not fit):"
    run "${plan_cmd[@]}"
  else
    echo "+ $(quote_all "${plan_cmd[@]}")" >&2
    status=0
    (cd "$root" && "${plan_cmd[@]}") || status=$?
    if [[ $status == 7 ]]; then
      echo "tpu_vm.sh: the plan above says $config does not fit a $accelerator; change the" \
           "config (or --accelerator), or pass --no-plan to start anyway." >&2
      exit 7
    elif [[ $status != 0 ]]; then
      echo "tpu_vm.sh: the plan failed (exit $status, above): it needs jkd and libtpu here" \
           "(pip install -e . 'jax[tpu]', or --plan-python PY); pass --no-plan to skip it." >&2
      exit "$status"
    fi
  fi
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")

# 1. The TPU VM.
describe=("${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format="value(state)")
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator"
        --version="$version")
[[ -n $spot ]] && create+=(--spot)
if [[ -n $dry_run ]]; then
  run "${describe[@]}"
  echo "# when it does not exist:"
  run "${create[@]}"
else
  state=$("${describe[@]}" 2>/dev/null) || state=""
  case $state in
    READY) echo "tpu_vm.sh: reusing $name ($zone), READY" >&2 ;;
    "") run "${create[@]}" ;;
    STOPPED) run "${gcloud_tpu[@]}" start "$name" "${where[@]}" ;;
    *)
      echo "tpu_vm.sh: $name is $state; delete it and rerun to create a new one:" >&2
      echo "  $(quote_all "${gcloud_tpu[@]}" delete "$name" "${where[@]}")" >&2
      exit 1 ;;
  esac
fi

ssh_all() {  # ssh_all COMMAND: COMMAND on every worker at once
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$1"
}

# 2. jkd and its Python on every worker.
venv="\$HOME/$remote_dir-venv"
if [[ -n $setup ]]; then
  if [[ -n $repo ]]; then
    fetch="if [ -d $remote_dir/.git ]; then git -C $remote_dir fetch --quiet origin;"
    fetch+=" else git clone --quiet $(quote "$repo") $remote_dir; fi; "
    if [[ -n $ref ]]; then
      fetch+="git -C $remote_dir checkout --quiet $(quote "$ref")"
    else
      fetch+="git -C $remote_dir pull --quiet --ff-only"
    fi
  else
    archive=$(mktemp "${TMPDIR:-/tmp}/jkd-XXXXXX.tar.gz")
    trap 'rm -f "$archive"' EXIT
    if [[ -z $dry_run ]]; then
      (cd "$root" && git ls-files -z --cached --others --exclude-standard \
         | while IFS= read -r -d '' f; do [[ ! -e $f ]] || printf '%s\0' "$f"; done \
         | tar -czf "$archive" --null -T -)
    else
      echo "# this checkout's files (git ls-files -co --exclude-standard) packed into $archive"
    fi
    run "${gcloud_tpu[@]}" scp "$archive" "$name:jkd.tar.gz" "${where[@]}" --worker=all
    fetch="rm -rf $remote_dir; mkdir -p $remote_dir; tar -xzf jkd.tar.gz -C $remote_dir"
  fi
  install="command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh"
  install+="; export PATH=\$HOME/.local/bin:\$PATH"
  install+="; [ -x $venv/bin/python ] || uv venv --quiet --python $(quote "$python_version") $venv"
  install+="; uv pip install --quiet --python $venv/bin/python -e $remote_dir 'jax[tpu]'"
  ssh_all "set -eo pipefail; $fetch; $install"
fi

# 3. The run: one process per worker.
if [[ $mode == env ]]; then
  # What jax.distributed.initialize() detects on a TPU VM (one slice): the worker number, and
  # the first of the workers' endpoints (name:id:ip or hostname) as the coordinator.
  # shellcheck disable=SC2016  # expanded on the worker
  dist='md() { curl -sf -H Metadata-Flavor:Google'
  dist+=' "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }'
  dist+='; eps=$(md worker-network-endpoints); rank=$(md agent-worker-number); first=${eps%%,*}'
  dist+='; export JAX_COORDINATOR_ADDRESS=${first##*:}:8476'
  dist+=' JAX_NUM_PROCESSES=$(echo "$eps" | tr , "\n" | wc -l) JAX_PROCESS_ID=$rank'
else
  dist="export JKD_DISTRIBUTED=auto"
fi
train="$venv/bin/python $(quote_all -m jkd.train --config "$config" --workdir "$workdir" \
        --config.train.progress_bar=False "$@")"
if [[ -n $detach ]]; then
  train="nohup $train > \$HOME/$remote_dir.log 2>&1 < /dev/null &"
fi
ssh_all "set -eo pipefail; cd $remote_dir; $dist; $train"
if [[ -n $detach && -z $dry_run ]]; then
  echo "tpu_vm.sh: started; follow it with:" >&2
  echo "  $(quote_all "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=0 \
        --command="tail -f ~/$remote_dir.log")" >&2
fi
