#!/usr/bin/env bash
# Copies this checkout as it is on disk (uncommitted edits and untracked files
# included, .gitignore'd ones not) to every worker, and installs it there with
# the tested versions: `pip install -c constraints.txt -e .[tpu]` (jax, jaxlib
# and libtpu pinned). Usage: launch/tpu_setup.sh
set -euo pipefail
source "$(dirname "$0")/tpu_env.sh"
tree=$(worktree_tree)
commit=$(git -C "$root" rev-parse --short HEAD)
changed=$(git -C "$root" diff --no-renames --name-only HEAD "$tree")
if [ -n "$changed" ]; then
  count=$(grep -c '' <<< "$changed")
  names=$(head -n 5 <<< "$changed" | tr '\n' ' ')
  [ "$count" -le 5 ] || names+='...'
  echo "Deploying $commit with $count uncommitted changes (${names% }) to \
$TPU_NAME"
else
  echo "Deploying $commit to $TPU_NAME"
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
archive="$scratch/vit_jax.tar.gz"
run git -C "$root" archive --format=tar.gz -o "$archive" "$tree"
[ "$DRY_RUN" = 1 ] || echo "Archive: $(du -h "$archive" | cut -f1)"
run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/vit_jax.tar.gz" \
  --zone="$ZONE" --project="$PROJECT" --worker=all
# .deployed_tree, written once the install succeeded, is how tpu_run.sh knows
# which checkout the workers run.
on_all_workers "rm -rf ~/$REPO_DIR && mkdir -p ~/$REPO_DIR && \
tar -xzf ~/vit_jax.tar.gz -C ~/$REPO_DIR && cd ~/$REPO_DIR && \
python3 -m pip install -q -c constraints.txt -e '.[tpu]' && \
echo $tree > .deployed_tree && \
python3 -c 'import jax; print(jax.__version__, jax.process_index(), \
jax.device_count())'"
