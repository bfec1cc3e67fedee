"""Images to inspect a model on: the bundled digits or a folder of files."""

import glob
import os

import numpy as np
from PIL import Image

from vit_jax import config_lib
from vit_jax import input_pipeline

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


def load_images(
    spec: str, image_size: int, num: int, tfds_data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
  """Images to inspect a model on, from the bundled digits or a folder.

  Args:
    spec: `'digits'` (its test split, through the input pipeline) or a
      folder searched recursively for .png/.jpg/.jpeg files (first `num` by
      name).
    image_size: Images are resized to `image_size` x `image_size`.
    num: How many images.
    tfds_data_dir: tfds directory where digits is prepared (default tfds').

  Returns:
    (images `[num, size, size, 3]` in [-1, 1], integer labels or None for a
    folder).

  Raises:
    FileNotFoundError: The folder has no images.
  """
  if spec == 'digits':
    # The base data section with digits at this size (no model involved).
    data = config_lib.section(
        {
            'dataset': 'digits',
            'image_size': image_size,
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
  paths = sorted(
      p
      for p in glob.glob(os.path.join(spec, '**', '*'), recursive=True)
      if p.lower().endswith(IMAGE_EXTENSIONS)
  )[:num]
  if not paths:
    raise FileNotFoundError(f'No .png/.jpg images found in {spec}.')
  images = [
      np.asarray(
          Image.open(p)
          .convert('RGB')
          .resize((image_size, image_size), Image.Resampling.BILINEAR),
          np.float32,
      )
      / 127.5
      - 1.0
      for p in paths
  ]
  return np.stack(images), None
