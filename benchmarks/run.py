r"""The benchmark suite: throughput, FLOP utilisation, compile time, memory.

  python -m benchmarks.run --models ViT-Ti_16,ViT-S_16,ViT-B_16 --batch 32 \
      --res 224 [--variants base,remat,dots,scan,bf16,attn_xla,fsdp] \
      [--steps 5] [--scan_compile ViT-B_16,ViT-L_16] [--nopipeline] \
      [--json out.json]

Measures, each in a fresh process (so that peak RSS and compile time belong
to one measurement):

* the machine's float32 matmul peak: median GFLOP/s of jitted square
  matmuls (2048 and 4096), the best size, measured with and without the
  process settings below and the better of the two kept;
* per model x variant: the inference forward pass and the product's train
  step (`vit_jax.train.make_train_step`: loss, gradients, SGD momentum,
  donated state, explicit shardings) on a constant batch: images/s (median
  of `--steps` timed calls after two warm-up calls, each ended by
  `block_until_ready`), achieved GFLOP/s from `vit_jax.flops` (training =
  3x forward), % of the matmul peak (MFU), compile time, the compiled
  program's memory per device (XLA memory analysis: arguments + outputs +
  temporaries - donated aliases) and the process's peak RSS;
* the train step's compile time with and without `scan` for
  `--scan_compile` models, and with `scan` at twice their depth (compiled
  only, never run; the state's initialisation finished first, so that it
  does not share the cores with the timed compile);
* the training input pipeline's images/s (generated JPEG folder, the
  model's resolution and batch).

Variants: `base` (float32, data parallel on 1 device), `remat` (remat
policy 'full'), `dots` / `dots_nb` (remat policies 'dots_saveable' /
'dots_with_no_batch_dims_saveable'), `scan`, `scan_remat`, `attn_xla`
(`attention_impl='xla'`), `attn_cudnn` (GPU: cuDNN flash attention, bf16),
`bf16` (compute dtype bfloat16, float32 parameters), `fsdp` (8 simulated
devices, parameters and optimizer state sharded: its memory per device is
the point, not its speed, since 8 simulated devices share the same cores).
Every process runs with `vit_jax.runtime`'s settings (huge pages for malloc),
as `python -m vit_jax.main` does; `--untuned` measures without them. Prints
a table and the issue's targets with the measured values; `--json` writes
everything.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    'base': {},
    'remat': {'remat': True},
    'scan': {'scan': True},
    'scan_remat': {'scan': True, 'remat': True},
    'bf16': {'compute_dtype': 'bfloat16'},
    'fsdp': {'mesh': (('data', 1), ('fsdp', -1))},
    # Remat policies (what the backward pass keeps) and attention
    # implementations: `model` entries are get_model overrides.
    'dots': {'model': {'remat_policy': 'dots_saveable'}},
    'dots_nb': {'model': {'remat_policy': 'dots_with_no_batch_dims_saveable'}},
    'attn_xla': {'model': {'attention_impl': 'xla'}},
    # GPU only: cuDNN flash attention needs bfloat16.
    'attn_cudnn': {
        'compute_dtype': 'bfloat16',
        'model': {'attention_impl': 'cudnn'},
    },
}
FSDP_DEVICES = 8
_NO_DROPOUT = {'transformer': {'dropout_rate': 0.0}}


def twice_as_deep(model_name: str) -> dict:
  """Model overrides: `model_name` with twice its layers, dropout off."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  layers = models.get_config(model_name)['transformer']['num_layers']
  return {'transformer': {'dropout_rate': 0.0, 'num_layers': 2 * layers}}


PEAK_SIZES = (2048, 4096)


