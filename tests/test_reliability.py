"""Reliability: kill anywhere and resume exactly, SIGTERM, determinism.

The runs go through the command line (`python -m vit_jax.main`) in
subprocesses, as a scheduler would start them, on one CPU device each (the
2-process test: 2 x 4 devices).
"""

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import run_checkpoints
from vit_jax import train

# The slow tier: training processes killed and restarted.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 60
CHECKPOINT_EVERY = 3
# Wall-clock figures in metrics.jsonl (clu's progress report); everything else
# must be identical between an interrupted and an uninterrupted run.
TIMING_KEYS = {'steps_per_sec', 'uptime'}
RESTORE_RE = re.compile(r'Restoring checkpoint step (\d+)')
TRAIN_LOG_RE = re.compile(r'\[(\d+)\] train/')
PREEMPTED_RE = re.compile(
    r'Preemption notice \(SIGTERM\): saved checkpoint ' r'step (\d+)'
)


def cli_args(workdir, tfds_dir, *extra):
  """A seconds-long digits run: tiny model, dropout, augmentation, EMA, and
  the AugReg recipe (RandAugment, Mixup, stochastic depth)."""
  return [
      sys.executable,
      '-m',
      'vit_jax.main',
      '--config=configs/digits.py:runlocal',
      f'--workdir={workdir}',
      f'--config.tfds_data_dir={tfds_dir}',
      '--config.model_name=testing',
      '--config.pp.inception_crop=True',
      '--config.pp.randaugment=(2, 10)',
      '--config.mixup_alpha=0.2',
      '--config.model.stochastic_depth=0.1',
      f'--config.total_steps={TOTAL_STEPS}',
      '--config.log_every=1',
      '--config.eval_every=20',
      f'--config.checkpoint_every={CHECKPOINT_EVERY}',
      '--config.keep_checkpoints=2',
      '--config.evals.fewshot.every=20',
      *extra,
  ]


def start(args, log_path, env):
  log = open(log_path, 'w')
  proc = subprocess.Popen(
      args,
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      env=env,
      start_new_session=True,
  )
  proc.log_file = log
  return proc


def finish(proc, timeout=300):
  try:
    code = proc.wait(timeout=timeout)
  finally:
    proc.log_file.close()
  return code


def read(path):
  with open(path) as f:
    return f.read()


