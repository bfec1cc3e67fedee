"""`digits`: scikit-learn's handwritten digits as a tensorflow-datasets builder.

1,797 real 8x8 grey-scale images of the digits 0-9 (the UCI "Optical
Recognition of Handwritten Digits" test set, bundled with scikit-learn), so a
newcomer can train on real images with no download.

Split (fixed, documented): in scikit-learn's order, the first 1,497 examples
are `train` and the last 300 are `test`. Pixel values 0..16 are stored as
uint8 0..255 (x * 255 / 16, rounded). Every tfds slicing works, e.g.
`train[:90%]` / `train[90%:]` for a held-out validation slice.
"""

import contextlib
import fcntl
import os

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1497
NUM_TEST = 300
NUM_EXAMPLES = NUM_TRAIN + NUM_TEST


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (local; no download)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: first 1,497 train, last 300 test.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(
                names=[str(d) for d in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    return {
        'train': self._generate_examples(0, NUM_TRAIN),
        'test': self._generate_examples(NUM_TRAIN, NUM_EXAMPLES),
    }

  def _generate_examples(self, start, stop):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    if len(digits.images) != NUM_EXAMPLES:
      raise RuntimeError(
          f'scikit-learn returned {len(digits.images)} digits, expected '
          f'{NUM_EXAMPLES}: the documented split no longer applies.')
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for i in range(start, stop):
      yield i, {'image': images[i][..., None], 'label': int(digits.target[i])}


@contextlib.contextmanager
def _file_lock(path: str):
  """Serialises preparation by processes sharing a data directory."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare_local_builder(builder: tfds.core.DatasetBuilder) -> None:
  """Generates a local builder's files once (safe with concurrent callers)."""
  data_root = os.path.dirname(os.path.dirname(builder.data_dir))
  with _file_lock(os.path.join(data_root, f'.{builder.name}.lock')):
    if not tfds.builder(builder.name, data_dir=data_root).is_prepared():
      builder.download_and_prepare()
