"""Input pipelines: tfds datasets, image folders and the bundled `digits`.

Selected by `config.dataset`:
  * any tensorflow-datasets name (`cifar10`, `imagenet2012`, ...), read from
    `config.tfds_data_dir`; `DATASET_PRESETS` give the number of classes and
    the train / test / held-out splits of the paper's datasets;
  * `digits`: scikit-learn's handwritten digits, a local tfds builder (the
    same code path as any tfds dataset, prepared on first use, no network);
  * `vtab/<task>`: one of the 19 VTAB-1k tasks (`datasets.vtab`): its tfds
    dataset read with the task's label, classes and splits (`train800`,
    `val200`, `train800val200`, `test`);
  * `image_folder`: `config.image_folder` holds one sub-folder per class (or
    `train/` and `test/` folders that do), with .jpg/.jpeg/.png files;
    which of them decode is checked once and then read from an index
    (`datasets.folder_index`) while the files are unchanged.

Config fields read here (all optional except `dataset`, `image_size` and
`batch`): `tfds_data_dir`, `tfds_download`, `train_split`, `eval_split`
('holdout' selects the preset's held-out slice), `num_classes`,
`batch_eval`, `shuffle_buffer`, `seed`, `pp` (see
`preprocess.PreprocessConfig`), `image_folder`, `image_folder_test_percent`,
`skip_bad_images`, `model_name` (to check the image size).

Multi-process: each JAX process reads a disjoint shard (an even split of the
tfds split, or every n-th file) and produces its part of the global batch,
which `sharding.prefetch_to_device` assembles into global `jax.Array` values.

Resumable order: epoch `e` is shuffled with a seed derived from
(`config.seed`, e) and every example's augmentation is seeded by (seed,
process, e, index), so the stream of batches is a pure function of the
config. A `TrainIterator`'s state is therefore one integer, the number of
examples it has produced; restoring rebuilds the stream at that position.

NaFlex (`config.naflex.seq_lens` set): every image keeps its aspect ratio
and becomes the tuple `(patches, ptype, yabs, xabs)` of
`preprocess.to_naflex`, held in a batch's 'image'. Each training step draws
one of the sequence lengths (a bucket) from (seed, step) alone
(`bucket_of_step`), and the bucket's batch size keeps the tokens per step
about constant (`bucket_batch_sizes`). The buckets share the one example
stream above: step `s` takes the next `batch(s)` examples of it and
preprocesses them at its sequence length. The state adds the step to the
position, so a resumed run draws the same buckets and reads the same
examples. Evaluation uses the largest sequence length.
"""

from collections.abc import Iterator, Mapping
import concurrent.futures
import dataclasses
import json
import math
import os
import shlex
from typing import Any

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import config_errors
from vit_jax import datasets as local_datasets
from vit_jax import fileio
from vit_jax import preprocess
from vit_jax import sharding as sharding_lib
from vit_jax.datasets import folder_index
from vit_jax.datasets import vtab

# Still importable from here, where the pipeline's users first found it.
prefetch_to_device = sharding_lib.prefetch_to_device

IMAGE_FOLDER = 'image_folder'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
CLASS_NAMES_FILE = 'class_names.json'
_MAX_EPOCHS = 2**40
_MAX_STEPS = 2**62

# Per-dataset defaults: classes, splits (`holdout` is the paper's held-out
# slice of train for hyper-parameter sweeps; `train` excludes it, or
# `holdout_train` is trained on instead while evaluating on it) and
# preprocessing overrides.
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    'digits': dict(
        num_classes=10,
        train='train',
        test='test',
        holdout='train[90%:]',
        pp=dict(inception_crop=False, flip=False),
    ),
    'cifar10': dict(
        num_classes=10, train='train[:98%]', test='test', holdout='train[98%:]'
    ),
    'cifar100': dict(
        num_classes=100, train='train[:98%]', test='test', holdout='train[98%:]'
    ),
    'imagenet2012': dict(
        num_classes=1000,
        train='train[:99%]',
        test='validation',
        holdout='train[99%:]',
    ),
    'oxford_iiit_pet': dict(
        num_classes=37, train='train[:90%]', test='test', holdout='train[90%:]'
    ),
    'oxford_flowers102': dict(
        num_classes=102, train='train[:90%]', test='test', holdout='train[90%:]'
    ),
}
# The VTAB-1k tasks: the final runs train on the 1,000 examples and report
# the test split; hyper-parameters are chosen on val200, training on
# train800. Images are resized, not cropped or flipped (task_adaptation's
# `data_loader.preprocess_fn` only resizes): a crop or a flip changes the
# answer of the structured tasks (object counts, positions, orientations).
DATASET_PRESETS.update(
    {
        task.dataset: dict(
            num_classes=task.num_classes,
            train=vtab.TRAIN_SPLIT,
            test=vtab.TEST_SPLIT,
            holdout=vtab.HOLDOUT_SPLIT,
            holdout_train=vtab.HOLDOUT_TRAIN_SPLIT,
            pp=dict(inception_crop=False, flip=False),
        )
        for task in vtab.TASKS.values()
    }
)


class DatasetNotPreparedError(RuntimeError):
  """A tfds dataset has no prepared files and cannot be prepared here."""


class BadImageError(ValueError):
  """An image file that cannot be decoded."""


