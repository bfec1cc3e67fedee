"""NaFlex preprocessing parity with big_vision's own ops (opt-in).

big_vision is not on PyPI; this test imports it from a clone and is skipped
otherwise (tests/test_naflex_data.py checks the same ops against NumPy
references in every run):

  git clone https://github.com/google-research/big_vision /tmp/big_vision
  VIT_JAX_BIG_VISION_PATH=/tmp/big_vision \
      python -m pytest tests/test_parity_big_vision_naflex_data.py

big_vision's side is the preprocessing string of its SigLIP 2 demo
(`value_range`, `resize_to_sequence`, `patchify`, `pad_to_shape`,
`tuplify`); ours is the evaluation preprocessing with
`preprocess.NaflexShape`, from the same PNG file.
"""

import os
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vit_jax import preprocess

if os.environ.get('VIT_JAX_BIG_VISION_PATH'):
  sys.path.insert(0, os.environ['VIT_JAX_BIG_VISION_PATH'])
pp_builder = pytest.importorskip(
    'big_vision.pp.builder',
    reason='set VIT_JAX_BIG_VISION_PATH to a big_vision clone',
)
# Registers the ops the preprocessing string names.
pytest.importorskip('big_vision.pp.ops_general')
pytest.importorskip('big_vision.pp.ops_image')
pytest.importorskip('big_vision.pp.proj.image_text.ops_naflex')

MAX_ABS_DIFF = 1e-4


def big_vision_naflex(image, patch_size, seq_len):
  """big_vision's SigLIP 2 demo preprocessing of a uint8 image."""
  fn = pp_builder.get_preprocess_fn(
      '|'.join(
          (
              'value_range(-1, 1)',
              f'resize_to_sequence({patch_size}, {seq_len}, outkey="image")',
              f'patchify({patch_size}, key="image")',
              'flatten(["image"])',
              f'pad_to_shape(key="image/patches", shape=({seq_len}, None))',
              f'pad_to_shape(key="image/type", shape=({seq_len},))',
              f'pad_to_shape(key="image/yidx", shape=({seq_len},))',
              f'pad_to_shape(key="image/xidx", shape=({seq_len},))',
              'tuplify(["image/patches", "image/type", "image/yidx", '
              '"image/xidx"], "image")',
          )
      ),
      log_data=False,
  )
  return tuple(np.asarray(t) for t in fn({'image': image})['image'])


@pytest.mark.parametrize(
    'height,width,patch_size,seq_len',
    [
        (224, 224, 16, 256),  # Square: the whole budget.
        (480, 640, 16, 256),  # 3:4 landscape, downscaled.
        (640, 360, 16, 576),  # 16:9 portrait.
        (97, 301, 16, 784),  # Odd sizes, upscaled.
        (50, 400, 14, 196),  # 1:8, another patch size.
        (300, 120, 16, 64),  # Few tokens.
    ],
)
def test_naflex_preprocessing_matches_big_vision(
    tmp_path, height, width, patch_size, seq_len
):
  rng = np.random.default_rng(height * width)
  # Smooth content plus noise: resizing kernels matter on both.
  yy, xx = np.mgrid[:height, :width]
  smooth = 127 + 120 * np.sin(
      yy[..., None] / 17 + xx[..., None] / 23 + [0, 1, 2]
  )
  pixels = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255)
  pixels = pixels.astype(np.uint8)
  path = str(tmp_path / 'image.png')
  Image.fromarray(pixels).save(path)

  want = big_vision_naflex(pixels, patch_size, seq_len)
  fn = preprocess.make_preprocess_fn(
      preprocess.PreprocessConfig(image_size=patch_size, num_classes=1),
      train=False,
      naflex=preprocess.NaflexShape(patch_size, seq_len),
  )
  got = fn({'image': tf.io.read_file(path), 'label': tf.constant(0)})
  got = tuple(t.numpy() for t in got['image'])
  # The grid, the patch order and the padding agree exactly.
  for name, g, w in zip(('ptype', 'yabs', 'xabs'), got[1:], want[1:]):
    np.testing.assert_array_equal(g, w, err_msg=name)
  diff = float(np.abs(got[0] - want[0]).max())
  print(f'{height}x{width} P={patch_size} N={seq_len}: max |diff| {diff:.2e}')
  assert got[0].shape == want[0].shape
  assert diff < MAX_ABS_DIFF
