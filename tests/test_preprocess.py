"""Tests of the preprocessing ops, eagerly and inside tf.data."""

import dataclasses
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
      preprocess.decode(_encode(image, 'PNG')).numpy(), image
  )
  jpeg = preprocess.decode(_encode(image, 'JPEG')).numpy()
  assert jpeg.shape == image.shape and jpeg.dtype == np.uint8
  assert np.abs(jpeg.astype(int) - image).mean() < 8


def test_to_rgb_from_grey_and_rgba():
  grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  rgb = preprocess.to_rgb(tf.constant(grey)).numpy()
  assert rgb.shape == (2, 3, 3)
  np.testing.assert_array_equal(rgb[..., 2], grey[..., 0])
  rgba = np.concatenate([_gradient(2, 3), np.full((2, 3, 1), 9, np.uint8)], -1)
  np.testing.assert_array_equal(
      preprocess.to_rgb(tf.constant(rgba)).numpy(), rgba[..., :3]
  )


def test_inception_crop_is_deterministic_in_the_seed_and_in_bounds():
  image = tf.constant(_gradient(40, 60))
  seed = tf.constant([3, 4], tf.int64)
  a = preprocess.inception_crop(image, seed, area_range=(0.1, 0.5)).numpy()
  b = preprocess.inception_crop(image, seed, area_range=(0.1, 0.5)).numpy()
  np.testing.assert_array_equal(a, b)
  assert a.shape[0] <= 40 and a.shape[1] <= 60
  assert 0.1 * 2400 * 0.8 <= a.shape[0] * a.shape[1] <= 0.5 * 2400 * 1.2
  shapes = {
      preprocess.inception_crop(image, tf.constant([s, 0], tf.int64)).shape
      for s in range(10)
  }
  assert len(shapes) > 1


def test_flip_is_seeded_and_flips():
  image = tf.constant(_gradient())
  flipped = [
      preprocess.flip(image, tf.constant([s, 1], tf.int64)).numpy()
      for s in range(20)
  ]
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
      preprocess.value_range(tf.constant([0, 255, 127.5])).numpy(), [-1, 1, 0]
  )
  np.testing.assert_array_equal(
      preprocess.one_hot(tf.constant(2), 4).numpy(), [0, 0, 1, 0]
  )


@pytest.mark.parametrize('train', [True, False])
def test_preprocess_fn_inside_tf_data(train):
  pp = preprocess.PreprocessConfig(
      image_size=8, num_classes=5, eval_crop_fraction=0.875
  )
  fn = preprocess.make_preprocess_fn(pp, train=train)
  grey = np.full((10, 14, 1), 255, np.uint8)
  ds = tf.data.Dataset.from_tensor_slices(
      {
          'image': [_encode(_gradient(), 'PNG'), _encode(grey[..., 0], 'PNG')],
          'label': tf.constant([1, 4], tf.int64),
          'seed': tf.constant([[1, 2], [3, 4]], tf.int64),
      }
  ).map(fn)
  out = list(ds.as_numpy_iterator())
  assert [o['image'].shape for o in out] == [(8, 8, 3)] * 2
  assert all(o['image'].min() >= -1 and o['image'].max() <= 1 for o in out)
  np.testing.assert_allclose(out[1]['image'], 1.0, atol=1e-6)  # White grey.
  np.testing.assert_array_equal(out[1]['labels'], [0, 0, 0, 0, 1])
  eager = fn(
      {
          'image': tf.constant(_encode(_gradient(), 'PNG')),
          'label': tf.constant(1, tf.int64),
          'seed': tf.constant([1, 2], tf.int64),
      }
  )
  np.testing.assert_allclose(eager['image'].numpy(), out[0]['image'], atol=1e-6)


def test_preprocess_config_rejects_unknown_fields():
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['flipp'\]"):
    preprocess.PreprocessConfig.from_config(
        {'flipp': True}, image_size=8, num_classes=2
    )


# ----------------------------------------------------------------------------
# Known answers for the random augmentations.
#
# tf.image.stateless_sample_distorted_bounding_box (the op under
# `inception_crop`; see tensorflow/core/kernels/image/
# sample_distorted_bounding_box_op.cc) draws, per attempt, an aspect ratio r
# *uniformly* (not log-uniformly) in `aspect_ratio_range`, then an integer
# crop height h *uniformly* in [round(sqrt(a_min*A/r)), h_max], with
# h_max = round(sqrt(a_max*A/r)) capped so that the crop fits (h <= H and
# round(h*r) <= W), and width round(h*r). It is *not* uniform in area. An
# attempt whose rounded area leaves the range is retried (100 attempts, then
# the whole image). For an N x N image, in units u = h/N, the area fraction
# is f = r*u^2 with u ~ U[sqrt(a_min/r), min(sqrt(a_max/r), 1, 1/r)], so
#   E[f | r] = r*(a^2 + a*b + b^2)/3,  E[f^2 | r] = r^2*(b^5 - a^5)/(5(b - a)).
# ----------------------------------------------------------------------------

_ASPECT = (3 / 4, 4 / 3)


