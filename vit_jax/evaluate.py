r"""Evaluates a trained model: top-1 / top-5 and few-shot linear accuracy.

  # A training run (its config.json and newest checkpoint):
  python -m vit_jax.evaluate --workdir=/tmp/vit_digits
  # An .npz with its experiment config (model, dataset, image size):
  python -m vit_jax.evaluate --config=configs/finetune.py:b16,cifar10 \
      --params=/tmp/b16_c10/final_params.npz --out=/tmp/b16_c10_eval

Any config field can be overridden with `--config.<field>=<value>`, with
--config or --workdir (e.g. `--config.evals.fewshot.shots=1,5` or
`--config.batch_eval=256`); `--print_config` lists every field and exits.
Few-shot shots, seeds and representation come from `config.evals.fewshot`;
`--nofewshot` skips the few-shot evaluation. The ImageNet variants the
config turns on (`config.evals.<name>.every` > 0, e.g.
`--config.evals.imagenet_real.every=1`) are evaluated too;
`--noimagenet_variants` skips them. Results are printed and written to
`<out>/eval_results.json` (default out: the workdir).

`--dynamic_image_size` (ViTs) evaluates at another image size than the
parameters were trained at, e.g. a 16 px run at 32 px:

  python -m vit_jax.evaluate --workdir=/tmp/vit_digits \
      --config.image_size=32 --dynamic_image_size --out=/tmp/digits_at_32

The position embeddings are resized to the new patch grid in the forward
pass (`get_model(..., dynamic_image_size=True)`), not rewritten; the
pipeline resizes every image to the one `config.image_size` (a tfds dataset
or an image folder alike: one size per run; `vit_jax.predict
--dynamic_image_size` takes each image at its own size).
"""

import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import tensorflow as tf

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import config_lib
from vit_jax import fileio
from vit_jax import input_pipeline
from vit_jax import loading
from vit_jax import run_checkpoints
from vit_jax import sharding
from vit_jax.evaluators import classification
from vit_jax.evaluators import fewshot as fewshot_lib
from vit_jax.evaluators import imagenet_variants
import vit_jax.models

RESULTS_FILE = 'eval_results.json'


