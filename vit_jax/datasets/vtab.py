"""VTAB-1k: the 19 tasks of the Visual Task Adaptation Benchmark, 1k version.

Each task is a tensorflow-datasets dataset read as the benchmark defines it
(google-research/task_adaptation, `task_adaptation/data/*.py`, the code the
benchmark and the ViT paper's Appendix D.10 used): a dataset name, config
and version, a label (a feature, or a function of the example's features),
the number of classes and three splits, as tfds split strings:

  * `train800`: the first 800 examples of the task's training split;
  * `val200`: 200 held-out examples (for choosing hyper-parameters);
  * `train800val200`: both, the 1,000 examples the final runs train on;
  * `test`: the examples the reported accuracy is measured on.

A run selects a task with `config.dataset='vtab/<task>'`, e.g.
`vtab/clevr_count` (`vit_jax.input_pipeline` reads it through this table);
`config.train_split` / `config.eval_split` name one of the splits above.

The tasks fall in three groups: natural (7), specialized (4) and structured
(8); the benchmark's score is the mean accuracy over all 19.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import tensorflow as tf

PREFIX = 'vtab/'
NATURAL = 'natural'
SPECIALIZED = 'specialized'
STRUCTURED = 'structured'
GROUPS = (NATURAL, SPECIALIZED, STRUCTURED)
# The split names a VTAB task accepts (config.train_split / eval_split).
SPLITS = ('train800', 'val200', 'train800val200', 'test')
TRAIN_SPLIT = 'train800val200'  # What the final runs train on.
TEST_SPLIT = 'test'  # What they report.
HOLDOUT_SPLIT = 'val200'  # Where hyper-parameters are chosen...
HOLDOUT_TRAIN_SPLIT = 'train800'  # ...training on the rest.

Features = Mapping[str, tf.Tensor]
_TRAIN_EXAMPLES = 800
_VAL_EXAMPLES = 200


@dataclasses.dataclass(frozen=True)
class Splits:
  """Where a task's splits lie in its tfds splits (task_adaptation's rules).

  `train800` is always `train[:800]`. `val200` is 200 examples of `val`: its
  first 200, or, when `val` is 'train', the 200 right after the first
  `train_percent` percent of it (task_adaptation's own "train" split; its
  remainder is the "val" split). The test set is the tfds split `test`, or,
  for a dataset published as one split, what follows the first
  `train_percent + val_percent` percent of `train`.

  Attributes:
    val: The tfds split `val200` is taken from.
    train_percent: With `val='train'`: the percentage of `train` before it.
    test: The tfds split of the test set; None: the rest of `train`.
    val_percent: With `test=None`: the percentage of `train` after the
      first `train_percent` that is neither train nor test.
  """

  val: str = 'validation'
  train_percent: int = 0
  test: str | None = 'test'
  val_percent: int = 0

  def resolve(self, train_size: int) -> dict[str, str]:
    """The task's splits as tfds split strings.

    Args:
      train_size: Examples in the dataset's tfds `train` split (the slices
        are counted in examples, as task_adaptation counts them).

    Returns:
      {name in `SPLITS`: tfds split string}.
    """
    # Integer arithmetic as task_adaptation's: `percent * n // 100`.
    start = self.train_percent * train_size // 100
    if self.val == 'train':
      val = f'train[{start}:{start + _VAL_EXAMPLES}]'
    else:
      val = f'{self.val}[:{_VAL_EXAMPLES}]'
    test = self.test
    if test is None:
      test = f'train[{start + self.val_percent * train_size // 100}:]'
    train = f'train[:{_TRAIN_EXAMPLES}]'
    return {
        'train800': train,
        'val200': val,
        'train800val200': f'{train}+{val}',
        'test': test,
    }


LabelFn = Callable[[Features], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Task:
  """One VTAB-1k task.

  Attributes:
    name: The task; `config.dataset` is `vtab/<name>`.
    group: NATURAL, SPECIALIZED or STRUCTURED.
    tfds_name: The tfds dataset with its config and version
      (`name[/config]:version`), as task_adaptation reads it.
    num_classes: Classes of the task's label.
    splits: Where its splits lie in the tfds splits.
    label: The tfds feature that is the label, or a function from the
      example's decoded features (the image left encoded) to the label.
    image_scale: Factor that takes the stored pixel values to 0..255
      (dsprites stores 0 and 1); 1 leaves the encoded image as it is.
  """

  name: str
  group: str
  tfds_name: str
  num_classes: int
  splits: Splits
  label: str | LabelFn = 'label'
  image_scale: int = 1

  @property
  def dataset(self) -> str:
    """Its `config.dataset` name, `vtab/<name>`."""
    return PREFIX + self.name

  def label_of(self, features: Features) -> tf.Tensor:
    """The example's label (int64) from its tfds features."""
    if isinstance(self.label, str):
      label = features[self.label]
    else:
      label = self.label(features)
    return tf.cast(label, tf.int64)

  def example(self, features: Features, image_key: str) -> dict[str, Any]:
    """{'image': encoded bytes, 'label': int64} of a tfds example.

    Args:
      features: The tfds example with its image still encoded (read with
        `tfds.decode.SkipDecoding()` for `image_key`).
      image_key: The image feature.

    Returns:
      The example as the input pipeline reads every dataset.
    """
    image = features[image_key]
    if self.image_scale != 1:
      # Re-encoded (PNG: lossless), so that the pipeline decodes every
      # dataset's images the same way.
      pixels = tf.io.decode_png(image) * tf.constant(self.image_scale, tf.uint8)
      image = tf.io.encode_png(pixels)
    return {'image': image, 'label': self.label_of(features)}


