"""Tests of `vit_jax.runtime`: the tuned environment and the re-execution."""

import os
import subprocess
import sys

import pytest

from vit_jax import runtime


def test_tuned_environment_adds_huge_pages_and_keeps_user_settings():
  env = runtime.tuned_environment({'PATH': '/bin', 'VIT_JAX_CPU_DEVICES': '1'})
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  assert env['PATH'] == '/bin'
  assert 'XLA_FLAGS' not in env  # One CPU device asked for: no flag.
  mine = runtime.tuned_environment(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
  )
  assert mine['GLIBC_TUNABLES'] == (
      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  )
  off = runtime.tuned_environment({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert off['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=0'
  assert runtime.tuned_environment({'VIT_JAX_TUNE': '0'}) == {
      'VIT_JAX_TUNE': '0'
  }


def test_host_is_split_into_one_cpu_device_per_core(monkeypatch):
  monkeypatch.setattr(
      os, 'sched_getaffinity', lambda pid: {0, 1, 2}, raising=False
  )
  monkeypatch.setattr(runtime.glob, 'glob', lambda pattern: [])
  flag = '--xla_force_host_platform_device_count'
  assert runtime.tuned_environment({})['XLA_FLAGS'] == f'{flag}=3'
  # Other XLA flags stay; a device count the user set wins.
  env = runtime.tuned_environment({'XLA_FLAGS': '--xla_cpu_ftz=true'})
  assert env['XLA_FLAGS'] == f'--xla_cpu_ftz=true {flag}=3'
  assert (
      runtime.tuned_environment({'XLA_FLAGS': f'{flag}=8'})['XLA_FLAGS']
      == f'{flag}=8'
  )
  assert (
      runtime.tuned_environment({'VIT_JAX_CPU_DEVICES': '2'})['XLA_FLAGS']
      == f'{flag}=2'
  )
  assert 'XLA_FLAGS' not in runtime.tuned_environment({'VIT_JAX_TUNE': '0'})
  with pytest.raises(ValueError, match="VIT_JAX_CPU_DEVICES='two'"):
    runtime.tuned_environment({'VIT_JAX_CPU_DEVICES': 'two'})
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0}, raising=False)
  assert 'XLA_FLAGS' not in runtime.tuned_environment({})  # One core.


def _run_probe(tmp_path, **env):
  (tmp_path / 'probe_main.py').write_text(
      'from vit_jax import runtime\n'
      "runtime.reexec_tuned('probe_main')\n"
      'import os, sys\n'
      "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n"
  )
  environ = {
      k: v
      for k, v in os.environ.items()
      if k not in ('GLIBC_TUNABLES', 'VIT_JAX_TUNED', 'VIT_JAX_TUNE')
  }
  environ.update(env, PYTHONPATH=str(tmp_path))
  process = subprocess.Popen(
      [sys.executable, '-m', 'probe_main', '--a=1', 'b'],
      cwd=tmp_path,
      env=environ,
      stdout=subprocess.PIPE,
      text=True,
  )
  out, _ = process.communicate(timeout=60)
  assert process.returncode == 0
  pid, tunables, args = out.strip().split(' ', 2)
  return process.pid, int(pid), tunables, args


@pytest.mark.slow
def test_entry_point_reexecutes_itself_once_with_the_settings(tmp_path):
  started, pid, tunables, args = _run_probe(tmp_path)
  assert pid == started  # execve: same process, so signals still reach it.
  assert tunables == 'glibc.malloc.hugetlb=1'
  assert args == "['--a=1', 'b']"
  _, _, tunables, _ = _run_probe(tmp_path, VIT_JAX_TUNE='0')
  assert tunables == 'None'


def test_hosts_with_an_accelerator_keep_their_cpu_platform(monkeypatch):
  monkeypatch.setattr(
      os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3}, raising=False
  )
  monkeypatch.setattr(
      runtime.glob,
      'glob',
      lambda pattern: (
          ['/dev/nvidia0'] if pattern.startswith('/dev/nvidia') else []
      ),
  )
  assert 'XLA_FLAGS' not in runtime.tuned_environment({})
  monkeypatch.setattr(runtime.glob, 'glob', lambda pattern: [])
  assert 'XLA_FLAGS' not in runtime.tuned_environment({'JAX_PLATFORMS': 'tpu'})
  assert 'XLA_FLAGS' in runtime.tuned_environment({'JAX_PLATFORMS': 'cpu'})
