#!/usr/bin/env bash
# Stops the run on every worker with SIGTERM, as a preemption does: vit_jax.main
# saves a checkpoint and exits; launch/tpu_run.sh with the same flags resumes.
# Usage: launch/tpu_stop.sh
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
# [.]: the pattern does not match this command's own shell.
on_all_workers "pkill -TERM -f 'vit_jax[.]main' || echo 'no run on this worker'"
echo "Asked the run on $TPU_NAME to save and stop; launch/tpu_logs.sh shows it"
