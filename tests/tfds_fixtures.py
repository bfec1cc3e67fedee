"""Small tfds datasets the tests write, in the format of the real ones.

`prepare` runs a real tfds builder's `download_and_prepare` with the
examples given instead of its download, so `tfds.builder(name,
data_dir=...)` — the code path runs use — reads them back with the real
builder's name, version, config and features.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds


def prepare(
    name: str,
    data_dir: str,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    config: str | None = None,
) -> tfds.core.DatasetBuilder:
  """Writes `splits` as the prepared tfds dataset `name` under `data_dir`.

  Args:
    name: A registered tfds dataset name (e.g. 'imagenet_v2').
    data_dir: The tfds data directory to write to.
    splits: Split name -> examples, each a dict of the builder's features
      (images as uint8 arrays of the feature's shape, labels as ints).
    config: The builder config, if the dataset has several.

  Returns:
    The prepared builder.
  """
  builder = tfds.builder(name, data_dir=data_dir, config=config)

  def split_generators(dl_manager, *args, **kwargs):
    del dl_manager, args, kwargs  # Nothing is downloaded.
    return {
        split: ((str(i), ex) for i, ex in enumerate(examples))
        for split, examples in splits.items()
    }

  # The instance's own methods: the class (and tfds' registry) is untouched.
  builder._split_generators = split_generators  # pylint: disable=protected-access
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
      )
  )
  return builder