def evaluate_params(
    config: ml_collections.ConfigDict,
    params: Any,
    *,
    fewshot: bool = True,
    fewshot_off_switch: str = '--nofewshot',
    dynamic_image_size: bool = False,
    variants: bool = True,
) -> dict[str, float]:
  """Classification (few-shot, ImageNet-variant) metrics of `params`.

  The parameters are placed with the config's sharding rules on all devices,
  so models that needed FSDP to train evaluate the same way. The config,
  the batch size and the few-shot data are checked before they are.

  Args:
    config: Experiment config (model, dataset, image size, mesh, evals).
    params: Parameters (host arrays), e.g. from `checkpoint.load`.
    fewshot: Also run the few-shot linear evaluator.
    fewshot_off_switch: How the caller turns the few-shot evaluation off
      (named when its data does not fit the shots).
    dynamic_image_size: Build the model with `dynamic_image_size=True`, so
      that parameters trained at another size evaluate at the config's
      `image_size` (their position embeddings resized in the forward pass).
    variants: Also run the ImageNet-variant evaluators the config turns on
      (`config.evals.<name>.every` > 0).

  Returns:
    `eval/accuracy`, `eval/top5`, `eval/loss`, `eval/examples`; with
    few-shot, `fewshot/<dataset>_<k>shot[_std]`; with variants,
    `<name>/accuracy`, `<name>/top5`, `<name>/examples`.

  Raises:
    ValueError: `dynamic_image_size` for a model without the option.
  """
  run = config_lib.parse(config)
  mesh = sharding.mesh_from_config(run.mesh)
  sharding.check_batch_size(run.data.batch_eval, mesh, what='config.batch_eval')
  source = input_pipeline.get_source(run.data)
  info = input_pipeline.get_dataset_info(run.data, source)
  model = vit_jax.models.get_model(
      num_classes=info.num_classes, **run.model.model_args()
  )
  if dynamic_image_size:
    model = loading.dynamic_model(model, run.model.model_name)
  shardings = sharding.shardings_from_config(
      jax.eval_shape(lambda: params), mesh, run.mesh
  )
  evaluator = None
  if fewshot:  # Checks its dataset against the shots: before any work.
    evaluator = fewshot_lib.FewShotEvaluator(
        run.evals.fewshot,
        run.data,
        model,
        mesh,
        shardings,
        off_switch=fewshot_off_switch,
    )
  variant_evaluators = {}
  if variants:  # Checks the head and the datasets: before any work.
    variant_evaluators = imagenet_variants.make_evaluators(
        run.evals.variants,
        run.data,
        model,
        mesh,
        shardings,
        head_classes=info.num_classes,
    )
  dataset, num_batches = input_pipeline.eval_dataset(run.data, source=source)
  params = sharding.put_global(params, shardings)
  eval_fn = classification.make_eval_fn(
      model, mesh, shardings, run.objective.loss
  )
  metrics = classification.evaluate(
      params,
      eval_fn,
      dataset,
      sharding.batch_sharding(mesh),
      num_batches=num_batches,
  )
  if evaluator is not None:
    metrics.update(evaluator.run(params))
  for variant in variant_evaluators.values():
    metrics.update(variant.run(params))
  return metrics


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the command line's flags.

  Called only when run as a program: another tool's module (`vit_jax.aot`)
  defines flags of the same names, and both may be imported in one process.
  """
  flags.DEFINE_string('workdir', None, 'A training run directory.')
  flags.DEFINE_string(
      'config',
      None,
      'Experiment config (instead of --workdir): '
      'configs/<file>.py[:arg]; then --config.<field>=<value> for any field '
      '(also with --workdir).',
  )
  flags.DEFINE_bool(
      'print_config',
      False,
      'Print every config field with its '
      'value and comment (after the overrides) and exit.',
  )
  flags.DEFINE_string(
      'params', None, ".npz to evaluate (default: the run's newest checkpoint)."
  )
  flags.DEFINE_bool(
      'fewshot',
      True,
      'Also run the few-shot linear evaluator '
      '(--nofewshot: only top-1 / top-5).',
  )
  flags.DEFINE_bool(
      'imagenet_variants',
      True,
      'Also run the ImageNet-variant evaluators the config turns on '
      '(config.evals.<name>.every > 0; --noimagenet_variants: skip them).',
  )
  flags.DEFINE_string(
      'out', None, f'Folder for {RESULTS_FILE} (default: the ' 'workdir).'
  )
  loading.define_dynamic_image_size_flag(
      'evaluate at --config.image_size whatever size the parameters were '
      'trained at.'
  )
  # --help lists it with this program's own flags.
  flags.adopt_module_key_flags(loading)


def main(argv, overrides):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(FLAGS.workdir) == bool(FLAGS.config):
    raise app.UsageError('Pass exactly one of --workdir or --config.')
  config = (
      config_lib.load_run_config(FLAGS.workdir)
      if FLAGS.workdir
      else config_lib.load_config_file(FLAGS.config)
  )
  config_lib.apply_overrides(config, overrides)
  if FLAGS.print_config:
    print(config_lib.describe(config))
    return
  if not FLAGS.params and not FLAGS.workdir:
    raise app.UsageError('--config needs --params=<npz>.')
  out = FLAGS.out or FLAGS.workdir
  if out and tf.io.gfile.exists(out) and not tf.io.gfile.isdir(out):
    raise app.UsageError(
        f'--out={out} is a file: give a folder for ' f'{RESULTS_FILE}.'
    )
  # The config's own checks (and the few-shot data's, in evaluate_params)
  # before the parameters are placed on the devices.
  run = config_lib.parse(config)
  if FLAGS.dynamic_image_size:  # Before the parameters are read.
    loading.dynamic_model(
        vit_jax.models.get_model(num_classes=1, **run.model.model_args()),
        run.model.model_name,
    )
  if FLAGS.params:
    params, source = checkpoint.load(FLAGS.params), FLAGS.params
  else:
    step, params = run_checkpoints.load_params(FLAGS.workdir)
    source = f'{FLAGS.workdir} step {step}'
  metrics = evaluate_params(
      config,
      params,
      fewshot=FLAGS.fewshot,
      dynamic_image_size=FLAGS.dynamic_image_size,
      variants=FLAGS.imagenet_variants,
  )
  metrics = {'params': source, **metrics}
  if out and jax.process_index() == 0:
    tf.io.gfile.makedirs(out)
    fileio.write_text_atomic(
        os.path.join(out, RESULTS_FILE), json.dumps(metrics, indent=1)
    )
  logging.info('Evaluation of %s: %s', source, metrics)
  print(json.dumps(metrics, indent=1))


if __name__ == '__main__':
  _define_flags()
  cli.run(main, config_flag='config')