# ----------------------------------------------------------------------------
# Measurements (each runs in its own process; see `_in_subprocess`).
# ----------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_matmul_peak(steps: int = 5) -> dict:
  """float32 GFLOP/s of square matmuls under jax.jit; the best size wins."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import inference  # pylint: disable=g-import-not-at-top

  rates = {}
  for n in PEAK_SIZES:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    seconds = inference.median_seconds(
        lambda f=matmul, a=a, b=b: f(a, b).block_until_ready(), steps, warmup=2
    )
    rates[n] = 2 * n**3 / seconds / 1e9
  return {'gflops_by_size': rates, 'peak_gflops': max(rates.values())}


def _config(
    model_name: str,
    variant: str,
    batch: int,
    res: int,
    model_overrides: dict | None = None,
):
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.get_base()
  config.model_name = model_name
  variant = dict(VARIANTS[variant])
  config.model = {**(model_overrides or {}), **variant.pop('model', {})}
  config.image_size = res
  config.batch = batch
  config.update(variant)
  return config


def product_train_setup(
    model_name: str,
    variant: str,
    batch: int,
    res: int,
    model_overrides: dict | None = None,
    num_classes: int = 1000,
):
  """The product's pieces for one benchmark row, the state initialised.

  Returns:
    (run, mesh, objective, model, tx, state, shardings, step): `step` the
    jitted `vit_jax.train.make_train_step`.
  """
  # pylint: disable=g-import-not-at-top
  import jax

  from vit_jax import config_lib
  from vit_jax import objectives
  from vit_jax import optim
  from vit_jax import sharding
  from vit_jax import train
  # pylint: enable=g-import-not-at-top
  run = config_lib.parse(
      _config(model_name, variant, batch, res, model_overrides)
  )
  mesh = sharding.mesh_from_config(run.mesh)
  objective = objectives.get(run.objective)
  model = train.build_model(run.model, objective, num_classes)
  tx, _ = optim.make_optimizer(run.optim)
  state, shardings, _ = train.create_train_state(
      run, objective, model, tx, mesh, jax.random.key(0)
  )
  step = train.make_train_step(run.loop, objective, model, tx, mesh, shardings)
  return run, mesh, objective, model, tx, state, shardings, step


def measure_step(
    model_name: str,
    variant: str,
    mode: str,
    batch: int,
    res: int,
    steps: int,
    compile_only: bool = False,
    model_overrides: dict | None = None,
) -> dict:
  """One row: a model's train step or forward pass in one variant."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from benchmarks import inference  # pylint: disable=g-import-not-at-top
  from vit_jax import flops  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top

  num_classes = 1000
  _, mesh, _, model, _, state, shardings, train_step = product_train_setup(
      model_name, variant, batch, res, model_overrides, num_classes
  )
  # Initialisation runs asynchronously: wait for it, or the timed compile
  # below shares the cores with it (more layers, longer overlap).
  jax.block_until_ready(state)
  rng = np.random.default_rng(0)
  batch_sharding = sharding.batch_sharding(mesh)
  data = sharding.put_global(
      {
          'image': rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
          'labels': np.eye(num_classes, dtype=np.float32)[
              rng.integers(0, num_classes, batch)
          ],
      },
      batch_sharding,
  )
  key = sharding.put_global(jax.random.key(1), sharding.replicated(mesh))
  if mode == 'train':
    fn = train_step
    args = (state, data, key)
  else:
    fn = jax.jit(
        lambda p, x: model.apply({'params': p}, x, train=False),
        in_shardings=(shardings.params, batch_sharding),
    )
    args = (state.params, data['image'])
  start = time.perf_counter()
  lowered = fn.lower(*args)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  row = {
      'model': model_name,
      'variant': variant,
      'mode': mode,
      'batch': batch,
      'res': res,
      'devices': len(mesh.devices.flat),
      'model_overrides': model_overrides or {},
      'compile_s': compile_s,
      'trace_and_lower_s': lower_s,
      'program_bytes_per_device': inference.compiled_program_bytes(compiled),
  }
  if not compile_only:
    if mode == 'train':
      holder = {'state': state}

      def call():
        holder['state'], metrics = compiled(holder['state'], data, key)
        jax.block_until_ready(metrics)

    else:

      def call():
        compiled(*args).block_until_ready()

    step_s = inference.median_seconds(call, steps, warmup=2)
    per_image = (flops.train_flops if mode == 'train' else flops.forward_flops)(
        model_name, res, num_classes=num_classes
    )
    row.update(
        {
            'step_s': step_s,
            'images_per_s': batch / step_s,
            'gflops_per_s': batch * per_image / step_s / 1e9,
        }
    )
  row['peak_rss_bytes'] = _peak_rss_bytes()
  return row


