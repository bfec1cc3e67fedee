#!/usr/bin/env bash
# Starts the same training command on every worker (in the background).
# Usage: launch/tpu_run.sh --config=configs/finetune.py:b16,cifar10 \
#          --workdir=gs://BUCKET/run [--config.field=value ...]
# The workdir must be on GCS (every worker writes/reads checkpoints there).
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
[ $# -gt 0 ] || { echo "usage: $0 --config=... --workdir=gs://... [flags]" >&2; exit 2; }
args=$(printf '%q ' "$@")
on_all_workers "cd ~/$REPO_DIR && nohup python3 -m vit_jax.main --distributed \
$args > ~/$LOG_FILE 2>&1 &"
echo "Started on all workers of $TPU_NAME; follow with launch/tpu_logs.sh"
