r"""Train-step compile time against depth, alternating in one process.

  python -m benchmarks.compile_depth --specs ViT-B_16:12,ViT-B_16:24 \
      --repeats 4 [--variant scan] [--batch 32] [--no_wait]

Each spec `MODEL:LAYERS` builds the product's train step for that model with
that many layers (dropout off), initialises its state, waits for the
initialisation to finish (unless `--no_wait`), then times `lower().compile()`.
The specs are compiled in turn, `--repeats` times, in one process, so that
each pair of numbers shares the machine's load: on a shared machine the
fresh-process rows of `benchmarks.run --scan_compile` move by much more than
the difference they look for. `--no_wait` shows what the benchmark used to
time: the initialisation, dispatched asynchronously, still running on the
same cores during the compile (the seconds it ran on afterwards are
printed).
"""

import argparse
import time


def compile_seconds(
    model_name: str, layers: int, variant: str, batch: int, res: int, wait: bool
) -> tuple[float, float]:
  """(seconds to lower and compile, seconds the initialisation ran after).

  Args:
    model_name: Registry name.
    layers: Number of encoder blocks.
    variant: A `benchmarks.run.VARIANTS` name (e.g. 'scan').
    batch: Global batch.
    res: Image size.
    wait: Whether to wait for the state's initialisation before timing.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  from benchmarks import run as suite
  # pylint: enable=g-import-not-at-top
  overrides = {'transformer': {'dropout_rate': 0.0, 'num_layers': layers}}
  *_, state, _, step = suite.product_train_setup(
      model_name, variant, batch, res, overrides
  )
  if wait:
    jax.block_until_ready(state)
  data = {
      'image': jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32),
      'labels': jax.ShapeDtypeStruct((batch, 1000), jnp.float32),
  }
  key = jax.eval_shape(lambda: jax.random.key(1))
  start = time.perf_counter()
  step.lower(state, data, key).compile()
  compiled = time.perf_counter()
  jax.block_until_ready(state)
  return compiled - start, time.perf_counter() - compiled


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--specs', default='ViT-B_16:12,ViT-B_16:24')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--variant', default='scan')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--no_wait', action='store_true')
  args = parser.parse_args(argv)
  specs = []
  for spec in args.specs.split(','):
    name, _, layers = spec.partition(':')
    if not layers.isdigit():
      parser.error(f'--specs: {spec!r} is not MODEL:LAYERS.')
    specs.append((name, int(layers)))
  print(
      f'# {args.variant}, batch {args.batch}, {args.res} px, dropout off; '
      + (
          'initialisation overlapping the compile'
          if args.no_wait
          else 'initialisation finished before the compile'
      )
  )
  print(f'{"model":<12} {"layers":>6} {"compile s":>9} {"init ran on s":>13}')
  for _ in range(args.repeats):
    for name, layers in specs:
      seconds, after = compile_seconds(
          name,
          layers,
          args.variant,
          args.batch,
          args.res,
          wait=not args.no_wait,
      )
      print(
          f'{name:<12} {layers:>6} {seconds:>9.2f} {after:>13.2f}', flush=True
      )


if __name__ == '__main__':
  main()
