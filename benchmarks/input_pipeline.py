"""Input-pipeline throughput against the train step's consumption.

  python -m benchmarks.input_pipeline [--folder DIR] [--batch 32] [--res 224]
      [--model ViT-S_16] [--steps 4] [--json out.json]

Prints images/s of the training pipeline (decode, Inception crop, resize,
flip, [-1, 1], one-hot, batching) for a folder of JPEGs (generated if
--folder is not given: 512 photos-sized 500x375 JPEGs of smooth noise) and
for the bundled digits dataset, then the images/s a jitted train step of
--model consumes, and the step time when it is fed by the pipeline versus by
a constant batch (the difference is what the step waits for its data).
"""

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax import sharding
import vit_jax.models


def make_jpeg_folder(root, num_images=512, classes=8, size=(375, 500)):
  """Writes `num_images` JPEGs of smooth random colour fields."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for i in range(num_images):
    folder = os.path.join(root, f'class_{i % classes}')
    os.makedirs(folder, exist_ok=True)
    coarse = rng.integers(
        0, 255, size=(size[0] // 25 + 1, size[1] // 25 + 1, 3)
    )
    image = np.kron(coarse, np.ones((25, 25, 1)))[: size[0], : size[1]]
    Image.fromarray(image.astype(np.uint8)).save(
        os.path.join(folder, f'{i:05d}.jpg'), quality=90
    )


def pipeline_rate(data, batches):
  """Images/s of the train iterator, first batch (warm-up) excluded."""
  it = input_pipeline.train_iterator(data)
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * data.batch / (time.perf_counter() - start)


def train_step_rates(data, model_name, steps):
  """Step time fed by a constant batch vs fed by the pipeline."""
  mesh = sharding.make_mesh(devices=jax.local_devices()[:1])
  batch_sharding = sharding.batch_sharding(mesh)
  info = input_pipeline.get_dataset_info(data)
  model = vit_jax.models.get_model(model_name, num_classes=info.num_classes)
  size = data.image_size
  params = jax.jit(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False
      )
  )()
  tx = optax.sgd(0.01, momentum=0.9)
  opt_state = tx.init(params)

  def step(params, opt_state, batch):
    def loss_fn(p):
      logits = model.apply(p, batch['image'], train=False)
      return optax.softmax_cross_entropy(logits, batch['labels']).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  batches = sharding.prefetch_to_device(
      input_pipeline.train_iterator(data), batch_sharding
  )
  fixed = next(batches)
  t0 = time.perf_counter()
  params, opt_state, loss = step(params, opt_state, fixed)
  loss.block_until_ready()
  compile_s = time.perf_counter() - t0

  def timed(batches):
    nonlocal params, opt_state
    times = []
    for batch in batches:
      t = time.perf_counter()
      params, opt_state, loss = step(params, opt_state, batch)
      loss.block_until_ready()
      times.append(time.perf_counter() - t)
    return float(np.median(times))

  # Alternate constant / pipeline-fed rounds so drift affects both alike.
  fixed_s, fed_s = [], []
  for _ in range(steps):
    fixed_s.append(timed([fixed]))
    fed_s.append(timed([next(batches)]))
  return compile_s, float(np.median(fixed_s)), float(np.median(fed_s))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--folder', default=None)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--model', default='ViT-S_16')
  parser.add_argument(
      '--steps',
      type=int,
      default=4,
      help='train steps per variant (0 skips the model)',
  )
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()

  results = {
      'device': str(jax.devices()[0]),
      'cpus': os.cpu_count(),
      'batch': args.batch,
      'res': args.res,
  }
  folder = args.folder
  tmp = None
  if folder is None:
    tmp = tempfile.TemporaryDirectory()
    folder = tmp.name
    make_jpeg_folder(folder)
  common = dict(
      image_size=args.res, batch=args.batch, seed=0, shuffle_buffer=10_000
  )
  folder_config = config_lib.section(
      dict(dataset='image_folder', image_folder=folder, **common), 'data'
  )
  digits_config = config_lib.section(
      dict(dataset='digits', tfds_data_dir=args.tfds_data_dir, **common), 'data'
  )
  for name, config in (
      ('jpeg_folder', folder_config),
      ('digits', digits_config),
  ):
    rate = pipeline_rate(config, args.batches)
    results[f'pipeline_{name}_img_per_s'] = rate
    print(f'train pipeline {name:12s} {args.res}px: {rate:8.1f} images/s')
  if args.steps:
    compile_s, fixed_s, fed_s = train_step_rates(
        folder_config, args.model, args.steps
    )
    results.update(
        {
            'model': args.model,
            'compile_s': compile_s,
            'step_s_constant_batch': fixed_s,
            'step_s_pipeline_fed': fed_s,
            'step_img_per_s': args.batch / fixed_s,
        }
    )
    print(
        f'{args.model} train step (batch {args.batch}): compile '
        f'{compile_s:.1f} s; {fixed_s:.2f} s/step on a constant batch = '
        f'{args.batch / fixed_s:.1f} images/s consumed; {fed_s:.2f} s/step '
        f'fed by the pipeline ({100 * (fed_s / fixed_s - 1):+.1f}%).'
    )
    ratio = results['pipeline_jpeg_folder_img_per_s'] / (args.batch / fixed_s)
    print(f'pipeline / consumption = {ratio:.1f}x')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  if tmp is not None:
    tmp.cleanup()


if __name__ == '__main__':
  main()
