"""The Cloud TPU scripts against a stand-in slice: what reaches the workers.

A fake `gcloud` plays a one-worker slice in a temporary folder: `tpu-vm scp`
copies into the worker's home, `tpu-vm ssh --command` runs the command there
with bash; on the worker, `python3` is a fake that records what it was asked.
The scripts run from a copy of launch/ in a fresh git repository, so a test can
leave edits uncommitted. (tests/test_train.py checks the commands of the dry runs.)
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
worker = os.environ['FAKE_WORKER']
with open(os.path.join(worker, 'gcloud.jsonl'), 'a') as f:
  f.write(json.dumps(args) + '\\n')
home = os.path.join(worker, 'home')
assert args[:3] == ['compute', 'tpus', 'tpu-vm'], args
if args[3] == 'scp':
  shutil.copy(args[4], os.path.join(home, args[5].split(':~/')[1]))
elif args[3] == 'ssh':
  (command,) = [a[len('--command='):] for a in args
                if a.startswith('--command=')]
  # As sshd would not: waits for what the command left in the background.
  sys.exit(subprocess.run(['bash', '-c', command + '\\nstatus=$?; wait; '
                           'exit $status'], cwd=home,
                          env=dict(os.environ, HOME=home)).returncode)
"""

# On the worker.
_PYTHON3 = """#!/usr/bin/env bash
echo "$PWD JAX_PLATFORMS=${JAX_PLATFORMS-} $*" >> "$FAKE_WORKER/python3.log"
case "$*" in
  -c*) echo '0.10.2 0 4' ;;
esac
"""


def _git(repo, *args):
  subprocess.run(['git', '-c', 'user.name=test', '-c', 'user.email=t@test',
                  '-c', 'commit.gpgsign=false', *args], cwd=repo, check=True,
                 capture_output=True)


@pytest.fixture
def slice_(tmp_path):
  """A committed checkout (with launch/) and a fake one-worker slice."""
  repo = tmp_path / 'repo'
  shutil.copytree(os.path.join(REPO, 'launch'), repo / 'launch')
  shutil.copy(os.path.join(REPO, 'constraints.txt'), repo)
  (repo / 'configs').mkdir()
  (repo / 'configs' / 'tiny.py').write_text('batch = 8\n')
  (repo / 'committed_then_deleted.txt').write_text('x\n')
  (repo / '.gitignore').write_text('ignored/\n')
  _git(repo, 'init', '-q')
  _git(repo, 'add', '-A')
  _git(repo, 'commit', '-q', '-m', 'initial')
  worker = tmp_path / 'worker'
  (worker / 'home').mkdir(parents=True)
  (worker / 'bin').mkdir()
  for name, text in (('gcloud', _GCLOUD), ('python3', _PYTHON3)):
    (worker / 'bin' / name).write_text(text)
    (worker / 'bin' / name).chmod(0o755)
  return repo, worker


def _script(slice_, script, *args, **env):
  repo, worker = slice_
  env = {k: v for k, v in os.environ.items()
         if k not in ('TOPOLOGY', 'SKIP_AOT', 'DRY_RUN', 'JAX_PLATFORMS')} | {
             'PATH': f'{worker / "bin"}:{os.environ["PATH"]}',
             'FAKE_WORKER': str(worker), 'PROJECT': 'my-project',
             'TPU_NAME': 'pod', 'ACCELERATOR': 'v4-8'} | env
  return subprocess.run(['bash', str(repo / 'launch' / script), *args],
                        env=env, capture_output=True, text=True, timeout=60)


def _python3(slice_):
  path = slice_[1] / 'python3.log'
  return path.read_text().splitlines() if path.exists() else []


def _deploy(slice_):
  result = _script(slice_, 'tpu_setup.sh')
  assert result.returncode == 0, result.stderr
  return result


def test_setup_deploys_the_working_tree_with_its_uncommitted_edits(slice_):
  repo, worker = slice_
  (repo / 'configs' / 'tiny.py').write_text('batch = 16  # tweaked\n')
  (repo / 'configs' / 'new.py').write_text('batch = 32\n')
  (repo / 'committed_then_deleted.txt').unlink()
  (repo / 'ignored').mkdir()
  (repo / 'ignored' / 'checkpoint.npz').write_text('big\n')
  result = _deploy(slice_)
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=repo,
                          capture_output=True, text=True).stdout.strip()
  assert result.stdout.startswith(
      f'Deploying {commit} with 3 uncommitted changes (committed_then_deleted'
      '.txt configs/new.py configs/tiny.py) to pod\n'), result.stdout
  deployed = worker / 'home' / 'vit_jax'
  assert (deployed / 'configs' / 'tiny.py').read_text() == (
      'batch = 16  # tweaked\n')
  assert (deployed / 'configs' / 'new.py').exists()
  assert not (deployed / 'committed_then_deleted.txt').exists()
  assert not (deployed / 'ignored').exists()
  assert (deployed / 'launch' / 'tpu_run.sh').exists()
  # The user's index is untouched: the edits are still uncommitted, unstaged.
  status = subprocess.run(['git', 'status', '--porcelain'], cwd=repo,
                          capture_output=True, text=True).stdout
  assert ' M configs/tiny.py' in status and '?? configs/new.py' in status


def test_setup_installs_with_the_constraints_file(slice_):
  _deploy(slice_)
  deployed = slice_[1] / 'home' / 'vit_jax'
  install, check = _python3(slice_)
  assert install == (f'{deployed} JAX_PLATFORMS= -m pip install -q '
                     '-c constraints.txt -e .[tpu]')
  assert check.startswith(f'{deployed} JAX_PLATFORMS= -c import jax')
  assert (deployed / 'constraints.txt').read_text().count('libtpu==') == 1
