"""RandAugment (Cubuk et al., 2019) as the AugReg recipe / big_vision runs it.

The op list, the level -> argument mappings and the constants follow
big_vision's `pp/autoaugment.py` (`distort_image_with_randaugment`, itself the
TPU EfficientNet code): `num_layers` times, one of the 16 `OPS` is picked
uniformly and *always* applied (that code draws a probability per op but never
uses it), at the fixed `magnitude` out of `MAX_LEVEL` = 10. Rotate, ShearX/Y
and TranslateX/Y get a random sign; Cutout a random position.

Unlike big_vision, every random choice is *stateless*: it comes from
`tf.random.stateless_*` with seeds split from the `seed` argument ([2] int
tensor), so the result is a function of (image, seed) eagerly and inside
tf.data, and a resumed run sees the same augmentations.

Images are uint8 [H, W, 3]; every op returns uint8 of the same shape.
Quirks of big_vision's ops are kept on purpose (the AugReg checkpoints were
trained with them) and named where they occur: Solarize's threshold is taken
modulo 256 (so magnitude 10 inverts every pixel), Contrast blends towards
grey level `H * W / 256` rather than the mean grey, Posterize's shift is
clamped to 7 (0 bits keeps the top bit), and the Translate/Cutout constants
are pixels (tuned for 224 px images).
"""

from collections.abc import Callable
import math
from typing import cast

import tensorflow as tf

MAX_LEVEL = 10.0
# big_vision's RandAugment hyper-parameters (AutoAugment uses 250 / 100).
TRANSLATE_CONST = 100  # Pixels of translation at level MAX_LEVEL.
CUTOUT_CONST = 40  # Half side (pixels) of the cutout square at MAX_LEVEL.
REPLACE = 128  # Grey that fills pixels the geometric ops and Cutout empty.
# big_vision's AugReg configs use magnitudes 0, 10, 15 and 20; above 20 its
# Posterize mapping asks for more than 8 bits (a negative shift).
MAX_MAGNITUDE = 20

