r"""Writes the paper's inspection figures for a trained model, or CKA.

  python -m vit_jax.analysis --workdir=/tmp/vit_digits --images=digits \
      --out=/tmp/vit_digits/analysis
  python -m vit_jax.analysis --pretrained_path=ViT-B_16.npz --model=ViT-B_16 \
      --images=/path/to/jpegs --out=/tmp/b16_analysis
  python -m vit_jax.analysis cka --workdir=/tmp/vit_digits \
      [--workdir_b=/tmp/resnet_digits | --pretrained_path_b=X.npz \
      --model_b=NAME] --images=digits --out=/tmp/cka

With --workdir the model, image size and classes come from the run's
config.json and the parameters from its newest checkpoint (EMA parameters if
the run kept them). Figures: filters.png, position_similarity.png,
attention_distance.png, rollout.png; numbers: analysis.json.

`cka`: minibatch CKA between the layers of the model (default out:
<workdir>/cka), and with a second model (--workdir_b, or --pretrained_path_b
with --model_b) between the two, on the same images (each model's
resolution). Figures: cka_within_a.png, cka_within_b.png, cka_between.png,
cka_sheet.png; numbers: cka.json.

`--dynamic_image_size` (ViTs) runs the model at another size than its
parameters were made for, its position embeddings resized in the forward
pass: `--image_size` (square), or without it the folder's images at their
own size, each side the nearest multiple of the patch size (all images must
come to one size: the figures average over one patch grid). Attention maps,
rollout and distances are then on that grid (rows x columns of the image);
the position-similarity figure shows the learned table on its own grid.
With `cka`, both models run at that size.
"""

import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax

from vit_jax import analysis
from vit_jax import cli
from vit_jax import loading
from vit_jax import predict
from vit_jax.analysis import images as images_lib

flags.DEFINE_string('workdir', None, 'A training run directory.')
flags.DEFINE_string('pretrained_path', None, 'An .npz (instead of --workdir).')
flags.DEFINE_string('model', None, 'Registry name of the .npz model.')
flags.DEFINE_string(
    'images', 'digits', "'digits' (bundled test split) or a folder of images."
)
flags.DEFINE_string('tfds_data_dir', None, 'tfds directory for digits.')
flags.DEFINE_integer(
    'num_images', 128, 'Images averaged over (the paper uses 128).'
)
flags.DEFINE_integer(
    'image_size',
    None,
    "Square size to run at (default: the model's; another one needs "
    '--dynamic_image_size).',
)
loading.define_dynamic_image_size_flag(
    "at --image_size, or at the folder images' own size (one size for all)."
)
# --help lists it with this program's own flags.
flags.adopt_module_key_flags(loading)
flags.DEFINE_string(
    'out',
    None,
    'Output folder (default: <workdir>/analysis, ' 'or <workdir>/cka for cka).',
)
# The cka subcommand's own flags.
flags.DEFINE_string('workdir_b', None, 'cka: a second training run.')
flags.DEFINE_string(
    'pretrained_path_b',
    None,
    'cka: a second model as an .npz (instead of --workdir_b).',
)
flags.DEFINE_string(
    'model_b', None, 'cka: registry name of --pretrained_path_b.'
)
flags.DEFINE_list(
    'layers',
    None,
    'cka: layer names of the model (default: the first '
    "block's input and every block's output).",
)
flags.DEFINE_list('layers_b', None, 'cka: layer names of the second model.')
flags.DEFINE_enum(
    'cka_pooling',
    'flatten',
    ['flatten', 'mean'],
    'cka: compare every token / position (flatten) or their ' 'mean.',
)
flags.DEFINE_integer('cka_batch', 64, 'cka: minibatch size of the estimator.')
FLAGS = flags.FLAGS
COMMANDS = ('cka',)
_CKA_FLAGS = (
    'workdir_b',
    'pretrained_path_b',
    'model_b',
    'layers',
    'layers_b',
    'cka_pooling',
    'cka_batch',
)


def model_from_workdir(workdir: str):
  """(model, params, image_size, class names) of a training run."""
  loaded = loading.load_run(workdir)
  logging.info('Parameters from %s', loaded.source)
  return loaded.model, loaded.params, loaded.image_size[0], loaded.class_names