def _clevr_count(features: Features) -> tf.Tensor:
  # task_adaptation data/clevr.py `_count_preprocess_fn`: scenes hold 3 to
  # 10 objects; the label is the count minus 3 (8 classes).
  return tf.size(features['objects']['size']) - 3


def _bin(value: tf.Tensor, thresholds: tuple[float, ...]) -> tf.Tensor:
  """Index of the last of the sorted `thresholds` strictly below `value`."""
  # task_adaptation's `tf.reduce_max(tf.where((thrs - dist) < 0))`.
  below = tf.constant(thresholds, tf.float32) - value < 0
  return tf.reduce_max(tf.where(below))


# task_adaptation data/clevr.py `_closest_object_preprocess_fn`: bins of the
# depth (pixel_coords[:, 2]) of the nearest object, "uniformly spaced and
# more or less balanced".
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)


def _clevr_distance(features: Features) -> tf.Tensor:
  depth = tf.reduce_min(features['objects']['pixel_coords'][:, 2])
  return _bin(depth, CLEVR_DISTANCE_THRESHOLDS)


# task_adaptation data/kitti.py `_closest_vehicle_distance_pp`: distance z
# (metres, camera coordinates) of the nearest Car, Van or Truck (KITTI types
# 0, 1, 2) in three bins; 1000 m stands for "no vehicle" (the fourth class).
KITTI_VEHICLE_TYPES = 3  # Types below this are vehicles.
KITTI_NO_VEHICLE_DISTANCE = 1000.0
KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)


def _kitti_distance(features: Features) -> tf.Tensor:
  objects = features['objects']
  vehicles = objects['type'] < KITTI_VEHICLE_TYPES
  depths = tf.boolean_mask(objects['location'][:, 2], vehicles)
  nearest = tf.reduce_min(
      tf.concat([depths, tf.constant([KITTI_NO_VEHICLE_DISTANCE])], 0)
  )
  return _bin(nearest, KITTI_DISTANCE_THRESHOLDS)


def _dsprites_bins(feature: str, num_values: int, num_classes: int) -> LabelFn:
  """The label: `feature`'s `num_values` values in `num_classes` bins."""
  # task_adaptation data/dsprites.py: neighbouring values grouped, the bin
  # being floor(value / (num_values / num_classes)).
  factor = num_values / num_classes

  def label(features: Features) -> tf.Tensor:
    value = tf.cast(features[feature], tf.float32)
    return tf.math.floordiv(value, factor)

  return label


DSPRITES_BINS = 16  # task_adaptation scripts/run_all_tasks.sh: num_classes=16.

# Splits of the datasets with a tfds `validation` split (task_adaptation:
# "train800": train[:800], "val200": validation[:200], test: test).
_VALIDATION = Splits()


