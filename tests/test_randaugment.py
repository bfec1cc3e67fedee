"""RandAugment: known answers of the ops, seeding, and the pipeline option.

The last test is opt-in: it compares each op with big_vision's own
`pp/autoaugment.py` (tensorflow-addons, which that file imports, is replaced
by a stub of the three functions it uses, written from tfa's formulas):

  git clone https://github.com/google-research/big_vision /tmp/big_vision
  VIT_JAX_BIG_VISION_PATH=/tmp/big_vision \
      python -m pytest tests/test_randaugment.py -k big_vision
"""

import importlib.util
import io
import os
import sys
import types

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vit_jax import preprocess
from vit_jax import randaugment as ra

GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
# Identity at magnitude 0 in big_vision's mappings: angle, shear, shift,
# cutout half-size and SolarizeAdd's addition are then 0.
IDENTITY_AT_ZERO = GEOMETRIC + ('Cutout', 'SolarizeAdd')
# Not the identity at 0: Posterize keeps 0 bits (the top bit, see
# `ra.posterize`), Solarize's threshold 0 inverts everything, the enhance ops
# blend with factor 0.1 (mostly the degenerate image), and AutoContrast,
# Equalize, Invert have no magnitude at all.
CHANGED_AT_ZERO = (
    'Posterize',
    'Solarize',
    'Color',
    'Contrast',
    'Brightness',
    'Sharpness',
    'Equalize',
    'Invert',
)