def model_from_npz(path: str, name: str):
  """(model, params, image_size, None) of a published-layout .npz."""
  if not name:
    raise app.UsageError('--pretrained_path needs --model (e.g. ViT-B_16).')
  loaded = loading.load_npz(path, name)
  return loaded.model, loaded.params, loaded.image_size[0], None


def run_size(model: Any, size: int, source: str) -> tuple[Any, tuple[int, int]]:
  """(the model to run, (height, width) to run it at), from the flags.

  Args:
    model: The loaded model.
    size: The image size it was made for.
    source: What it was loaded from (for messages).

  Raises:
    app.UsageError: another size without --dynamic_image_size, a size that
      is not a multiple of the patch size, or images of several sizes.
    ValueError: --dynamic_image_size for a model without the option.
  """
  if not FLAGS.dynamic_image_size:
    if FLAGS.image_size and FLAGS.image_size != size:
      raise app.UsageError(
          f'--image_size={FLAGS.image_size}: {source} was made for {size} px; '
          'add --dynamic_image_size to resize its position embeddings in the '
          'forward pass.'
      )
    return model, (size, size)
  model = loading.dynamic_model(model, source)
  stride = tuple(model.total_stride)
  if FLAGS.image_size:
    if FLAGS.image_size % stride[0] or FLAGS.image_size % stride[1]:
      raise app.UsageError(
          f'--image_size={FLAGS.image_size} is not a multiple of the patch '
          f'size {stride[0]}x{stride[1]} of {source}.'
      )
    return model, (FLAGS.image_size, FLAGS.image_size)
  if FLAGS.images == 'digits':
    raise app.UsageError(
        '--dynamic_image_size with --images=digits needs --image_size (the '
        'digits have no size of their own here).'
    )
  sizes = sorted(
      {
          predict.own_size(path, stride)
          for path in images_lib.folder_images(FLAGS.images, FLAGS.num_images)
      }
  )
  if len(sizes) > 1:
    shown = ', '.join(f'{h}x{w}' for h, w in sizes[:4])
    raise app.UsageError(
        f'--dynamic_image_size: the images in {FLAGS.images} come to '
        f'{len(sizes)} sizes ({shown}) and the figures average over one patch '
        'grid: pass --image_size, or a folder of images of one size.'
    )
  return model, sizes[0]


def _load_images(size: int | tuple[int, int]):
  try:
    return images_lib.load_images(
        FLAGS.images, size, FLAGS.num_images, FLAGS.tfds_data_dir
    )
  except FileNotFoundError as e:
    raise app.UsageError(f'--images={FLAGS.images}: {e}') from e


def _name(workdir: str | None, model: str | None) -> str:
  # Without a workdir, model_from_npz has refused a missing --model already.
  return os.path.basename(os.path.normpath(workdir)) if workdir else str(model)


