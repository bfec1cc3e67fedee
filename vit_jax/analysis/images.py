"""Images to inspect a model on: the bundled digits or a folder of files."""

from collections.abc import Sequence
import glob
import os

import numpy as np
from PIL import Image

from vit_jax import config_lib
from vit_jax import input_pipeline

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def folder_images(folder: str, num: int) -> list[str]:
  """The first `num` .png/.jpg/.jpeg files under `folder` (by name).

  Raises:
    FileNotFoundError: The folder has no images.
  """
  paths = sorted(
      p
      for p in glob.glob(os.path.join(folder, '**', '*'), recursive=True)
      if p.lower().endswith(IMAGE_EXTENSIONS)
  )[:num]
  if not paths:
    raise FileNotFoundError(f'No .png/.jpg images found in {folder}.')
  return paths


def load_images(
    spec: str,
    image_size: int | Sequence[int],
    num: int,
    tfds_data_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
  """Images to inspect a model on, from the bundled digits or a folder.

  Args:
    spec: `'digits'` (its test split, through the input pipeline) or a
      folder searched recursively for .png/.jpg/.jpeg files (first `num` by
      name).
    image_size: Images are resized to `image_size` x `image_size`, or to
      (height, width) (a folder's images only).
    num: How many images.
    tfds_data_dir: tfds directory where digits is prepared (default tfds').

  Returns:
    (images `[num, height, width, 3]` in [-1, 1], integer labels or None
    for a folder).

  Raises:
    FileNotFoundError: The folder has no images.
  """
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  height, width = (int(n) for n in image_size)
  if spec == 'digits':
    if height != width:
      raise ValueError(
          f'digits is read at square sizes only, not {height}x{width}.'
      )
    # The base data section with digits at this size (no model involved).
    data = config_lib.section(
        {
            'dataset': 'digits',
            'image_size': height,
            'batch_eval': 64,
            'tfds_data_dir': tfds_data_dir,
        },
        'data',
    )
    ds, _ = input_pipeline.eval_dataset(data, process_index=0, process_count=1)
    images, labels = [], []
    for batch in ds.as_numpy_iterator():
      keep = batch['mask'] > 0
      images.append(batch['image'][keep])
      labels.append(batch['labels'][keep].argmax(-1))
      if sum(len(i) for i in images) >= num:
        break
    return (np.concatenate(images)[:num], np.concatenate(labels)[:num])
  images = [
      np.asarray(
          Image.open(p)
          .convert('RGB')
          .resize((width, height), Image.Resampling.BILINEAR),
          np.float32,
      )
      / 127.5
      - 1.0
      for p in folder_images(spec, num)
  ]
  return np.stack(images), None
