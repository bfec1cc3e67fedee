"""Image preprocessing: small typed tf ops, composed from config.

Each op is a plain function on tensors that works eagerly and inside tf.data.
Random ops are *stateless*: they take a `seed` (shape [2] int tensor), which
the input pipeline derives from (run seed, epoch, example index). The same
example in the same epoch is therefore augmented identically whatever the
parallelism, and a resumed run sees exactly the augmentations of an
uninterrupted one.

`make_preprocess_fn(config, train=...)` composes the ops (no string
mini-language):

  train: decode -> to_rgb -> [inception_crop] -> resize -> [flip]
         -> [uint8 -> randaugment] -> value_range(-1, 1) -> one_hot
  eval:  decode -> to_rgb -> resize (or resize_small + central_crop)
         -> value_range(-1, 1) -> one_hot

NaFlex (`make_preprocess_fn(..., naflex=NaflexShape(patch_size, seq_len))`)
replaces the resize (and the eval crop) by `resize_to_sequence`, which keeps
the image's aspect ratio within a token budget, and ends with `patchify` and
`pad_to_sequence`: the image becomes big_vision's NaFlex input tuple
`(patches, ptype, yabs, xabs)`.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import tensorflow as tf

from vit_jax import randaugment as randaugment_lib

Features = dict[str, tf.Tensor]

# Folded into an example's seed to give RandAugment's seed.
_RANDAUGMENT_STREAM = 1


def decode(data: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 [H, W, C] (C as stored)."""
  image = tf.io.decode_image(data, expand_animations=False)
  image.set_shape([None, None, None])
  return image


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Grey -> RGB (channel repeated); RGBA -> RGB (alpha dropped)."""
  channels = tf.shape(image)[-1]
  image = tf.cond(
      channels == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3]
  )
  image.set_shape([None, None, 3])
  return image


def inception_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    area_range: tuple[float, float] = (0.05, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
  """Random crop covering `area_range` of the image (Inception-style).

  Args:
    image: [H, W, C] image.
    seed: [2] int seed.
    area_range: Fraction of the image area the crop covers.
    aspect_ratio_range: Width/height ratio range of the crop.

  Returns:
    The cropped image (not resized).
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image),
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      seed=seed,
      area_range=area_range,
      aspect_ratio_range=aspect_ratio_range,
      min_object_covered=0.0,
      use_image_if_no_bounding_boxes=True,
  )
  channels = image.shape[-1]
  image = tf.slice(image, begin, size)
  image.set_shape([None, None, channels])
  return image


def resize(image: tf.Tensor, size: int | tuple[int, int]) -> tf.Tensor:
  """Bilinear resize to `size` (int: square); returns float32."""
  hw = (size, size) if isinstance(size, int) else tuple(size)
  return tf.image.resize(tf.cast(image, tf.float32), hw, method='bilinear')


def resize_small(image: tf.Tensor, smaller_size: int) -> tf.Tensor:
  """Resizes so that the shorter side is `smaller_size` (aspect kept)."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.cast(smaller_size, tf.float32) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  return tf.image.resize(tf.cast(image, tf.float32), new, method='bilinear')


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Crops the central `size` x `size` window."""
  shape = tf.shape(image)
  top = (shape[0] - size) // 2
  left = (shape[1] - size) // 2
  return image[top : top + size, left : left + size]


def flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Random horizontal flip with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def value_range(
    image: tf.Tensor, low: float = -1.0, high: float = 1.0
) -> tf.Tensor:
  """Maps [0, 255] to [low, high] as float32."""
  image = tf.cast(image, tf.float32) / 255.0
  return image * (high - low) + low


