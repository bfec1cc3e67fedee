#!/usr/bin/env bash
# Submits launch/slurm.sbatch with the options of a GPU cluster run.
# Usage: NODES=2 GPUS_PER_NODE=8 [PER=gpu|node] [PARTITION=p] [TIME=24:00:00]
#        [ACCOUNT=a] launch/slurm_submit.sh --config=... --workdir=... [flags]
# DRY_RUN=1 prints the sbatch command instead of submitting it.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 --config=... --workdir=... [flags]" >&2; exit 2; }
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PER=${PER:-gpu}
case "$PER" in
  gpu) tasks=$GPUS_PER_NODE ;;
  node) tasks=1 ;;
  *) echo "PER=$PER: use gpu (one process per GPU) or node" >&2; exit 2 ;;
esac
opts=(--nodes="$NODES" --ntasks-per-node="$tasks"
      --gpus-per-node="$GPUS_PER_NODE" --export=ALL,PER="$PER",GPUS_PER_NODE="$GPUS_PER_NODE")
[ -n "${PARTITION:-}" ] && opts+=(--partition="$PARTITION")
[ -n "${TIME:-}" ] && opts+=(--time="$TIME")
[ -n "${ACCOUNT:-}" ] && opts+=(--account="$ACCOUNT")
cmd=(sbatch "${opts[@]}" "$(dirname "$0")/slurm.sbatch" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
fi
