"""The Cloud TPU scripts against a stand-in slice: what reaches the workers.

A fake `gcloud` plays a one-worker slice in a temporary folder: `tpu-vm scp`
copies into the worker's home, `tpu-vm ssh --command` runs the command there
with bash; on the worker, `python3` and `pgrep` are fakes that record what they
were asked (`pgrep` lists the processes a test says are running). The scripts
run from a copy of launch/ in a fresh git repository, so a test can leave edits
uncommitted. (tests/test_train.py checks the commands of the dry runs.)
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

# Every test runs the scripts (bash, a fake gcloud, git): processes.
pytestmark = pytest.mark.slow

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

# On the worker. The aot stand-in answers as vit_jax.aot does: exit 0 when the
# config fits, 2 and one `error:` line when it does not (FAKE_AOT_ERROR).
_PYTHON3 = """#!/usr/bin/env bash
echo "$PWD JAX_PLATFORMS=${JAX_PLATFORMS-} $*" >> "$FAKE_WORKER/python3.log"
case "$*" in
  *vit_jax.aot*)
    if [ -n "${FAKE_AOT_ERROR-}" ]; then
      echo "error: $FAKE_AOT_ERROR" >&2; exit 2
    fi ;;
  -c*) echo '0.10.2 0 4' ;;
