#!/usr/bin/env bash
# Copies this checkout to every worker and installs it with JAX for TPU.
# Usage: launch/tpu_setup.sh
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
archive="$(mktemp -d)/vit_jax.tar.gz"
run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/vit_jax.tar.gz" \
  --zone="$ZONE" --project="$PROJECT" --worker=all
on_all_workers "rm -rf ~/$REPO_DIR && mkdir -p ~/$REPO_DIR && \
tar -xzf ~/vit_jax.tar.gz -C ~/$REPO_DIR && cd ~/$REPO_DIR && \
pip install -q -U 'jax[tpu]' && pip install -q -e . && \
python3 -c 'import jax; print(jax.process_index(), jax.device_count())'"
