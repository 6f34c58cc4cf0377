#!/usr/bin/env bash
# Runs N processes of a seg_jax CLI on this machine as one JAX job: they
# meet at a coordinator on 127.0.0.1 (JAX's distributed runtime) and, on
# CPU, exchange data over gloo.
#
#   launch/local_multiprocess.sh N [MODULE] ARGS...
#
#   N       number of processes (process 0 writes logs and summaries).
#   MODULE  the CLI to run: seg_jax.main (default) or seg_jax.evaluate.
#   ARGS    its flags, e.g. --config=configs/unet_shapes.py --workdir=runs/x
#
# Environment:
#   JAX_PLATFORMS  default cpu. Devices per CPU process:
#                  XLA_FLAGS=--xla_force_host_platform_device_count=K
#   PORT           coordinator port (default: a free one).
#   PYTHON         interpreter (default: python3).
#   ONE_DEVICE_PER_PROCESS=1  process i sees only local device i (GPUs).
#
# If any process fails, the others are stopped; the exit status is the
# first failure's (0 when all succeed). A process stopped by a signal after
# saving (status 130 or 143: Ctrl-C, SIGTERM) is not a failure: the others
# stop at the same step, and the status is that one.
set -euo pipefail

usage() {
  echo "usage: $0 N [MODULE] ARGS..." >&2
  exit 2
}

[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
n=$1
shift
module=seg_jax.main
if [[ ${1:-} == seg_jax.* ]]; then
  module=$1
  shift
fi
python=${PYTHON:-python3}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export JAX_COORDINATOR_ADDRESS=127.0.0.1:$port
export JAX_NUM_PROCESSES=$n

pids=()
stop_all() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap 'stop_all; wait; exit 130' INT
trap 'stop_all; wait; exit 143' TERM

for ((i = 0; i < n; i++)); do
  if [[ ${ONE_DEVICE_PER_PROCESS:-0} == 1 ]]; then
    JAX_PROCESS_ID=$i JAX_LOCAL_DEVICE_IDS=$i "$python" -m "$module" "$@" &
  else
    JAX_PROCESS_ID=$i "$python" -m "$module" "$@" &
  fi
  pids+=("$!")
done

remaining=$n
stopped=0
while ((remaining > 0)); do
  if wait -n; then
    remaining=$((remaining - 1))
  else
    status=$?
    if ((status == 130 || status == 143)); then
      stopped=$status
      remaining=$((remaining - 1))
      continue
    fi
    echo "$0: a process exited with status $status; stopping the others." >&2
    stop_all
    wait || true
    exit "$status"
  fi
done
exit "$stopped"
