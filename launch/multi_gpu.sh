#!/usr/bin/env bash
# Trains on every GPU of this machine.
#
#   launch/multi_gpu.sh ARGS...                    one process drives all GPUs
#   PROCESSES=per-gpu launch/multi_gpu.sh ARGS...  one process per GPU
#
#   ARGS  flags of seg_jax.main (or a MODULE first, as for
#         local_multiprocess.sh), e.g.
#         --config=configs/deeplabv3_resnet50_voc.py --workdir=runs/dl3
#
# Expects: jax with CUDA (pip install -U "jax[cuda12]") and nvidia-smi.
# One process is simplest and as fast on one host; per-gpu mirrors a
# multi-node layout (one JAX process per device) on one machine.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}

case ${PROCESSES:-one} in
  one)
    exec "${PYTHON:-python3}" -m seg_jax.main "$@"
    ;;
  per-gpu)
    if ! command -v nvidia-smi >/dev/null; then
      echo "$0: nvidia-smi not found: PROCESSES=per-gpu needs NVIDIA GPUs and their driver." >&2
      exit 1
    fi
    gpus=$( (nvidia-smi --list-gpus 2>/dev/null || true) | wc -l)
    if ((gpus < 1)); then
      echo "$0: nvidia-smi lists no GPU." >&2
      exit 1
    fi
    ONE_DEVICE_PER_PROCESS=1 exec "$here/local_multiprocess.sh" "$gpus" "$@"
    ;;
  *)
    echo "$0: PROCESSES=${PROCESSES} must be 'one' or 'per-gpu'." >&2
    exit 2
    ;;
esac