def measure_pipeline(batch: int, res: int, batches: int = 20) -> dict:
  """Images/s of the training input pipeline on a generated JPEG folder."""
  from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as folder:
    input_pipeline.make_jpeg_folder(folder)
    data = config_lib.section(
        dict(
            dataset='image_folder',
            image_folder=folder,
            image_size=res,
            batch=batch,
            seed=0,
            shuffle_buffer=10_000,
        ),
        'data',
    )
    rate = input_pipeline.pipeline_rate(data, batches)
  return {'pipeline_images_per_s': rate, 'batch': batch, 'res': res}


# ----------------------------------------------------------------------------
# Orchestration.
# ----------------------------------------------------------------------------


def _in_subprocess(task: dict, devices: int = 1, tuned: bool = True) -> dict:
  """Runs one measurement in a fresh Python process; returns its result.

  With `tuned`, the process gets `vit_jax.runtime`'s settings, as
  `python -m vit_jax.main` does.
  """
  from vit_jax import runtime  # pylint: disable=g-import-not-at-top

  env = runtime.tuned_environment(os.environ) if tuned else dict(os.environ)
  env.pop('XLA_FLAGS', None)
  if devices > 1:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--task', json.dumps(task)],
      env=env,
      capture_output=True,
      text=True,
      check=False,
  )
  lines = result.stdout.strip().splitlines()
  if result.returncode != 0 or not lines:
    return {
        **task,
        'error': (result.stderr.strip().splitlines() or ['no output'])[-1],
    }
  return json.loads(lines[-1])


def _run_task(task: dict) -> dict:
  kind = task['kind']
  if kind == 'peak':
    # More calls than the rows: the peak is the denominator of every MFU.
    return measure_matmul_peak(max(task['steps'], 10))
  if kind == 'step':
    return measure_step(
        task['model'],
        task['variant'],
        task['mode'],
        task['batch'],
        task['res'],
        task['steps'],
        task.get('compile_only', False),
        task.get('model_overrides'),
    )
  if kind == 'pipeline':
    return measure_pipeline(task['batch'], task['res'])
  raise ValueError(f'Unknown task kind {kind!r}')


def _fmt(value, spec, missing='-'):
  return missing if value is None else format(value, spec)


def _print_row(row: dict, peak: float) -> None:
  if 'error' in row:
    print(
        f'{row["model"]:<12} {row["variant"]:<10} {row["mode"]:<9} '
        f'ERROR: {row["error"]}',
        flush=True,
    )
    return
  mfu = row.get('gflops_per_s')
  mfu = None if mfu is None else 100 * mfu / peak
  program = row.get('program_bytes_per_device')
  mode = row['mode'] + ('*' if row.get('model_overrides') else '')
  print(
      f'{row["model"]:<12} {row["variant"]:<10} {mode:<9} '
      f'{row["devices"]:>3} {_fmt(row.get("images_per_s"), "8.2f"):>8} '
      f'{_fmt(row.get("step_s"), "8.3f"):>8} '
      f'{_fmt(row.get("gflops_per_s"), "7.1f"):>7} {_fmt(mfu, "5.1f"):>5} '
      f'{row["compile_s"]:>8.2f} '
      f'{_fmt(None if program is None else program / 2**30, "8.2f"):>8} '
      f'{row["peak_rss_bytes"] / 2**30:>8.2f}',
      flush=True,
  )


def _find(rows, **match):
  for row in rows:
    if 'error' not in row and all(row.get(k) == v for k, v in match.items()):
      return row
  return None