def run_cka() -> dict[str, Any]:
  """The cka subcommand: the flags checked, the models loaded, CKA written.

  Raises:
    app.UsageError: contradictory or incomplete flags, naming them.
  """
  if FLAGS.workdir_b and FLAGS.pretrained_path_b:
    raise app.UsageError(
        'Pass at most one of --workdir_b or '
        '--pretrained_path_b (the second model).'
    )
  if FLAGS.model_b and not FLAGS.pretrained_path_b:
    raise app.UsageError(
        '--model_b names the model of --pretrained_path_b; '
        'pass --pretrained_path_b too (or --workdir_b).'
    )
  if FLAGS.layers_b and not (FLAGS.workdir_b or FLAGS.pretrained_path_b):
    raise app.UsageError(
        '--layers_b needs a second model (--workdir_b or '
        '--pretrained_path_b).'
    )
  if FLAGS.workdir:
    model, params, size, _ = model_from_workdir(FLAGS.workdir)
  else:
    model, params, size, _ = model_from_npz(FLAGS.pretrained_path, FLAGS.model)
  model, size = run_size(model, size, _name(FLAGS.workdir, FLAGS.model))
  images, _ = _load_images(size)
  second = {}
  if FLAGS.workdir_b or FLAGS.pretrained_path_b:
    if FLAGS.workdir_b:
      model_b, params_b, size_b, _ = model_from_workdir(FLAGS.workdir_b)
    else:
      if not FLAGS.model_b:
        raise app.UsageError(
            '--pretrained_path_b needs --model_b (e.g. ' 'ViT-B_16).'
        )
      model_b, params_b, size_b, _ = model_from_npz(
          FLAGS.pretrained_path_b, FLAGS.model_b
      )
    size_b = (size_b, size_b)
    if FLAGS.dynamic_image_size:  # Both at the one size.
      model_b = loading.dynamic_model(
          model_b, _name(FLAGS.workdir_b, FLAGS.model_b)
      )
      size_b = size
    second = dict(
        model_b=model_b,
        params_b=jax.device_put(params_b),
        images_b=(images if size_b == size else _load_images(size_b)[0]),
        name_b=_name(FLAGS.workdir_b, FLAGS.model_b),
        layers_b=FLAGS.layers_b,
    )
  out = FLAGS.out or os.path.join(FLAGS.workdir or '.', 'cka')
  try:
    results = analysis.analyze_cka(
        model,
        jax.device_put(params),
        images,
        out,
        name_a=_name(FLAGS.workdir, FLAGS.model),
        layers_a=FLAGS.layers,
        pooling=FLAGS.cka_pooling,
        batch_size=FLAGS.cka_batch,
        **second,
    )
  except ValueError as e:
    # Argument names in the library's messages -> the flags that set them.
    message = str(e)
    for argument, flag in (
        ('layers_a', '--layers'),
        ('layers_b', '--layers_b'),
        ('batch_size', '--cka_batch'),
    ):
      message = message.replace(f'{argument}:', f'{flag}:').replace(
          f'{argument}=', f'{flag}='
      )
    raise app.UsageError(message) from e
  logging.info(
      'Wrote %s and %s to %s',
      ', '.join(results['figures']),
      analysis.CKA_RESULTS_FILE,
      out,
  )
  return results


def main(argv):
  if len(argv) > 2 or (len(argv) == 2 and argv[1] not in COMMANDS):
    raise app.UsageError(
        f'Unexpected arguments: {argv[1:]} (the one '
        f'subcommand is {" / ".join(COMMANDS)}).'
    )
  command = argv[1] if len(argv) == 2 else None
  if bool(FLAGS.workdir) == bool(FLAGS.pretrained_path):
    raise app.UsageError('Pass exactly one of --workdir or --pretrained_path.')
  if FLAGS.num_images < 1:
    raise app.UsageError(f'--num_images={FLAGS.num_images}: give 1 or more.')
  if FLAGS.images != 'digits' and not os.path.isdir(FLAGS.images):
    raise app.UsageError(
        f'--images={FLAGS.images}: no such folder (give '
        "'digits' or a folder of images)."
    )
  out = FLAGS.out or os.path.join(FLAGS.workdir or '.', command or 'analysis')
  if os.path.exists(out) and not os.path.isdir(out):
    raise app.UsageError(
        f'--out={out} is a file: give a folder for the ' 'figures.'
    )
  if command == 'cka':
    results = run_cka()
    print(
        json.dumps(
            {
                'figures': results['figures'],
                'num_images': results['num_images'],
                'between': results.get('between'),
            },
            indent=1,
        )
    )
    return
  given = [f'--{name}' for name in _CKA_FLAGS if FLAGS[name].present]
  if given:
    raise app.UsageError(
        f'{", ".join(given)}: only for the cka subcommand '
        '(python -m vit_jax.analysis cka ...).'
    )
  if FLAGS.workdir:
    model, params, size, class_names = model_from_workdir(FLAGS.workdir)
  else:
    model, params, size, class_names = model_from_npz(
        FLAGS.pretrained_path, FLAGS.model
    )
  model, size = run_size(
      model, size, FLAGS.workdir or str(FLAGS.pretrained_path)
  )
  images, labels = _load_images(size)
  titles = None
  if labels is not None:
    titles = [class_names[l] if class_names else str(l) for l in labels]
  params = jax.device_put(params)
  results = analysis.analyze(model, params, images, out, titles=titles)
  logging.info(
      'Wrote %s and %s to %s',
      ', '.join(results['figures']),
      analysis.RESULTS_FILE,
      out,
  )
  print(
      json.dumps(
          {k: v for k, v in results.items() if k != 'filter_variance_ratios'},
          indent=1,
      )
  )


if __name__ == '__main__':
  cli.run(main)
