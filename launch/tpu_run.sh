#!/usr/bin/env bash
# Starts the same training command on every worker (in the background), once
# worker 0 has shown that nothing runs on the slice, that it holds this
# checkout as it is on disk (launch/tpu_setup.sh), and that the config
# compiles and fits in memory on the slice (vit_jax.aot).
# Usage: launch/tpu_run.sh --config=configs/finetune.py:b16,cifar10 \
#          --workdir=gs://BUCKET/run [--config.field=value ...]
# The workdir must be on GCS (every worker writes/reads checkpoints there).
# TOPOLOGY=v4:2x2x4 names the slice's topology where ACCELERATOR does not;
# SKIP_AOT=1 skips the compile check.
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
usage="usage: $0 --config=... --workdir=gs://... [flags]"
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }

# The workdir (one run at a time into it) and the config flags (vit_jax.aot's).
flags=("$@") workdir='' config_flags=()
for ((i = 0; i < ${#flags[@]}; i++)); do
  case ${flags[i]} in
    --workdir=*) workdir=${flags[i]#--workdir=} ;;
    --workdir) workdir=${flags[i + 1]-}; i=$((i + 1)) ;;
    --config=* | --config.*=*) config_flags+=("${flags[i]}") ;;
    --config | --config.*)
      config_flags+=("${flags[i]}" "${flags[i + 1]-}"); i=$((i + 1)) ;;
  esac
done
[ -n "$workdir" ] || die "--workdir is required ($usage)"
if [ "${SKIP_AOT:-0}" != 1 ] && [ -z "${TOPOLOGY:-}" ]; then
  TOPOLOGY=$(tpu_topology "$ACCELERATOR") || die "no topology known for \
ACCELERATOR=$ACCELERATOR: set TOPOLOGY (e.g. TOPOLOGY=v4:2x2x4) or SKIP_AOT=1"
fi

# Worker 0: the deployed checkout's tree, and its vit_jax.main processes
# (`pid command line`; [.] keeps this command's own shell out of the list).
ask_worker0 "echo deployed \$(cat ~/$REPO_DIR/.deployed_tree 2>/dev/null \
|| echo none); pgrep -af 'vit_jax[.]main' || true"
deployed=$(sed -n 's/^deployed //p' <<< "$REPLY")
running=$(grep -E '^[0-9]+ ' <<< "$REPLY" || true)
if [ -n "$running" ]; then
  while IFS= read -r process; do
    case " $process " in
      *" --workdir=${workdir%/} "* | *" --workdir=${workdir%/}/ "* | \
      *" --workdir ${workdir%/} "* | *" --workdir ${workdir%/}/ "*)
        die "a run is already running into $workdir on $TPU_NAME (pid \
${process%% *}): follow it with launch/tpu_logs.sh, or stop it first with \
launch/tpu_stop.sh" ;;
    esac
  done <<< "$running"
  process=$(head -n 1 <<< "$running")
  die "$TPU_NAME is busy with another run (pid ${process%% *}: \
${process#* }): stop it with launch/tpu_stop.sh, or use another TPU_NAME"
fi
if [ "$DRY_RUN" != 1 ]; then
  tree=$(worktree_tree)
  [ "$deployed" != none ] || die "nothing deployed on $TPU_NAME: run \
launch/tpu_setup.sh first"
  if [ "$deployed" != "$tree" ]; then
    changed=$(git -C "$root" diff --no-renames --name-only "$deployed" "$tree" \
      2>/dev/null | head -n 5 | tr '\n' ' ') || true
    changed=${changed% }
    die "$TPU_NAME holds another version of this checkout (differing: \
${changed:-unknown, deployed from another clone}): run launch/tpu_setup.sh \
first"
  fi
fi

# The compile check, on worker 0 with the deployed code and its pinned jax and
# libtpu: deviceless (JAX_PLATFORMS=cpu keeps the TPU free; libtpu compiles
# for TOPOLOGY), so it is the program the run will compile.
if [ "${SKIP_AOT:-0}" = 1 ]; then
  echo "Not compiling for the slice first (SKIP_AOT=1)"
else
  echo "Compiling for $TOPOLOGY on worker 0 of $TPU_NAME (vit_jax.aot)"
  aot_flags=$(printf '%q ' ${config_flags[@]+"${config_flags[@]}"})
  if run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" \
    --project="$PROJECT" --worker=0 --command="cd ~/$REPO_DIR && \
JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python3 -m vit_jax.aot \
--topology=$TOPOLOGY $aot_flags"; then
    status=0
  else
    status=$?
  fi
  [ "$status" != 2 ] || die "not started: the config does not compile or \
fit on $TOPOLOGY (vit_jax.aot's error above)"
  [ "$status" = 0 ] || die "not started: the compile check failed on worker \
0 of $TPU_NAME (exit $status, output above); SKIP_AOT=1 starts without it"
fi

args=$(printf '%q ' "$@")
on_all_workers "cd ~/$REPO_DIR && nohup python3 -m vit_jax.main --distributed \
$args > ~/$LOG_FILE 2>&1 &"
echo "Started on all workers of $TPU_NAME; follow with launch/tpu_logs.sh"