# ----------------------------------------------------------------------------
# The data section of a run's config (composed by `vit_jax.config_lib`).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NaflexSection:
  """NaFlex inputs: images at their own aspect ratio, as patch sequences.

  Attributes mirror `config.naflex.*` (see `get_base()`).

  Attributes:
    patch_size: Pixels per patch side: the model's patch size (0 in a
      config means the model's; `config_lib.parse` sets it).
    seq_lens: Tokens per image, one entry per bucket (e.g. (256, 576,
      784)); () turns NaFlex off (fixed-size images).
  """

  patch_size: int
  seq_lens: tuple[int, ...]

  def __post_init__(self):
    lens = self.seq_lens
    if not isinstance(lens, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lens
    ):
      raise ValueError(
          f'config.naflex.seq_lens={lens!r} must be a tuple of positive '
          'token counts, e.g. (256, 576, 784), or () for fixed-size images.'
      )
    if len(set(lens)) != len(lens):
      raise ValueError(
          f'config.naflex.seq_lens={lens!r} repeats a length: give each '
          'bucket once.'
      )
    if self.patch_size < 0:
      raise ValueError(
          f'config.naflex.patch_size={self.patch_size} must be the '
          "model's patch size (or 0: the model's)."
      )

  @property
  def enabled(self) -> bool:
    """Whether the pipeline yields NaFlex tuples."""
    return bool(self.seq_lens)

  @property
  def eval_seq_len(self) -> int:
    """The sequence length of evaluation, the largest bucket's."""
    return max(self.seq_lens)


@dataclasses.dataclass(frozen=True)
class DataSection:
  """Where the images come from and how they are batched.

  Attributes mirror the config fields of the same names (see `get_base()`).
  `train_split`, `eval_split` and `num_classes` may be None: the dataset's
  preset (or the data itself) decides.
  """

  dataset: str
  tfds_data_dir: str | None
  tfds_download: bool
  image_folder: str
  image_folder_test_percent: int
  skip_bad_images: bool
  train_split: str | None
  eval_split: str | None
  num_classes: int | None
  image_size: int
  pp: Mapping[str, Any]
  shuffle_buffer: int
  batch: int
  batch_eval: int
  seed: int
  naflex: NaflexSection = dataclasses.field(metadata={'section': NaflexSection})

  def __post_init__(self):
    if not self.dataset:
      raise ValueError(
          "config.dataset is not set: use a tfds name, 'digits' "
          "or 'image_folder'."
      )
    if vtab.is_task(self.dataset):
      vtab.get_task(self.dataset)  # An unknown task is named here.
      for field, split, accepted in (
          ('train_split', self.train_split, vtab.SPLITS),
          ('eval_split', self.eval_split, (*vtab.SPLITS, 'holdout')),
      ):
        if split is not None and split not in accepted:
          raise ValueError(
              f'config.{field}={split!r} is not a split of the VTAB task '
              f'{self.dataset}: use one of {", ".join(accepted)}, or leave it '
              f'unset (training on {vtab.TRAIN_SPLIT}, evaluating on '
              f'{vtab.TEST_SPLIT}).'
          )
    if not isinstance(self.image_size, int) or self.image_size <= 0:
      raise ValueError(
          f'config.image_size={self.image_size!r} must be a '
          'positive number of pixels.'
      )
    config_errors.check_positive(
        batch=self.batch,
        batch_eval=self.batch_eval,
        shuffle_buffer=self.shuffle_buffer,
    )
    if self.num_classes is not None and self.num_classes <= 0:
      raise ValueError(
          f'config.num_classes={self.num_classes} must be '
          'positive (or None: from the dataset).'
      )
    crop = self.pp.get('eval_crop_fraction', 1.0)
    if self.naflex.enabled and crop < 1.0:
      raise ValueError(
          f'config.pp.eval_crop_fraction={crop} crops to a square; NaFlex '
          'evaluates whole images at their aspect ratio: set it to 1.0 (or '
          'config.naflex.seq_lens=()).'
      )


# ----------------------------------------------------------------------------
# Sources: encoded images + integer labels, one shard per process.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Shard:
  """One process's part of a split.

  Attributes:
    dataset: Deterministic tf.data stream of {'image': encoded bytes,
      'label': int64}.
    num_examples: Examples in this shard.
    max_num_examples: Examples in the largest shard of any process (eval
      pads every process to the same number of batches).
  """

  dataset: tf.data.Dataset
  num_examples: int
  max_num_examples: int


