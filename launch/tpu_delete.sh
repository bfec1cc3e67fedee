#!/usr/bin/env bash
# Deletes the TPU VM / pod slice (stops billing). Usage: launch/tpu_delete.sh
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" \
  --project="$PROJECT" --quiet
