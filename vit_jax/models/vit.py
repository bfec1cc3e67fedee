"""Vision Transformer (ViT) and its ResNet hybrid, in Flax linen.

The parameter tree is the one of the official google-research vit_jax Linen
model, so published checkpoints load through `vit_jax.checkpoint` unchanged:

  cls                                          (1, 1, D)    class token
  embedding/{kernel, bias}                     (P, P, C, D) patch embedding
  Transformer/posembed_input/pos_embedding     (1, T, D)
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/
      {query,key,value}/{kernel (D, H, D/H), bias (H, D/H)},
      out/{kernel (H, D/H, D), bias (D,)}, LayerNorm_1, MlpBlock_0/Dense_{0,1}
  Transformer/encoder_norm
  pre_logits/{kernel, bias}                    only with a representation size
  head/{kernel, bias}
  conv_root, gn_root, block{k}/unit{j}/...     hybrids only (see resnet.py)

With `scan=True` the blocks are one `Transformer/encoderblock` whose parameters
carry a leading axis of length `num_layers`; `vit_jax.checkpoint` converts
between the two layouts.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import resnet

Dtype = Any

# Initialisers of the paper's code base.
_ATTENTION_KERNEL_INIT = nn.initializers.xavier_uniform
_MLP_KERNEL_INIT = nn.initializers.xavier_uniform()
_MLP_BIAS_INIT = nn.initializers.normal(stddev=1e-6)
_POSEMB_INIT = nn.initializers.normal(stddev=0.02)
_LAYER_NORM_EPSILON = 1e-6

CLASSIFIERS = ('token', 'gap', 'unpooled', 'token_unpooled')
OUTPUTS = ('logits', 'tokens')


def config_value(config: Any, name: str, default: Any = None) -> Any:
  """Reads `name` from a dict, FrozenDict, ml_collections.ConfigDict or object.

  The official model configs are `ConfigDict`s read by attribute
  (`config.patches.size`); plain dicts are the natural form in user code.
  Accepting both keeps `VisionTransformer(**official_config)` working.

  Args:
    config: The container, or None.
    name: Field name.
    default: Value when the field (or the container) is absent.

  Returns:
    The field's value, or `default`.
  """
  if config is None:
    return default
  if isinstance(config, Mapping) or hasattr(config, 'get'):
    return config.get(name, default)
  return getattr(config, name, default)


def patch_size_of(patches: Any) -> tuple[int, int]:
  """Returns the (height, width) patch size of a `patches` config field."""
  size = config_value(patches, 'size', patches)
  if isinstance(size, int):
    return (size, size)
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f'patches.size must be an int or a pair, got {size!r}.')
  return size


class _ProjectionParams(nn.Module):
  """Holds the kernel and bias of one attention projection.

  The attention computes its projections itself (q, k and v fused into a single
  matmul), so this module only owns the parameters, under the names and shapes
  of the published checkpoints.
  """
  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...]
  fan_in_axes: tuple[int, ...]
  fan_out_axes: tuple[int, ...]
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    kernel_init = _ATTENTION_KERNEL_INIT(
        in_axis=self.fan_in_axes, out_axis=self.fan_out_axes)
    kernel = self.param('kernel', kernel_init, self.kernel_shape,
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, self.bias_shape,
                      self.param_dtype)
    return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention with the published parameter layout.

  Attributes:
    num_heads: Number of heads; must divide the hidden size.
    dropout_rate: Dropout on the attention weights.
    deterministic: Disables dropout.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
  """
  num_heads: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = x.shape[-1]
    if hidden % self.num_heads:
      raise ValueError(f'hidden size {hidden} is not divisible by num_heads '
                       f'{self.num_heads}.')
    head_dim = hidden // self.num_heads
    heads = (self.num_heads, head_dim)

    def projection(name):
      return _ProjectionParams(
          kernel_shape=(hidden, *heads), bias_shape=heads, fan_in_axes=(0,),
          fan_out_axes=(1, 2), param_dtype=self.param_dtype, name=name)()

    (wq, bq), (wk, bk), (wv, bv) = (
        projection(n) for n in ('query', 'key', 'value'))
    wo, bo = _ProjectionParams(
        kernel_shape=(*heads, hidden), bias_shape=(hidden,),
        fan_in_axes=(0, 1), fan_out_axes=(2,), param_dtype=self.param_dtype,
        name='out')()

    # One [B*T, D] x [D, 3D] matmul for q, k and v, written straight into the
    # heads-major layout [B, 3H, T, D/H] that the two attention einsums want.
    w_qkv = jnp.concatenate([wq, wk, wv], axis=1).astype(self.dtype)
    b_qkv = jnp.concatenate([bq, bk, bv], axis=0).astype(self.dtype)
    qkv = jnp.einsum('btd,dnh->bnth', x.astype(self.dtype), w_qkv)
    qkv = qkv + b_qkv[None, :, None, :]
    q, k, v = jnp.split(qkv, 3, axis=1)
    q = q * jnp.asarray(head_dim**-0.5, self.dtype)

    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k)
    # Softmax in float32 whatever the compute dtype: bfloat16 exponentials
    # lose too much precision in long sequences.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights = weights.astype(self.dtype)
    self.sow('intermediates', 'attention_weights', weights)
    weights = nn.Dropout(rate=self.dropout_rate)(
        weights, deterministic=self.deterministic)
    out = jnp.einsum('bhqk,bhkd->bhqd', weights, v)
    out = jnp.einsum('bhqd,hdo->bqo', out, wo.astype(self.dtype))
    return out + bo.astype(self.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout.

  Attributes:
    mlp_dim: Hidden width.
    dropout_rate: Dropout after each Dense.
    deterministic: Disables dropout.
    out_dim: Output width; defaults to the input width.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  out_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dim = self.out_dim or x.shape[-1]
    dense = lambda n, name: nn.Dense(  # pylint: disable=g-long-lambda
        n, kernel_init=_MLP_KERNEL_INIT, bias_init=_MLP_BIAS_INIT,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    x = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=self.deterministic)
    x = dense(out_dim, 'Dense_1')(x)
    return nn.Dropout(rate=self.dropout_rate)(
        x, deterministic=self.deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-norm Transformer block: x + MSA(LN(x)), then x + MLP(LN(x)).

  Returns `(outputs, None)` so that the same module is the body of `nn.scan`.

  Attributes:
    mlp_dim: MLP hidden width.
    num_heads: Attention heads.
    dropout_rate: Dropout after attention and in the MLP.
    attention_dropout_rate: Dropout on attention weights.
    deterministic: Disables dropout.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> tuple[jax.Array, None]:
    norm = lambda name: nn.LayerNorm(  # pylint: disable=g-long-lambda
        epsilon=_LAYER_NORM_EPSILON, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    x = norm('LayerNorm_0')(inputs)
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
        deterministic=self.deterministic, dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='MultiHeadDotProductAttention_0')(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=self.deterministic)
    x = x + inputs
    y = norm('LayerNorm_1')(x)
    y = MlpBlock(
        mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
        deterministic=self.deterministic, dtype=self.dtype,
        param_dtype=self.param_dtype, name='MlpBlock_0')(y)
    outputs = x + y
    self.sow('intermediates', 'block_output', outputs)
    return outputs, None


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings of shape (1, tokens, hidden).

  Attributes:
    param_dtype: Parameter dtype.
  """
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (1, x.shape[1], x.shape[2])
    if self.has_variable('params', 'pos_embedding'):
      stored = self.get_variable('params', 'pos_embedding').shape
      if tuple(stored) != shape:
        raise ValueError(
            f'Position embeddings {tuple(stored)} do not match the input '
            f'sequence {shape}: the parameters were made for another image '
            'size. Resize them with vit_jax.checkpoint.load_pretrained (or '
            'interpolate_posembed) for this resolution.')
    posemb = self.param('pos_embedding', _POSEMB_INIT, shape, self.param_dtype)
    return x + posemb.astype(x.dtype)


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and a final LayerNorm.

  Attributes:
    num_layers: Number of blocks.
    mlp_dim: MLP hidden width.
    num_heads: Attention heads.
    dropout_rate: Dropout rate.
    attention_dropout_rate: Attention-weight dropout rate.
    add_position_embedding: Whether to add learned position embeddings.
    deterministic: Disables dropout.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
    remat: Rematerialise each block in the backward pass (saves memory).
    scan: Run the blocks with `nn.scan` (compile time independent of depth).
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  add_position_embedding: bool = True
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.add_position_embedding:
      x = AddPositionEmbs(param_dtype=self.param_dtype,
                          name='posembed_input')(x)
      x = nn.Dropout(rate=self.dropout_rate)(
          x, deterministic=self.deterministic)
    x = x.astype(self.dtype)
    block_cls = Encoder1DBlock
    if self.remat:
      # Under scan, common-subexpression elimination cannot undo the remat, so
      # the (costly) CSE barrier is only needed in the unrolled loop.
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan)
    block_kwargs = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        deterministic=self.deterministic, dtype=self.dtype,
        param_dtype=self.param_dtype)
    if self.scan:
      block_cls = nn.scan(
          block_cls,
          variable_axes={'params': 0, 'intermediates': 0},
          split_rngs={'params': True, 'dropout': True},
          length=self.num_layers)
      x, _ = block_cls(name='encoderblock', **block_kwargs)(x)
    else:
      for i in range(self.num_layers):
        x, _ = block_cls(name=f'encoderblock_{i}', **block_kwargs)(x)
    return nn.LayerNorm(
        epsilon=_LAYER_NORM_EPSILON, dtype=self.dtype,
        param_dtype=self.param_dtype, name='encoder_norm')(x)


class VisionTransformer(nn.Module):
  """Vision Transformer, optionally on top of a BiT ResNet (hybrid).

  Takes the official model-config fields, so
  `VisionTransformer(num_classes=10, **official_config)` works with the
  `ml_collections` configs of google-research/vision_transformer as well as
  with plain dicts.

  Attributes:
    num_classes: Output classes; None or 0 returns the pre-logits features.
    patches: `{'size': (ph, pw)}`; on the ResNet feature map for hybrids.
    transformer: `{'num_layers', 'mlp_dim', 'num_heads', 'dropout_rate',
      'attention_dropout_rate'}`; None skips the encoder (ResNet features only).
    hidden_size: Token width D.
    resnet: `{'num_layers': (3, 4, 9), 'width_factor': 1}` for hybrids.
    representation_size: Width of the tanh pre-logits layer; None for none.
    classifier: 'token' (class token), 'gap' (mean of tokens), 'unpooled'
      (all tokens, for dense tasks) or 'token_unpooled' (class token kept in
      the sequence).
    head_bias_init: Initial value of the head bias.
    model_name: Registry name, informational.
    dtype: Computation dtype (e.g. jnp.bfloat16).
    param_dtype: Parameter dtype.
    remat: Rematerialise encoder blocks in the backward pass.
    scan: Scan over encoder blocks.
  """
  num_classes: int | None
  patches: Any
  transformer: Any
  hidden_size: int
  resnet: Any = None
  representation_size: int | None = None
  classifier: str = 'token'
  head_bias_init: float = 0.0
  model_name: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan: bool = False

  @property
  def total_stride(self) -> tuple[int, int]:
    """Input pixels per token along (height, width)."""
    ph, pw = patch_size_of(self.patches)
    stride = resnet.total_stride(self.resnet)
    return ph * stride, pw * stride

  def _check_image(self, images: jax.Array) -> None:
    if images.ndim != 4:
      raise ValueError(f'images must be NHWC (4-D), got shape {images.shape}.')
    sh, sw = self.total_stride
    h, w = images.shape[1:3]
    if h % sh or w % sw:
      kind = 'patch size' if self.resnet is None else 'total stride'
      raise ValueError(
          f'Image size {h}x{w} is not divisible by the {kind} {sh}x{sw} of '
          f'{self.model_name or "this model"}: resize or crop the images to a '
          f'multiple of it (e.g. '
          f'{max(1, h // sh) * sh}x{max(1, w // sw) * sw}).')

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool,
               patch_transform: Callable[[jax.Array], jax.Array] | None = None,
               output: str = 'logits') -> jax.Array:
    """Logits `[batch, num_classes]` (or features without a head).

    The two keyword hooks serve training objectives other than
    classification (`vit_jax.objectives`), which keep their own parameters in
    a module around this one.

    Args:
      inputs: Images `[batch, height, width, 3]` in [-1, 1].
      train: Enables dropout (needs a 'dropout' rng).
      patch_transform: Applied to the patch embeddings `[batch, patches, D]`
        (row-major patch order) before the class token and the encoder, e.g.
        to mask some of them.
      output: 'logits' (pooled, through the representation layer and head)
        or 'tokens': the encoder's output sequence `[batch, tokens, D]`
        (class token first when the classifier has one).

    Returns:
      As `output` says.
    """
    if output not in OUTPUTS:
      raise ValueError(f'Unknown output {output!r}; use one of {OUTPUTS}.')
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'Unknown classifier {self.classifier!r}; use one of '
                       f'{CLASSIFIERS}.')
    self._check_image(inputs)
    x = inputs.astype(self.dtype)
    if self.resnet is not None:
      x = resnet.bit_stem_and_stages(
          x, num_layers=tuple(config_value(self.resnet, 'num_layers')),
          width_factor=config_value(self.resnet, 'width_factor', 1),
          dtype=self.dtype, param_dtype=self.param_dtype)

    ph, pw = patch_size_of(self.patches)
    x = nn.Conv(
        features=self.hidden_size, kernel_size=(ph, pw), strides=(ph, pw),
        padding='VALID', dtype=self.dtype, param_dtype=self.param_dtype,
        name='embedding')(x)

    if (patch_transform or output == 'tokens') and self.transformer is None:
      raise ValueError('patch_transform and output=\'tokens\' need a '
                       'transformer (this model has none).')
    if self.transformer is not None:
      n, h, w, c = x.shape
      x = jnp.reshape(x, (n, h * w, c))
      if patch_transform is not None:
        x = patch_transform(x)
      if self.classifier in ('token', 'token_unpooled'):
        cls = self.param('cls', nn.initializers.zeros, (1, 1, c),
                         self.param_dtype)
        x = jnp.concatenate(
            [jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
      encoder_fields = {
          k: config_value(self.transformer, k)
          for k in ('num_layers', 'mlp_dim', 'num_heads')}
      for k, default in (('dropout_rate', 0.1),
                         ('attention_dropout_rate', 0.1),
                         ('add_position_embedding', True)):
        encoder_fields[k] = config_value(self.transformer, k, default)
      x = Encoder(
          deterministic=not train, dtype=self.dtype,
          param_dtype=self.param_dtype, remat=self.remat, scan=self.scan,
          name='Transformer', **encoder_fields)(x)
      if output == 'tokens':
        return x

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))

    if self.representation_size is not None:
      x = nn.Dense(
          self.representation_size, dtype=self.dtype,
          param_dtype=self.param_dtype, name='pre_logits')(x)
      x = jnp.tanh(x)
    self.sow('intermediates', 'pre_logits', x)

    if self.num_classes:
      x = nn.Dense(
          self.num_classes, kernel_init=nn.initializers.zeros,
          bias_init=nn.initializers.constant(self.head_bias_init),
          dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)
    return x


__all__ = [
    'AddPositionEmbs', 'CLASSIFIERS', 'Encoder', 'Encoder1DBlock', 'MlpBlock',
    'MultiHeadDotProductAttention', 'OUTPUTS', 'VisionTransformer',
    'config_value', 'patch_size_of',
]
