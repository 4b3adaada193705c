#!/usr/bin/env bash
# N processes of `python -m jkd.train` on this machine, one jax.distributed run.
#
#   launch/local.sh N CONFIG WORKDIR [--config.key=value ...]
#
# Process 0 coordinates on a free localhost port; process i gets JAX_PROCESS_ID=i and writes
# WORKDIR/logs/proc<i>.log. The script waits for all of them. If one fails, the others are
# killed (SIGKILL: a checkpointed run resumes exactly) and the script exits with the failed
# rank's status, naming the rank and printing the tail of its log. SIGINT/SIGTERM to the
# script are passed on as SIGTERM: every process saves a checkpoint at the same step and stops
# (exit status 0 when all did; the same command resumes).
#
# Environment:
#   DEVICES_PER_PROC  simulated CPU devices per process (XLA_FLAGS
#                     --xla_force_host_platform_device_count); default: XLA's (1 on CPU)
#   JAX_PLATFORMS     default cpu; set it (e.g. JAX_PLATFORMS=cuda, or empty for JAX's
#                     choice) to run on accelerators
#   JKD_PORT          the coordinator port (default: a free one)
#   PYTHON            the interpreter (default: python3, or python)
#   TAIL_LINES        lines of a failed rank's log to print (default 30)
set -euo pipefail

usage() {
  [[ $# -gt 0 ]] && echo "error: $*" >&2
  cat >&2 <<'EOF'
usage: launch/local.sh N CONFIG WORKDIR [extra flags for python -m jkd.train ...]
  N        number of processes (a positive integer)
  CONFIG   configs/<name>.py[:arg]
  WORKDIR  the run's directory (logs in WORKDIR/logs/proc<i>.log)
example: DEVICES_PER_PROC=2 launch/local.sh 2 configs/kd_tiny.py /tmp/kd2 --config.train.steps=8
EOF
  exit 2
}

[[ $# -ge 3 ]] || usage "expected N CONFIG WORKDIR, got $# argument(s)"
num_procs=$1
config=$2
workdir=$3
shift 3
[[ $num_procs =~ ^[1-9][0-9]*$ ]] || usage "N must be a positive integer (got '$num_procs')"
[[ -f ${config%%:*} ]] || usage "config file '${config%%:*}' not found"
if [[ -n ${DEVICES_PER_PROC:-} && ! ${DEVICES_PER_PROC} =~ ^[1-9][0-9]*$ ]]; then
  usage "DEVICES_PER_PROC must be a positive integer (got '$DEVICES_PER_PROC')"
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$(command -v python3 || command -v python || true)}
[[ -n $python ]] || usage "no python found; set PYTHON=/path/to/python"
tail_lines=${TAIL_LINES:-30}

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's jkd, installed or not
export JAX_PLATFORMS=${JAX_PLATFORMS-cpu}
if [[ -n ${DEVICES_PER_PROC:-} ]]; then
  device_flag="--xla_force_host_platform_device_count=$DEVICES_PER_PROC"
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$device_flag"
fi
unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID
if ((num_procs > 1)); then
  # A free port (python3 from PATH: $PYTHON may be a wrapper of the training command).
  port_python=$(command -v python3 || command -v python || echo "$python")
  port=${JKD_PORT:-$("$port_python" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES=$num_procs
  if [[ $JAX_PLATFORMS == cpu ]]; then
    # Cross-process collectives between CPU devices.
    export JAX_CPU_COLLECTIVES_IMPLEMENTATION=${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo}
  fi
fi

logs="$workdir/logs"
mkdir -p "$logs"
pids=()

kill_all() {  # kill_all SIGNAL: the processes still running
  local pid
  for pid in "${pids[@]}"; do
    if [[ -n $pid ]]; then kill "-$1" "$pid" 2>/dev/null || true; fi
  done
}

forward_stop() {  # exit status: 0 when every process stopped cleanly (after saving)
  echo "local.sh: stopping: SIGTERM to every process (each saves a checkpoint)" >&2
  kill_all TERM
  local i status=0 code
  for i in "${!pids[@]}"; do
    [[ -n ${pids[i]} ]] || continue
    code=0
    wait "${pids[i]}" || code=$?
    pids[i]=""
    if ((code != 0)); then
      echo "local.sh: rank $i exited with status $code; see $logs/proc$i.log" >&2
      if ((status == 0)); then status=$code; fi
    fi
  done
  exit "$status"
}
trap forward_stop INT TERM
trap 'kill_all KILL' EXIT

echo "local.sh: $num_procs process(es), ${JAX_COORDINATOR_ADDRESS:-no coordinator}," \
     "JAX_PLATFORMS=${JAX_PLATFORMS:-auto}, logs in $logs/" >&2
for ((i = 0; i < num_procs; i++)); do
  JAX_PROCESS_ID=$i "$python" -m jkd.train --config "$config" --workdir "$workdir" "$@" \
    >"$logs/proc$i.log" 2>&1 &
  pids+=("$!")
done

running=$num_procs
while ((running > 0)); do
  for ((i = 0; i < num_procs; i++)); do
    pid=${pids[i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then continue; fi  # done, or running
    status=0
    wait "$pid" || status=$?
    pids[i]=""
    running=$((running - 1))
    if ((status != 0)); then
      kill_all KILL
      wait || true
      {
        echo "local.sh: rank $i failed (exit status $status); the other processes were killed."
        echo "---- last $tail_lines lines of $logs/proc$i.log ----"
        tail -n "$tail_lines" "$logs/proc$i.log"
        echo "----"
      } >&2
      exit "$status"
    fi
  done
  if ((running > 0)); then sleep 0.2; fi
done
echo "local.sh: all $num_procs process(es) finished; $(tail -n 1 "$logs/proc0.log")" >&2