def targets(rows: list[dict], peak: float, pipeline: dict | None) -> list:
  """The performance targets (issue 9) as (name, measured, target, met)."""
  out = []
  for name in ('ViT-S_16', 'ViT-B_16'):
    for mode, goal in (('train', 65), ('inference', 70)):
      row = _find(rows, model=name, variant='base', mode=mode)
      if row and 'gflops_per_s' in row:
        mfu = 100 * row['gflops_per_s'] / peak
        out.append(
            (
                f'{name} {mode} MFU (float32)',
                f'{mfu:.1f}%',
                f'>= {goal}%',
                mfu >= goal,
            )
        )
  base = _find(rows, model='ViT-S_16', variant='base', mode='train')
  for variant in ('remat', 'scan_remat'):
    remat = _find(rows, model='ViT-S_16', variant=variant, mode='train')
    if base and remat and 'step_s' in base and 'step_s' in remat:
      memory = (
          remat['program_bytes_per_device'] / base['program_bytes_per_device']
      )
      slower = 1 - base['step_s'] / remat['step_s']
      out.append(
          (
              f'ViT-S_16 {variant}: program memory vs base',
              f'{100 * memory:.0f}%',
              '<= 50%',
              memory <= 0.5,
          )
      )
      out.append(
          (
              f'ViT-S_16 {variant}: throughput loss vs base',
              f'{100 * slower:.0f}%',
              '<= 25%',
              slower <= 0.25,
          )
      )
  scan_b = _find(
      rows,
      model='ViT-B_16',
      variant='scan',
      mode='train',
      model_overrides=_NO_DROPOUT,
  )
  scan_l = _find(
      rows,
      model='ViT-L_16',
      variant='scan',
      mode='train',
      model_overrides=_NO_DROPOUT,
  )
  if scan_b and scan_l:
    ratio = scan_l['compile_s'] / scan_b['compile_s']
    out.append(
        (
            'scan: ViT-L_16 / ViT-B_16 train-step compile time',
            f'{ratio:.2f}x',
            '<= 1.2x',
            ratio <= 1.2,
        )
    )
  for name in ('ViT-B_16', 'ViT-L_16'):
    scan = _find(
        rows,
        model=name,
        variant='scan',
        mode='train',
        model_overrides=_NO_DROPOUT,
    )
    deeper = _find(
        rows,
        model=name,
        variant='scan',
        mode='train',
        model_overrides=twice_as_deep(name),
    )
    if scan and deeper:
      # Within this machine's noise of equal (issue 17, item 6).
      ratio = deeper['compile_s'] / scan['compile_s']
      out.append(
          (
              f'scan: {name} at 2x depth / 1x train-step compile',
              f'{ratio:.2f}x',
              '<= 1.1x',
              ratio <= 1.1,
          )
      )
  if pipeline and base and 'images_per_s' in base:
    ratio = pipeline['pipeline_images_per_s'] / base['images_per_s']
    out.append(
        (
            'input pipeline / ViT-S_16 train step images/s',
            f'{ratio:.1f}x',
            '>= 3x',
            ratio >= 3,
        )
    )
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='ViT-Ti_16,ViT-S_16,ViT-B_16')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument(
      '--variants', default='base,remat,dots,dots_nb,scan,bf16,attn_xla,fsdp'
  )
  parser.add_argument('--modes', default='train,inference')
  parser.add_argument(
      '--steps',
      type=int,
      default=5,
      help='timed calls per row (after 2 warm-up calls)',
  )
  parser.add_argument(
      '--scan_compile',
      default='ViT-B_16,ViT-L_16',
      help='models whose scanned and unscanned train steps '
      'are compiled (not run, dropout off) for compile '
      'time; "" skips',
  )
  parser.add_argument('--nopipeline', action='store_true')
  parser.add_argument(
      '--untuned',
      action='store_true',
      help="measure without vit_jax.runtime's process "
      'settings (huge pages for malloc)',
  )
  parser.add_argument('--json', default=None)
  parser.add_argument('--task', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.task:  # A child process: one measurement, JSON on the last line.
    print(json.dumps(_run_task(json.loads(args.task))))
    return

  import jax  # pylint: disable=g-import-not-at-top

  from vit_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime_env = runtime.tuned_environment(os.environ)
  tuned = not args.untuned
  # The MFU denominator: the best of both process settings (huge pages help
  # the step but not always a lone matmul), so no row looks better than it is.
  peaks = [
      _in_subprocess({'kind': 'peak', 'steps': args.steps}, tuned=t)
      for t in (True, False)
  ]
  failed = [p['error'] for p in peaks if 'error' in p]
  if failed:
    sys.exit(f'Matmul peak measurement failed: {failed[0]}')
  peak = max(peaks, key=lambda p: p['peak_gflops'])
  peak_gflops = peak['peak_gflops']
  device = jax.devices()[0]
  print(
      f'# {device.platform} {device.device_kind}, {os.cpu_count()} CPUs, '
      f'jax {jax.__version__}; float32 matmul peak {peak_gflops:.1f} '
      'GFLOP/s ('
      + '; '.join(
          ('with' if t else 'without')
          + ' settings '
          + ', '.join(f'{n}: {g:.1f}' for n, g in p['gflops_by_size'].items())
          for t, p in zip((True, False), peaks)
      )
      + ')'
  )
  settings = (
      f'GLIBC_TUNABLES={runtime_env.get("GLIBC_TUNABLES")}'
      if tuned
      else 'untuned (no vit_jax.runtime settings)'
  )
  print(
      f'# batch {args.batch}, {args.res} px; median of {args.steps} '
      f'calls after 2 warm-up calls; process settings: {settings}'
  )
  print(
      f'{"model":<12} {"var":<10} {"mode":<9} {"dev":>3} {"img/s":>8} '
      f'{"step s":>8} {"GFLOP/s":>7} {"MFU%":>5} {"compile":>8} '
      f'{"prog GiB":>8} {"RSS GiB":>8}'
  )
  rows = []
  for name in args.models.split(','):
    for variant in args.variants.split(','):
      for mode in args.modes.split(','):
        task = {
            'kind': 'step',
            'model': name,
            'variant': variant,
            'mode': mode,
            'batch': args.batch,
            'res': args.res,
            'steps': args.steps,
        }
        row = _in_subprocess(
            task, FSDP_DEVICES if variant == 'fsdp' else 1, tuned=tuned
        )
        rows.append(row)
        _print_row(row, peak_gflops)
  for name in filter(None, args.scan_compile.split(',')):
    # Dropout off for all: L_16's official config has dropout 0.1 and
    # B_16's none, and generating the dropout masks adds compile time
    # that has nothing to do with depth. The last row is the same model
    # at twice its depth, with scan.
    for variant, overrides in (
        ('base', _NO_DROPOUT),
        ('scan', _NO_DROPOUT),
        ('scan', twice_as_deep(name)),
    ):
      row = _in_subprocess(
          {
              'kind': 'step',
              'model': name,
              'variant': variant,
              'mode': 'train',
              'batch': args.batch,
              'res': args.res,
              'steps': args.steps,
              'compile_only': True,
              'model_overrides': overrides,
          },
          tuned=tuned,
      )
      rows.append(row)
      _print_row(row, peak_gflops)
  if args.scan_compile:
    print(
        '* compiled only, dropout off (see --scan_compile); the last row '
        'of each model has twice its layers'
    )
  pipeline = None
  if not args.nopipeline:
    pipeline = _in_subprocess(
        {'kind': 'pipeline', 'batch': args.batch, 'res': args.res}, tuned=tuned
    )
    print(
        f'input pipeline (JPEG folder, train preprocessing): '
        f'{pipeline.get("pipeline_images_per_s", float("nan")):.1f} '
        'images/s'
    )
  checks = targets(rows, peak_gflops, pipeline)
  if checks:
    print(
        '\ntarget                                              measured  '
        'target    met'
    )
    for what, measured, goal, met in checks:
      print(f'{what:<51} {measured:>8}  {goal:<8}  {"yes" if met else "NO"}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(
          {
              'device': f'{device.platform} {device.device_kind}',
              'cpus': os.cpu_count(),
              'jax': jax.__version__,
              'process_settings': settings,
              'matmul_peak': peak,
              'matmul_peaks': peaks,
              'rows': rows,
              'pipeline': pipeline,
              'targets': [
                  dict(zip(('what', 'measured', 'target', 'met'), c))
                  for c in checks
              ],
          },
          f,
          indent=1,
      )


if __name__ == '__main__':
  main()
