r"""The CPU train step on 1, 2, ... XLA devices, alternating.

  python -m benchmarks.cpu_devices --model ViT-S_16 --batch 32 \
      --devices 1,2,8 --rounds 2 [--steps 3] [--flags '--xla_cpu_...']

Each measurement is a fresh process with `vit_jax.runtime`'s settings (huge
pages) and `--xla_force_host_platform_device_count=N`, running the product's
train step (`vit_jax.train.make_train_step`, data parallel over the N
devices) on a constant batch: the median of `--steps` calls after two
warm-up calls. Besides images/s it prints how busy the machine's cores were
(process CPU time / wall time), the kernel (system) time per step, and the
share of the process's CPU time taken by its busiest threads, which tells
whether the work ran on one thread or several. The device counts alternate
within each round, so that a busy machine slows all of them alike.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _thread_ticks() -> dict[str, int]:
  """CPU ticks (user + system) of each thread of this process."""
  ticks = {}
  for tid in os.listdir('/proc/self/task'):
    try:
      with open(f'/proc/self/task/{tid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      ticks[tid] = int(fields[11]) + int(fields[12])
    except OSError:  # The thread ended meanwhile.
      pass
  return ticks


def measure(model_name: str, batch: int, res: int, steps: int) -> dict:
  """One process's figures (this process's devices)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np

  from benchmarks import run as suite
  from vit_jax import sharding
  # pylint: enable=g-import-not-at-top
  _, mesh, _, _, _, state, _, step = suite.product_train_setup(
      model_name, 'base', batch, res
  )
  rng = np.random.default_rng(0)
  data = sharding.put_global(
      {
          'image': rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
          'labels': np.eye(1000, dtype=np.float32)[
              rng.integers(0, 1000, batch)
          ],
      },
      sharding.batch_sharding(mesh),
  )
  key = sharding.put_global(jax.random.key(1), sharding.replicated(mesh))
  for _ in range(2):
    state, metrics = step(state, data, key)
    jax.block_until_ready(metrics)
  before = _thread_ticks()
  calls = []
  for _ in range(steps):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    state, metrics = step(state, data, key)
    jax.block_until_ready(metrics)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    calls.append(
        (wall, after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime)
    )
  ticks = _thread_ticks()
  spent = sorted((ticks[t] - before.get(t, 0) for t in ticks), reverse=True)
  wall, user, system = sorted(calls)[len(calls) // 2]
  return {
      'devices': len(jax.devices()),
      'images_per_s': batch / wall,
      'step_s': wall,
      'cores_busy': (user + system) / wall,
      'system_s': system,
      'busiest_threads': [round(t / max(sum(spent), 1), 3) for t in spent[:3]],
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='ViT-S_16')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--devices', default='1,2,8')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument(
      '--flags', default='', help='extra XLA_FLAGS for every process'
  )
  parser.add_argument('--task', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.task:  # A child process: one measurement, JSON on the last line.
    print(json.dumps(measure(args.model, args.batch, args.res, args.steps)))
    return
  from vit_jax import runtime  # pylint: disable=g-import-not-at-top

  print(
      f'# {args.model}, batch {args.batch}, {args.res} px, float32; '
      f'median of {args.steps} calls; {os.cpu_count()} CPUs'
  )
  print(
      f'{"round":>5} {"devices":>7} {"img/s":>7} {"step s":>7} '
      f'{"cores busy":>10} {"system s":>8}  busiest threads'
  )
  for round_ in range(1, args.rounds + 1):
    for devices in (int(d) for d in args.devices.split(',')):
      env = runtime.tuned_environment(
          {**os.environ, runtime.CPU_DEVICES_VARIABLE: str(devices)}
      )
      env['XLA_FLAGS'] = (
          f'{args.flags} --xla_force_host_platform_device_' f'count={devices}'
      ).strip()
      env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
      result = subprocess.run(
          [
              sys.executable,
              '-m',
              'benchmarks.cpu_devices',
              '--task',
              f'--model={args.model}',
              f'--batch={args.batch}',
              f'--res={args.res}',
              f'--steps={args.steps}',
          ],
          env=env,
          capture_output=True,
          text=True,
          check=False,
      )
      lines = result.stdout.strip().splitlines()
      if result.returncode or not lines:
        print(
            f'{round_:>5} {devices:>7} ERROR: '
            f'{(result.stderr.strip().splitlines() or ["?"])[-1]}'
        )
        continue
      row = json.loads(lines[-1])
      print(
          f'{round_:>5} {row["devices"]:>7} {row["images_per_s"]:>7.2f} '
          f'{row["step_s"]:>7.2f} {row["cores_busy"]:>10.2f} '
          f'{row["system_s"]:>8.2f}  {row["busiest_threads"]}',
          flush=True,
      )


if __name__ == '__main__':
  main()
