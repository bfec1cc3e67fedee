#!/usr/bin/env bash
# Creates a TPU VM or pod slice. Usage: [SPOT=1] launch/tpu_create.sh
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
extra=()
[ "${SPOT:-0}" = 1 ] && extra+=(--spot)
run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
  --project="$PROJECT" --accelerator-type="$ACCELERATOR" \
  --version="$RUNTIME_VERSION" "${extra[@]}"
