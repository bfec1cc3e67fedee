"""Inference throughput and the largest batch that fits (paper Figure 12).

  python -m benchmarks.inference [--models ViT-Ti_16,ViT-S_16] \
      [--resolutions 224,384] [--batches 1,8,32] [--repeats 3] \
      [--memory_gb N] [--json out.json]

For every model x resolution x batch: the compile time of the jitted
forward pass (measured alone), then images/s over `--repeats` timed calls
after one warm-up call, each ended by `block_until_ready`. For every model x
resolution: the largest power-of-two batch whose compiled program fits in
the device memory, from XLA's memory analysis of the compiled program
(arguments + outputs + temporaries; nothing is run). Device memory is the
accelerator's `bytes_limit`, or on CPU `--memory_gb` (default: the machine's
RAM). Prints a table and, with --json, writes the rows.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import vit_jax.models


def device_memory_bytes(override_gb: float | None) -> int:
  """Memory of one device: accelerator limit, else the flag or host RAM."""
  if override_gb:
    return int(override_gb * 2**30)
  stats = jax.devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit'])
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def forward_fn(model):
  return jax.jit(
      lambda params, images: model.apply(
          {'params': params}, images, train=False
      )
  )


def abstract_params(model, resolution):
  return jax.eval_shape(
      lambda: model.init(
          jax.random.key(0),
          jnp.zeros((1, resolution, resolution, 3)),
          train=False,
      )
  )['params']


def median_seconds(fn, steps: int, warmup: int) -> float:
  """Median wall time of `fn()` (which must block) after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def compiled_program_bytes(compiled) -> int | None:
  """Device bytes a compiled program needs: arguments + outputs +
  temporaries - donated aliases (None if XLA does not say)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
  )


def program_bytes(fn, params, batch, resolution) -> int | None:
  """Device bytes the compiled forward pass needs (None if unknown)."""
  images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
  return compiled_program_bytes(fn.lower(params, images).compile())


def largest_batch(fn, params, resolution, limit, max_batch=2**14) -> int:
  """Largest power-of-two batch whose program fits in `limit` bytes."""
  best, batch = 0, 1
  while batch <= max_batch:
    needed = program_bytes(fn, params, batch, resolution)
    if needed is None or needed > limit:
      break
    best, batch = batch, batch * 2
  return best


def measure(name, resolution, batch, repeats):
  """One row: compile seconds and images/s of the forward pass."""
  model = vit_jax.models.get_model(name, num_classes=1000)
  fn = forward_fn(model)
  params = jax.jit(
      lambda: model.init(
          jax.random.key(0),
          jnp.zeros((1, resolution, resolution, 3)),
          train=False,
      )['params']
  )()
  images = jnp.asarray(
      np.random.default_rng(0)
      .uniform(-1, 1, (batch, resolution, resolution, 3))
      .astype(np.float32)
  )
  start = time.perf_counter()
  compiled = fn.lower(params, images).compile()
  compile_s = time.perf_counter() - start
  median = median_seconds(
      lambda: compiled(params, images).block_until_ready(), repeats, warmup=1
  )
  return {
      'model': name,
      'resolution': resolution,
      'batch': batch,
      'compile_s': round(compile_s, 2),
      'step_s': round(median, 4),
      'images_per_s': round(batch / median, 2),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='ViT-Ti_16,ViT-S_16')
  parser.add_argument('--resolutions', default='224')
  parser.add_argument('--batches', default='1,8,32')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--memory_gb', type=float, default=None)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  limit = device_memory_bytes(args.memory_gb)
  device = jax.devices()[0]
  print(
      f'# {device.platform} {device.device_kind}, {jax.device_count()} '
      f'device(s); memory per device {limit / 2**30:.1f} GiB; '
      f'jax {jax.__version__}'
  )
  rows, fits = [], []
  print(
      f'{"model":<14} {"res":>4} {"batch":>5} {"compile s":>9} '
      f'{"step s":>8} {"img/s":>8}'
  )
  for name in args.models.split(','):
    for res in (int(r) for r in args.resolutions.split(',')):
      for batch in (int(b) for b in args.batches.split(',')):
        row = measure(name, res, batch, args.repeats)
        rows.append(row)
        print(
            f'{name:<14} {res:>4} {batch:>5} {row["compile_s"]:>9.2f} '
            f'{row["step_s"]:>8.4f} {row["images_per_s"]:>8.2f}',
            flush=True,
        )
      model = vit_jax.models.get_model(name, num_classes=1000)
      best = largest_batch(
          forward_fn(model), abstract_params(model, res), res, limit
      )
      fits.append({'model': name, 'resolution': res, 'largest_batch': best})
  print(f'\n{"model":<14} {"res":>4} {"largest batch that fits":>24}')
  for f in fits:
    print(f'{f["model"]:<14} {f["resolution"]:>4} {f["largest_batch"]:>24}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
          {
              'device': f'{device.platform} {device.device_kind}',
              'memory_bytes': limit,
              'throughput': rows,
              'largest_batch': fits,
          },
          f,
          indent=1,
      )


if __name__ == '__main__':
  main()