def _random_image(h=32, w=32, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _seed(a, b=0):
  return tf.constant([a, b], tf.int64)


def test_the_op_list_and_level_mappings_are_big_visions():
  # big_vision's `pp/autoaugment.py` (the TPU AutoAugment code): its
  # `available_ops` in its order (an op is drawn by index), the ops it
  # passes through `_randomly_negate_tensor`, and its RandAugment constants.
  assert ra.OPS == (
      'AutoContrast',
      'Equalize',
      'Invert',
      'Rotate',
      'Posterize',
      'Solarize',
      'Color',
      'Contrast',
      'Brightness',
      'Sharpness',
      'ShearX',
      'ShearY',
      'TranslateX',
      'TranslateY',
      'Cutout',
      'SolarizeAdd',
  )
  assert ra.SIGNED_OPS == {
      'Rotate',
      'ShearX',
      'ShearY',
      'TranslateX',
      'TranslateY',
  }
  assert (ra.MAX_LEVEL, ra.TRANSLATE_CONST, ra.CUTOUT_CONST, ra.REPLACE) == (
      10.0,
      100,
      40,
      128,
  )
  assert set(ra.OPS) == set(ra._FUNCS) | {'Cutout'}  # pylint: disable=protected-access
  assert ra.level_to_arg('Rotate', 10) == 30.0
  assert ra.level_to_arg('Posterize', 10) == 4
  assert ra.level_to_arg('Posterize', 15) == 6
  assert ra.level_to_arg('Solarize', 10) == 256
  assert ra.level_to_arg('Solarize', 3) == 76  # int(0.3 * 256)
  assert ra.level_to_arg('SolarizeAdd', 10) == 110
  assert ra.level_to_arg('Cutout', 10) == 40
  assert ra.level_to_arg('TranslateX', 10) == 100.0
  assert ra.level_to_arg('ShearY', 10) == pytest.approx(0.3)
  assert ra.level_to_arg('Color', 0) == pytest.approx(0.1)
  assert ra.level_to_arg('Sharpness', 10) == pytest.approx(1.9)
  assert ra.level_to_arg('Invert', 10) is None
  with pytest.raises(ValueError, match='Unknown RandAugment op'):
    ra.level_to_arg('Blur', 5)


@pytest.mark.parametrize('name', ra.OPS)
def test_each_op_is_deterministic_given_its_seed(name):
  image = tf.constant(_random_image())
  # Magnitude 2: a cutout square of 16 px and a 20 px shift leave part of a
  # 32 px image, so position and sign show.
  outputs = [ra.apply_op(name, image, 2, _seed(s)).numpy() for s in range(8)]
  again = ra.apply_op(name, image, 2, _seed(3)).numpy()
  np.testing.assert_array_equal(again, outputs[3])
  assert all(o.dtype == np.uint8 and o.shape == (32, 32, 3) for o in outputs)
  distinct = len({o.tobytes() for o in outputs})
  if name in ra.RANDOM_OPS:
    assert distinct > 1, f'{name} ignores its seed'
  else:
    assert distinct == 1, f'{name} is random'


@pytest.mark.parametrize('name', IDENTITY_AT_ZERO)
def test_magnitude_zero_is_the_identity(name):
  image = _random_image()
  for s in range(4):
    out = ra.apply_op(name, tf.constant(image), 0, _seed(s)).numpy()
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize('name', CHANGED_AT_ZERO)
def test_magnitude_zero_still_changes_these(name):
  image = _random_image()
  out = ra.apply_op(name, tf.constant(image), 0, _seed(0)).numpy()
  assert (out != image).mean() > 0.3


def test_invert_solarize_posterize_solarize_add_known_answers():
  x = np.array([0, 1, 64, 127, 128, 129, 200, 255], np.uint8).reshape(1, 8, 1)
  x = np.repeat(x, 3, -1)
  t = tf.constant(x)
  np.testing.assert_array_equal(ra.invert(t).numpy(), 255 - x)
  np.testing.assert_array_equal(
      ra.solarize(t, 128).numpy(), np.where(x < 128, x, 255 - x)
  )
  np.testing.assert_array_equal(
      ra.solarize(t, 200).numpy(), np.where(x < 200, x, 255 - x)
  )
  # big_vision's uint8 threshold wraps: 256 (magnitude 10) inverts all.
  np.testing.assert_array_equal(ra.solarize(t, 256).numpy(), 255 - x)
  np.testing.assert_array_equal(ra.posterize(t, 2).numpy(), x & 0b11000000)
  np.testing.assert_array_equal(ra.posterize(t, 4).numpy(), x & 0b11110000)
  np.testing.assert_array_equal(ra.posterize(t, 0).numpy(), x & 0b10000000)
  np.testing.assert_array_equal(ra.posterize(t, 8).numpy(), x)
  added = np.minimum(x.astype(int) + 110, 255)
  np.testing.assert_array_equal(
      ra.solarize_add(t, 110).numpy(), np.where(x < 128, added, x)
  )


def test_blend_ops_known_answers():
  x = np.array([0, 3, 50, 101, 170, 255], np.uint8).reshape(2, 3, 1)
  x = np.repeat(x, 3, -1)
  t = tf.constant(x)
  # Blend with black, truncated towards 0 and clipped (PIL Brightness).
  np.testing.assert_array_equal(
      ra.brightness(t, 0.5).numpy(), np.floor(x * 0.5).astype(np.uint8)
  )
  np.testing.assert_array_equal(
      ra.brightness(t, 1.5).numpy(),
      np.minimum(np.floor(x * 1.5), 255).astype(np.uint8),
  )
  np.testing.assert_array_equal(ra.brightness(t, 1.0).numpy(), x)
  # big_vision's Contrast blends with grey H*W/256 (here 6/256 -> 0).
  np.testing.assert_array_equal(
      ra.contrast(t, 0.5).numpy(), np.floor(x * 0.5).astype(np.uint8)
  )
  big = tf.fill([32, 32, 3], tf.constant(10, tf.uint8))  # grey 1024/256 = 4.
  np.testing.assert_array_equal(ra.contrast(big, 0.5).numpy(), 7)


def test_sharpness_known_answer():
  x = np.zeros((5, 5, 3), np.uint8)
  x[2, 2] = 130
  # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 inside the
  # 1-pixel border (which keeps the image): 50 at the centre, 10 around.
  smooth = np.zeros_like(x)
  smooth[1:4, 1:4] = 10
  smooth[2, 2] = 50
  np.testing.assert_array_equal(ra.sharpness(tf.constant(x), 0.0), smooth)
  # Factor 2 extrapolates: 2 * x - smooth, clipped.
  np.testing.assert_array_equal(
      ra.sharpness(tf.constant(x), 2.0),
      np.clip(2 * x.astype(int) - smooth, 0, 255).astype(np.uint8),
  )


def test_autocontrast_and_equalize_known_answers():
  x = np.zeros((2, 2, 3), np.uint8)
  x[..., 0] = [[50, 60], [70, 101]]  # Scale 255 / 51 = 5.
  x[..., 1] = 9  # A flat channel is kept.
  x[..., 2] = [[0, 0], [255, 255]]
  out = ra.autocontrast(tf.constant(x)).numpy()
  np.testing.assert_array_equal(out[..., 0], [[0, 50], [100, 255]])
  np.testing.assert_array_equal(out[..., 1:], x[..., 1:])
  # PIL equalize of 4 values each once: step = (4 - 1) // 255 = 0 -> kept.
  np.testing.assert_array_equal(
      ra.equalize(tf.constant(x)).numpy()[..., 0], x[..., 0]
  )
  # 510 pixels at 10, 255 at 20, 255 at 30: step 3; LUT 0, 170, 255.
  y = np.repeat(
      np.array([10] * 510 + [20] * 255 + [30] * 255, np.uint8), 3
  ).reshape(30, 34, 3)
  want = {10: 0, 20: 170, 30: 255}
  np.testing.assert_array_equal(
      ra.equalize(tf.constant(y)).numpy(), np.vectorize(want.get)(y)
  )


@pytest.mark.parametrize('k', [1, 3, -2])
def test_translate_by_k_pixels_is_slicing_with_the_replace_value(k):
  x = _random_image(6, 7)
  want = np.full_like(x, 128)
  if k > 0:
    want[:, :-k] = x[:, k:]
  else:
    want[:, -k:] = x[:, :k]
  np.testing.assert_array_equal(ra.translate_x(tf.constant(x), k).numpy(), want)
  want = np.full_like(x, 128)
  if k > 0:
    want[:-k] = x[k:]
  else:
    want[-k:] = x[:k]
  np.testing.assert_array_equal(ra.translate_y(tf.constant(x), k).numpy(), want)


def test_rotate_and_shear_known_answers():
  x = _random_image(5, 5)
  # +90 degrees turns the content anticlockwise, as np.rot90.
  np.testing.assert_array_equal(
      ra.rotate(tf.constant(x), 90.0).numpy(), np.rot90(x)
  )
  np.testing.assert_array_equal(
      ra.rotate(tf.constant(x), -90.0).numpy(), np.rot90(x, -1)
  )
  # Shear x by 1: row y reads columns x + y.
  want = np.full_like(x, 128)
  for y in range(5):
    want[y, : 5 - y] = x[y, y:]
  np.testing.assert_array_equal(ra.shear_x(tf.constant(x), 1.0).numpy(), want)
  np.testing.assert_array_equal(
      ra.shear_y(tf.constant(x), 1.0).numpy(),
      np.swapaxes(
          ra.shear_x(tf.constant(np.swapaxes(x, 0, 1)), 1.0).numpy(), 0, 1
      ),
  )


def test_cutout_fills_a_square_of_twice_the_pad_size():
  x = np.full((40, 40, 3), 7, np.uint8)
  sizes = set()
  for s in range(6):
    out = ra.cutout(tf.constant(x), 3, _seed(s)).numpy()
    filled = (out == 128).all(-1)
    assert ((out == 128) | (out == 7)).all()
    rows, cols = np.nonzero(filled)
    # A (clipped) square: its bounding box is exactly filled.
    box = filled[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all() and box.shape[0] <= 6 and box.shape[1] <= 6
    sizes.add(filled.sum())
  assert 36 in sizes  # Unclipped somewhere in 6 draws.


def test_randaugment_is_seeded_and_zero_layers_is_the_identity():
  image = tf.constant(_random_image())
  np.testing.assert_array_equal(ra.randaugment(image, 0, 10, _seed(1)), image)
  outs = [ra.randaugment(image, 2, 10, _seed(s)).numpy() for s in range(6)]
  np.testing.assert_array_equal(ra.randaugment(image, 2, 10, _seed(4)), outs[4])
  assert len({o.tobytes() for o in outs}) > 3
  with pytest.raises(TypeError, match='uint8'):
    ra.randaugment(tf.cast(image, tf.float32), 2, 10, _seed(0))


def test_randaugment_inside_tf_data_matches_eager():
  image = _random_image(16, 16)
  ds = tf.data.Dataset.range(5).map(
      lambda i: ra.randaugment(
          tf.constant(image), 2, 15, tf.stack([i, tf.constant(9, tf.int64)])
      )
  )
  for i, out in enumerate(ds):
    np.testing.assert_array_equal(
        out.numpy(), ra.randaugment(tf.constant(image), 2, 15, _seed(i, 9))
    )


# The pipeline option.


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _features(i):
  return {
      'image': tf.constant(_png(_random_image(20, 24, seed=i))),
      'label': tf.constant(i % 3, tf.int64),
      'seed': tf.constant([11, i], tf.int64),
  }


def _pp(**kwargs):
  return preprocess.PreprocessConfig.from_config(
      kwargs, image_size=16, num_classes=3
  )


def _by_hand(features, randaugment):
  """The train pipeline written out: crop, resize, flip, [RA], range."""
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(features['seed'], 2)
  )
  image = preprocess.to_rgb(preprocess.decode(features['image']))
  image = preprocess.inception_crop(image, crop_seed)
  image = preprocess.flip(preprocess.resize(image, 16), flip_seed)
  if randaugment:
    seed = tf.random.experimental.stateless_fold_in(
        features['seed'], tf.constant(1, tf.int64)
    )
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    image = ra.randaugment(image, *randaugment, seed=seed)
  return preprocess.value_range(image).numpy()


def test_pipeline_without_randaugment_is_unchanged():
  fn = preprocess.make_preprocess_fn(_pp(randaugment=()), train=True)
  default = preprocess.make_preprocess_fn(_pp(), train=True)
  for i in range(3):
    out = fn(_features(i))['image'].numpy()
    np.testing.assert_array_equal(out, _by_hand(_features(i), ()))
    np.testing.assert_array_equal(out, default(_features(i))['image'])
  # (0, m) applies no op and so no rounding either.
  zero = preprocess.make_preprocess_fn(_pp(randaugment=(0, 10)), train=True)
  np.testing.assert_array_equal(zero(_features(2))['image'], out)


def test_pipeline_randaugment_changes_images_deterministically():
  fn = preprocess.make_preprocess_fn(_pp(randaugment=[2, 10]), train=True)
  off = preprocess.make_preprocess_fn(_pp(), train=True)
  ds = tf.data.Dataset.range(4).map(
      lambda i: {
          'image': tf.constant(
              [_png(_random_image(20, 24, seed=k)) for k in range(4)]
          )[i],
          'label': i % 3,
          'seed': tf.stack([tf.constant(11, tf.int64), i]),
      }
  )
  outs = [x['image'].numpy() for x in ds.map(fn)]
  changed = 0
  for i, out in enumerate(outs):
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert -1 <= out.min() and out.max() <= 1
    # On after the flip, before value_range, with its own folded-in seed.
    np.testing.assert_array_equal(out, _by_hand(_features(i), (2, 10)))
    np.testing.assert_array_equal(out, fn(_features(i))['image'])
    assert not np.array_equal(out, off(_features(i))['image'])
    # Not only by the rounding to uint8 that RandAugment needs.
    changed += not np.array_equal(out, _by_hand(_features(i), (0, 10)))
  assert changed >= 3
  # Eval is never augmented.
  evaluate = preprocess.make_preprocess_fn(
      _pp(randaugment=(2, 10)), train=False
  )
  plain = preprocess.make_preprocess_fn(_pp(), train=False)
  np.testing.assert_array_equal(
      evaluate(_features(0))['image'], plain(_features(0))['image']
  )


@pytest.mark.parametrize(
    'value',
    [
        (2,),
        (2, 10, 1),
        (-1, 5),
        (2, 21),
        (2, -1),
        (2.0, 10),
        (True, 10),
        'ra',
        2,
    ],
)
def test_bad_randaugment_is_refused_naming_the_field(value):
  with pytest.raises(ValueError, match=r'config\.pp\.randaugment'):
    preprocess.PreprocessConfig(image_size=8, num_classes=2, randaugment=value)


def test_good_randaugment_values():
  assert _pp().randaugment == ()
  assert _pp(randaugment=None).randaugment == ()
  assert _pp(randaugment=[2, 15]).randaugment == (2, 15)
  assert _pp(randaugment=(2, 20)).randaugment == (2, 20)
  assert _pp(randaugment=(0, 0)).randaugment == (0, 0)


# Opt-in parity with big_vision's code.


def _tfa_stub():
  """The three tensorflow_addons.image functions autoaugment.py calls."""

  def transform(images, transforms, interpolation='nearest'):
    assert interpolation == 'nearest'
    images = tf.convert_to_tensor(images)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[None],
        transforms=tf.reshape(tf.cast(transforms, tf.float32), [1, 8]),
        output_shape=tf.shape(images)[:2],
        fill_value=0.0,
        interpolation='NEAREST',
        fill_mode='CONSTANT',
    )
    return out[0]

  def rotate(images, angles):
    h = tf.cast(tf.shape(images)[0], tf.float32)
    w = tf.cast(tf.shape(images)[1], tf.float32)
    c, s = tf.cos(angles), tf.sin(angles)
    x_offset = ((w - 1) - (c * (w - 1) - s * (h - 1))) / 2.0
    y_offset = ((h - 1) - (s * (w - 1) + c * (h - 1))) / 2.0
    return transform(images, [c, -s, x_offset, s, c, y_offset, 0.0, 0.0])

  def translate(images, translations):
    dx, dy = translations
    return transform(images, [1.0, 0.0, -dx, 0.0, 1.0, -dy, 0.0, 0.0])

  image = types.ModuleType('tensorflow_addons.image')
  image.transform, image.rotate, image.translate = transform, rotate, translate
  package = types.ModuleType('tensorflow_addons')
  package.image = image
  return package, image


