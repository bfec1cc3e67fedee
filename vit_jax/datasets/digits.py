"""`digits`: scikit-learn's handwritten digits as a tensorflow-datasets builder.

1,797 real 8x8 grey-scale images of the digits 0-9 (the UCI "Optical
Recognition of Handwritten Digits" test set, bundled with scikit-learn), so a
newcomer can train on real images with no download.

Split (fixed, documented): in scikit-learn's order, every sixth example
(index % 6 == 5) is `test` (299 examples), the other 1,498 are `train`.
scikit-learn's order groups the images by writer, so interleaving puts every
writer in both splits (a "first n / last m" split would test on unseen
writers only). Pixel values 0..16 are stored as uint8 0..255 (x * 255 / 16,
rounded). Every tfds slicing works, e.g. `train[:90%]` / `train[90%:]` for a
held-out validation slice.
"""

import contextlib
import fcntl
import os

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1498
NUM_TEST = 299
NUM_EXAMPLES = NUM_TRAIN + NUM_TEST
TEST_EVERY = 6  # Index % 6 == 5 -> test.


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (local; no download)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: first 1,497 train, last 300 test.',
      '1.1.0': 'Interleaved split: index % 6 == 5 is test (299), so every '
      'writer appears in train and test.',
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(8, 8, 1)),
                'label': tfds.features.ClassLabel(
                    names=[str(d) for d in range(10)]
                ),
            }
        ),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    return {
        'train': self._generate_examples(test=False),
        'test': self._generate_examples(test=True),
    }

  def _generate_examples(self, test):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    if len(digits.images) != NUM_EXAMPLES:
      raise RuntimeError(
          f'scikit-learn returned {len(digits.images)} digits, expected '
          f'{NUM_EXAMPLES}: the documented split no longer applies.'
      )
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for i in range(NUM_EXAMPLES):
      if (i % TEST_EVERY == TEST_EVERY - 1) == test:
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
