#!/usr/bin/env bash
# Fine-tunes one model on the 19 VTAB-1k tasks, one after the other, each in
# its own workdir ROOT/<task>, then prints the table of the three groups.
# Usage: launch/vtab.sh MODEL ROOT [vit_jax.main flags...]
#   launch/vtab.sh b16 /tmp/vtab_b16 --config.pretrained_path=ViT-B_16.npz
# TASKS="dtd svhn" runs those tasks only; DRY_RUN=1 prints the commands.
# Run it again after an interruption: a finished task is left as it is and
# an interrupted one resumes (the workdir is the run's identity). A task that
# fails does not stop the others; the script then exits 1 naming it.
set -euo pipefail
model=${1:?usage: vtab.sh MODEL ROOT [vit_jax.main flags...]}
root=${2:?usage: vtab.sh MODEL ROOT [vit_jax.main flags...]}
shift 2
python=${PYTHON:-python3}
config="$(cd "$(dirname "$0")/.." && pwd)/configs/vtab.py"
tasks=${TASKS:-$("$python" -c \
  'from vit_jax.datasets import vtab; print(*vtab.TASKS)')}

run() {
  if [ -n "${DRY_RUN-}" ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

failed=()
for task in $tasks; do
  run "$python" -m vit_jax.main "--config=$config:$model,$task" \
    "--workdir=$root/$task" "$@" || failed+=("$task")
done
status=0
run "$python" -m vit_jax.vtab_summary "--workdirs=$root" || status=1
if [ ${#failed[@]} -gt 0 ]; then
  echo "vtab.sh: ${#failed[@]} task(s) failed: ${failed[*]}" >&2
  status=1
fi
exit $status
