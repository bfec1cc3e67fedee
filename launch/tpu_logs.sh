#!/usr/bin/env bash
# Follows the training log of one worker (default 0; process 0 writes the
# metrics). Usage: launch/tpu_logs.sh [WORKER]
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" \
  --project="$PROJECT" --worker="${1:-0}" --command="tail -n 100 -f ~/$LOG_FILE"
