"""MLP-Mixer (Tolstikhin et al., 2021) with the published parameter tree.

  stem/{kernel, bias}                                    patch embedding
  MixerBlock_{i}/LayerNorm_0, token_mixing/Dense_{0,1},
                 LayerNorm_1, channel_mixing/Dense_{0,1}
  pre_head_layer_norm, head

These names load the published Mixer checkpoints unchanged.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import vit

Dtype = Any


class _MixingMlp(nn.Module):
  """Dense -> GELU -> Dense over the last axis (default initialisers)."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n, name: nn.Dense(  # pylint: disable=g-long-lambda
        n, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    y = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    return dense(x.shape[-1], 'Dense_1')(y)


class MixerBlock(nn.Module):
  """Token mixing across patches, then channel mixing, both pre-norm.

  Attributes:
    tokens_mlp_dim: Hidden width of the token-mixing MLP.
    channels_mlp_dim: Hidden width of the channel-mixing MLP.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
  """

  tokens_mlp_dim: int
  channels_mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.LayerNorm(name='LayerNorm_0', **kw)(x)
    y = jnp.swapaxes(y, 1, 2)
    y = _MixingMlp(self.tokens_mlp_dim, name='token_mixing', **kw)(y)
    x = x + jnp.swapaxes(y, 1, 2)
    y = nn.LayerNorm(name='LayerNorm_1', **kw)(x)
    x = x + _MixingMlp(self.channels_mlp_dim, name='channel_mixing', **kw)(y)
    self.sow('intermediates', 'block_output', x)
    return x


class MlpMixer(nn.Module):
  """MLP-Mixer classifier.

  Attributes:
    num_classes: Output classes; None or 0 returns the pooled features.
    patches: `{'size': (ph, pw)}`.
    num_blocks: Number of Mixer blocks.
    hidden_dim: Channel width.
    tokens_mlp_dim: Token-mixing MLP width.
    channels_mlp_dim: Channel-mixing MLP width.
    model_name: Registry name, informational.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
  """

  num_classes: int | None
  patches: Any
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  model_name: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
    del train  # No dropout or batch statistics in the Mixer.
    ph, pw = vit.patch_size_of(self.patches)
    h, w = inputs.shape[1:3]
    if h % ph or w % pw:
      raise ValueError(
          f'Image size {h}x{w} is not divisible by the patch size {ph}x{pw} '
          f'of {self.model_name or "this model"}: resize or crop the images '
          'to a multiple of it.'
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(
        self.hidden_dim,
        (ph, pw),
        strides=(ph, pw),
        padding='VALID',
        name='stem',
        **kw,
    )(inputs.astype(self.dtype))
    x = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))
    for i in range(self.num_blocks):
      x = MixerBlock(
          self.tokens_mlp_dim,
          self.channels_mlp_dim,
          name=f'MixerBlock_{i}',
          **kw,
      )(x)
    x = nn.LayerNorm(name='pre_head_layer_norm', **kw)(x)
    x = jnp.mean(x, axis=1)
    self.sow('intermediates', 'pre_logits', x)
    if self.num_classes:
      x = nn.Dense(
          self.num_classes, kernel_init=nn.initializers.zeros, name='head', **kw
      )(x)
    return x
