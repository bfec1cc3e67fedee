"""ImageNet-ReaL, -v2, -A, -R and -Sketch evaluators.

Known answers on hand-made cases: logits and labels written here, counted
by hand; and small tfds datasets in the real builders' format, scored by a
model whose predictions are fixed (a zero head kernel: the logits are the
head's bias, whatever the image).
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tfds_fixtures

from helpers import init_params
from helpers import random_images
from helpers import run_module
from helpers import tiny_model
from vit_jax import config_lib
from vit_jax import evaluate
from vit_jax import input_pipeline
from vit_jax import sharding
from vit_jax import train
from vit_jax.evaluators import classification
from vit_jax.evaluators import imagenet_variants

# The 200 classes as ImageNet-1k indices, as timm lists them
# (timm/data/_info/imagenet_a_indices.txt, imagenet_r_indices.txt): a source
# other than the WordNet ids the package ships.
IMAGENET_A_INDICES = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76,
    79, 89, 90, 94, 96, 97, 99, 105, 107, 108, 110, 113, 124, 125, 130,
    132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295,
    298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323,
    324, 326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386, 397,
    400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438,
    445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492, 496, 514, 516,
    528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575,
    579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668,
    677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765,
    768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815,
    820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880,
    888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947,
    951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988,
)  # fmt: skip
IMAGENET_R_INDICES = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79,
    84, 90, 94, 96, 97, 99, 100, 105, 107, 113, 122, 125, 130, 132, 144,
    145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187,
    195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250,
    251, 254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289, 291,
    292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327,
    330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355, 361, 362, 365,
    366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414, 425, 428,
    430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476,
    483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609,
    613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768, 774, 776,
    779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883,
    889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948,
    949, 951, 953, 954, 957, 963, 965, 967, 980, 981, 983, 988,
)  # fmt: skip


# ----------------------------------------------------------------------------
# The 200-class lists.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'name, expected',
    [('imagenet_a', IMAGENET_A_INDICES), ('imagenet_r', IMAGENET_R_INDICES)],
)
def test_subsets_are_the_published_200_classes(name, expected):
  subset = imagenet_variants.class_subset(name)
  assert len(expected) == 200 and len(set(expected)) == 200
  assert list(expected) == sorted(expected)
  assert subset == expected


def test_subset_indices_are_those_wnids_in_the_tfds_label_order(tmp_path):
  # tfds' ImageNet ClassLabel names (WordNet ids, the label order of every
  # variant's tfds features), read without preparing anything.
  names = (
      tfds.builder('imagenet_a', data_dir=str(tmp_path))
      .info.features['label']
      .names
  )
  assert len(names) == 1000
  for name in ('imagenet_a', 'imagenet_r'):
    path = os.path.join(
        os.path.dirname(imagenet_variants.__file__),
        '..',
        'labels',
        f'{name}.txt',
    )
    with open(path, encoding='utf-8') as f:
      wnids = f.read().split()
    assert [names[i] for i in imagenet_variants.class_subset(name)] == wnids
  # Known classes: goldfish (1), stingray (6), goldfinch (11), acorn (988).
  known = {
      1: 'n01443537',
      6: 'n01498041',
      11: 'n01531178',
      988: 'n12267677',
  }
  assert {i: names[i] for i in known} == known
  a = imagenet_variants.class_subset('imagenet_a')
  r = imagenet_variants.class_subset('imagenet_r')
  assert 1 not in a and 1 in r  # Goldfish: a rendition, not in -A.
  assert 6 in a and 6 in r and 988 in a and 988 in r


# ----------------------------------------------------------------------------
# The evaluation step on hand-made logits.
# ----------------------------------------------------------------------------


class Logits:
  """A 'model' whose logits are its input (the batch's 'image')."""

  @staticmethod
  def apply(variables, images, train):
    del variables, train
    return images


def _step(logits, labels, mask=None, class_subset=None):
  batch = {
      'image': jnp.asarray(logits, jnp.float32),
      'labels': jnp.asarray(labels, jnp.float32),
      'mask': jnp.asarray(
          np.ones(len(logits)) if mask is None else mask, jnp.float32
      ),
  }
  sums = classification.eval_step(
      {}, batch, model=Logits(), class_subset=class_subset
  )
  return {k: float(v) for k, v in sums.items()}


def _k_hot(classes_per_image, num_classes):
  out = np.zeros((len(classes_per_image), num_classes), np.float32)
  for row, classes in enumerate(classes_per_image):
    out[row, list(classes)] = 1.0
  return out


def test_real_accuracy_counts_any_real_label_and_skips_unlabelled_images():
  # Predictions (argmax): 3, 7, 2, 9, 4, 1; the fourth image is padding.
  logits = np.full((6, 10), -1.0)
  for row, best in enumerate([3, 7, 2, 9, 4, 1]):
    logits[row, best] = 1.0
  real = [{3, 5}, {1}, set(), {9, 2}, {4}, set()]
  mask = [1, 1, 1, 0, 1, 1]
  sums = _step(logits, _k_hot(real, 10), mask)
  # Counted: images 0, 1, 4 (2 and 5 have no label, 3 is padding); right:
  # 0 (3 is a real label) and 4.
  assert sums['count'] == 3
  assert sums['correct'] == 2
  metrics = imagenet_variants.metrics('imagenet_real', sums)
  assert metrics['imagenet_real/accuracy'] == pytest.approx(2 / 3)
  assert metrics['imagenet_real/examples'] == 3


def test_subset_prediction_is_the_best_class_of_the_subset():
  subset = imagenet_variants.class_subset('imagenet_a')
  logits = np.zeros((3, 1000))
  # Image 0: the best class overall (0, tench) is not an ImageNet-A class;
  # the best of the subset is 6, its label: right.
  logits[0, 0], logits[0, 6] = 9.0, 5.0
  # Image 1: the best of the subset is 11, its label is 6: wrong.
  logits[1, 0], logits[1, 11], logits[1, 6] = 9.0, 5.0, 4.0
  # Image 2: 988 beats every other subset class: right.
  logits[2, 988] = 1.0
  labels = np.eye(1000)[[6, 6, 988]]
  assert _step(logits, labels, class_subset=subset)['correct'] == 2
  # The whole head predicts 0 twice: one right.
  assert _step(logits, labels)['correct'] == 1


# ----------------------------------------------------------------------------
# The evaluators on tfds-format data.
# ----------------------------------------------------------------------------

# Fixed predictions: the logits fall with the class index, so the ranking is
# 0, 1, 2, ...: top-1 is 0, top-5 {0, ..., 4}; among ImageNet-A's classes
# top-1 is 6 and top-5 {6, 11, 13, 15, 17}; among ImageNet-R's 1 and
# {1, 2, 4, 6, 8}.
_BIAS = -0.01 * np.arange(1000, dtype=np.float32)


def _image(seed):
  return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), np.uint8)