OPS = (
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
# Ops whose argument big_vision negates with probability 1/2.
SIGNED_OPS = frozenset(
    {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'}
)
# Ops that use their seed (a random sign or position); the rest ignore it.
RANDOM_OPS = SIGNED_OPS | {'Cutout'}


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  """Clips a float image to [0, 255] and truncates (as big_vision casts)."""
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def blend(image1: tf.Tensor, image2: tf.Tensor, factor: float) -> tf.Tensor:
  """image1 + factor * (image2 - image1), clipped; 0 -> image1, 1 -> image2.

  Factors above 1 extrapolate away from image1 (PIL's ImageEnhance).
  """
  if factor == 0.0:
    return image1
  if factor == 1.0:
    return image2
  image1 = tf.cast(image1, tf.float32)
  image2 = tf.cast(image2, tf.float32)
  return _to_uint8(image1 + factor * (image2 - image1))


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel's [min, max] to [0, 255] (flat channels kept)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  # x * scale - lo * scale, not (x - lo) * scale: big_vision's rounding.
  stretched = _to_uint8(x * scale + (-lo * scale))
  return tf.where(hi > lo, stretched, image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.equalize on one uint8 [H, W] channel."""
  x = tf.cast(channel, tf.int32)
  histo = tf.histogram_fixed_width(x, [0, 255], nbins=256)
  nonzero = tf.boolean_mask(histo, histo > 0)
  # Pixels outside the most frequent-last bin, spread over 255 levels.
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  safe = tf.maximum(step, 1)
  lut = (tf.cumsum(histo) + safe // 2) // safe
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  return tf.where(step > 0, tf.cast(tf.gather(lut, x), tf.uint8), channel)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram equalisation of each channel (PIL's Equalize)."""
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def invert(image: tf.Tensor) -> tf.Tensor:
  """255 - image."""
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the top `bits` bits of each value.

  Args:
    image: uint8 image.
    bits: 0..8. big_vision shifts by 8 - bits with tf.bitwise, which clamps
      the shift to 7 on uint8: 0 bits keeps the top bit, like 1 bit.

  Returns:
    The posterized image.
  """
  shift = min(8 - bits, 7)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
  """Inverts the values >= threshold (taken modulo 256, as big_vision).

  big_vision compares the uint8 image with the Python int, which TF converts
  to uint8 with wrap-around: its threshold 256 (magnitude 10) is 0 and
  inverts everything; 384 (magnitude 15) is 128.

  Args:
    image: uint8 image.
    threshold: Values below it are kept.

  Returns:
    The solarized image.
  """
  return tf.where(image < threshold % 256, image, 255 - image)


def solarize_add(
    image: tf.Tensor, addition: int, threshold: int = 128
) -> tf.Tensor:
  """Adds `addition` (clipped to [0, 255]) to the values below `threshold`."""
  added = tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255)
  return tf.where(image < threshold, tf.cast(added, tf.uint8), image)


def color(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Saturation: blends the grey version (factor 0) with the image (1)."""
  grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return blend(grey, image, factor)


def contrast(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Contrast: blends a flat grey (factor 0) with the image (factor 1).

  big_vision's grey level is the histogram's *total* / 256, i.e. the pixel
  count H * W / 256 clipped to 255 (PIL uses the mean grey value); kept so
  the recipe matches the AugReg runs. At 224 px it is 196.

  Args:
    image: uint8 image.
    factor: Blend factor.

  Returns:
    The image with its contrast changed.
  """
  shape = tf.shape(image)
  level = tf.cast(shape[0] * shape[1], tf.float32) / 256.0
  grey = tf.fill(shape, _to_uint8(level))
  return blend(grey, image, factor)


def brightness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Brightness: blends black (factor 0) with the image (factor 1)."""
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Sharpness: blends PIL's SMOOTH-filtered image (factor 0) with the image.

  The 1-pixel border of the smoothed image keeps the original values.

  Args:
    image: uint8 image.
    factor: Blend factor.

  Returns:
    The image sharpened (factor > 1) or blurred (factor < 1).
  """
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(
      tf.cast(image, tf.float32)[None],
      kernel,
      strides=[1, 1, 1, 1],
      padding='VALID',
  )[0]
  smooth = tf.pad(_to_uint8(smooth), [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(
      tf.ones_like(smooth[1:-1, 1:-1], tf.bool), [[1, 1], [1, 1], [0, 0]]
  )
  return blend(tf.where(interior, smooth, image), image, factor)


def _transform(
    image: tf.Tensor, matrix: list[tf.Tensor | float], replace: int
) -> tf.Tensor:
  """Projective transform; output (x, y) reads input (a0 x + a1 y + a2, ...).

  `matrix` is [a0, a1, a2, b0, b1, b2] (an affine map from output to input
  pixel coordinates). Nearest-neighbour sampling, as big_vision (via
  tensorflow-addons) does; pixels that map outside the input get `replace`.
  """
  transforms = tf.stack(
      [tf.cast(m, tf.float32) for m in matrix]
      + [tf.constant(0.0), tf.constant(0.0)]
  )
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=transforms[None],
      output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(replace, tf.float32),
      interpolation='NEAREST',
      fill_mode='CONSTANT',
  )
  return out[0]


def rotate(
    image: tf.Tensor, degrees: tf.Tensor | float, replace: int = REPLACE
) -> tf.Tensor:
  """Rotates about the image centre by `degrees` (positive: anticlockwise)."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(radians), tf.sin(radians)
  shape = tf.cast(tf.shape(image), tf.float32)
  h, w = shape[0] - 1, shape[1] - 1
  # input = R(radians) @ (output - centre) + centre; the offsets are
  # written in tensorflow-addons' order so that float32 rounding (and so
  # nearest-neighbour ties) matches big_vision.
  return _transform(
      image,
      [
          cos,
          -sin,
          (w - (cos * w - sin * h)) / 2,
          sin,
          cos,
          (h - (sin * w + cos * h)) / 2,
      ],
      replace,
  )


def shear_x(
    image: tf.Tensor, level: tf.Tensor | float, replace: int = REPLACE
) -> tf.Tensor:
  """Output (x, y) reads input (x + level * y, y)."""
  return _transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0], replace)


def shear_y(
    image: tf.Tensor, level: tf.Tensor | float, replace: int = REPLACE
) -> tf.Tensor:
  """Output (x, y) reads input (x, y + level * x)."""
  return _transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0], replace)


def translate_x(
    image: tf.Tensor, pixels: tf.Tensor | float, replace: int = REPLACE
) -> tf.Tensor:
  """Moves the content `pixels` to the left: out[:, x] = in[:, x + pixels]."""
  return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], replace)


def translate_y(
    image: tf.Tensor, pixels: tf.Tensor | float, replace: int = REPLACE
) -> tf.Tensor:
  """Moves the content `pixels` up: out[y] = in[y + pixels]."""
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], replace)


def cutout(
    image: tf.Tensor, pad_size: int, seed: tf.Tensor, replace: int = REPLACE
) -> tf.Tensor:
  """Fills a 2*pad_size square (clipped to the image) with `replace`.

  Its centre is uniform over the pixels: rows [cy - pad_size, cy + pad_size)
  and the same for columns.

  Args:
    image: uint8 image.
    pad_size: Half side of the square; 0 changes nothing.
    seed: [2] int seed of the centre.
    replace: Fill value.

  Returns:
    The image with the square filled.
  """
  shape = tf.shape(image)
  row_seed, col_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2)
  )
  cy = tf.random.stateless_uniform([], row_seed, 0, shape[0], tf.int32)
  cx = tf.random.stateless_uniform([], col_seed, 0, shape[1], tf.int32)
  return _fill_square(image, pad_size, cy, cx, replace)