def _tasks() -> tuple[Task, ...]:
  """The 19 tasks, group by group, in the benchmark's order.

  Sources (task_adaptation, `task_adaptation/data/<file>`): each task's
  dataset name and version pattern, label, classes and split rule are those
  of its data class; the 19 tasks and their arguments are those of
  `scripts/run_all_tasks.sh`.
  """
  return (
      # caltech.py: _TRAIN_SPLIT_PERCENT = 90 of tfds train; test: test.
      Task(
          'caltech101',
          NATURAL,
          'caltech101:3.*.*',
          102,
          Splits(val='train', train_percent=90),
      ),
      # cifar.py: TRAIN_SPLIT_PERCENT = 90.
      Task(
          'cifar100',
          NATURAL,
          'cifar100:3.*.*',
          100,
          Splits(val='train', train_percent=90),
      ),
      # dtd.py: tfds validation split (the 1st official fold).
      Task('dtd', NATURAL, 'dtd:3.*.*', 47, _VALIDATION),
      # oxford_flowers102.py: tfds validation split.
      Task(
          'oxford_flowers102',
          NATURAL,
          'oxford_flowers102:2.*.*',
          102,
          _VALIDATION,
      ),
      # oxford_iiit_pet.py: TRAIN_SPLIT_PERCENT = 80. It read version
      # 3.*.*, which tfds no longer builds; 4.0.0 "adds head bounding boxes,
      # fixes corrupt images".
      Task(
          'oxford_iiit_pet',
          NATURAL,
          'oxford_iiit_pet:4.*.*',
          37,
          Splits(val='train', train_percent=80),
      ),
      # sun397.py: config "tfds", tfds validation split.
      Task('sun397', NATURAL, 'sun397/tfds:4.*.*', 397, _VALIDATION),
      # svhn.py: TRAIN_SPLIT_PERCENT = 90 (the "extra" split unused).
      Task(
          'svhn',
          NATURAL,
          'svhn_cropped:3.*.*',
          10,
          Splits(val='train', train_percent=90),
      ),
      # patch_camelyon.py: tfds validation split.
      Task(
          'patch_camelyon',
          SPECIALIZED,
          'patch_camelyon:2.*.*',
          2,
          _VALIDATION,
      ),
      # eurosat.py: subset "rgb", one tfds split: 60% train, 20% val, the
      # last 20% test.
      Task(
          'eurosat',
          SPECIALIZED,
          'eurosat/rgb:2.*.*',
          10,
          Splits(val='train', train_percent=60, test=None, val_percent=20),
      ),
      # resisc45.py: one tfds split: 60% train, 20% val, 20% test.
      Task(
          'resisc45',
          SPECIALIZED,
          'resisc45:3.*.*',
          45,
          Splits(val='train', train_percent=60, test=None, val_percent=20),
      ),
      # diabetic_retinopathy.py: config "btgraham-300", tfds validation
      # split (the heavy augmentation is off by default and not used).
      Task(
          'diabetic_retinopathy',
          SPECIALIZED,
          'diabetic_retinopathy_detection/btgraham-300:3.*.*',
          5,
          _VALIDATION,
      ),
      # clevr.py: TRAIN_SPLIT_PERCENT = 90; the test set is the tfds
      # validation split (tfds' test split has no scene annotations).
      Task(
          'clevr_count',
          STRUCTURED,
          'clevr:3.*.*',
          8,
          Splits(val='train', train_percent=90, test='validation'),
          label=_clevr_count,
      ),
      Task(
          'clevr_distance',
          STRUCTURED,
          'clevr:3.*.*',
          6,
          Splits(val='train', train_percent=90, test='validation'),
          label=_clevr_distance,
      ),
      # dmlab.py: version 2.0.1, tfds validation split.
      Task('dmlab', STRUCTURED, 'dmlab:2.0.1', 6, _VALIDATION),
      # dsprites.py: one tfds split: 80% train, 10% val, 10% test; the
      # image (0/1) is scaled to 0..255 and the attribute binned.
      Task(
          'dsprites_location',
          STRUCTURED,
          'dsprites:2.*.*',
          DSPRITES_BINS,
          Splits(val='train', train_percent=80, test=None, val_percent=10),
          label=_dsprites_bins('label_x_position', 32, DSPRITES_BINS),
          image_scale=255,
      ),
      Task(
          'dsprites_orientation',
          STRUCTURED,
          'dsprites:2.*.*',
          DSPRITES_BINS,
          Splits(val='train', train_percent=80, test=None, val_percent=10),
          label=_dsprites_bins('label_orientation', 40, DSPRITES_BINS),
          image_scale=255,
      ),
      # kitti.py: tfds validation split. It read version 3.1.0, which tfds
      # can no longer generate (3.2.0 "devkit updated", 3.3.0 "added labels
      # for occluded"); 3.* reads what tfds builds now.
      Task(
          'kitti_distance',
          STRUCTURED,
          'kitti:3.*.*',
          4,
          _VALIDATION,
          label=_kitti_distance,
      ),
      # smallnorb.py: val200 is the first 200 of tfds test, the test set
      # its second half (VAL_SPLIT_PERCENT = 50); labels are the tfds
      # features (18 azimuths, 9 elevations).
      Task(
          'smallnorb_azimuth',
          STRUCTURED,
          'smallnorb:2.*.*',
          18,
          Splits(val='test', test='test[50%:]'),
          label='label_azimuth',
      ),
      Task(
          'smallnorb_elevation',
          STRUCTURED,
          'smallnorb:2.*.*',
          9,
          Splits(val='test', test='test[50%:]'),
          label='label_elevation',
      ),
  )


TASKS: dict[str, Task] = {t.name: t for t in _tasks()}


def is_task(dataset: str) -> bool:
  """Whether `config.dataset` names a VTAB task (`vtab/...`)."""
  return dataset.startswith(PREFIX)


def get_task(name: str) -> Task:
  """The task named `name` or `vtab/<name>`.

  Raises:
    ValueError: an unknown task, with the list of tasks.
  """
  task = TASKS.get(name.removeprefix(PREFIX))
  if task is None:
    raise ValueError(
        f'Unknown VTAB task {name!r}: use vtab/<task> with a task among '
        f'{", ".join(TASKS)}.'
    )
  return task


def tasks_of(group: str) -> tuple[Task, ...]:
  """The tasks of `group` (NATURAL, SPECIALIZED or STRUCTURED), in order."""
  return tuple(t for t in TASKS.values() if t.group == group)
