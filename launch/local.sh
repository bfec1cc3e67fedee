#!/usr/bin/env bash
# Rehearses a pod run on this machine: N CPU processes, D devices each.
# Usage: launch/local.sh N D --config=configs/digits.py:runlocal --workdir=DIR
set -euo pipefail
n=${1:?usage: local.sh NUM_PROCESSES DEVICES_PER_PROCESS main.py flags...}
d=${2:?usage: local.sh NUM_PROCESSES DEVICES_PER_PROCESS main.py flags...}
shift 2
exec python3 "$(dirname "$0")/local.py" --num_processes="$n" \
  --devices_per_process="$d" -- python3 -m vit_jax.main "$@"