def _fill_square(
    image: tf.Tensor, pad_size: int, cy: tf.Tensor, cx: tf.Tensor, replace: int
) -> tf.Tensor:
  """Cutout's square centred on pixel (cy, cx)."""
  shape = tf.shape(image)
  rows = tf.range(shape[0])[:, None, None]
  cols = tf.range(shape[1])[None, :, None]
  inside = (
      (rows >= cy - pad_size)
      & (rows < cy + pad_size)
      & (cols >= cx - pad_size)
      & (cols < cx + pad_size)
  )
  return tf.where(inside, tf.constant(replace, image.dtype), image)


def level_to_arg(name: str, magnitude: float) -> float | int | None:
  """The argument big_vision gives op `name` at `magnitude` (before sign)."""
  level = magnitude / MAX_LEVEL
  if name == 'Rotate':
    return level * 30.0
  if name == 'Posterize':
    return int(level * 4)
  if name == 'Solarize':
    return int(level * 256)
  if name == 'SolarizeAdd':
    return int(level * 110)
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return level * 1.8 + 0.1
  if name in ('ShearX', 'ShearY'):
    return level * 0.3
  if name in ('TranslateX', 'TranslateY'):
    return level * float(TRANSLATE_CONST)
  if name == 'Cutout':
    return int(level * CUTOUT_CONST)
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return None
  raise ValueError(f'Unknown RandAugment op {name!r}; use one of {OPS}.')


_FUNCS: dict[str, Callable[..., tf.Tensor]] = {
    'AutoContrast': autocontrast,
    'Equalize': equalize,
    'Invert': invert,
    'Rotate': rotate,
    'Posterize': posterize,
    'Solarize': solarize,
    'Color': color,
    'Contrast': contrast,
    'Brightness': brightness,
    'Sharpness': sharpness,
    'ShearX': shear_x,
    'ShearY': shear_y,
    'TranslateX': translate_x,
    'TranslateY': translate_y,
    'SolarizeAdd': solarize_add,
}


def apply_op(
    name: str, image: tf.Tensor, magnitude: float, seed: tf.Tensor
) -> tf.Tensor:
  """Applies op `name` at `magnitude` as one RandAugment layer does.

  Args:
    name: One of `OPS`.
    image: uint8 [H, W, 3] image.
    magnitude: Level, out of `MAX_LEVEL`.
    seed: [2] int seed: the sign of the `SIGNED_OPS`' argument (each with
      probability 1/2), Cutout's position; unused by the other ops.

  Returns:
    The uint8 image.
  """
  arg = level_to_arg(name, magnitude)
  sign_seed, cutout_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2)
  )
  if name == 'Cutout':
    return cutout(image, cast(int, arg), cutout_seed)
  if name in SIGNED_OPS:
    assert arg is not None  # Every signed op takes a number.
    negate = tf.random.stateless_uniform([], sign_seed) < 0.5
    arg = tf.where(negate, -arg, arg)
  if arg is None:
    return _FUNCS[name](image)
  return _FUNCS[name](image, arg)


def randaugment(
    image: tf.Tensor, num_layers: int, magnitude: float, seed: tf.Tensor
) -> tf.Tensor:
  """RandAugment: `num_layers` ops, each uniform over `OPS`, at `magnitude`.

  Args:
    image: uint8 [H, W, 3] image.
    num_layers: Ops applied in sequence (N in the paper); 0 is the identity.
    magnitude: Shared level of every op (M), out of `MAX_LEVEL`. Magnitude 0
      still changes images (e.g. Invert, Equalize, Posterize to 1 bit).
    seed: [2] int seed; the output is a function of (image, seed).

  Returns:
    The augmented uint8 image.
  """
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f'randaugment takes uint8 images, got {image.dtype}.')
  if num_layers == 0:
    return image
  layer_seeds = tf.random.experimental.stateless_split(seed, num_layers)
  for layer in range(num_layers):
    choice_seed, op_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seeds[layer], 2)
    )
    index = tf.random.stateless_uniform([], choice_seed, 0, len(OPS), tf.int32)
    branches = [
        lambda name=name, image=image, op_seed=op_seed: apply_op(
            name, image, magnitude, op_seed
        )
        for name in OPS
    ]
    image = tf.ensure_shape(tf.switch_case(index, branches), image.shape)
  return image
