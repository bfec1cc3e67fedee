r"""Train-step and inference MFU on an accelerator (GPU / TPU), bf16 compute.

  python -m benchmarks.accelerator [--models ViT-B_16,ViT-L_16] [--res 224] \
      [--steps 5] [--max_batch 1024] [--peak_tflops X] [--json out.json]

For each model: the largest power-of-two batch per device whose compiled
train step (bfloat16 compute, `attention_impl='auto'`, no remat) fits in the
device's memory (XLA's memory analysis of the compiled program; nothing is
run), then at that batch the product's train step
(`vit_jax.train.make_train_step`, measured by `benchmarks.run`) with
`attention_impl` einsum / xla / auto (the fused kernel: cuDNN on NVIDIA GPUs,
Pallas flash attention on TPU) and `remat_policy` none / dots_saveable /
full, and the forward pass. MFU is achieved FLOP/s (`vit_jax.flops`,
training = 3x forward) over the device's dense bfloat16 peak: the vendor's
figure for known devices (`PEAK_BF16_TFLOPS`), else (CPU) a measured
bfloat16 matmul; `--peak_tflops` overrides. The same code runs on CPU (use
small models and `--max_batch` there); `benchmarks/gpu.sh` is the prepared
GPU run. Each row runs in a fresh process, as in `benchmarks.run`.
"""

import argparse
import json
import sys

# Dense (not sparse) bfloat16 peaks from the vendors' datasheets, TFLOP/s per
# device, matched against `jax.devices()[0].device_kind`.
PEAK_BF16_TFLOPS = (
    ('H200', 989.0),
    ('H100', 989.0),
    ('A100', 312.0),
    ('L40S', 362.0),
    ('L4', 121.0),
    ('TPU v6', 918.0),
    ('TPU v5p', 459.0),
    ('TPU v5 lite', 197.0),
    ('TPU v5e', 197.0),
    ('TPU v4', 275.0),
)
# (attention_impl, remat_policy) rows, the first one sizes the batch.
ROWS = (
    ('auto', 'none'),
    ('einsum', 'none'),
    ('xla', 'none'),
    ('auto', 'dots_saveable'),
    ('auto', 'full'),
)


def peak_tflops(device_kind: str) -> float | None:
  """The vendor's dense bf16 peak of a device kind, or None if unknown."""
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def measured_bf16_peak_tflops(steps: int = 5) -> float:
  """bfloat16 matmul TFLOP/s of this device (the CPU's denominator)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import inference  # pylint: disable=g-import-not-at-top

  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  matmul = jax.jit(jnp.matmul)
  seconds = inference.median_seconds(
      lambda: matmul(a, b).block_until_ready(), steps, warmup=2
  )
  return 2 * n**3 / seconds / 1e12


def _task(
    model, batch, res, steps, impl, policy, mode='train', compile_only=False
):
  return {
      'kind': 'step',
      'model': model,
      'variant': 'bf16',
      'mode': mode,
      'batch': batch,
      'res': res,
      'steps': steps,
      'compile_only': compile_only,
      'model_overrides': {
          'attention_impl': impl,
          'remat_policy': policy,
          'transformer': {'dropout_rate': 0.0, 'attention_dropout_rate': 0.0},
      },
  }


def largest_batch(
    run_task, model: str, res: int, memory: int, max_batch: int, start: int = 8
) -> int:
  """Largest power-of-two batch whose compiled train step fits `memory`."""
  best, batch = 0, start
  while batch <= max_batch:
    row = run_task(_task(model, batch, res, 1, *ROWS[0], compile_only=True))
    used = row.get('program_bytes_per_device')
    if 'error' in row or used is None or used > 0.9 * memory:
      break
    best, batch = batch, batch * 2
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='ViT-B_16,ViT-L_16')
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--max_batch', type=int, default=1024)
  parser.add_argument('--peak_tflops', type=float, default=None)
  parser.add_argument(
      '--memory_gb',
      type=float,
      default=None,
      help="device memory (default: the accelerator's "
      'limit, or the host RAM on CPU)',
  )
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top

  from benchmarks import inference  # pylint: disable=g-import-not-at-top
  from benchmarks import run as suite  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  peak = args.peak_tflops or peak_tflops(device.device_kind)
  source = 'given' if args.peak_tflops else 'datasheet'
  if peak is None:
    peak, source = measured_bf16_peak_tflops(), 'measured bf16 matmul'
  memory = inference.device_memory_bytes(args.memory_gb)
  print(
      f'# {device.platform} {device.device_kind} x {jax.device_count()}, '
      f'jax {jax.__version__}; bf16 peak {peak:.3g} TFLOP/s ({source}); '
      f'{memory / 2**30:.1f} GiB per device; {args.res} px',
      flush=True,
  )
  print(
      f'{"model":<10} {"mode":<9} {"attention":<9} {"remat":<14} '
      f'{"batch":>6} {"img/s":>9} {"TFLOP/s":>8} {"MFU %":>6} '
      f'{"GiB":>6} {"compile s":>9}',
      flush=True,
  )
  run_task = lambda task: suite._in_subprocess(task, tuned=False)  # pylint: disable=protected-access
  rows = []
  for model in filter(None, args.models.split(',')):
    per_device = largest_batch(
        run_task, model, args.res, memory, args.max_batch
    )
    if not per_device:
      print(f'{model:<10} no batch fits', flush=True)
      continue
    batch = per_device * jax.device_count()
    tasks = [
        _task(model, batch, args.res, args.steps, impl, policy)
        for impl, policy in ROWS
    ]
    tasks.append(
        _task(
            model, batch, args.res, args.steps, 'auto', 'none', mode='inference'
        )
    )
    for task in tasks:
      row = run_task(task)
      row.update(
          attention_impl=task['model_overrides']['attention_impl'],
          remat_policy=task['model_overrides']['remat_policy'],
          peak_tflops=peak,
      )
      rows.append(row)
      overrides = task['model_overrides']
      if 'error' in row:
        print(
            f'{model:<10} {task["mode"]:<9} '
            f'{overrides["attention_impl"]:<9} '
            f'{overrides["remat_policy"]:<14} ERROR: {row["error"]}',
            flush=True,
        )
        continue
      tflops = row['gflops_per_s'] / 1e3
      print(
          f'{model:<10} {task["mode"]:<9} {overrides["attention_impl"]:<9} '
          f'{overrides["remat_policy"]:<14} {batch:>6} '
          f'{row["images_per_s"]:>9.1f} {tflops:>8.3g} '
          f'{100 * tflops / peak:>6.1f} '
          f'{(row["program_bytes_per_device"] or 0) / 2**30:>6.2f} '
          f'{row["compile_s"]:>9.1f}',
          flush=True,
      )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
          {
              'device': device.device_kind,
              'peak_tflops': peak,
              'peak_source': source,
              'rows': rows,
          },
          f,
          indent=1,
      )


if __name__ == '__main__':
  sys.exit(main())
