"""Tests of the preprocessing ops, eagerly and inside tf.data."""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vit_jax import preprocess


def _encode(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _gradient(h=12, w=20):
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 12, y * 20, (x + y) * 6], -1).astype(np.uint8)


def test_decode_png_and_jpeg():
  image = _gradient()
  np.testing.assert_array_equal(
      preprocess.decode(_encode(image, 'PNG')).numpy(), image)
  jpeg = preprocess.decode(_encode(image, 'JPEG')).numpy()
  assert jpeg.shape == image.shape and jpeg.dtype == np.uint8
  assert np.abs(jpeg.astype(int) - image).mean() < 8


def test_to_rgb_from_grey_and_rgba():
  grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  rgb = preprocess.to_rgb(tf.constant(grey)).numpy()
  assert rgb.shape == (2, 3, 3)
  np.testing.assert_array_equal(rgb[..., 2], grey[..., 0])
  rgba = np.concatenate([_gradient(2, 3), np.full((2, 3, 1), 9, np.uint8)], -1)
  np.testing.assert_array_equal(preprocess.to_rgb(tf.constant(rgba)).numpy(),
                                rgba[..., :3])


def test_inception_crop_is_deterministic_in_the_seed_and_in_bounds():
  image = tf.constant(_gradient(40, 60))
  seed = tf.constant([3, 4], tf.int64)
  a = preprocess.inception_crop(image, seed, area_range=(0.1, 0.5)).numpy()
  b = preprocess.inception_crop(image, seed, area_range=(0.1, 0.5)).numpy()
  np.testing.assert_array_equal(a, b)
  assert a.shape[0] <= 40 and a.shape[1] <= 60
  assert 0.1 * 2400 * 0.8 <= a.shape[0] * a.shape[1] <= 0.5 * 2400 * 1.2
  shapes = {preprocess.inception_crop(
      image, tf.constant([s, 0], tf.int64)).shape for s in range(10)}
  assert len(shapes) > 1


def test_flip_is_seeded_and_flips():
  image = tf.constant(_gradient())
  flipped = [preprocess.flip(image, tf.constant([s, 1], tf.int64)).numpy()
             for s in range(20)]
  assert any((f == image.numpy()[:, ::-1]).all() for f in flipped)
  assert any((f == image.numpy()).all() for f in flipped)
  again = preprocess.flip(image, tf.constant([7, 1], tf.int64)).numpy()
  np.testing.assert_array_equal(again, flipped[7])


def test_resize_central_crop_and_resize_small():
  image = tf.constant(_gradient(12, 20))
  assert preprocess.resize(image, 8).shape == (8, 8, 3)
  assert preprocess.resize(image, (6, 10)).dtype == tf.float32
  small = preprocess.resize_small(image, 6)
  assert small.shape == (6, 10, 3)
  crop = preprocess.central_crop(tf.constant(_gradient(12, 20)), 4).numpy()
  np.testing.assert_array_equal(crop, _gradient(12, 20)[4:8, 8:12])


def test_value_range_and_one_hot():
  np.testing.assert_allclose(
      preprocess.value_range(tf.constant([0, 255, 127.5])).numpy(),
      [-1, 1, 0])
  np.testing.assert_array_equal(
      preprocess.one_hot(tf.constant(2), 4).numpy(), [0, 0, 1, 0])


@pytest.mark.parametrize('train', [True, False])
def test_preprocess_fn_inside_tf_data(train):
  pp = preprocess.PreprocessConfig(image_size=8, num_classes=5,
                                   eval_crop_fraction=0.875)
  fn = preprocess.make_preprocess_fn(pp, train=train)
  grey = np.full((10, 14, 1), 255, np.uint8)
  ds = tf.data.Dataset.from_tensor_slices({
      'image': [_encode(_gradient(), 'PNG'), _encode(grey[..., 0], 'PNG')],
      'label': tf.constant([1, 4], tf.int64),
      'seed': tf.constant([[1, 2], [3, 4]], tf.int64)}).map(fn)
  out = list(ds.as_numpy_iterator())
  assert [o['image'].shape for o in out] == [(8, 8, 3)] * 2
  assert all(o['image'].min() >= -1 and o['image'].max() <= 1 for o in out)
  np.testing.assert_allclose(out[1]['image'], 1.0, atol=1e-6)  # White grey.
  np.testing.assert_array_equal(out[1]['labels'], [0, 0, 0, 0, 1])
  eager = fn({'image': tf.constant(_encode(_gradient(), 'PNG')),
              'label': tf.constant(1, tf.int64),
              'seed': tf.constant([1, 2], tf.int64)})
  np.testing.assert_allclose(eager['image'].numpy(), out[0]['image'],
                             atol=1e-6)


def test_preprocess_config_rejects_unknown_fields():
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['flipp'\]"):
    preprocess.PreprocessConfig.from_config(
        {'flipp': True}, image_size=8, num_classes=2)