# Variant -> (examples' labels, counted, right at top-1, right at top-5).
_CASES = {
    # An image is right when 0 is one of its labels; two have none.
    'imagenet_real': (
        [[0, 5], [5], [], [2, 0], [], [7], [0], [9, 3], [0], [1]],
        8,
        4,
        6,
    ),
    'imagenet_v2': ([0, 6, 1], 3, 1, 2),
    'imagenet_a': ([6, 6, 11, 13, 988, 6], 6, 3, 5),
    'imagenet_r': ([1, 2, 1, 988], 4, 2, 3),
    'imagenet_sketch': ([0, 3, 0, 999], 4, 2, 3),
}


def _examples(name, labels):
  if name == 'imagenet_real':
    return [
        dict(
            image=_image(i),
            file_name=f'{i}.JPEG',
            original_label=(real or [0])[0],
            real_label=real,
        )
        for i, real in enumerate(labels)
    ]
  return [
      dict(image=_image(i), file_name=f'{i}.JPEG', label=label)
      for i, label in enumerate(labels)
  ]


@pytest.fixture(scope='module')
def variants_dir(tmp_path_factory):
  """A tfds data dir with every variant, written as their builders do."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  for name, (labels, *_) in _CASES.items():
    variant = imagenet_variants.VARIANTS[name]
    tfds_name, _, config = variant.tfds_name.partition('/')
    tfds_fixtures.prepare(
        tfds_name,
        data_dir,
        {variant.split: _examples(name, labels)},
        config=config or None,
    )
  return data_dir


def _data(data_dir, **fields):
  return config_lib.section(
      {
          'tfds_data_dir': data_dir,
          'image_size': 16,
          'batch_eval': 8,
          'model_name': 'testing',
          **fields,
      },
      'data',
  )


@pytest.fixture(scope='module')
def fixed_model():
  """(model, params, mesh, shardings): a 1000-way head predicting _BIAS."""
  model, size = tiny_model('vit', num_classes=1000)
  params = init_params(model, random_images((1, size, size, 3)))
  params = jax.tree_util.tree_map(np.asarray, params)
  params['head'] = {
      'kernel': np.zeros_like(params['head']['kernel']),
      'bias': _BIAS,
  }
  mesh = sharding.make_mesh()
  shardings = jax.tree_util.tree_map(
      lambda _: sharding.replicated(mesh), params
  )
  return model, sharding.put_global(params, shardings), mesh, shardings


@pytest.mark.parametrize('name', sorted(_CASES))
def test_evaluator_known_answers_on_tfds_data(name, variants_dir, fixed_model):
  model, params, mesh, shardings = fixed_model
  _, counted, top1, top5 = _CASES[name]
  evaluator = imagenet_variants.VariantEvaluator(
      name, _data(variants_dir), model, mesh, shardings
  )
  assert evaluator.run(params) == {
      f'{name}/accuracy': pytest.approx(top1 / counted),
      f'{name}/top5': pytest.approx(top5 / counted),
      f'{name}/examples': counted,
  }


# ----------------------------------------------------------------------------
# Refusals, and when the evaluators run.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'head, says', [(10, 'this run has a 10-way head'), (None, 'trains no')]
)
def test_a_head_other_than_imagenets_is_refused(head, says):
  with pytest.raises(ValueError) as e:
    imagenet_variants.check_head(['imagenet_r'], head)
  message = str(e.value)
  assert says in message and '\n' not in message
  assert message.startswith('config.evals.imagenet_r.every > 0 ')
  assert message.endswith('or set config.evals.imagenet_r.every=0.')
  imagenet_variants.check_head(['imagenet_r'], 1000)
  imagenet_variants.check_head([], 10)


def test_a_variant_on_a_10_class_run_is_refused_before_the_workdir(tmp_path):
  config = config_lib.get_base()
  config_lib.set_runlocal(config)
  config.tfds_data_dir = str(tmp_path / 'tfds')
  config.evals.imagenet_v2.every = 2
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=r'this run has a 10-way head'):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_an_unprepared_variant_says_how_to_prepare_it_or_turn_it_off(
    tmp_path, fixed_model
):
  model, _, mesh, shardings = fixed_model
  with pytest.raises(input_pipeline.DatasetNotPreparedError) as e:
    imagenet_variants.VariantEvaluator(
        'imagenet_v2', _data(str(tmp_path)), model, mesh, shardings
    )
  message = str(e.value)
  assert '\n' not in message
  # The tfds directory itself, though the name has a builder config.
  assert message.startswith(
      "tfds dataset 'imagenet_v2/matched-frequency' is not prepared in "
      f'{tmp_path}. '
  )
  assert (
      f'`tfds build imagenet_v2/matched-frequency --data_dir={tmp_path}`), '
      f'copy {tmp_path}/imagenet_v2 here'
  ) in message
  assert message.endswith(
      '(Read by config.evals.imagenet_v2; config.evals.imagenet_v2.every=0 '
      'turns it off.)'
  )


def test_a_negative_period_is_refused_when_parsed():
  with pytest.raises(
      ValueError, match=r'^config\.evals\.imagenet_a\.every=-1 must be >= 0'
  ):
    config_lib.parse({'evals': {'imagenet_a': {'every': -1}}})


def test_plan_step_runs_each_variant_at_its_period_and_at_the_end():
  loop = config_lib.section(
      {
          'total_steps': 10,
          'log_every': 100,
          'eval_every': 100,
          'checkpoint_every': 100,
      },
      'loop',
  )
  every = {'imagenet_a': 3, 'imagenet_r': 0, 'imagenet_v2': 4}
  plans = {
      step: train.plan_step(step, loop, 0, False, every)
      for step in range(1, 11)
  }
  assert {s: p.evaluators for s, p in plans.items() if p.evaluators} == {
      3: ('imagenet_a',),
      4: ('imagenet_v2',),
      6: ('imagenet_a',),
      8: ('imagenet_v2',),
      9: ('imagenet_a',),
      10: ('imagenet_a', 'imagenet_v2'),
  }
  assert [s for s, p in plans.items() if p.evaluate] == [3, 4, 6, 8, 9, 10]


class _Objective:

  def evaluate(self, params, eval_fn, dataset, batch_sharding):
    del params, eval_fn, dataset, batch_sharding
    return {'eval/a': 1.0}


class _Fixed:

  def __init__(self, name):
    self.name = name

  def run(self, params):
    return {f'{self.name}/accuracy': params}


def test_evaluations_run_the_due_variants_only():
  evaluations = train.Evaluations(
      objective=_Objective(),
      eval_fn=None,
      dataset=None,
      batch_sharding=None,
      fewshot=None,
      ckpt=None,
      final_params_path='',
      workdir='',
      evaluators={n: _Fixed(n) for n in ('imagenet_a', 'imagenet_r')},
  )
  assert evaluations(0.5, 3, fewshot=False, last=False) == {'eval/a': 1.0}
  assert evaluations(
      0.5, 3, fewshot=False, last=False, evaluators=('imagenet_r',)
  ) == {'eval/a': 1.0, 'imagenet_r/accuracy': 0.5}


def test_a_finished_runs_last_evaluation_includes_the_variants(tmp_path):
  with open(tmp_path / train.METRICS_FILE, 'w') as f:
    for record in [
        {'step': 4, 'eval/accuracy': 0.5, 'imagenet_a/accuracy': 0.125},
        {'step': 8, 'train/loss': 1.0},
        {'step': 8, 'eval/accuracy': 0.75, 'imagenet_real/accuracy': 0.25},
    ]:
      f.write(json.dumps(record) + '\n')
  assert train.finished_run(str(tmp_path), 8, 8) == {
      'step': 8,
      'eval/accuracy': 0.75,
      'imagenet_real/accuracy': 0.25,
      'finished_at_step': 8.0,
  }


@pytest.mark.slow
def test_a_training_run_writes_the_variants_metrics(tmp_path, variants_dir):
  """`python -m vit_jax.main` with ImageNet-A every 2 steps and ReaL at the
  end, trained on the ImageNet-v2 fixture (a 1000-way head)."""
  workdir = tmp_path / 'run'
  result = run_module(
      'vit_jax.main',
      '--config=configs/digits.py:runlocal',
      f'--workdir={workdir}',
      f'--config.tfds_data_dir={variants_dir}',
      '--config.dataset=imagenet_v2/matched-frequency',
      '--config.train_split=test',
      '--config.eval_split=test',
      '--config.batch=4',
      '--config.batch_eval=4',
      '--config.shuffle_buffer=8',
      '--config.total_steps=4',
      '--config.evals.fewshot.every=0',
      '--config.evals.imagenet_a.every=2',
      '--config.evals.imagenet_real.every=100',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / train.METRICS_FILE) as f:
    records = [json.loads(line) for line in f]
  evaluated = {
      r['step']: sorted(k for k in r if k.startswith('imagenet'))
      for r in records
      if 'eval/accuracy' in r
  }
  a = ['imagenet_a/accuracy', 'imagenet_a/examples', 'imagenet_a/top5']
  real = [k.replace('imagenet_a', 'imagenet_real') for k in a]
  assert evaluated == {2: a, 4: sorted(a + real)}
  last = records[-1]
  assert last['imagenet_a/examples'] == 6
  assert last['imagenet_real/examples'] == 8  # Two of ten have no label.
  assert 0 <= last['imagenet_real/accuracy'] <= 1
  assert re.search(r'imagenet_a: 2 batches, 6 images in', result.stderr)


def test_evaluate_scores_the_variants_the_config_turns_on(
    variants_dir, fixed_model
):
  _, params, _, _ = fixed_model
  config = config_lib.get_base()
  config.dataset = 'imagenet_v2/matched-frequency'
  config.train_split = config.eval_split = 'test'
  config.tfds_data_dir = variants_dir
  config.model_name = 'testing'
  config.model = {'patches': {'size': (4, 4)}, 'transformer': {'num_layers': 2}}
  config.image_size = 16
  config.batch_eval = 8
  config.evals.imagenet_a.every = 1
  params = jax.device_get(params)
  metrics = evaluate.evaluate_params(config, params, fewshot=False)
  # ImageNet-v2 as the run's own split (1 of 3 right), ImageNet-A as above.
  assert metrics['eval/accuracy'] == pytest.approx(1 / 3)
  assert {k: v for k, v in metrics.items() if k.startswith('imagenet')} == {
      'imagenet_a/accuracy': 0.5,
      'imagenet_a/top5': pytest.approx(5 / 6),
      'imagenet_a/examples': 6,
  }
  skipped = evaluate.evaluate_params(
      config, params, fewshot=False, variants=False
  )
  assert not [k for k in skipped if k.startswith('imagenet')]


def test_runlocal_turns_the_variants_off():
  # A runlocal run trains on digits: a 10-way head the variants refuse.
  config = config_lib.get_base()
  config.evals.imagenet_real.every = 5
  config.evals.imagenet_sketch.every = 7
  config_lib.set_runlocal(config)
  assert all(
      s.every == 0 for s in config_lib.parse(config).evals.variants.values()
  )
