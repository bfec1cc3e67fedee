"""Shared test setup: 8 simulated CPU devices, no network, tiny models."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Compiling for TPU slices (libtpu) in several test processes at once: no
# process needs libtpu's lock on the host's (absent) TPU.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# XLA:CPU compiles threefry (jax's default PRNG) slowly: initialising even the
# tiny test models takes seconds per shape. The tests never depend on the
# particular random numbers, so they use the faster-compiling 'rbg' PRNG.
os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')

# pylint: disable=g-import-not-at-top,g-bad-import-order
import collections
import fcntl
import platform
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_Popen = subprocess.Popen
# The standard library starts `uname -p` the first time anything asks for
# the processor (`platform.processor()`, then cached): ask here, before the
# guard below, so that the first test to ask is not taken for one that
# starts processes.
platform.processor()


class _RefusedPopen(_Popen):
  """`subprocess.Popen` for the fast tier: starting a process is refused."""

  def __init__(self, args, *rest, **kwargs):
    del rest, kwargs
    raise AssertionError(
        f'this test starts a process ({args!r:.80}): mark it (or the test '
        'using its fixture) @pytest.mark.slow, which keeps it out of '
        '`-m "not slow"`.'
    )


def _guard_processes(item):
  """Everything that starts a process or a kernel is marked `slow`."""
  if item.get_closest_marker('slow') is None:
    subprocess.Popen = _RefusedPopen
  try:
    return (yield)
  finally:
    subprocess.Popen = _Popen


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
  return (yield from _guard_processes(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  return (yield from _guard_processes(item))


DigitsRun = collections.namedtuple('DigitsRun', 'workdir tfds_dir stderr')


@pytest.fixture(scope='session')
def digits_run(tmp_path_factory):
  """The main job's small run (configs/digits.py:runlocal) through the CLI.

  Trained once per test session and shared by the test processes (xdist
  workers): the first to ask trains it under a file lock, the others wait
  for it. Tests only read it (a refused command in it included); to write
  into a run, copy it first (`shutil.copytree`).

  Returns:
    `DigitsRun(workdir, tfds_dir, stderr)`: the run, its tfds data dir and
    what the command printed.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # The session's directory, above the workers' own.
  root = root / 'shared_digits_run'
  root.mkdir(exist_ok=True)
  workdir, tfds_dir = root / 'workdir', root / 'tfds'
  log = root / 'stderr.txt'
  with open(root / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not log.exists():
      result = subprocess.run(
          [
              sys.executable,
              '-m',
              'vit_jax.main',
              '--config=configs/digits.py:runlocal',
              f'--workdir={workdir}',
              f'--config.tfds_data_dir={tfds_dir}',
          ],
          cwd=REPO,
          capture_output=True,
          text=True,
          timeout=900,
          env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
      )
      if result.returncode:
        shutil.rmtree(workdir, ignore_errors=True)
      assert result.returncode == 0, result.stderr[-4000:]
      log.write_text(result.stderr)
  return DigitsRun(str(workdir), str(tfds_dir), log.read_text())