esac
"""

# Lists the lines of FAKE_PROCESSES (`pid command line`) that match, as
# `pgrep -af PATTERN` does; exit 1 when none.
_PGREP = """#!/usr/bin/env bash
[ "$1" = -af ] || exit 3
printf '%s' "${FAKE_PROCESSES-}" | grep -E -- "$2"
"""

RUN_FLAGS = (
    '--config=configs/tiny.py:b16',
    '--workdir=gs://bucket/run',
    '--config.batch=64',
)


def _git(repo, *args):
  subprocess.run(
      [
          'git',
          '-c',
          'user.name=test',
          '-c',
          'user.email=t@test',
          '-c',
          'commit.gpgsign=false',
          *args,
      ],
      cwd=repo,
      check=True,
      capture_output=True,
  )


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
  for name, text in (
      ('gcloud', _GCLOUD),
      ('python3', _PYTHON3),
      ('pgrep', _PGREP),
  ):
    (worker / 'bin' / name).write_text(text)
    (worker / 'bin' / name).chmod(0o755)
  return repo, worker


def _script(slice_, script, *args, **env):
  repo, worker = slice_
  env = (
      {
          k: v
          for k, v in os.environ.items()
          if k not in ('TOPOLOGY', 'SKIP_AOT', 'DRY_RUN', 'JAX_PLATFORMS')
      }
      | {
          'PATH': f'{worker / "bin"}:{os.environ["PATH"]}',
          'FAKE_WORKER': str(worker),
          'PROJECT': 'my-project',
          'TPU_NAME': 'pod',
          'ACCELERATOR': 'v4-8',
      }
      | env
  )
  return subprocess.run(
      ['bash', str(repo / 'launch' / script), *args],
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
  )


def _calls(slice_):
  """The remote commands so far (ssh --command, or scp), in order."""
  path = slice_[1] / 'gcloud.jsonl'
  calls = [json.loads(l) for l in open(path)] if path.exists() else []
  return [
      next((a for a in c if a.startswith('--command=')), ' '.join(c[3:]))
      for c in calls
  ]


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
  commit = subprocess.run(
      ['git', 'rev-parse', '--short', 'HEAD'],
      cwd=repo,
      capture_output=True,
      text=True,
  ).stdout.strip()
  assert result.stdout.startswith(
      f'Deploying {commit} with 3 uncommitted changes (committed_then_deleted'
      '.txt configs/new.py configs/tiny.py) to pod\n'
  ), result.stdout
  deployed = worker / 'home' / 'vit_jax'
  assert (deployed / 'configs' / 'tiny.py').read_text() == (
      'batch = 16  # tweaked\n'
  )
  assert (deployed / 'configs' / 'new.py').exists()
  assert not (deployed / 'committed_then_deleted.txt').exists()
  assert not (deployed / 'ignored').exists()
  assert (deployed / 'launch' / 'tpu_run.sh').exists()
  # The user's index is untouched: the edits are still uncommitted, unstaged.
  status = subprocess.run(
      ['git', 'status', '--porcelain'], cwd=repo, capture_output=True, text=True
  ).stdout
  assert ' M configs/tiny.py' in status and '?? configs/new.py' in status


def test_setup_installs_with_the_constraints_file(slice_):
  _deploy(slice_)
  deployed = slice_[1] / 'home' / 'vit_jax'
  install, check = _python3(slice_)
  assert install == (
      f'{deployed} JAX_PLATFORMS= -m pip install -q '
      '-c constraints.txt -e .[tpu]'
  )
  assert check.startswith(f'{deployed} JAX_PLATFORMS= -c import jax')
  assert (deployed / 'constraints.txt').read_text().count('libtpu==') == 1


def test_run_checks_the_slice_compiles_for_it_then_starts(slice_):
  _deploy(slice_)
  result = _script(slice_, 'tpu_run.sh', *RUN_FLAGS)
  assert result.returncode == 0, result.stderr
  check, aot, start = _calls(slice_)[-3:]
  assert 'pgrep' in check and '.deployed_tree' in check
  assert 'vit_jax.aot' in aot and 'vit_jax.main' in start
  *_, aot_call, main_call = _python3(slice_)
  home = slice_[1] / 'home'
  assert aot_call == (
      f'{home / "vit_jax"} JAX_PLATFORMS=cpu -m vit_jax.aot '
      '--topology=v4:2x2x1 --config=configs/tiny.py:b16 '
      '--config.batch=64'
  )
  assert main_call.endswith(
      '-m vit_jax.main --distributed ' + ' '.join(RUN_FLAGS)
  )
  assert 'Started on all workers of pod' in result.stdout


@pytest.mark.parametrize(
    'running, message',
    [
        (
            '4242 python3 -m vit_jax.main --distributed '
            '--config=configs/tiny.py:b16'
            ' --workdir=gs://bucket/run/\n',
            'error: a run is already running into gs://bucket/run on pod '
            '(pid 4242):'
            ' follow it with launch/tpu_logs.sh, or stop it first with '
            'launch/tpu_stop.sh\n',
        ),
        (
            '4343 python3 -m vit_jax.main --distributed --workdir gs://bucket/other\n',
            'error: pod is busy with another run '
            '(pid 4343: python3 -m vit_jax.main '
            '--distributed --workdir gs://bucket/other): stop it with '
            'launch/tpu_stop.sh, or use another TPU_NAME\n',
        ),
    ],
)
def test_run_refuses_while_a_run_is_running(slice_, running, message):
  _deploy(slice_)
  deployed = len(_calls(slice_))
  unrelated = '77 python3 -m vit_jax.evaluate --workdir=gs://bucket/run\n'
  result = _script(
      slice_, 'tpu_run.sh', *RUN_FLAGS, FAKE_PROCESSES=unrelated + running
  )
  assert (result.returncode, result.stderr) == (2, message)
  (check,) = _calls(slice_)[deployed:]  # Nothing compiled, nothing started.
  assert 'pgrep' in check


def test_run_does_not_start_what_does_not_fit(slice_):
  _deploy(slice_)
  result = _script(
      slice_,
      'tpu_run.sh',
      *RUN_FLAGS,
      FAKE_AOT_ERROR='out of memory: 40 GiB of 32 GiB per device',
  )
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      'error: out of memory: 40 GiB of 32 GiB per device',
      'error: not started: the config does not compile or fit on v4:2x2x1 '
      "(vit_jax.aot's error above)",
  ]
  assert not any('-m vit_jax.main' in c for c in _calls(slice_))


def test_run_refuses_a_checkout_that_differs_from_the_deployed_one(slice_):
  repo, _ = slice_
  result = _script(slice_, 'tpu_run.sh', *RUN_FLAGS)
  assert (result.returncode, result.stderr) == (
      2,
      'error: nothing deployed on pod: run launch/tpu_setup.sh first\n',
  )
  _deploy(slice_)
  (repo / 'configs' / 'tiny.py').write_text('batch = 16  # after setup\n')
  result = _script(slice_, 'tpu_run.sh', *RUN_FLAGS)
  assert (result.returncode, result.stderr) == (
      2,
      'error: pod holds another version of this checkout (differing: '
      'configs/tiny.py): run launch/tpu_setup.sh first\n',
  )
  assert not any('-m vit_jax.main' in c for c in _calls(slice_))
  _deploy(slice_)
  assert _script(slice_, 'tpu_run.sh', *RUN_FLAGS).returncode == 0


def test_run_topology_from_the_accelerator_or_the_user(slice_):
  _deploy(slice_)
  for env, topology in (
      ({'ACCELERATOR': 'v5litepod-16'}, 'v5e:4x4'),
      ({'ACCELERATOR': 'v5p-32'}, 'v5:2x2x4'),
      ({'TOPOLOGY': 'v4:4x4x4'}, 'v4:4x4x4'),
  ):
    assert _script(slice_, 'tpu_run.sh', *RUN_FLAGS, **env).returncode == 0
    assert f'--topology={topology} ' in _python3(slice_)[-2]
  result = _script(slice_, 'tpu_run.sh', *RUN_FLAGS, ACCELERATOR='v9-8')
  assert (result.returncode, result.stderr) == (
      2,
      'error: no topology known for ACCELERATOR=v9-8: set TOPOLOGY (e.g. '
      'TOPOLOGY=v4:2x2x4) or SKIP_AOT=1\n',
  )
  before = len(_python3(slice_))
  result = _script(
      slice_, 'tpu_run.sh', *RUN_FLAGS, ACCELERATOR='v9-8', SKIP_AOT='1'
  )
  assert result.returncode == 0, result.stderr
  assert ['vit_jax.main' in c for c in _python3(slice_)[before:]] == [True]


@pytest.mark.skipif(not shutil.which('pgrep'), reason='needs pgrep')
def test_the_running_check_lists_a_run_and_not_itself(tmp_path):
  # The real pgrep on this machine, against a process named like a run.
  env = dict(os.environ, DRY_RUN='1', PROJECT='p', TPU_NAME='pod')
  dry = subprocess.run(
      ['bash', os.path.join(REPO, 'launch', 'tpu_run.sh'), *RUN_FLAGS],
      env=env,
      capture_output=True,
      text=True,
      check=True,
  ).stdout
  check = shlex.split(dry.splitlines()[0])[-1][len('--command=') :]
  name = 'python3 -m vit_jax.main --distributed --workdir=gs://bucket/run'
  run = subprocess.Popen(['bash', '-c', f'exec -a "{name}" sleep 60'])
  try:
    for _ in range(100):  # Until the exec happened.
      listed = subprocess.run(
          ['bash', '-c', check],
          capture_output=True,
          text=True,
          env=dict(env, HOME=str(tmp_path)),
          check=True,
      ).stdout
      if f'{run.pid} {name}' in listed:
        break
    assert listed.startswith('deployed none\n')
    assert f'\n{run.pid} {name}' in listed
    assert 'pgrep' not in listed  # The check's own shell is not a run.
  finally:
    run.kill()
    run.wait()