class TfdsSource:
  """A tensorflow-datasets dataset (catalogue or local builder).

  Its examples' labels are the dataset's supervised label, or the feature
  `label_key` names (e.g. ImageNet-ReaL's 'real_label', a list of classes).
  """

  def __init__(
      self,
      name: str,
      data_dir: str | None,
      download: bool,
      label_key: str | None = None,
  ):
    self.name = name
    self._label_feature = label_key  # None: the supervised label.
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      presets = sorted(n for n in DATASET_PRESETS if not vtab.is_task(n))
      raise ValueError(
          f'Unknown dataset {name!r} (config.dataset). Accepted: '
          f'{", ".join(presets)}, {IMAGE_FOLDER!r} (with '
          "config.image_folder), 'vtab/<task>' (a VTAB-1k task), or any "
          'tensorflow-datasets name (tfds.list_builders()).'
      ) from e
    if not self.builder.is_prepared():
      self._prepare(download)
      # Another process may have prepared it while this one waited for the
      # lock: a fresh builder reads the files' metadata either way.
      self.builder = tfds.builder(name, data_dir=data_dir)
    self._describe()

  def _describe(self) -> None:
    """Sets the image and label features, the class names and count."""
    keys = self.builder.info.supervised_keys or ('image', 'label')
    self.image_key, self.label_key = keys[0], self._label_feature or keys[1]
    label = self.builder.info.features[self.label_key]
    self.class_names: tuple[str, ...] = tuple(
        getattr(label, 'names', None) or ()
    )
    self.num_classes: int | None = getattr(label, 'num_classes', None)

  def _prepare(self, download: bool) -> None:
    # The tfds directory itself, also for a name with a builder config
    # ('imagenet_v2/matched-frequency': one directory deeper).
    data_dir = str(self.builder.data_dir_root)
    if self.name in local_datasets.LOCAL_BUILDERS:
      local_datasets.prepare_local_builder(self.builder)
      return
    how = (
        f'Prepare it on a machine with network access (`tfds build '
        f'{shlex.quote(self.name)} --data_dir={data_dir}`), copy '
        f'{data_dir}/{self.builder.name} here and point config.tfds_data_dir '
        'at it'
    )
    if not download:
      raise DatasetNotPreparedError(
          f'tfds dataset {self.name!r} is not prepared in {data_dir}. {how}; '
          'or set config.tfds_download=True to download it now (needs '
          'network access; some datasets, e.g. imagenet2012, need a manual '
          'download first).'
      )
    try:
      self.builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetNotPreparedError(
          f'tfds dataset {self.name!r} is not prepared in {data_dir} and '
          f'downloading it failed ({type(e).__name__}: {e}). Without network '
          f'access: {how}.'
      ) from e

  # What a dataset with its own reading of the examples (`VtabSource`)
  # changes: how a split name becomes a tfds split, and an example's label.

  def tfds_split(self, split: str) -> str:
    """The tfds split string of `split` (the same here)."""
    return split

  def _label(self, features: Mapping[str, Any]) -> tf.Tensor:
    return tf.cast(features[self.label_key], tf.int64)

  def _example(self, features: Mapping[str, Any]) -> dict[str, tf.Tensor]:
    return {'image': features[self.image_key], 'label': self._label(features)}

  def _read(self, tfds_split: str) -> tf.data.Dataset:
    """The tfds examples of `tfds_split`, in order, images left encoded."""
    return self.builder.as_dataset(
        split=tfds_split,
        shuffle_files=False,
        decoders={self.image_key: tfds.decode.SkipDecoding()},
        # The pipeline re-reads the files every epoch; tfds' automatic
        # in-memory cache would only warn when an iterator stops early.
        read_config=tfds.ReadConfig(try_autocache=False),
    )

  def split_size(self, split: str) -> int:
    return self.builder.info.splits[self.tfds_split(split)].num_examples

  def class_counts(
      self, split: str, num_classes: int, enough: int
  ) -> np.ndarray:
    """Examples per class in `split`, each counted up to at least `enough`.

    Reads only the labels (images are not decoded) and stops as soon as
    every class has `enough`, so on a large dataset whose classes are mixed
    it reads a small part of the split.
    """
    ds = self._read(self.tfds_split(split))
    counts = np.zeros(num_classes, np.int64)
    for labels in ds.map(self._label).batch(4096).as_numpy_iterator():
      counts += np.bincount(labels, minlength=num_classes)[:num_classes]
      if counts.min() >= enough:
        break
    return counts

  def shard(self, split: str, process_index: int, process_count: int) -> Shard:
    parts = tfds.even_splits(self.tfds_split(split), n=process_count)
    sizes = [self.builder.info.splits[p].num_examples for p in parts]
    ds = self._read(parts[process_index]).map(self._example)
    return Shard(ds, sizes[process_index], max(sizes))


class VtabSource(TfdsSource):
  """A VTAB-1k task (`vtab/<task>`): its tfds dataset as the task reads it.

  Split names are the task's (`datasets.vtab.SPLITS`), each a slice of the
  tfds splits computed from their sizes; labels are the task's (a feature
  or a function of the example's features).
  """

  def __init__(self, task: vtab.Task, data_dir: str | None, download: bool):
    self.task = task
    super().__init__(task.tfds_name, data_dir, download)
    # {task split: tfds split string}, from the size of tfds' train split.
    self.splits = task.splits.resolve(
        self.builder.info.splits['train'].num_examples
    )

  def _describe(self) -> None:
    self.image_key = 'image'
    label = self.task.label
    # A computed label (clevr's object count, ...) has no names in the data.
    feature = (
        self.builder.info.features[label] if isinstance(label, str) else None
    )
    self.class_names = tuple(getattr(feature, 'names', None) or ())
    self.num_classes = self.task.num_classes

  def _label(self, features: Mapping[str, Any]) -> tf.Tensor:
    return self.task.label_of(features)

  def _example(self, features: Mapping[str, Any]) -> dict[str, tf.Tensor]:
    return self.task.example(features, self.image_key)

  def tfds_split(self, split: str) -> str:
    if split not in self.splits:
      raise ValueError(
          f'{split!r} is not a split of the VTAB task {self.task.dataset}: '
          f'use one of {", ".join(self.splits)} (config.train_split / '
          'eval_split).'
      )
    return self.splits[split]

  def split_size(self, split: str) -> int:
    try:
      return super().split_size(split)
    except ValueError as e:  # tfds: a slice beyond the split's examples.
      sizes = {k: v.num_examples for k, v in self.builder.info.splits.items()}
      raise ValueError(
          f'The VTAB task {self.task.dataset} reads its {split} split as '
          f'{self.splits[split]!r} of {self.task.tfds_name}, more than the '
          f'prepared data in {self.builder.data_dir} holds ({sizes}): '
          'prepare the full dataset.'
      ) from e


