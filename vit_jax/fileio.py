"""Small file helpers shared by the run outputs (local paths or gs://)."""

import os

import tensorflow as tf


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename.

  A reader (or a run killed half-way) sees the old file or the new one,
  never a partial one.
  """
  tmp = f'{path}.tmp.{os.getpid()}'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)