def complete_steps(workdir):
  directory = os.path.join(workdir, run_checkpoints.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def partial_saves(workdir):
  directory = os.path.join(workdir, run_checkpoints.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return [d for d in os.listdir(directory) if 'tmp' in d]


def last_logged_step(log_path):
  """Newest step whose training loss this process has logged."""
  steps = TRAIN_LOG_RE.findall(read(log_path))
  return int(steps[-1]) if steps else 0


def metric_lines(workdir):
  lines = []
  for line in read(os.path.join(workdir, train.METRICS_FILE)).splitlines():
    record = {k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
    if set(record) != {'step'}:
      lines.append(record)
  return lines


def final_params(workdir):
  return checkpoint.flatten(
      checkpoint.load(os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE))
  )


def assert_bit_identical_params(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def wait_for(condition, proc, timeout=120, poll=0.002):
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      return False
    if time.monotonic() > deadline:
      raise TimeoutError('the run did not reach the expected point')
    time.sleep(poll)
  return True


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """vit_jax.main's own CPU devices (one per core); restarts reuse compiled
  programs (JAX's disk cache)."""
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  return dict(
      {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
      JAX_COMPILATION_CACHE_DIR=cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
  )


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, tfds_dir, env):
  """The uninterrupted run every interrupted one must equal."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  proc = start(
      cli_args(workdir, tfds_dir), os.path.join(workdir, 'log.txt'), env
  )
  assert finish(proc) == 0, read(os.path.join(workdir, 'log.txt'))[-4000:]
  return workdir


# ----------------------------------------------------------------------------
# 1. Kill anywhere, resume exactly.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_10_random_moments_then_resume_is_bit_identical(
    reference_run, tfds_dir, env, tmp_path
):
  workdir = str(tmp_path / 'run')
  rng = random.Random(20261122)  # Fixed, so a failure can be replayed.
  # Every third kill waits for a checkpoint write to start (orbax's temporary
  # step directory appears) and kills at once; the others kill after a
  # random number of steps plus a random fraction of a second.
  modes = ['random', 'random', 'during_save'] * 3 + ['random']
  expected_restore = None
  killed_mid_save = 0
  resumed_from = []
  for trial, mode in enumerate(modes):
    log_path = str(tmp_path / f'trial_{trial}.log')
    known_partial = set(partial_saves(workdir))
    resume_from = max(complete_steps(workdir), default=0)
    proc = start(cli_args(workdir, tfds_dir), log_path, env)
    if mode == 'during_save':
      alive = wait_for(
          lambda known=known_partial: set(partial_saves(workdir)) - known, proc
      )
    else:
      target = resume_from + rng.randint(1, 5)
      alive = wait_for(
          lambda path=log_path, step=target: last_logged_step(path) >= step,
          proc,
      )
      time.sleep(rng.uniform(0, 0.2))
    assert alive and proc.poll() is None, (
        f'trial {trial}: the run ended before the kill:\n'
        + read(log_path)[-3000:]
    )
    os.killpg(proc.pid, signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL
    restored = [int(s) for s in RESTORE_RE.findall(read(log_path))]
    # Each start resumed from the newest complete checkpoint the previous
    # kill left behind (or from scratch when there was none).
    assert restored == (
        [] if expected_restore is None else [expected_restore]
    ), (trial, restored)
    if mode == 'during_save' and set(partial_saves(workdir)) - known_partial:
      killed_mid_save += 1
    expected_restore = max(complete_steps(workdir), default=None)
    resumed_from.append(expected_restore or 0)
  # The kills during saves really interrupted writes in progress.
  assert killed_mid_save >= 1

  log_path = str(tmp_path / 'final.log')
  proc = start(cli_args(workdir, tfds_dir), log_path, env)
  assert finish(proc) == 0, read(log_path)[-4000:]
  assert RESTORE_RE.findall(read(log_path)) == [str(expected_restore)]
  assert not partial_saves(workdir)  # Leftovers of killed saves are gone.
  assert metric_lines(workdir) == metric_lines(reference_run)
  assert_bit_identical_params(
      final_params(workdir), final_params(reference_run)
  )
  assert complete_steps(workdir) == complete_steps(reference_run)
  print(
      f'{len(modes)} SIGKILLs ({killed_mid_save} during a checkpoint '
      f'write), resumed from steps {resumed_from}: final parameters and '
      'metrics bit-identical to the uninterrupted run'
  )


# ----------------------------------------------------------------------------
# 2. Graceful preemption.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_exits_0_and_resumes(
    reference_run, tfds_dir, env, tmp_path
):
  workdir = str(tmp_path / 'run')
  # Only the preemption save: no periodic checkpoint to resume from instead.
  args = cli_args(workdir, tfds_dir)
  args[args.index(f'--config.checkpoint_every={CHECKPOINT_EVERY}')] = (
      '--config.checkpoint_every=1000'
  )
  log_path = str(tmp_path / 'first.log')
  proc = start(args, log_path, env)
  assert wait_for(lambda: last_logged_step(log_path) >= 7, proc)
  os.killpg(proc.pid, signal.SIGTERM)
  assert finish(proc) == 0, read(log_path)[-4000:]
  saved = [int(s) for s in PREEMPTED_RE.findall(read(log_path))]
  assert len(saved) == 1 and 7 <= saved[0] < TOTAL_STEPS
  assert complete_steps(workdir) == saved
  assert not os.path.exists(
      os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE)
  )

  log_path = str(tmp_path / 'second.log')
  proc = start(args, log_path, env)
  assert finish(proc) == 0, read(log_path)[-4000:]
  assert RESTORE_RE.findall(read(log_path)) == [str(saved[0])]
  assert_bit_identical_params(
      final_params(workdir), final_params(reference_run)
  )
  # With log_every=1 every logged value covers one step, so even the
  # metrics are those of the uninterrupted run.
  assert metric_lines(workdir) == metric_lines(reference_run)


def _free_port():
  spec = importlib.util.spec_from_file_location(
      'launch_local', os.path.join(REPO, 'launch', 'local.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.free_port()


@pytest.mark.slow
def test_sigterm_to_one_host_of_two_saves_the_same_step_on_both(
    tfds_dir, env, tmp_path
):
  workdir = str(tmp_path / 'run')
  env = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=4')

  def start_job(name):
    port = _free_port()
    return [
        start(
            cli_args(
                workdir,
                tfds_dir,
                '--config.total_steps=20',
                f'--coordinator_address=127.0.0.1:{port}',
                '--num_processes=2',
                f'--process_id={i}',
            ),
            str(tmp_path / f'{name}_{i}.log'),
            env,
        )
        for i in range(2)
    ]

  procs = start_job('first')
  assert wait_for(
      lambda: last_logged_step(str(tmp_path / 'first_0.log')) >= 5,
      procs[0],
      timeout=240,
  )
  # A maintenance event may reach only one host; both must stop together.
  os.killpg(procs[1].pid, signal.SIGTERM)
  codes = [finish(p) for p in procs]
  logs = [read(str(tmp_path / f'first_{i}.log')) for i in range(2)]
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  saved = [PREEMPTED_RE.findall(log) for log in logs]
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  step = int(saved[0][0])
  assert step in complete_steps(workdir)
  assert max(complete_steps(workdir)) == step

  procs = start_job('second')
  codes = [finish(p) for p in procs]
  logs = [read(str(tmp_path / f'second_{i}.log')) for i in range(2)]
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert [RESTORE_RE.findall(log) for log in logs] == [[str(step)]] * 2
  assert os.path.exists(
      os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE)
  )


# ----------------------------------------------------------------------------
# 4. Determinism.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_different(
    reference_run, tfds_dir, env, tmp_path
):
  again, other = str(tmp_path / 'again'), str(tmp_path / 'other')
  procs = [
      start(cli_args(again, tfds_dir), str(tmp_path / 'again.log'), env),
      start(
          cli_args(other, tfds_dir, '--config.seed=1'),
          str(tmp_path / 'other.log'),
          env,
      ),
  ]
  assert [finish(p) for p in procs] == [0, 0]
  assert metric_lines(again) == metric_lines(reference_run)
  assert_bit_identical_params(final_params(again), final_params(reference_run))
  different = [
      a
      for a, b in zip(metric_lines(other), metric_lines(reference_run))
      if a != b
  ]
  assert len(different) > TOTAL_STEPS // 2
  assert not np.array_equal(
      final_params(other)['Transformer/encoder_norm/scale'],
      final_params(reference_run)['Transformer/encoder_norm/scale'],
  )
