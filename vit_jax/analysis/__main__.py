r"""Writes the paper's inspection figures for a trained model.

  python -m vit_jax.analysis --workdir=/tmp/vit_digits --images=digits \
      --out=/tmp/vit_digits/analysis
  python -m vit_jax.analysis --pretrained_path=ViT-B_16.npz --model=ViT-B_16 \
      --images=/path/to/jpegs --out=/tmp/b16_analysis

With --workdir the model, image size and classes come from the run's
config.json and the parameters from its newest checkpoint (EMA parameters if
the run kept them). Figures: filters.png, position_similarity.png,
attention_distance.png, rollout.png; numbers: analysis.json.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from vit_jax import analysis
from vit_jax.analysis import images as images_lib
from vit_jax import checkpoint
from vit_jax import checkpointing
from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax import objectives
import vit_jax.models

flags.DEFINE_string('workdir', None, 'A training run directory.')
flags.DEFINE_string('pretrained_path', None, 'An .npz (instead of --workdir).')
flags.DEFINE_string('model', None, 'Registry name of the .npz model.')
flags.DEFINE_string('images', 'digits',
                    "'digits' (bundled test split) or a folder of images.")
flags.DEFINE_string('tfds_data_dir', None, 'tfds directory for digits.')
flags.DEFINE_integer('num_images', 128,
                     'Images averaged over (the paper uses 128).')
flags.DEFINE_string('out', None, 'Output folder (default: <workdir>/analysis).')
FLAGS = flags.FLAGS


def model_from_workdir(workdir: str):
  """(model, params, image_size, class names) of a training run."""
  run = config_lib.parse(config_lib.load_run_config(workdir))
  names_path = os.path.join(workdir, input_pipeline.CLASS_NAMES_FILE)
  with open(names_path) as f:
    class_names = json.load(f)['class_names']
  # The backbone with the head its objective gives it (none after masked
  # patch prediction, whose own head is not used here).
  num_classes = objectives.get(run.objective).num_classes(len(class_names))
  model = vit_jax.models.get_model(num_classes=num_classes,
                                   **run.model.model_args())
  try:
    step, params = checkpointing.load_params(workdir)
    logging.info('Parameters of step %d from %s', step, workdir)
  except FileNotFoundError:
    params = checkpoint.load(
        os.path.join(workdir, checkpointing.FINAL_PARAMS_FILE))
  return model, params, run.data.image_size, class_names


def model_from_npz(path: str, name: str):
  """(model, params, image_size, None) of a published-layout .npz."""
  if not name:
    raise app.UsageError('--pretrained_path needs --model (e.g. ViT-B_16).')
  params = checkpoint.load(path)
  head = params.get('head', {}).get('kernel')
  model = vit_jax.models.get_model(
      name, num_classes=None if head is None else head.shape[-1])
  tokens = params['Transformer']['posembed_input']['pos_embedding'].shape[1]
  has_cls = model.classifier in ('token', 'token_unpooled')
  side = int(round(np.sqrt(tokens - has_cls)))
  return model, params, side * model.total_stride[0], None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(FLAGS.workdir) == bool(FLAGS.pretrained_path):
    raise app.UsageError('Pass exactly one of --workdir or --pretrained_path.')
  if FLAGS.workdir:
    model, params, size, class_names = model_from_workdir(FLAGS.workdir)
  else:
    model, params, size, class_names = model_from_npz(FLAGS.pretrained_path,
                                                      FLAGS.model)
  out = FLAGS.out or os.path.join(FLAGS.workdir or '.', 'analysis')
  try:
    images, labels = images_lib.load_images(
        FLAGS.images, size, FLAGS.num_images, FLAGS.tfds_data_dir)
  except FileNotFoundError as e:
    raise app.UsageError(f'--images={FLAGS.images}: {e}') from e
  titles = None
  if labels is not None:
    titles = [class_names[l] if class_names else str(l) for l in labels]
  params = jax.device_put(params)
  results = analysis.analyze(model, params, images, out, titles=titles)
  logging.info('Wrote %s and %s to %s', ', '.join(results['figures']),
               analysis.RESULTS_FILE, out)
  print(json.dumps({k: v for k, v in results.items()
                    if k != 'filter_variance_ratios'}, indent=1))


if __name__ == '__main__':
  app.run(main)
