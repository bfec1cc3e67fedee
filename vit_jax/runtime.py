"""Process settings that speed up training, applied before the process starts.

XLA:CPU allocates and frees the step's large activation buffers with malloc
at every step; without huge pages each step page-faults through gigabytes of
fresh memory (measured: a fifth to a quarter of the step's CPU time in the
kernel). glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for
transparent huge pages, which cut the ViT-S_16 train step on a 2-core CPU
from 6.7 s to 4.6-4.8 s (docs/performance.md). glibc reads tunables only at
process start, so the command-line entry points re-execute themselves once
with the setting (same PID, same arguments) before importing anything heavy.

The setting changes only how memory is obtained, never a number the program
computes; glibc older than 2.35 and other C libraries ignore it. A value the
user already set in `GLIBC_TUNABLES` is kept.

The host is also split into one XLA CPU device per usable core
(`--xla_force_host_platform_device_count`), so a CPU run is data parallel
over its cores: the ViT-S_16 train step ran 9-12% faster on 2 devices than
on one on a 2-core machine, alternating (docs/performance.md), where one
device already kept both cores busy (1.92 cores) but worked on buffers
twice as large, and 8 devices were slower than one. Data parallelism changes
the order of the gradient sums, not what is computed; a CPU run's batch must
then divide by the device count (the run says so before it starts).
`VIT_JAX_CPU_DEVICES=N` sets the count (1: one device); a device count
already in `XLA_FLAGS` is kept. Hosts with an accelerator (an NVIDIA or
TPU device node, or `JAX_PLATFORMS` naming another platform) are left
alone: their CPU devices hold no training work.

`VIT_JAX_TUNE=0` turns all of this off.
"""

from collections.abc import Mapping
import glob
import os
import sys

_HUGE_PAGES = 'glibc.malloc.hugetlb=1'
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
CPU_DEVICES_VARIABLE = 'VIT_JAX_CPU_DEVICES'
# Set in the re-executed process, so that it does not re-execute again.
_MARKER = 'VIT_JAX_TUNED'


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` plus the settings above (those the user set win).

  Args:
    environ: An environment, e.g. `os.environ`.

  Returns:
    A new dict; unchanged when `VIT_JAX_TUNE=0`.
  """
  env = dict(environ)
  if env.get('VIT_JAX_TUNE', '1') == '0':
    return env
  tunables = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t]
  if not any(t.startswith('glibc.malloc.hugetlb=') for t in tunables):
    tunables.append(_HUGE_PAGES)
  env['GLIBC_TUNABLES'] = ':'.join(tunables)
  xla_flags = env.get('XLA_FLAGS', '')
  if _DEVICE_COUNT_FLAG not in xla_flags and not _has_accelerator(env):
    devices = cpu_device_count(env)
    if devices > 1:
      env['XLA_FLAGS'] = f'{xla_flags} {_DEVICE_COUNT_FLAG}={devices}'.strip()
  env[_MARKER] = '1'
  return env


def _has_accelerator(environ: Mapping[str, str]) -> bool:
  """Whether this host's runs will not be on the CPU (checked cheaply,
  before jax is imported)."""
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms and set(platforms.split(',')) - {'cpu'}:
    return True
  return bool(
      glob.glob('/dev/nvidia[0-9]*')
      or glob.glob('/dev/accel*')
      or glob.glob('/dev/vfio/[0-9]*')
  )


def cpu_device_count(environ: Mapping[str, str]) -> int:
  """XLA CPU devices to split the host into: one per usable core.

  Args:
    environ: An environment; `VIT_JAX_CPU_DEVICES` there sets the count.

  Returns:
    The count, >= 1.

  Raises:
    ValueError: `VIT_JAX_CPU_DEVICES` is not a positive integer.
  """
  value = environ.get(CPU_DEVICES_VARIABLE)
  if value is not None:
    if not value.strip().isdigit() or int(value) < 1:
      raise ValueError(
          f'{CPU_DEVICES_VARIABLE}={value!r}: give a positive '
          'number of CPU devices (1 for one).'
      )
    return int(value)
  if hasattr(os, 'sched_getaffinity'):  # The cores this process may use.
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def reexec_tuned(module: str) -> None:
  """Replaces this process by `python -m <module> <same args>`, tuned.

  Call it first thing in a `__main__` block. Does nothing when the process
  already runs with the settings (or `VIT_JAX_TUNE=0`, or on a platform
  without `os.execve`).

  Args:
    module: The module being run with `python -m`.
  """
  if (
      os.environ.get(_MARKER)
      or os.environ.get('VIT_JAX_TUNE') == '0'
      or not hasattr(os, 'execve')
      or sys.platform != 'linux'
  ):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(
      sys.executable,
      [sys.executable, '-m', module, *sys.argv[1:]],
      tuned_environment(os.environ),
  )
