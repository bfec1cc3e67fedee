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

# Runs a shell command on every worker of the slice (one VM: worker 0).
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" \
    --project="$PROJECT" --worker=all --command="$1"
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