def _crop_area_theory(a_min, a_max=1.0, aspect=_ASPECT, below=None):
  """Mean and std of the area fraction, and P(f < below), on a square image."""
  from scipy import integrate  # pylint: disable=g-import-not-at-top

  def bounds(r):
    return np.sqrt(a_min / r), min(np.sqrt(a_max / r), 1.0, 1.0 / r)

  def moment1(r):
    a, b = bounds(r)
    return r * (a * a + a * b + b * b) / 3

  def moment2(r):
    a, b = bounds(r)
    return r**2 * (b**5 - a**5) / (5 * (b - a))

  def tail(r):
    a, b = bounds(r)
    return np.clip((np.sqrt(below / r) - a) / (b - a), 0.0, 1.0)

  average = lambda g: integrate.quad(g, *aspect, points=[1.0])[0] / (
      aspect[1] - aspect[0]
  )
  mean = average(moment1)
  std = np.sqrt(average(moment2) - mean**2)
  return mean, std, (average(tail) if below is not None else None)


def _inception_crop_sizes(num_seeds, size=200, **kwargs):
  """(height, width) of `inception_crop` on a size x size image per seed."""
  image = tf.zeros((size, size, 1), tf.uint8)
  crop_shape = tf.function(
      lambda seed: tf.shape(preprocess.inception_crop(image, seed, **kwargs))[
          :2
      ]
  )
  return np.array(
      [
          crop_shape(tf.constant([s, 17], tf.int64)).numpy()
          for s in range(num_seeds)
      ]
  )


def test_inception_crop_default_ranges_and_area_distribution():
  """Default ranges (0.05, 1) x (3/4, 4/3): bounds and the derived moments."""
  n, size = 1000, 200
  hw = _inception_crop_sizes(n, size)
  h, w = hw[:, 0], hw[:, 1]
  area = h * w / size**2
  aspect = w / h
  # Areas are kept inside the range exactly (rounding is repaired or the
  # attempt retried); the aspect ratio is off by at most round(h*r)'s 0.5/h.
  assert area.min() >= 0.05 and area.max() <= 1.0
  assert (aspect >= _ASPECT[0] - 0.5 / h).all()
  assert (aspect <= _ASPECT[1] + 0.5 / h).all()
  assert area.min() < 0.06 and area.max() > 0.9  # The whole range is used.
  mean, std, below = _crop_area_theory(0.05, below=0.08)
  # mean ~ 0.375 here; (0.08, 1) would give 0.404 with no area below 0.08,
  # (0.5, 1) 0.675, and an area-uniform sampler 0.525.
  assert abs(area.mean() - mean) < 4 * std / np.sqrt(n), (area.mean(), mean)
  tail_sigma = np.sqrt(below * (1 - below) / n)
  assert abs((area < 0.08).mean() - below) < 4 * tail_sigma, (
      (area < 0.08).mean(),
      below,
  )
  # Aspect ratio uniform in (3/4, 4/3): mean 1.042 (log-uniform: 1.014).
  aspect_mean = sum(_ASPECT) / 2
  aspect_sigma = (_ASPECT[1] - _ASPECT[0]) / np.sqrt(12 * n)
  assert abs(aspect.mean() - aspect_mean) < 4 * aspect_sigma


def _coordinate_png(size=200):
  """RGB PNG whose red channel is the column and green the row (0..size-1)."""
  rows, cols = np.mgrid[0:size, 0:size]
  return _encode(
      np.stack([cols, rows, np.zeros_like(rows)], -1).astype(np.uint8), 'PNG'
  )


def _crop_windows(out, image_size):
  """Recovers (top, left, height, width) of the crop behind a resized output.

  Bilinear resizing (half-pixel centres) of a linear ramp is linear: output
  pixel i samples crop coordinate (i + 0.5) * n / S - 0.5, so the ramp's
  difference between the last and first output pixel is n * (S - 1) / S.
  """
  pixels = (np.asarray(out, np.float64) + 1) / 2 * 255  # Undo value_range.
  s = image_size
  width = (pixels[0, -1, 0] - pixels[0, 0, 0]) * s / (s - 1)
  height = (pixels[-1, 0, 1] - pixels[0, 0, 1]) * s / (s - 1)
  left = pixels[0, 0, 0] - (0.5 * width / s - 0.5)
  top = pixels[0, 0, 1] - (0.5 * height / s - 0.5)
  return np.round([top, left, height, width]).astype(int)


def test_crop_area_range_from_config_reaches_the_crop():
  """config.pp.crop_area_range=(0.9, 1) gives crops of >= 90% of the image."""
  pp = preprocess.PreprocessConfig.from_config(
      {'crop_area_range': [0.9, 1.0], 'flip': False},
      image_size=8,
      num_classes=2,
  )
  fn = preprocess.make_preprocess_fn(pp, train=True)
  data = tf.constant(_coordinate_png())
  areas = []
  for s in range(40):
    out = fn(
        {
            'image': data,
            'label': tf.constant(0, tf.int64),
            'seed': tf.constant([s, 5], tf.int64),
        }
    )['image'].numpy()
    top, left, height, width = _crop_windows(out, 8)
    assert 0 <= top and top + height <= 200 and 0 <= left
    assert left + width <= 200
    areas.append(height * width / 200**2)
  # With the default (0.05, 1), P(area >= 0.9) is about 1%.
  assert min(areas) >= 0.9, min(areas)
  assert max(areas) < 1.0  # Really cropped, not the whole-image fallback.