def _big_vision_autoaugment(monkeypatch):
  root = os.environ.get('VIT_JAX_BIG_VISION_PATH')
  if not root:
    pytest.skip('set VIT_JAX_BIG_VISION_PATH to a big_vision clone')
  path = os.path.join(root, 'big_vision', 'pp', 'archive', 'autoaugment.py')
  if not os.path.exists(path):
    path = os.path.join(root, 'big_vision', 'pp', 'autoaugment.py')
  package, image = _tfa_stub()
  monkeypatch.setitem(sys.modules, 'tensorflow_addons', package)
  monkeypatch.setitem(sys.modules, 'tensorflow_addons.image', image)
  spec = importlib.util.spec_from_file_location('bv_autoaugment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_ops_match_big_vision(monkeypatch):
  bv = _big_vision_autoaugment(monkeypatch)
  hparams = bv.HParams(
      cutout_const=ra.CUTOUT_CONST, translate_const=ra.TRANSLATE_CONST
  )
  image = tf.constant(_random_image(24, 20, seed=5))
  replace = [128, 128, 128]
  for magnitude in (0, 3, 5, 7, 10, 15, 20):
    for name in ra.OPS:
      args = bv.level_to_arg(hparams)[name](float(magnitude))
      mine = ra.level_to_arg(name, magnitude)
      if mine is None:
        assert args == ()
        np.testing.assert_array_equal(
            ra._FUNCS[name](image),  # pylint: disable=protected-access
            bv.NAME_TO_FUNC[name](image),
            name,
        )
        continue
      assert abs(float(args[0])) == pytest.approx(mine), (name, magnitude)
      if name == 'Cutout':
        continue  # Below: big_vision draws the position statefully.
      for arg in ([mine, -mine] if name in ra.SIGNED_OPS else [mine]):
        extra = []
        if name in ra.SIGNED_OPS:
          # big_vision's random sign makes these float32 tensors.
          arg, extra = tf.constant(arg, tf.float32), [replace]
        want = bv.NAME_TO_FUNC[name](image, arg, *extra)
        got = ra._FUNCS[name](image, arg)  # pylint: disable=protected-access
        np.testing.assert_array_equal(got, want, f'{name} {magnitude}')
  # Cutout at big_vision's (stateful) position, given to ours.
  for s in range(5):
    tf.random.set_seed(s)
    want = bv.cutout(image, 8, replace=128).numpy()
    filled = np.argwhere((want != image.numpy()).any(-1))
    if not filled.size:
      continue
    (top, left), (bottom, right) = filled.min(0), filled.max(0)
    # Recover the centre from an unclipped edge of the square.
    cy = top + 8 if top > 0 else bottom + 1 - 8
    cx = left + 8 if left > 0 else right + 1 - 8
    got = ra._fill_square(image, 8, cy, cx, 128)  # pylint: disable=protected-access
    np.testing.assert_array_equal(got, want)
