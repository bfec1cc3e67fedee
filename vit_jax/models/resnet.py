"""BiT ResNet (weight-standardised convs + GroupNorm) for the ViT hybrids.

The hybrids (R50+ViT-B_16, ...) take their patches from the feature map of a
ResNet v1.5 with Group Normalisation and weight standardisation ("ResNet
(BiT)", paper §3.1). The stem and stages are created directly inside the
calling module, so their parameters sit at the top of the model's tree
(`conv_root`, `gn_root`, `block1/unit1/conv1`, ...) as in the published
hybrid checkpoints.

Each residual unit sows its output into `intermediates`
(`block{k}/unit{j}/unit_output`; a stage's output is its last unit's), as
the ViT blocks sow theirs, for `vit_jax.analysis`; nothing is stored unless
that collection is mutable.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_STD_EPSILON = 1e-5
_GROUPS = 32


def standardize(x: jax.Array, axis: Sequence[int], eps: float) -> jax.Array:
  """Returns `x` shifted and scaled to zero mean and unit std over `axis`."""
  x = x - jnp.mean(x, axis=axis, keepdims=True)
  return x / (jnp.std(x, axis=axis, keepdims=True) + eps)


class StdConv(nn.Conv):
  """Convolution whose kernel is standardised per output channel."""

  def param(self, name, init_fn, *init_args, **init_kwargs):
    value = super().param(name, init_fn, *init_args, **init_kwargs)
    if name == 'kernel':
      value = standardize(value, axis=(0, 1, 2), eps=_STD_EPSILON)
    return value


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1, with a projected shortcut.

  Attributes:
    features: Bottleneck width; the unit outputs `4 * features` channels.
    strides: Stride of the 3x3 conv (and of the projection).
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
  """

  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda features, kernel, name, strides=(1, 1): StdConv(  # pylint: disable=g-long-lambda
        features=features,
        kernel_size=kernel,
        strides=strides,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )
    norm = lambda name, **kw: nn.GroupNorm(  # pylint: disable=g-long-lambda
        num_groups=_GROUPS,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
        **kw,
    )
    out_features = 4 * self.features
    residual = x
    if x.shape[-1] != out_features or tuple(self.strides) != (1, 1):
      residual = conv(out_features, (1, 1), 'conv_proj', self.strides)(x)
      residual = norm('gn_proj')(residual)
    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), 'conv1')(x)))
    y = conv(self.features, (3, 3), 'conv2', self.strides)(y)
    y = nn.relu(norm('gn2')(y))
    y = conv(out_features, (1, 1), 'conv3')(y)
    # Zero-initialised last norm: each unit starts as the identity.
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    outputs = nn.relu(residual + y)
    self.sow('intermediates', 'unit_output', outputs)
    return outputs


class ResNetStage(nn.Module):
  """`block_size` residual units; the first one may downsample.

  Attributes:
    block_size: Number of units.
    nout: Bottleneck width of the units.
    first_stride: Stride of the first unit.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
  """

  block_size: int
  nout: int
  first_stride: tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.block_size):
      x = ResidualUnit(
          self.nout,
          strides=self.first_stride if i == 0 else (1, 1),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f'unit{i + 1}',
      )(x)
    return x


def total_stride(resnet_config: Mapping[str, Any] | Any | None) -> int:
  """Downsampling factor of the stem and stages (1 without a ResNet)."""
  if resnet_config is None:
    return 1
  if isinstance(resnet_config, Mapping) or hasattr(resnet_config, 'get'):
    num_layers = resnet_config.get('num_layers', ())
  else:
    num_layers = getattr(resnet_config, 'num_layers', ())
  # Root conv (stride 2) and max-pool (stride 2), then every stage after the
  # first halves the resolution.
  return 4 * 2 ** max(len(tuple(num_layers)) - 1, 0)


def bit_stem_and_stages(
    x: jax.Array,
    *,
    num_layers: Sequence[int],
    width_factor: float,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> jax.Array:
  """Applies the BiT root block and stages inside the calling linen module.

  Must be called from a `@nn.compact` method: the layers become children of
  that module (`conv_root`, `gn_root`, `block1`, ...).

  Args:
    x: NHWC images.
    num_layers: Units per stage, e.g. (3, 4, 9) for R50+ViT-B_16; empty for
      the root block only.
    width_factor: Channel multiplier of the standard ResNet widths.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.

  Returns:
    The feature map.
  """
  width = int(64 * width_factor)
  x = StdConv(
      features=width,
      kernel_size=(7, 7),
      strides=(2, 2),
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      name='conv_root',
  )(x)
  x = nn.GroupNorm(
      num_groups=_GROUPS, dtype=dtype, param_dtype=param_dtype, name='gn_root'
  )(x)
  x = nn.relu(x)
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(num_layers):
    x = ResNetStage(
        block_size=block_size,
        nout=width * 2**i,
        first_stride=(1, 1) if i == 0 else (2, 2),
        dtype=dtype,
        param_dtype=param_dtype,
        name=f'block{i + 1}',
    )(x)
  return x