class ImageFolderSource:
  """Images in one sub-folder per class (optionally under train/ and test/).

  Without train/ and test/ folders the split is automatic and deterministic:
  in each class, evenly spaced files (by sorted name) form the test split,
  `test_percent` percent of them.
  """

  def __init__(
      self,
      root: str,
      *,
      test_percent: int = 10,
      skip_bad_images: bool = False,
      write_index: bool | None = None,
  ):
    """Lists the folder and finds its unreadable images.

    Which files decode is kept in an index (`folder_index`) and reused while
    a file's size and mtime are unchanged, so only the first start of a run
    (and files added or changed since) pays for decoding.

    Args:
      root: The image folder.
      test_percent: Percentage of each class in the automatic test split.
      skip_bad_images: Leave unreadable files out (else BadImageError).
      write_index: Whether to write the index (default: in JAX process 0).
    """
    if not root:
      raise ValueError(
          "config.dataset='image_folder' needs "
          'config.image_folder (a directory path).'
      )
    if not os.path.isdir(root):
      raise FileNotFoundError(
          f'config.image_folder={root!r} is not a ' 'directory.'
      )
    self.root = root
    self.skip_bad_images = skip_bad_images
    self.num_skipped = 0  # Unreadable files left out (skip_bad_images).
    # Path (as in self.files) -> (path relative to root, stat).
    self._stats: dict[str, tuple[str, folder_index.Stat]] = {}
    split_dirs = {s: os.path.join(root, s) for s in ('train', 'test')}
    if all(os.path.isdir(d) for d in split_dirs.values()):
      files = {s: self._scan(d, s) for s, d in split_dirs.items()}
      names = sorted(files['train'])
      extra = sorted(set(files['test']) - set(names))
      if extra:
        raise ValueError(
            f'{split_dirs["test"]} has classes {extra} that '
            f'{split_dirs["train"]} lacks.'
        )
      self.files = {
          s: [(p, names.index(c)) for c, ps in f.items() for p in ps]
          for s, f in files.items()
      }
    else:
      per_class = self._scan(root, '')
      names = sorted(per_class)
      self.files = {'train': [], 'test': []}
      for label, name in enumerate(names):
        for i, path in enumerate(per_class[name]):
          is_test = (i + 1) * test_percent // 100 > i * test_percent // 100
          self.files['test' if is_test else 'train'].append((path, label))
    self.class_names = tuple(names)
    self.num_classes = len(names)
    if self.num_classes < 2:
      raise ValueError(
          f'{root} has {self.num_classes} class folder(s) ({names}); a '
          'classifier needs at least 2: add one sub-folder of images per '
          'class.'
      )
    if write_index is None:
      write_index = jax.process_index() == 0
    readable = self._readable(write_index)
    self.files = {
        split: sorted(f for f in files if f[0] in readable)
        for split, files in self.files.items()
    }

  def _scan(self, directory: str, relative: str) -> dict[str, list[str]]:
    """Class name -> sorted image paths; records each file's stat."""
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not classes:
      raise ValueError(
          f'{directory} has no class sub-folders: put the images of each '
          f'class in {directory}/<class name>/ (.jpg, .jpeg or .png).'
      )
    folders = [os.path.join(directory, name) for name in classes]
    # Threads: on a network file system listing and stat'ing a million
    # files one at a time takes minutes; the calls release the GIL.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      listings = list(
          pool.map(lambda f: folder_index.scan(f, IMAGE_EXTENSIONS), folders)
      )
    files: dict[str, list[str]] = {}
    for name, folder, listing in zip(classes, folders, listings):
      if not listing:
        raise ValueError(
            f'Class folder {folder} contains no images (.jpg, .jpeg, .png in '
            'any letter case): add images or remove the folder.'
        )
      prefix = f'{relative}/{name}/' if relative else f'{name}/'
      files[name] = []
      for file_name, stat in listing:
        path = os.path.join(folder, file_name)
        files[name].append(path)
        self._stats[path] = (prefix + file_name, stat)
    return files

  def _readable(self, write_index: bool) -> set[str]:
    """Returns the paths that decode; raises on others unless skipping."""
    # Every file is checked once (then known from the index), so that a bad
    # file is named here rather than failing deep inside tf.data without
    # its path.
    errors = folder_index.verdicts(
        self.root, dict(self._stats.values()), write=write_index
    )
    bad = sorted(
        (p, errors[rel])
        for p, (rel, _) in self._stats.items()
        if errors[rel] is not None
    )
    if bad and not self.skip_bad_images:
      path, error = bad[0]
      raise BadImageError(
          f'Cannot decode image {path} ({error}); {len(bad)} unreadable '
          'file(s) in all. Remove or replace it, or set '
          'config.skip_bad_images=True to skip unreadable files.'
      )
    if bad:
      self.num_skipped = len(bad)
      logging.warning(
          'Skipping %d unreadable image(s), e.g. %s',
          len(bad),
          [p for p, _ in bad[:5]],
      )
    return {p for p, (rel, _) in self._stats.items() if errors[rel] is None}

  def split_size(self, split: str) -> int:
    return len(self._files(split))

  def class_counts(
      self, split: str, num_classes: int, enough: int
  ) -> np.ndarray:
    """Images per class in `split` (from the file lists; `enough` unused)."""
    del enough  # Counting file names costs nothing.
    labels = np.asarray([label for _, label in self._files(split)], np.int64)
    return np.bincount(labels, minlength=num_classes)[:num_classes]

  def _files(self, split: str) -> list[tuple[str, int]]:
    if split not in self.files:
      raise ValueError(
          f"Image folders have splits 'train' and 'test', not "
          f'{split!r} (config.train_split / eval_split).'
      )
    return self.files[split]

  def shard(self, split: str, process_index: int, process_count: int) -> Shard:
    files = self._files(split)
    mine = files[process_index::process_count]
    if not mine:
      raise ValueError(
          f'{self.root} split {split!r} has {len(files)} images, fewer than '
          f'the {process_count} processes.'
      )
    paths, labels = zip(*mine)
    ds = tf.data.Dataset.from_tensor_slices(
        {'path': list(paths), 'label': np.asarray(labels, np.int64)}
    )
    ds = ds.map(
        lambda f: {'image': tf.io.read_file(f['path']), 'label': f['label']}
    )
    return Shard(ds, len(mine), math.ceil(len(files) / process_count))