def test_flip_probability_is_one_half():
  """Over 1000 seeds the flip rate is 1/2 within 4 binomial sigmas."""
  image = tf.constant(_gradient(3, 5))
  flip = tf.function(preprocess.flip)
  n = 1000
  flips = 0
  for s in range(n):
    out = flip(image, tf.constant([s, 3], tf.int64)).numpy()
    if (out == image.numpy()[:, ::-1]).all():
      flips += 1
    else:
      np.testing.assert_array_equal(out, image.numpy())
  assert abs(flips - n / 2) < 4 * np.sqrt(n / 4), flips


def test_flip_mirrors_the_width_axis_only():
  """A flip reverses columns (x), never rows, on a non-square image."""
  image = _gradient(4, 7)
  outs = [
      preprocess.flip(tf.constant(image), tf.constant([s, 0], tf.int64)).numpy()
      for s in range(16)
  ]
  flipped = [o for o in outs if not (o == image).all()]
  assert flipped and len(flipped) < len(outs)
  for out in flipped:
    assert out.shape == (4, 7, 3)
    np.testing.assert_array_equal(out, image[:, ::-1])
    np.testing.assert_array_equal(out[:, 0], image[:, -1])


def test_flip_in_the_train_preprocess_fn():
  """make_preprocess_fn flips about half the examples, along x only."""
  pp = preprocess.PreprocessConfig.from_config(
      {'inception_crop': False}, image_size=8, num_classes=2
  )
  fn = tf.function(preprocess.make_preprocess_fn(pp, train=True))
  data = tf.constant(_coordinate_png(16))
  n, flips = 200, 0
  for s in range(n):
    out = fn(
        {
            'image': data,
            'label': tf.constant(0, tf.int64),
            'seed': tf.constant([s, 9], tf.int64),
        }
    )['image'].numpy()
    dx = np.diff(out[..., 0], axis=1)
    dy = np.diff(out[..., 1], axis=0)
    assert (dy > 0).all()  # Rows never reversed.
    assert (dx > 0).all() or (dx < 0).all()
    flips += int((dx < 0).all())
  assert abs(flips - n / 2) < 4 * np.sqrt(n / 4), flips
  no_flip = preprocess.make_preprocess_fn(
      dataclasses.replace(pp, flip=False), train=True
  )
  for s in range(10):
    out = no_flip(
        {
            'image': data,
            'label': tf.constant(0, tf.int64),
            'seed': tf.constant([s, 9], tf.int64),
        }
    )['image'].numpy()
    assert (np.diff(out[..., 0], axis=1) > 0).all()


# ----------------------------------------------------------------------------
# Mean / std normalisation (config.pp.mean, config.pp.std).
# ----------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def test_normalize_is_per_channel_mean_and_std_of_unit_pixels():
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
  got = preprocess.normalize(tf.constant(pixels), IMAGENET_MEAN, IMAGENET_STD)
  want = (pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
  assert got.dtype == tf.float32
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
  # Without them: [-1, 1], bit for bit what the pipeline always gave.
  np.testing.assert_array_equal(
      preprocess.normalize(tf.constant(pixels)).numpy(),
      (np.float32(pixels) / np.float32(255.0)) * np.float32(2.0)
      - np.float32(1.0),
  )


@pytest.mark.parametrize(
    'mean, std',
    [
        ((0.5, 0.5), (0.5, 0.5, 0.5)),
        ((0.5, 0.5, 0.5), None),
        ((0.5, 0.5, 0.5), (0.5, 0.0, 0.5)),
        (('a', 0.5, 0.5), (0.5, 0.5, 0.5)),
    ],
)
def test_pp_mean_and_std_are_refused_in_one_line_unless_three_each(mean, std):
  with pytest.raises(ValueError) as e:
    preprocess.PreprocessConfig.from_config(
        {'mean': mean, 'std': std}, image_size=8, num_classes=2
    )
  assert 'config.pp.mean' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('train', [True, False])
def test_pipeline_normalizes_with_pp_mean_and_std(train):
  """The image the model sees is (pixels / 255 - mean) / std."""
  pp = preprocess.PreprocessConfig.from_config(
      {
          'mean': list(IMAGENET_MEAN),
          'std': list(IMAGENET_STD),
          'inception_crop': False,
          'flip': False,
      },
      image_size=12,
      num_classes=3,
  )
  image = np.random.default_rng(1).integers(0, 256, (12, 12, 3), np.uint8)
  out = preprocess.make_preprocess_fn(pp, train=train)(
      {
          'image': tf.constant(_encode(image, 'PNG')),
          'label': tf.constant(2, tf.int64),
          'seed': tf.constant([1, 2], tf.int64),
      }
  )
  # Same size: the resize leaves the pixels as they are.
  want = (image / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
  np.testing.assert_allclose(out['image'].numpy(), want, atol=1e-5)
