#!/usr/bin/env bash
# Runs seg_jax.main on every worker of a Cloud TPU VM slice at once; JAX
# finds the coordinator, process count and rank from the TPU metadata.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_vm.sh --config=configs/deeplabv3_resnet50_voc.py --workdir=gs://bucket/runs/dl3
#
# Environment:
#   TPU_NAME, ZONE  the slice (required); PROJECT  gcloud project (optional).
#   REPO_DIR        the repository on each worker (default: ~/seg_jax),
#                   installed there with pip install -e . "jax[tpu]".
# Expects: gcloud authenticated here, and a --workdir every worker can
# write (a GCS bucket, or a shared filesystem).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
repo=${REPO_DIR:-'~/seg_jax'}
args=$(printf ' %q' "$@")
project=()
if [[ -n ${PROJECT:-} ]]; then
  project=(--project="$PROJECT")
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" \
  --worker=all \
  --command="cd $repo && python3 -m seg_jax.main --distributed$args"