# ----------------------------------------------------------------------------
# Dataset description.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What training needs to know about the configured dataset.

  Attributes:
    name: `config.dataset`.
    num_classes: Number of classes.
    class_names: Label index -> class name (may be empty for tfds datasets
      without names).
    train_split: Split used for training.
    eval_split: Split used for evaluation.
    num_train_examples: Examples in the train split (all processes).
    num_eval_examples: Examples in the eval split (all processes).
  """

  name: str
  num_classes: int
  class_names: tuple[str, ...]
  train_split: str
  eval_split: str
  num_train_examples: int
  num_eval_examples: int


def get_source(data: DataSection) -> 'TfdsSource | ImageFolderSource':
  """Returns the data source named by `data.dataset`."""
  if data.dataset == IMAGE_FOLDER:
    return ImageFolderSource(
        data.image_folder,
        test_percent=data.image_folder_test_percent,
        skip_bad_images=data.skip_bad_images,
    )
  if vtab.is_task(data.dataset):
    return VtabSource(
        vtab.get_task(data.dataset), data.tfds_data_dir, data.tfds_download
    )
  return TfdsSource(data.dataset, data.tfds_data_dir, data.tfds_download)


def resolve_splits(
    dataset: str, train_split: str | None, eval_split: str | None
) -> tuple[str, str]:
  """The (train, eval) splits a run of `dataset` reads.

  Args:
    dataset: `config.dataset`.
    train_split: `config.train_split` (None: the dataset's preset decides).
    eval_split: `config.eval_split` (None: the preset's; 'holdout': the
      preset's held-out slice).

  Returns:
    The split names, as the dataset's source reads them.
  """
  preset = DATASET_PRESETS.get(dataset, {})
  train = train_split or preset.get('train', 'train')
  evaluation = eval_split or preset.get('test', 'test')
  if evaluation == 'holdout':
    if 'holdout' not in preset:
      raise ValueError(
          f"config.eval_split='holdout' needs a preset with a held-out "
          f'slice; {dataset!r} has none: give the split explicitly, '
          "e.g. 'train[98%:]' (and train_split='train[:98%]')."
      )
    evaluation = preset['holdout']
    train = train_split or preset.get('holdout_train', train)
  return train, evaluation


def _splits(data: DataSection) -> tuple[str, str]:
  return resolve_splits(data.dataset, data.train_split, data.eval_split)


def get_dataset_info(data: DataSection, source: Any = None) -> DatasetInfo:
  """Describes the configured dataset (classes, splits, sizes)."""
  source = source or get_source(data)
  preset = DATASET_PRESETS.get(data.dataset, {})
  num_classes = (
      data.num_classes or preset.get('num_classes') or source.num_classes
  )
  if not num_classes:
    raise ValueError(
        f'Cannot tell the number of classes of '
        f'{data.dataset!r}: set config.num_classes.'
    )
  train, evaluation = _splits(data)
  return DatasetInfo(
      name=data.dataset,
      num_classes=int(num_classes),
      class_names=tuple(source.class_names),
      train_split=train,
      eval_split=evaluation,
      num_train_examples=source.split_size(train),
      num_eval_examples=source.split_size(evaluation),
  )


def write_class_names(workdir: str, info: DatasetInfo) -> str | None:
  """Writes `class_names.json` (index -> name) into the run directory.

  Only process 0 writes, atomically. Returns the path, or None elsewhere.
  """
  if jax.process_index() != 0:
    return None
  path = os.path.join(workdir, CLASS_NAMES_FILE)
  tf.io.gfile.makedirs(workdir)
  fileio.write_text_atomic(
      path,
      json.dumps(
          {'dataset': info.name, 'class_names': list(info.class_names)},
          indent=1,
      ),
  )
  return path


def _preprocess_config(
    data: DataSection, num_classes: int
) -> preprocess.PreprocessConfig:
  pp = dict(DATASET_PRESETS.get(data.dataset, {}).get('pp', {}))
  pp.update(data.pp)
  return preprocess.PreprocessConfig.from_config(
      pp, image_size=data.image_size, num_classes=num_classes
  )


def _local_batch_size(global_batch: int, process_count: int, what: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
        f'{what}={global_batch} must be a positive multiple of the '
        f'{process_count} JAX processes.'
    )
  return global_batch // process_count


def _process(process_index: int | None, process_count: int | None):
  return (
      jax.process_index() if process_index is None else process_index,
      jax.process_count() if process_count is None else process_count,
  )


# ----------------------------------------------------------------------------
# Training stream.
# ----------------------------------------------------------------------------


# Unit of the saved `position`: examples of the global batches, i.e. of all
# processes together. Checkpoints without it counted one process's examples.
POSITION_UNIT = 'global_examples'


class TrainIterator(Iterator[dict[str, np.ndarray]]):
  """Endless iterator of this process's training batches (numpy).

  Its state is `position`, the number of examples the global batches have
  held so far (all processes together: the same number on every process,
  `steps * config.batch`); an iterator built with `position=p` yields
  exactly what the original yielded after `p` examples. Each process skips
  `p / process_count` examples of its own shard. With NaFlex buckets the
  batch size varies by step, so the state also holds `step`, the batches
  produced so far (each step's bucket is drawn from it).

  Attributes:
    batch_size: This process's batch (NaFlex: at the longest sequence).
    global_batch_size: `config.batch`, all processes together.
    bucket_batches: NaFlex: the global batch of each of
      `config.naflex.seq_lens` (`bucket_batch_sizes`); () otherwise.
    position: Global examples of the batches produced so far.
    step: Batches produced so far (from the run's start).
  """

  def __init__(
      self,
      data: DataSection,
      *,
      position: int = 0,
      step: int | None = None,
      process_index: int | None = None,
      process_count: int | None = None,
      source: Any = None,
      batch_multiple: int | None = None,
  ):
    """Builds the stream at `position` (and NaFlex `step`).

    Args:
      data: The run's data section (`config_lib.parse(config).data`).
      position: Global examples already produced.
      step: Batches already produced (default: `position / config.batch`;
        NaFlex buckets need it given when resuming).
      process_index: Defaults to `jax.process_index()`.
      process_count: Defaults to `jax.process_count()`.
      source: A source from `get_source(data)`, to avoid rebuilding it.
      batch_multiple: NaFlex: every bucket's global batch is a multiple of
        this (default: `jax.device_count()`; training passes the batch
        shards times `config.accum_steps`).
    """
    process_index, process_count = _process(process_index, process_count)
    source = source or get_source(data)
    self.info = get_dataset_info(data, source)
    self.batch_size = _local_batch_size(
        data.batch, process_count, 'config.batch'
    )
    self.global_batch_size = self.batch_size * process_count
    self._seed = int(data.seed)
    self._naflex = data.naflex
    self.bucket_batches: tuple[int, ...] = ()
    if data.naflex.enabled:
      check_naflex_patch_size(data.naflex)
      self.bucket_batches = bucket_batch_sizes(
          data.batch,
          data.naflex.seq_lens,
          batch_multiple or jax.device_count(),
      )
      for global_batch in self.bucket_batches:
        _local_batch_size(
            global_batch, process_count, 'The NaFlex bucket batch'
        )
    shard = source.shard(self.info.train_split, process_index, process_count)
    if shard.num_examples < self.batch_size:
      logging.warning(
          'The training shard has %d examples, fewer than the '
          'local batch of %d.',
          shard.num_examples,
          self.batch_size,
      )
    self.position = int(position)
    if self.position % process_count:
      raise ValueError(
          f'The saved training-data position {self.position} (global '
          f'examples) does not split over {process_count} processes: resume '
          'with the process count the checkpoint was written with.'
      )
    if step is None:
      if self.bucket_batches and self.position:
        raise ValueError(
            f'The saved training-data state (position {self.position}) has '
            'no NaFlex step: resume with the config.naflex.seq_lens the '
            'checkpoint was written with.'
        )
      step = self.position // self.global_batch_size
    self.step = int(step)
    # (batches, position) of the last `state_after`, to continue from.
    self._start = self._cursor = (self.step, self.position)
    pp = _preprocess_config(data, self.info.num_classes)
    examples = _example_stream(
        shard,
        seed=self._seed,
        process_index=process_index,
        shuffle_buffer=int(data.shuffle_buffer),
        start=self.position // process_count,
    )
    if self.bucket_batches:
      self._dataset = _naflex_train_dataset(
          examples,
          pp,
          data.naflex,
          local_batches=tuple(b // process_count for b in self.bucket_batches),
          first_step=self.step,
          bucket=self.bucket,
      )
    else:
      self._dataset = _train_dataset(examples, pp, batch_size=self.batch_size)
    self._iterator = iter(self._dataset.as_numpy_iterator())

  def bucket(self, step: int) -> int:
    """NaFlex: the index in `config.naflex.seq_lens` of `step`'s bucket."""
    return bucket_of_step(self._seed, step, len(self._naflex.seq_lens))

  def global_batch_at(self, step: int) -> int:
    """The global batch of `step` (counted from 0, the run's first)."""
    if self.bucket_batches:
      return self.bucket_batches[self.bucket(step)]
    return self.global_batch_size

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.position += self.global_batch_at(self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state to store with a checkpoint."""
    return self._state(self.step, self.position)

  def state_after(self, num_batches: int) -> dict[str, Any]:
    """The state after the first `num_batches` batches of this iterator.

    Training prefetches ahead of its steps, so its checkpoint at a step is
    this, not `get_state()`.
    """
    if not self.bucket_batches:
      return state_at(self._start[1] + num_batches * self.global_batch_size)
    step = self._start[0] + num_batches
    done, position = self._cursor
    if step < done:  # Asked for an earlier state: count from the start.
      done, position = self._start
    for s in range(done, step):
      position += self.global_batch_at(s)
    self._cursor = (step, position)
    return self._state(step, position)

  def _state(self, step: int, position: int) -> dict[str, Any]:
    state = state_at(position)
    if self.bucket_batches:
      state['step'] = int(step)
    return state


def state_at(position: int) -> dict[str, Any]:
  """The iterator state (for a checkpoint) at `position` global examples."""
  return {'position': int(position), 'unit': POSITION_UNIT}


# Folded into the run seed for the draw of NaFlex buckets.
_BUCKET_STREAM = 0x6E61666C  # 'nafl'


def bucket_of_step(seed: int, step: int, num_buckets: int) -> int:
  """The NaFlex bucket of a training step: a uniform draw from (seed, step).

  A pure function of its arguments, the same on every process (they must
  agree on the global batch) and on resuming.

  Args:
    seed: The run seed (`config.seed`).
    step: Batches before this one (0 for the run's first).
    num_buckets: Number of sequence lengths.

  Returns:
    An index into `config.naflex.seq_lens`.
  """
  if num_buckets == 1:
    return 0
  rng = np.random.default_rng([_BUCKET_STREAM, seed % 2**63, step])
  return int(rng.integers(num_buckets))


def bucket_batch_sizes(
    batch: int, seq_lens: tuple[int, ...], multiple: int
) -> tuple[int, ...]:
  """Global batch per NaFlex bucket: about `batch * max(seq_lens)` tokens.

  The longest sequence gets `batch` (the memory of a step is about that of
  its tokens, so `config.batch` is sized for it); a shorter one gets more
  images, rounded to a multiple of `multiple` (the devices the batch is
  split over), at least one multiple.

  Args:
    batch: `config.batch`.
    seq_lens: `config.naflex.seq_lens`.
    multiple: The batch granularity.

  Returns:
    One global batch per entry of `seq_lens`.

  Raises:
    ValueError: `batch` is not a multiple of `multiple`.
  """
  if batch % multiple:
    raise ValueError(
        f'config.batch={batch} is not a multiple of the {multiple} devices '
        '(times config.accum_steps) NaFlex batches are split over: use e.g. '
        f'{max(1, round(batch / multiple)) * multiple}.'
    )
  tokens = batch * max(seq_lens)
  return tuple(
      max(1, round(tokens / (n * multiple))) * multiple for n in seq_lens
  )


def check_naflex_patch_size(naflex: NaflexSection) -> None:
  """Raises unless the patch size was set (`config_lib.parse` sets it)."""
  if naflex.patch_size <= 0:
    raise ValueError(
        f'config.naflex.patch_size={naflex.patch_size}: read the config with '
        "config_lib.parse (which sets the model's patch size) or set it."
    )


def _example_stream(
    shard: Shard,
    *,
    seed: int,
    process_index: int,
    shuffle_buffer: int,
    start: int,
) -> tf.data.Dataset:
  """Endless shuffled encoded examples with their seeds, from `start`."""
  n = shard.num_examples
  first_epoch, offset = divmod(start, n)
  indexed = shard.dataset.enumerate()
  base_seed = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, 0], tf.int64), process_index
  )

  def epoch(e):
    epoch_seed = tf.random.experimental.stateless_fold_in(base_seed, e)
    # Shuffle encoded records (cheap to buffer) with a per-epoch seed.
    shuffled = indexed.shuffle(
        min(shuffle_buffer, n),
        seed=tf.bitwise.bitwise_xor(epoch_seed[0], epoch_seed[1]),
        reshuffle_each_iteration=False,
    )
    return shuffled.map(
        lambda i, f: {
            **f,
            'seed': tf.random.experimental.stateless_fold_in(epoch_seed, i),
        }
    )

  ds = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch)
  return ds.skip(offset)


def _train_dataset(
    examples: tf.data.Dataset,
    pp: preprocess.PreprocessConfig,
    *,
    batch_size: int,
) -> tf.data.Dataset:
  ds = examples.map(
      preprocess.make_preprocess_fn(pp, train=True),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
  )
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def _naflex_train_dataset(
    examples: tf.data.Dataset,
    pp: preprocess.PreprocessConfig,
    naflex: NaflexSection,
    *,
    local_batches: tuple[int, ...],
    first_step: int,
    bucket: Any,
) -> tf.data.Dataset:
  """NaFlex batches: step `s` holds the next examples at its bucket's length.

  Every example is labelled with its step and bucket (a schedule computed in
  Python by `bucket`), preprocessed at the bucket's sequence length, and the
  examples of one step are batched together.
  """
  num_buckets = len(local_batches)
  sizes = tf.constant(local_batches, tf.int64)
  lens = tf.constant(naflex.seq_lens, tf.int32)

  def key_of(step: np.int64) -> np.int64:
    # One key per step: the bucket is recoverable from it (key % buckets).
    return np.int64(step * num_buckets + bucket(int(step)))

  # numpy_function, not from_generator: no Python state to finalise.
  keys = tf.data.Dataset.range(first_step, _MAX_STEPS).map(
      lambda step: tf.ensure_shape(
          tf.numpy_function(key_of, [step], tf.int64, stateful=False), []
      )
  )
  per_example = keys.flat_map(
      lambda key: tf.data.Dataset.from_tensors(key).repeat(
          sizes[key % num_buckets]
      )
  )
  fn = preprocess.make_preprocess_fn(
      pp, train=True, naflex=preprocess.NaflexShape(naflex.patch_size)
  )

  def prepare(features, key):
    seq_len = lens[key % num_buckets]
    return {**fn({**features, 'seq_len': seq_len}), 'key': key}

  ds = tf.data.Dataset.zip(examples, per_example).map(
      prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )
  ds = ds.group_by_window(
      key_func=lambda f: f['key'],
      reduce_func=lambda key, window: window.batch(sizes[key % num_buckets]),
      window_size_func=lambda key: sizes[key % num_buckets],
  )
  ds = ds.map(lambda f: {k: v for k, v in f.items() if k != 'key'})
  return ds.prefetch(tf.data.AUTOTUNE)


def train_iterator(
    data: DataSection, *, state: Mapping[str, Any] | None = None, **kwargs
) -> TrainIterator:
  """Builds the training iterator, resuming from `state` if given.

  Args:
    data: The run's data section (`config_lib.parse(config).data`).
    state: A `get_state()` / `state_at()` dict from a checkpoint, or None.
    **kwargs: `process_index`, `process_count`, `source`, `batch_multiple`
      of TrainIterator.

  Returns:
    The iterator.
  """
  state = dict(state or {})
  position = int(state.get('position', 0))
  if state and state.get('unit') != POSITION_UNIT:
    # Written before positions were global: it counted this process's
    # examples, the same on every process.
    _, process_count = _process(
        kwargs.get('process_index'), kwargs.get('process_count')
    )
    position *= process_count
  step = state.get('step')
  return TrainIterator(
      data,
      position=position,
      step=None if step is None else int(step),
      **kwargs,
  )


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def eval_dataset(
    data: DataSection,
    split: str | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Any = None,
) -> tuple[tf.data.Dataset, int]:
  """This process's evaluation batches, every example exactly once.

  Every process yields the same number of batches (collectives need it): the
  last ones are padded with zero images whose `mask` is 0; real examples have
  `mask` 1.

  Args:
    data: The run's data section (`config_lib.parse(config).data`).
    split: Split to evaluate (default: the section's eval split).
    process_index: Defaults to `jax.process_index()`.
    process_count: Defaults to `jax.process_count()`.
    source: A source from `get_source(data)`, to avoid rebuilding it.

  Returns:
    (dataset of {'image', 'labels', 'mask'} numpy-able batches, num_batches).
  """
  process_index, process_count = _process(process_index, process_count)
  source = source or get_source(data)
  info = get_dataset_info(data, source)
  split = split or info.eval_split
  batch_size = _local_batch_size(
      data.batch_eval, process_count, 'config.batch_eval'
  )
  shard = source.shard(split, process_index, process_count)
  num_batches = math.ceil(shard.max_num_examples / batch_size)
  pp = _preprocess_config(data, info.num_classes)
  naflex = None
  if data.naflex.enabled:
    check_naflex_patch_size(data.naflex)
    naflex = preprocess.NaflexShape(
        data.naflex.patch_size, data.naflex.eval_seq_len
    )
  fn = preprocess.make_preprocess_fn(pp, train=False, naflex=naflex)
  ds = shard.dataset.map(
      lambda f: {**fn(f), 'mask': tf.constant(1.0)},
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
  )
  padding = num_batches * batch_size - shard.num_examples
  if padding:
    if naflex is None:
      size = pp.image_size
      image: Any = tf.zeros([size, size, 3], tf.float32)
    else:
      image = _naflex_padding_image(naflex)
    ds = ds.concatenate(
        tf.data.Dataset.from_tensors(
            {
                'image': image,
                'labels': tf.zeros([info.num_classes], tf.float32),
                'mask': tf.constant(0.0),
            }
        ).repeat(padding)
    )
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE), num_batches


def _naflex_padding_image(naflex: preprocess.NaflexShape) -> Any:
  """The NaFlex tuple of an evaluation padding example: one patch of zeros.

  One real token, not none: attention over a sequence that is all padding
  would average nothing (NaN), and a NaN times its mask of 0 is still NaN.
  """
  assert naflex.seq_len is not None
  image = tf.zeros([naflex.patch_size, naflex.patch_size, 3], tf.float32)
  patches, yabs, xabs = preprocess.patchify(image, naflex.patch_size)
  return preprocess.pad_to_sequence(patches, yabs, xabs, naflex.seq_len)