def normalize(
    image: tf.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tf.Tensor:
  """The model's input values of a [0, 255] image, as float32.

  Args:
    image: [..., 3] pixel values in [0, 255].
    mean: Per-channel mean of [0, 1] pixels (e.g. ImageNet's (0.485, 0.456,
      0.406), what DINOv2 and EVA-02 were trained with); None: [-1, 1]
      (`value_range`, the paper's and SigLIP's), as is `std`.
    std: Per-channel standard deviation of [0, 1] pixels.

  Returns:
    `(image / 255 - mean) / std`, or `value_range(image)` without them.
  """
  if mean is None and std is None:
    return value_range(image)
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def check_normalization(mean: Any, std: Any, where: str = 'config.pp') -> None:
  """Refuses a mean/std pair that is not two lists of 3 (std > 0).

  Raises:
    ValueError: naming `where`'s fields and the fix.
  """
  if mean is None and std is None:
    return
  ok = all(
      isinstance(v, (list, tuple))
      and len(v) == 3
      and all(
          isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
      )
      for v in (mean, std)
  )
  if not ok or min(std) <= 0:
    raise ValueError(
        f'{where}.mean={mean!r} and {where}.std={std!r}: set both to three '
        'numbers (per channel, on [0, 1] pixels, std > 0), e.g. '
        '0.485,0.456,0.406 and 0.229,0.224,0.225, or neither for [-1, 1].'
    )


def naflex_grid(
    height: tf.Tensor, width: tf.Tensor, max_tokens: int | tf.Tensor
) -> tf.Tensor:
  """The patch grid (rows, columns) NaFlex gives an image of this shape.

  The image is scaled by the largest factor `s` (in patches per pixel) for
  which `max(1, ceil(height * s)) * max(1, ceil(width * s)) <= max_tokens`:
  the most patches within the budget at the image's aspect ratio, each side
  rounded up to whole patches (big_vision's `resize_to_sequence` searches for
  the same factor by bisection). That factor makes `height * s` or
  `width * s` a whole number `k`, so it is found exactly, in integers, among
  the `2 * max_tokens` candidates `k / height` and `k / width`.

  Args:
    height: Image height in pixels (scalar int tensor).
    width: Image width in pixels.
    max_tokens: Token budget (>= 1).

  Returns:
    int32 [2]: (rows, columns), rows * columns <= max_tokens.
  """
  h = tf.cast(height, tf.int64)
  w = tf.cast(width, tf.int64)
  budget = tf.cast(max_tokens, tf.int64)
  k = tf.range(1, budget + 1, dtype=tf.int64)

  def largest_feasible(side, other):
    # k patches along `side`: ceil(other * k / side) along the other side.
    across = (other * k + side - 1) // side
    return tf.reduce_max(tf.where(k * across <= budget, k, 0))

  rows_k = largest_feasible(h, w)  # Scale rows_k / h.
  cols_k = largest_feasible(w, h)  # Scale cols_k / w.
  # The larger scale wins (compared without division).
  by_rows = rows_k * w >= cols_k * h
  rows = tf.where(by_rows, rows_k, tf.maximum((h * cols_k + w - 1) // w, 1))
  cols = tf.where(by_rows, tf.maximum((w * rows_k + h - 1) // h, 1), cols_k)
  return tf.cast(tf.stack([rows, cols]), tf.int32)


def resize_to_sequence(
    image: tf.Tensor, patch_size: int, max_tokens: int | tf.Tensor
) -> tf.Tensor:
  """Resizes to the largest whole-patch size within `max_tokens` patches.

  The aspect ratio is kept up to rounding each side up to a multiple of
  `patch_size` (`naflex_grid`). Bilinear with antialiasing, as big_vision's
  `resize_to_sequence`.

  Args:
    image: [H, W, C] image (any dtype).
    patch_size: Pixels per patch side.
    max_tokens: Token budget.

  Returns:
    float32 [rows * patch_size, columns * patch_size, C].
  """
  shape = tf.shape(image)
  grid = naflex_grid(shape[0], shape[1], max_tokens)
  return tf.image.resize(
      tf.cast(image, tf.float32),
      grid * patch_size,
      method='bilinear',
      antialias=True,
  )


def patchify(
    image: tf.Tensor, patch_size: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Cuts an image whose sides are multiples of `patch_size` into patches.

  Args:
    image: [rows * P, columns * P, C].
    patch_size: P.

  Returns:
    (patches [rows * columns, P * P * C], each flattened in (row, column,
    channel) order like `tf.image.extract_patches`, in row-major patch
    order; yabs, xabs: int32 [rows * columns], each patch's row and column).
  """
  shape = tf.shape(image)
  rows, cols = shape[0] // patch_size, shape[1] // patch_size
  channels = image.shape[-1] or shape[-1]
  grid = tf.reshape(image, [rows, patch_size, cols, patch_size, channels])
  patches = tf.reshape(
      tf.transpose(grid, [0, 2, 1, 3, 4]),
      [rows * cols, patch_size * patch_size * channels],
  )
  yabs, xabs = tf.meshgrid(tf.range(rows), tf.range(cols), indexing='ij')
  return patches, tf.reshape(yabs, [-1]), tf.reshape(xabs, [-1])


NaflexInputs = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]


def pad_to_sequence(
    patches: tf.Tensor,
    yabs: tf.Tensor,
    xabs: tf.Tensor,
    seq_len: int | tf.Tensor,
) -> NaflexInputs:
  """Pads `patchify`'s output to `seq_len` tokens: the NaFlex input tuple.

  Args:
    patches: [n, D] with n <= seq_len.
    yabs: int32 [n] patch rows.
    xabs: int32 [n] patch columns.
    seq_len: Sequence length N.

  Returns:
    (patches float32 [N, D] (zeros after n), ptype int32 [N] (1 for a
    patch, 0 for padding), yabs, xabs int32 [N] (0 for padding)).
  """
  n = tf.shape(patches)[0]
  pad = seq_len - n
  ptype = tf.pad(tf.ones([n], tf.int32), [[0, pad]])
  return (
      tf.pad(tf.cast(patches, tf.float32), [[0, pad], [0, 0]]),
      ptype,
      tf.pad(tf.cast(yabs, tf.int32), [[0, pad]]),
      tf.pad(tf.cast(xabs, tf.int32), [[0, pad]]),
  )


def one_hot(label: tf.Tensor, num_classes: int) -> tf.Tensor:
  """Integer label -> float32 one-hot vector (label smoothing: in the loss).

  A vector of labels (a multi-label image, e.g. ImageNet-ReaL's) gives the
  k-hot vector of its classes: all zeros when it is empty.
  """
  if label.shape.rank == 1:
    # A sum, not a max: the max of an empty list is -inf, its sum 0.
    hits = tf.reduce_sum(tf.one_hot(label, num_classes, dtype=tf.float32), 0)
    return tf.minimum(hits, 1.0)
  return tf.one_hot(label, num_classes, dtype=tf.float32)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Typed preprocessing options (`config.pp` in experiment configs).

  Attributes:
    image_size: Output height and width.
    num_classes: Size of the one-hot labels.
    inception_crop: Train: random crop before resizing.
    crop_area_range: Train: area fraction of the random crop.
    flip: Train: random horizontal flips.
    eval_crop_fraction: Eval: 1.0 resizes to `image_size` directly (the
      paper's fine-tuning evaluation); < 1 resizes the shorter side to
      `image_size / eval_crop_fraction` and takes a central crop.
    randaugment: Train: `(num_layers, magnitude)` of RandAugment as the
      AugReg recipe runs it (`vit_jax.randaugment`), on the uint8 image
      after the crop, resize and flip; `()` turns it off.
    mean: Per-channel mean of [0, 1] pixels the images are normalised with
      (`normalize`); None, with `std`: [-1, 1].
    std: Per-channel standard deviation, likewise.
  """

  image_size: int
  num_classes: int
  inception_crop: bool = True
  crop_area_range: tuple[float, float] = (0.05, 1.0)
  flip: bool = True
  eval_crop_fraction: float = 1.0
  randaugment: tuple[int, int] | tuple[()] = ()
  mean: tuple[float, float, float] | None = None
  std: tuple[float, float, float] | None = None

  def __post_init__(self):
    check_normalization(self.mean, self.std)
    for name in ('mean', 'std'):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(getattr(self, name)))
    value: Any = self.randaugment  # Any: what the user gave, checked below.
    if value is None:
      value = ()
    if isinstance(value, (list, tuple)):
      value = tuple(value)
      object.__setattr__(self, 'randaugment', value)
    if value == ():
      return
    limit = randaugment_lib.MAX_MAGNITUDE
    ints = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ints or value[0] < 0 or not 0 <= value[1] <= limit:
      raise ValueError(
          f'config.pp.randaugment={self.randaugment!r} must be () (off) or '
          f'(num_layers, magnitude): ints with num_layers >= 0 and '
          f'0 <= magnitude <= {limit} (the AugReg configs use magnitudes '
          f'0, 10, 15 and 20; big_vision sets no bound, but above {limit} '
          f'its Posterize would need more than 8 bits).'
      )

  @classmethod
  def from_config(
      cls, pp: Mapping[str, Any] | Any, *, image_size: int, num_classes: int
  ) -> 'PreprocessConfig':
    """Builds from a `config.pp` ConfigDict/dict, rejecting unknown fields."""
    fields = {f.name for f in dataclasses.fields(cls)} - {
        'image_size',
        'num_classes',
    }
    values = dict(pp.items()) if pp is not None else {}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(
          f'config.pp has unknown field(s) {unknown}; valid: '
          f'{sorted(fields)}.'
      )
    if 'crop_area_range' in values:
      values['crop_area_range'] = tuple(values['crop_area_range'])
    return cls(image_size=image_size, num_classes=num_classes, **values)


@dataclasses.dataclass(frozen=True)
class NaflexShape:
  """The NaFlex form of the preprocessed images.

  Attributes:
    patch_size: Pixels per patch side (the model's patch size).
    seq_len: Tokens per image (the budget and the padded length); None: each
      example's own, from its 'seq_len' feature (sequence-length buckets).
  """

  patch_size: int
  seq_len: int | None = None


def to_naflex(
    image: tf.Tensor,
    patch_size: int,
    seq_len: int | tf.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> NaflexInputs:
  """A [0, 255] image whose sides are multiples of `patch_size` -> NaFlex tuple.

  Values are normalised as the fixed-size pipeline does (`normalize`: [-1, 1]
  without `mean` and `std`), then patchified and padded to `seq_len` tokens.
  """
  patches, yabs, xabs = patchify(normalize(image, mean, std), patch_size)
  return pad_to_sequence(patches, yabs, xabs, seq_len)


def make_preprocess_fn(
    pp: PreprocessConfig, *, train: bool, naflex: NaflexShape | None = None
) -> Callable[[Features], Features]:
  """Returns fn({'image': bytes, 'label': int, 'seed': [2]}) -> batch features.

  The result holds 'image' (float32 [S, S, 3] in [-1, 1]) and 'labels'
  (float32 one-hot). With `naflex`, 'image' is the NaFlex tuple
  `(patches, ptype, yabs, xabs)` of `to_naflex` instead: the image resized
  by `resize_to_sequence` at its own aspect ratio (the random crop, flip and
  RandAugment as in the fixed-size pipeline; the evaluation crop unused).
  """

  def resize_to_target(image: tf.Tensor, features: Features) -> tf.Tensor:
    if naflex is None:
      return resize(image, pp.image_size)
    return resize_to_sequence(image, naflex.patch_size, seq_len(features))

  def seq_len(features: Features) -> int | tf.Tensor:
    assert naflex is not None
    if naflex.seq_len is None:
      return features['seq_len']
    return naflex.seq_len

  def fn(features: Features) -> Features:
    image = to_rgb(decode(features['image']))
    if train:
      crop_seed, flip_seed = tf.unstack(
          tf.random.experimental.stateless_split(features['seed'], 2)
      )
      if pp.inception_crop:
        image = inception_crop(image, crop_seed, pp.crop_area_range)
      image = resize_to_target(image, features)
      if pp.flip:
        image = flip(image, flip_seed)
      if pp.randaugment and pp.randaugment[0] > 0:
        # Its own stream, folded in rather than a third split, so that the
        # crop and flip of every example are those of a run without it.
        randaugment_seed = tf.random.experimental.stateless_fold_in(
            features['seed'], tf.constant(_RANDAUGMENT_STREAM, tf.int64)
        )
        # RandAugment's ops are defined on uint8 (big_vision runs it on
        # the uint8 image its resize returns); round, not truncate.
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        image = randaugment_lib.randaugment(
            image, *pp.randaugment, seed=randaugment_seed
        )
    elif naflex is None and pp.eval_crop_fraction < 1.0:
      image = resize_small(image, round(pp.image_size / pp.eval_crop_fraction))
      image = central_crop(image, pp.image_size)
    else:
      image = resize_to_target(image, features)
    labels = one_hot(features['label'], pp.num_classes)
    if naflex is not None:
      return {
          'image': to_naflex(
              image, naflex.patch_size, seq_len(features), pp.mean, pp.std
          ),
          'labels': labels,
      }
    image = tf.ensure_shape(
        normalize(image, pp.mean, pp.std), [pp.image_size, pp.image_size, 3]
    )
    return {'image': image, 'labels': labels}

  return fn
