# Settings shared by the Cloud TPU scripts; override any of them in the
# environment. Sourced, not run.
: "${TPU_NAME:=vit-jax}"                      # TPU VM / pod slice name.
: "${ZONE:=us-central2-b}"                    # Zone with TPU quota.
: "${ACCELERATOR:=v4-8}"                      # v4-8 = one VM; v4-32 = a pod slice.
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"   # TPU VM software version.
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${REPO_DIR:=vit_jax}"                      # Checkout directory on every worker.
: "${LOG_FILE:=vit_jax_train.log}"            # Log file on every worker.
: "${DRY_RUN:=0}"                             # 1: print the commands only.

# The checkout these scripts belong to (what tpu_setup.sh deploys).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Runs (or, with DRY_RUN=1, prints) a command.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

# Runs a command for its output, kept in REPLY; with DRY_RUN=1 prints the
# command and leaves REPLY empty.
ask() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@"; echo
    REPLY=''
  else
    REPLY=$("$@")
  fi
}

# Refuses in one line (house style of every vit_jax command).
die() {
  echo "error: $*" >&2
  exit 2
}

# Runs a shell command on every worker of the slice (one VM: worker 0).
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" \
    --project="$PROJECT" --worker=all --command="$1"
}

# The same on worker 0 only, the output kept in REPLY (see ask).
ask_worker0() {
  ask gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" \
    --project="$PROJECT" --worker=0 --command="$1"
}

# Prints the git tree id of the checkout as it is on disk: tracked files as
# they are now (committed or not) and untracked ones that .gitignore does not
# exclude. The user's index, branch and files are left alone (a scratch index;
# git keeps the snapshot's objects until its next gc).
worktree_tree() {
  local scratch
  scratch=$(mktemp -d)
  (
    cd "$root"
    # Starting from the real index makes `git add` re-read changed files only.
    cp "$(git rev-parse --git-path index)" "$scratch/index" 2>/dev/null || true
    GIT_INDEX_FILE="$scratch/index" git add -A
    GIT_INDEX_FILE="$scratch/index" git write-tree
  ) || { rm -rf "$scratch"; return 1; }
  rm -rf "$scratch"
}

# Prints the topology name vit_jax.aot compiles for (jax's form, e.g.
# v4:2x2x4) of an accelerator type's default shape (e.g. v4-32); fails for a
# type it does not know (then set TOPOLOGY).
tpu_topology() {
  local kind=${1%-*} size=${1##*-} shape=''
  [[ $size =~ ^[0-9]+$ ]] || return 1
  case $kind in
    v4|v5p)  # The size counts TensorCores: two per chip.
      case $((size / 2)) in
        4) shape=2x2x1 ;; 8) shape=2x2x2 ;; 16) shape=2x2x4 ;;
        32) shape=2x4x4 ;; 64) shape=4x4x4 ;; 128) shape=4x4x8 ;;
        256) shape=4x8x8 ;; 512) shape=8x8x8 ;; 1024) shape=8x8x16 ;;
        2048) shape=8x16x16 ;;
      esac
      [ "$kind" = v5p ] && kind=v5 ;;  # libtpu's name for v5p.
    v5litepod|v5e|v6e)  # The size counts chips.
      case $size in
        1) shape=1x1 ;; 4) shape=2x2 ;; 8) shape=2x4 ;; 16) shape=4x4 ;;
        32) shape=4x8 ;; 64) shape=8x8 ;; 128) shape=8x16 ;; 256) shape=16x16 ;;
      esac
      [ "$kind" = v5litepod ] && kind=v5e ;;
  esac
  [ -n "$shape" ] || return 1
  echo "$kind:$shape"
}
