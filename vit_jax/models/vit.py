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

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from vit_jax.models import resnet
from vit_jax.models import rope as rope_lib

Dtype = Any

# Initialisers of the paper's code base.
_ATTENTION_KERNEL_INIT = nn.initializers.xavier_uniform
_MLP_KERNEL_INIT = nn.initializers.xavier_uniform()
_MLP_BIAS_INIT = nn.initializers.normal(stddev=1e-6)
_POSEMB_INIT = nn.initializers.normal(stddev=0.02)
_LAYER_NORM_EPSILON = 1e-6

CLASSIFIERS = ('token', 'gap', 'map', 'unpooled', 'token_unpooled')
OUTPUTS = ('logits', 'tokens')
# Position embeddings (paper Appendix D.4; big_vision's sine-cosine table):
#   'learn':    learned, one per token of the sequence, class token included
#               (`Transformer/posembed_input/pos_embedding`, the published
#               layout; big_vision's files, whose class token has none, load
#               into it with a zero class slot, the same sums);
#   'learn2d':  learned row and column embeddings of D/2 each, concatenated
#               per patch (`posembed_2d/{row,column}`);
#   'sincos2d': big_vision's fixed 2-D sine-cosine table, no parameters;
#   'none':     none.
# The kinds other than 'learn' are added to the patches before the class
# token and any registers join the sequence, as big_vision does, so those
# tokens have no position.
POSEMB_KINDS = ('learn', 'learn2d', 'sincos2d', 'none')
# How `dynamic_image_size` resizes learned embeddings to the input's grid
# (`vit_jax.checkpoint.POSEMB_METHODS`, the same numbers as its resize).
# 'linear' is big_vision FlexiViT's: half-pixel-centred, antialiased when
# shrinking (`jax.image.resize(..., 'linear')`).
POSEMB_RESIZE_METHODS = ('bilinear', 'bicubic', 'linear')
# The patch sizes FlexiViT (Beyer et al., 2023) trains with at 240 px, the
# grids 5x5 to 30x30 (big_vision's `config.flexi.seqhw`).
FLEXIVIT_PATCH_SIZES = (48, 40, 30, 24, 20, 16, 15, 12, 10, 8)
# The grid of a NaFlex model's learned 2-D position embeddings when none is
# given (`posemb_grid_size`): SigLIP 2 NaFlex's 16x16.
NAFLEX_POSEMB_GRID = (16, 16)

# How attention is computed (the parameters are the same for all):
#   'einsum': heads-major einsums, the fastest measured on CPU;
#   'xla':    jax.nn.dot_product_attention's XLA implementation;
#   'cudnn':  its cuDNN fused (flash) kernel, NVIDIA GPUs, bfloat16/float16;
#   'flash':  the Pallas TPU flash-attention kernel that jax ships;
#   'splash': the Pallas TPU splash-attention kernel that jax ships;
#   'auto':   per backend (see `resolve_attention_impl`).
# The two Pallas kernels run once per shard of the current mesh (see
# `_per_shard`): XLA cannot partition a Mosaic kernel itself.
ATTENTION_IMPLS = ('auto', 'einsum', 'xla', 'cudnn', 'flash', 'splash')
_TPU_KERNELS = ('flash', 'splash')
# Memory controls of the encoder blocks: 'none' keeps every activation, 'full'
# recomputes each block in the backward pass, the others are the
# `jax.checkpoint_policies` of the same name (what is saved, not recomputed).
REMAT_POLICIES = (
    'none',
    'full',
    'dots_saveable',
    'dots_with_no_batch_dims_saveable',
    'nothing_saveable',
    'everything_saveable',
)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128  # cuDNN's fused attention kernels go up to 128.
# The TPU kernels' sequence block (flash's and splash's default block sizes);
# sequences are padded to a multiple of it.
_FLASH_BLOCK = 128
_logged_choices: set[tuple[Any, ...]] = set()  # Say each choice once.

# Logical axes of the parameters that tensor parallelism splits, one name per
# dimension of one layer (a scanned stack adds the layer axis in front):
# (path regex, names). `vit_jax.sharding` maps the names onto mesh axes
# ('heads' and 'mlp' onto 'model': Megatron-style, so that each block needs one
# reduction of its attention output and one of its MLP output, and no weight
# is gathered over 'model'). Other parameters have no tensor-parallel axis.
_BLOCK = r'.*/encoderblock(_\d+)?'
PARAM_AXES = (
    (
        _BLOCK + r'/MultiHeadDotProductAttention_0/(query|key|value)/kernel',
        ('embed', 'heads', 'head_dim'),
    ),
    (
        _BLOCK + r'/MultiHeadDotProductAttention_0/(query|key|value)/bias',
        ('heads', 'head_dim'),
    ),
    (
        _BLOCK + r'/MultiHeadDotProductAttention_0/out/kernel',
        ('heads', 'head_dim', 'embed'),
    ),
    # SwiGLU's two branches (Dense_0, Dense_2) are split alike, so that each
    # device multiplies its own slice of both.
    (_BLOCK + r'/MlpBlock_0/Dense_[02]/kernel', ('embed', 'mlp')),
    (_BLOCK + r'/MlpBlock_0/Dense_[02]/bias', ('mlp',)),
    (_BLOCK + r'/MlpBlock_0/Dense_1/kernel', ('mlp', 'embed')),
    # The norm of the MLP's hidden activations (`mlp_norm`), over 'mlp'.
    (_BLOCK + r'/MlpBlock_0/LayerNorm_0/(scale|bias)', ('mlp',)),
    # RoPE-Mixed's learned frequencies [2, heads, head_dim // 2].
    (
        _BLOCK + r'/MultiHeadDotProductAttention_0/rope/freqs',
        ('rope_coordinate', 'heads', 'rope_pair'),
    ),
)
# Logical axes of the activations between blocks: [batch, tokens, hidden].
ACTIVATION_AXES = ('batch', 'length', 'embed')

# The block options of today's ViT families (`VisionTransformer`'s fields of
# the same names document them).
MLP_KINDS = ('gelu', 'swiglu')
NORM_KINDS = ('layernorm', 'rmsnorm')
# `VisionTransformer`'s fields for them; their defaults are the 2020 ViT.
BLOCK_OPTION_FIELDS = (
    'layer_scale',
    'qk_norm',
    'mlp',
    'mlp_norm',
    'norm',
    'qkv_bias',
    'proj_bias',
    'mlp_bias',
    'rope',
    'rope_options',
    'class_token',
    'posemb_class_token',
    'pre_norm',
    'embed_norm',
    'fc_norm',
    'map_num_heads',
    'map_mlp_dim',
)


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """What an encoder block is made of, beyond the 2020 ViT's.

  The defaults are the 2020 ViT's block, with its published parameter names.
  `VisionTransformer` builds one from its fields of the same names
  (`VisionTransformer.block_options`); see there for each option.
  """

  layer_scale: float | None = None
  qk_norm: bool = False
  mlp: str = 'gelu'
  mlp_norm: bool = False
  norm: str = 'layernorm'
  qkv_bias: bool | str = True
  proj_bias: bool = True
  mlp_bias: bool = True
  rope: str | None = None
  rope_options: tuple[tuple[str, Any], ...] = ()


# qkv_bias values: every projection, none, or query and value only (EVA's:
# a key bias adds the same logit to every key of a query, so it changes no
# attention weight).
QKV_BIAS_KINDS = (True, False, 'qv')
# Classifiers a class token may join without being what they pool.
_POOLS_WITHOUT_CLASS_TOKEN = ('gap', 'map')


def make_norm(
    kind: str,
    *,
    epsilon: float,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
) -> nn.Module:
  """The model's norm of `kind` (one of `NORM_KINDS`) under `name`.

  'layernorm' is `nn.LayerNorm` (scale and bias); 'rmsnorm' is `nn.RMSNorm`
  (x / sqrt(mean(x^2) + epsilon) * scale, no bias), timm's RmsNorm. Both
  normalise over the last axis.
  """
  norm_cls = nn.LayerNorm if kind == 'layernorm' else nn.RMSNorm
  return norm_cls(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name
  )


def _is_bool(value: Any) -> bool:
  return isinstance(value, (bool, np.bool_))


def check_options(fields: Mapping[str, Any], prefix: str = '') -> None:
  """Refuses bad block options and combinations, one line naming the field.

  Args:
    fields: A `VisionTransformer`'s fields (a registry config with its
      overrides, or the module's own attributes); absent ones are defaults.
    prefix: Put before each field's name in the message (e.g.
      'config.model.' when the fields come from a run's config).

  Raises:
    ValueError: an unknown kind, a value of the wrong type, or options that
      do not go together (e.g. fc_norm without 'gap' pooling).
  """
  get = lambda name, default: fields.get(name, default)  # pylint: disable=g-long-lambda
  classifier = get('classifier', 'token')
  refusals = []
  layer_scale = get('layer_scale', None)
  if layer_scale is not None and (
      _is_bool(layer_scale) or not isinstance(layer_scale, (int, float))
  ):
    refusals.append(
        ('layer_scale', 'the initial value of the scales (e.g. 1e-5) or None')
    )
  for name in (
      'qk_norm',
      'mlp_norm',
      'proj_bias',
      'mlp_bias',
      'posemb_class_token',
      'pre_norm',
      'embed_norm',
      'fc_norm',
  ):
    if not _is_bool(get(name, False)):
      refusals.append((name, 'True or False'))
  if get('mlp', 'gelu') not in MLP_KINDS:
    refusals.append(('mlp', f'one of {MLP_KINDS}'))
  if get('norm', 'layernorm') not in NORM_KINDS:
    refusals.append(('norm', f'one of {NORM_KINDS}'))
  qkv_bias = get('qkv_bias', True)
  if not (_is_bool(qkv_bias) or qkv_bias == 'qv'):
    refusals.append(('qkv_bias', f'one of {QKV_BIAS_KINDS}'))
  class_token = get('class_token', None)
  if class_token is not None and not _is_bool(class_token):
    refusals.append(('class_token', 'True, False or None (from classifier)'))
  elif class_token is False and classifier in ('token', 'token_unpooled'):
    refusals.append(
        ('class_token', f'True or None: classifier={classifier!r} pools it')
    )
  elif class_token and classifier == 'unpooled':
    refusals.append(
        (
            'class_token',
            "False or None with classifier='unpooled' (the patch tokens); "
            "classifier='token_unpooled' keeps a class token",
        )
    )
  if get('fc_norm', False) is True and classifier != 'gap':
    refusals.append(
        (
            'fc_norm',
            f"False: it norms the 'gap' pool (classifier={classifier!r})",
        )
    )
  for name in ('map_num_heads', 'map_mlp_dim'):
    value = get(name, None)
    if value is None:
      continue
    if _is_bool(value) or not isinstance(value, int) or value < 1:
      refusals.append((name, 'a positive integer or None'))
    elif classifier != 'map':
      refusals.append(
          (name, f"None: it sizes the 'map' head (classifier={classifier!r})")
      )
  map_heads, hidden = get('map_num_heads', None), get('hidden_size', None)
  if (
      isinstance(map_heads, int)
      and map_heads > 0
      and isinstance(hidden, int)
      and hidden % map_heads
  ):
    refusals.append(('map_num_heads', f'a divisor of hidden_size {hidden}'))
  if refusals:
    name, fix = refusals[0]
    raise ValueError(f'{prefix}{name}={get(name, None)!r}: use {fix}.')
  num_heads = config_value(get('transformer', None), 'num_heads')
  try:
    rope_lib.check_model_options(
        get('rope', None),
        get('rope_options', ()),
        naflex=bool(get('naflex', False)),
        head_dim=(
            hidden // num_heads
            if isinstance(hidden, int) and isinstance(num_heads, int)
            else None
        ),
    )
  except ValueError as e:
    raise ValueError(f'{prefix}{e}') from None


class LayerScale(nn.Module):
  """A learned per-channel scale of a residual branch (`scale` [D]).

  Touvron et al., 2021 (CaiT); timm's LayerScale (`gamma`), initialised to
  `init_value` everywhere.

  Attributes:
    init_value: The scales' initial value.
    param_dtype: Parameter dtype.
  """

  init_value: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        'scale',
        nn.initializers.constant(self.init_value),
        (x.shape[-1],),
        self.param_dtype,
    )
    return x * scale.astype(x.dtype)


def resolve_attention_impl(
    requested: str, *, backend: str, dtype: Any, head_dim: int, dropout: bool
) -> tuple[str, str]:
  """The attention implementation to use, and why.

  Args:
    requested: One of `ATTENTION_IMPLS`.
    backend: `jax.default_backend()` ('cpu', 'gpu', 'tpu', ...).
    dtype: Compute dtype.
    head_dim: Features per head.
    dropout: Whether dropout on the attention weights is active (training
      with `attention_dropout_rate` > 0): only 'einsum' has it.

  Returns:
    (implementation, reason).

  Raises:
    ValueError: an unknown name, or an explicit choice the backend, dtype or
      dropout cannot run, naming what to change.
  """
  if requested not in ATTENTION_IMPLS:
    raise ValueError(
        f'attention_impl={requested!r}; use one of ' f'{ATTENTION_IMPLS}.'
    )
  cudnn_ok = (
      backend == 'gpu'
      and jnp.dtype(dtype) in _CUDNN_DTYPES
      and head_dim <= _CUDNN_MAX_HEAD_DIM
      and head_dim % 8 == 0
  )
  if requested != 'auto':
    if requested != 'einsum' and dropout:
      raise ValueError(
          f'attention_impl={requested!r} has no dropout on the attention '
          "weights: use attention_impl='einsum' (or 'auto') with "
          'attention_dropout_rate > 0, or set attention_dropout_rate=0.'
      )
    if requested == 'cudnn' and not cudnn_ok:
      raise ValueError(
          "attention_impl='cudnn' needs an NVIDIA GPU, a bfloat16/float16 "
          f'compute dtype and a head size <= {_CUDNN_MAX_HEAD_DIM} divisible '
          f'by 8 (backend {backend!r}, dtype {jnp.dtype(dtype).name}, head '
          f"size {head_dim}): use 'auto' or 'xla'."
      )
    if requested in _TPU_KERNELS and backend != 'tpu':
      raise ValueError(
          f'attention_impl={requested!r} is a TPU kernel; the '
          f"backend is {backend!r}: use 'auto' or 'xla'."
      )
    return requested, 'asked for'
  if dropout:
    return 'einsum', 'attention dropout is on (only einsum has it)'
  if backend == 'cpu':
    return 'einsum', 'fastest measured on CPU'
  if backend == 'gpu':
    if cudnn_ok:
      return 'cudnn', 'fused cuDNN kernel for this dtype and head size'
    return 'xla', (
        f'no cuDNN kernel for dtype {jnp.dtype(dtype).name}, head '
        f'size {head_dim}'
    )
  if backend == 'tpu':
    return 'flash', 'Pallas flash-attention kernel'
  return 'xla', f'no fused kernel on backend {backend!r}'


# The platform being compiled for, when it is not this host's (set by
# `compiling_for`, e.g. while `vit_jax.aot` compiles for a TPU slice on a CPU).
_target_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    'vit_jax_target_platform', default=None
)


@contextlib.contextmanager
def compiling_for(platform: str | None) -> Iterator[None]:
  """Models traced inside resolve their attention for `platform`.

  'auto' and the checks of an explicit `attention_impl` read the backend a
  program is compiled for; that is `jax.default_backend()` unless this
  context names another (ahead-of-time compilation for a TPU slice on a CPU
  host). None changes nothing.

  Args:
    platform: 'cpu', 'gpu' or 'tpu', or None.

  Yields:
    Nothing.
  """
  token = _target_platform.set(platform)
  try:
    yield
  finally:
    _target_platform.reset(token)


def _backend() -> str:
  """The platform attention is compiled for (a function: tests replace it)."""
  return _target_platform.get() or jax.default_backend()


def _log_choice(requested, impl, reason, backend):
  key = (requested, impl, reason, backend)
  if requested == 'auto' and key not in _logged_choices:
    _logged_choices.add(key)
    logging.info("attention_impl='auto' on %s: %r (%s).", backend, impl, reason)


def _tpu_flash_attention(q, k, v, segment_ids, sm_scale):
  """The Pallas TPU kernel (a function of its own so tests can replace it).

  Args:
    q: Queries [B, H, T, D]; `k`, `v` alike.
    k: Keys.
    v: Values.
    segment_ids: [B, T] int32: tokens attend within their own segment.
    sm_scale: Logit scale.

  Returns:
    [B, H, T, D].
  """
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import flash_attention

  return flash_attention.flash_attention(
      q,
      k,
      v,
      segment_ids=flash_attention.SegmentIds(q=segment_ids, kv=segment_ids),
      sm_scale=sm_scale,
  )


def _tpu_splash_attention(q, k, v, segment_ids, interpret=False):
  """The Pallas TPU splash-attention kernel (replaceable by tests, as flash).

  Args:
    q: Queries [B, H, T, D], already scaled (splash has no logit scale);
      `k`, `v` alike.
    k: Keys.
    v: Values.
    segment_ids: [B, T] int32: tokens attend within their own segment.
    interpret: Run the kernel in Pallas' interpreter (on any backend: how
      the tests run this very kernel on CPU).

  Returns:
    [B, H, T, D].
  """
  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_mask as mask_lib,
  )
  # pylint: enable=g-import-not-at-top
  heads, t = q.shape[1], q.shape[2]
  # Built from the shapes it is given, so that under `_per_shard` the mask
  # covers this shard's heads only. Every token may attend to every token;
  # padding is excluded by the segment ids, as in flash.
  mask = mask_lib.MultiHeadMask([mask_lib.FullMask((t, t))] * heads)
  kernel = splash.make_splash_mha(
      mask, head_shards=1, q_seq_shards=1, interpret=interpret
  )
  # The kernel takes one example [H, T, D]: mapped over the batch.
  return jax.vmap(kernel)(
      q, k, v, splash.SegmentIds(q=segment_ids, kv=segment_ids)
  )


def _mesh_axes_for(logical_name, size, mesh, free, taken=()):
  """The mesh axes that split a dimension of `size` named `logical_name`.

  Read from flax's logical-axis rules in force (`vit_jax.sharding`'s
  `activation_sharding` sets them with the mesh): the axes the model's
  activations are already split over, so entering the kernel moves no data.
  Only axes of `free` not in `taken`, and only as many as divide `size`
  (a dimension they do not divide is kept whole: correct, if slower).
  """
  mesh_axes = nn.logical_to_mesh_axes((logical_name,))
  assert mesh_axes is not None  # A PartitionSpec whenever names are given.
  spec = mesh_axes[0]
  if spec is None or spec is P.UNCONSTRAINED:
    return ()
  axes = [spec] if isinstance(spec, str) else list(spec)
  axes = [a for a in axes if a in free and a not in taken]
  while axes and size % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return tuple(axes)


def _per_shard(kernel, q, k, v, segment_ids):
  """`kernel(q, k, v, segment_ids)` run once per shard of the current mesh.

  XLA cannot partition a Mosaic (Pallas TPU) kernel ("Mosaic kernels cannot
  be automatically partitioned"), so on a mesh the kernel runs under
  `jax.shard_map`, each device on its own examples (the axes of the logical
  'batch' axis) and heads ('heads'); attention needs nothing from other
  examples or heads, so there are no collectives. The mesh is the abstract
  mesh in force while tracing (`jax.sharding.get_abstract_mesh()`, set by
  `jax.sharding.use_abstract_mesh` / `jax.set_mesh`): the model takes no
  mesh argument and needs none without one (a plain `apply` on one device).
  Axes the logical rules do not map (no rules in force) see whole,
  replicated operands; axes already manual (inside an enclosing
  `shard_map`) are left to it.

  Args:
    kernel: f(q, k, v, segment_ids) on [B, H, T, D] and [B, T].
    q: Queries [B, H, T, D]; `k`, `v` alike.
    k: Keys.
    v: Values.
    segment_ids: [B, T] int32.

  Returns:
    [B, H, T, D].
  """
  mesh = jax.sharding.get_abstract_mesh()
  free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
  if not free:
    return kernel(q, k, v, segment_ids)
  batch = _mesh_axes_for('batch', q.shape[0], mesh, free)
  heads = _mesh_axes_for('heads', q.shape[1], mesh, free, taken=batch)
  spec = P(batch or None, heads or None)
  # check_vma=False: pallas_call's outputs carry no varying-axes type, which
  # the check would require. Replication is what the specs say: operands and
  # result are whole over every axis not in `spec`.
  return jax.shard_map(
      kernel,
      mesh=mesh,
      in_specs=(spec, spec, spec, P(batch or None)),
      out_specs=spec,
      axis_names=frozenset(free),
      check_vma=False,
  )(q, k, v, segment_ids)


def _kernel_attention(impl, q, k, v, scale, kv_mask=None):
  """A TPU kernel's attention on heads-major [B, H, T, D], any length T.

  The kernels work on whole blocks of the sequence, so T is padded to a
  multiple of the block; padded keys get another segment id, so no real
  query attends to them, and padded queries are cut off again. The keys
  `kv_mask` excludes (NaFlex padding) join that segment too.

  Args:
    impl: 'flash' or 'splash'.
    q: Queries [B, H, T, D]; `k`, `v` alike.
    k: Keys.
    v: Values.
    scale: Logit scale.
    kv_mask: [B, T] bool, False for tokens no real token attends to; None:
      every token counts.

  Returns:
    [B, H, T, D].
  """
  t = q.shape[2]
  padded = math.ceil(t / _FLASH_BLOCK) * _FLASH_BLOCK
  pad = [(0, 0), (0, 0), (0, padded - t), (0, 0)]
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  if kv_mask is None:
    ids = jnp.broadcast_to(
        (jnp.arange(padded) >= t).astype(jnp.int32), (q.shape[0], padded)
    )
  else:
    ids = jnp.pad(
        jnp.logical_not(kv_mask).astype(jnp.int32),
        [(0, 0), (0, padded - t)],
        constant_values=1,
    )
  # Scaled here, as the einsum path scales, so that the kernels (splash has
  # no scale, flash's reference backward pass ignores it) run at scale 1.
  q = q * jnp.asarray(scale, q.dtype)
  if impl == 'flash':
    # Looked up when called, not bound at import: tests replace the kernels.
    kernel = lambda q, k, v, ids: _tpu_flash_attention(q, k, v, ids, 1.0)
  else:
    kernel = lambda *args: _tpu_splash_attention(*args)
  out = _per_shard(kernel, q, k, v, ids)
  return out[:, :, :t]


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


def remat_policy_of(remat: bool, remat_policy: str | None) -> str:
  """The encoder's remat policy from the `remat` switch and `remat_policy`.

  Raises:
    ValueError: an unknown policy, or `remat=True` with policy 'none'.
  """
  if remat_policy is None:
    return 'full' if remat else 'none'
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(
        f'remat_policy={remat_policy!r}; use one of ' f'{REMAT_POLICIES}.'
    )
  if remat and remat_policy == 'none':
    raise ValueError(
        'remat=True asks for rematerialisation but '
        "remat_policy='none' turns it off: drop one of them."
    )
  return remat_policy


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
  use_bias: bool = True

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array | None]:
    kernel_init = _ATTENTION_KERNEL_INIT(
        in_axis=self.fan_in_axes, out_axis=self.fan_out_axes
    )
    kernel = self.param(
        'kernel', kernel_init, self.kernel_shape, self.param_dtype
    )
    if not self.use_bias:
      return kernel, None
    bias = self.param(
        'bias', nn.initializers.zeros, self.bias_shape, self.param_dtype
    )
    return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention with the published parameter layout.

  Attributes:
    num_heads: Number of heads; must divide the hidden size.
    dropout_rate: Dropout on the attention weights.
    deterministic: Disables dropout.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
    attention_impl: One of `ATTENTION_IMPLS`. Every implementation computes
      the same function of the same parameters; the attention weights are
      materialised only by 'einsum' or when the `intermediates` collection
      is asked for.
    options: The block's options (`BlockOptions`): biases, QK-norm, RoPE.
    rope_grid: The patch grid (rows, columns) RoPE rotates (with
      `options.rope`).
    rope_start: Index of the first patch token (after a class token).
    layer_norm_epsilon: Epsilon of the query and key norms
      (`options.qk_norm`).
  """

  num_heads: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'
  options: BlockOptions = BlockOptions()
  rope_grid: tuple[int, int] | None = None
  rope_start: int = 0
  layer_norm_epsilon: float = _LAYER_NORM_EPSILON

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      inputs_kv: jax.Array | None = None,
      kv_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Attention of `x` over itself, or over `inputs_kv` when given.

    Args:
      x: Queries' inputs [B, Tq, D] (and keys' and values' by default).
      inputs_kv: Keys' and values' inputs [B, Tk, D] (cross-attention, e.g.
        the MAP head's probe over the tokens): computed with einsums.
      kv_mask: [B, Tk] bool: the keys that may be attended to (False:
        NaFlex padding, which gets no weight in any implementation; with
        'cudnn' it must come last in each sequence). None: all of them.

    Returns:
      [B, Tq, D].
    """
    hidden = x.shape[-1]
    if hidden % self.num_heads:
      raise ValueError(
          f'hidden size {hidden} is not divisible by num_heads '
          f'{self.num_heads}.'
      )
    head_dim = hidden // self.num_heads
    heads = (self.num_heads, head_dim)
    backend = _backend()
    impl, reason = resolve_attention_impl(
        self.attention_impl,
        backend=backend,
        dtype=self.dtype,
        head_dim=head_dim,
        dropout=self.dropout_rate > 0 and not self.deterministic,
    )
    _log_choice(self.attention_impl, impl, reason, backend)

    qkv_bias = self.options.qkv_bias

    def projection(name):
      return _ProjectionParams(
          kernel_shape=(hidden, *heads),
          bias_shape=heads,
          fan_in_axes=(0,),
          fan_out_axes=(1, 2),
          param_dtype=self.param_dtype,
          use_bias=qkv_bias is True or (qkv_bias == 'qv' and name != 'key'),
          name=name,
      )()

    (wq, bq), (wk, bk), (wv, bv) = (
        projection(n) for n in ('query', 'key', 'value')
    )
    wo, bo = _ProjectionParams(
        kernel_shape=(*heads, hidden),
        bias_shape=(hidden,),
        fan_in_axes=(0, 1),
        fan_out_axes=(2,),
        param_dtype=self.param_dtype,
        use_bias=self.options.proj_bias,
        name='out',
    )()

    def output(out, subscripts):
      out = jnp.einsum(subscripts, out, wo.astype(self.dtype))
      return out if bo is None else out + bo.astype(self.dtype)

    if inputs_kv is not None:
      q, k, v = (
          jnp.einsum(
              'btd,dnh->bnth', y.astype(self.dtype), w.astype(self.dtype)
          )
          + (0 if b is None else b.astype(self.dtype)[:, None])
          for y, w, b in ((x, wq, bq), (inputs_kv, wk, bk), (inputs_kv, wv, bv))
      )
      q, k = self._normalized(q, k)
      weights = self._weights(q, k, head_dim**-0.5, kv_mask)
      self.sow('intermediates', 'attention_weights', weights)
      out = jnp.einsum('bhqk,bhkd->bhqd', weights, v)
      return output(out, 'bhqd,hdo->bqo')

    # One [B*T, D] x [D, 3D] matmul for q, k and v, written straight into the
    # heads-major layout [B, 3, H, T, D/H] that the einsums and the TPU kernel
    # want, or [B, T, 3, H, D/H] for jax.nn.dot_product_attention. Stacked on
    # a new axis (the same memory as concatenating the heads), so that the
    # heads axis of every projection stays whole: sharded over a 'model' axis,
    # each device keeps its own heads of q, k and v.
    w_qkv = jnp.stack([wq, wk, wv], axis=1).astype(self.dtype)
    # A missing bias adds zeros (exactly nothing); without any, no addition.
    b_qkv = None
    if qkv_bias is not False:
      b_qkv = jnp.stack(
          [
              jnp.zeros(heads, self.param_dtype) if b is None else b
              for b in (bq, bk, bv)
          ],
          axis=0,
      ).astype(self.dtype)
    x = x.astype(self.dtype)
    scale = head_dim**-0.5
    if impl in ('xla', 'cudnn'):
      qkv = jnp.einsum('btd,dsnh->btsnh', x, w_qkv)
      if b_qkv is not None:
        qkv = qkv + b_qkv
      q, k, v = (qkv[:, :, i] for i in range(3))
      q, k = self._rotated(*self._normalized(q, k), token_axis=1)
      mask = lengths = None
      if kv_mask is not None and impl == 'cudnn':
        # cuDNN's own padding mask (no [B, 1, T, T] bias is built): the
        # valid keys are the first ones.
        lengths = jnp.sum(kv_mask, axis=1, dtype=jnp.int32)
      elif kv_mask is not None:
        mask = kv_mask[:, None, None, :]
      out = jax.nn.dot_product_attention(
          q,
          k,
          v,
          mask=mask,
          scale=scale,
          key_value_seq_lengths=lengths,
          implementation='cudnn' if impl == 'cudnn' else 'xla',
      )
      if self.is_mutable_collection('intermediates'):
        self.sow(
            'intermediates',
            'attention_weights',
            self._weights(q.swapaxes(1, 2), k.swapaxes(1, 2), scale, kv_mask),
        )
      return output(out, 'bqhd,hdo->bqo')

    qkv = jnp.einsum('btd,dsnh->bsnth', x, w_qkv)
    if b_qkv is not None:
      qkv = qkv + b_qkv[None, :, :, None, :]
    q, k, v = (qkv[:, i] for i in range(3))
    q, k = self._rotated(*self._normalized(q, k), token_axis=2)
    if impl in _TPU_KERNELS:
      out = _kernel_attention(impl, q, k, v, scale, kv_mask)
      if self.is_mutable_collection('intermediates'):
        self.sow(
            'intermediates',
            'attention_weights',
            self._weights(q, k, scale, kv_mask),
        )
    else:
      weights = self._weights(q, k, scale, kv_mask)
      self.sow('intermediates', 'attention_weights', weights)
      weights = nn.Dropout(rate=self.dropout_rate)(
          weights, deterministic=self.deterministic
      )
      out = jnp.einsum('bhqk,bhkd->bhqd', weights, v)
    return output(out, 'bhqd,hdo->bqo')

  def _normalized(
      self, q: jax.Array, k: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """q and k normalised over each head's features (`options.qk_norm`).

    timm's q_norm / k_norm: the model's norm kind over head_dim (the last
    axis in both layouts), before RoPE and the scaled dot product.
    """
    if not self.options.qk_norm:
      return q, k
    norm = functools.partial(
        make_norm,
        self.options.norm,
        epsilon=self.layer_norm_epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    return norm(name='query_norm')(q), norm(name='key_norm')(k)

  def _rotated(
      self, q: jax.Array, k: jax.Array, token_axis: int
  ) -> tuple[jax.Array, jax.Array]:
    """q and k with RoPE applied (`options.rope`), before any kernel."""
    if self.options.rope is None:
      return q, k
    if self.rope_grid is None:
      raise ValueError('rope needs the patch grid (rope_grid).')
    return rope_lib.Rope(
        kind=self.options.rope,
        options=self.options.rope_options,
        grid=self.rope_grid,
        num_heads=self.num_heads,
        head_dim=q.shape[-1],
        start=self.rope_start,
        name='rope',
    )(q, k, token_axis)

  def _weights(
      self,
      q: jax.Array,
      k: jax.Array,
      scale: float,
      kv_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Softmax attention weights [B, H, Tq, Tk] of heads-major q and k.

    Keys `kv_mask` [B, Tk] excludes get weight exactly 0.
    """
    q = q * jnp.asarray(scale, self.dtype)
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k)
    # Softmax in float32 whatever the compute dtype: bfloat16 exponentials
    # lose too much precision in long sequences.
    logits = logits.astype(jnp.float32)
    if kv_mask is not None:
      logits = jnp.where(
          kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min
      )
    weights = jax.nn.softmax(logits, axis=-1)
    return weights.astype(self.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout.

  With `options.mlp='swiglu'`: SiLU(Dense_0 x) * Dense_2 x -> dropout ->
  Dense_1 -> dropout (timm's SwiGLU). With `options.mlp_norm` a norm of the
  hidden activations (`LayerNorm_0`, the kind `options.norm` says) comes
  before Dense_1 (timm's Mlp / SwiGLU `norm_layer`).

  Attributes:
    mlp_dim: Hidden width.
    dropout_rate: Dropout after each Dense.
    deterministic: Disables dropout.
    out_dim: Output width; defaults to the input width.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
    gelu_approximate: tanh GELU (the paper's and big_vision's code) or, when
      False, the exact erf GELU (transformers' `hidden_act='gelu'`).
    options: The block's options (`BlockOptions`): GELU or SwiGLU, biases,
      the hidden norm.
    layer_norm_epsilon: Epsilon of the hidden norm (`options.mlp_norm`).
  """

  mlp_dim: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  out_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  gelu_approximate: bool = True
  options: BlockOptions = BlockOptions()
  layer_norm_epsilon: float = _LAYER_NORM_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dim = self.out_dim or x.shape[-1]
    dense = lambda n, name: nn.Dense(  # pylint: disable=g-long-lambda
        n,
        use_bias=self.options.mlp_bias,
        kernel_init=_MLP_KERNEL_INIT,
        bias_init=_MLP_BIAS_INIT,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )
    if self.options.mlp == 'swiglu':
      # Dense_0 is the gate (SiLU), Dense_2 the linear branch it multiplies.
      x = nn.silu(dense(self.mlp_dim, 'Dense_0')(x)) * dense(
          self.mlp_dim, 'Dense_2'
      )(x)
    else:
      x = nn.gelu(
          dense(self.mlp_dim, 'Dense_0')(x), approximate=self.gelu_approximate
      )
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=self.deterministic)
    if self.options.mlp_norm:
      x = make_norm(
          self.options.norm,
          epsilon=self.layer_norm_epsilon,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name='LayerNorm_0',
      )(x)
    x = dense(out_dim, 'Dense_1')(x)
    return nn.Dropout(rate=self.dropout_rate)(
        x, deterministic=self.deterministic
    )


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
    attention_impl: See `MultiHeadDotProductAttention`.
    layer_norm_epsilon: LayerNorm epsilon.
    gelu_approximate: See `MlpBlock`.
    options: The block's options (`BlockOptions`).
    rope_grid: See `MultiHeadDotProductAttention`.
    rope_start: See `MultiHeadDotProductAttention`.
  """

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'
  layer_norm_epsilon: float = _LAYER_NORM_EPSILON
  gelu_approximate: bool = True
  options: BlockOptions = BlockOptions()
  rope_grid: tuple[int, int] | None = None
  rope_start: int = 0

  def _drop_path(self, x: jax.Array, rate: Any) -> jax.Array:
    """Stochastic depth: drops the residual branch `x` per example.

    Args:
      x: A residual branch's output [B, ...].
      rate: Drop probability (a float, or a traced scalar under `nn.scan`);
        None for none.

    Returns:
      `x` zeroed for the dropped examples and scaled by 1 / (1 - rate) for
      the others (the expectation is unchanged), or `x` at evaluation.
    """
    if rate is None or self.deterministic:
      return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    kept = jax.random.bernoulli(
        self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1)
    )
    return jnp.where(kept, x / keep.astype(x.dtype), jnp.zeros_like(x))

  @nn.compact
  def __call__(
      self,
      inputs: jax.Array,
      drop_path_rate: Any = None,
      kv_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, None]:
    """One block.

    Args:
      inputs: Tokens [B, T, D].
      drop_path_rate: This block's stochastic-depth rate (None: off).
      kv_mask: [B, T] bool, the tokens attention may look at (see
        `MultiHeadDotProductAttention`); None: all.

    Returns:
      (outputs [B, T, D], None).
    """
    norm = functools.partial(
        make_norm,
        self.options.norm,
        epsilon=self.layer_norm_epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    layer_scale = self.options.layer_scale

    def scaled(y, name):
      if layer_scale is None:
        return y
      return LayerScale(layer_scale, param_dtype=self.param_dtype, name=name)(y)

    # Block boundaries: the activations are split over the batch only (whole
    # on every device of a 'model' axis). A no-op unless the caller sets
    # logical axis rules (`vit_jax.sharding.logical_axis_rules`).
    inputs = nn.with_logical_constraint(inputs, ACTIVATION_AXES)
    x = norm(name='LayerNorm_0')(inputs)
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dropout_rate=self.attention_dropout_rate,
        deterministic=self.deterministic,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        attention_impl=self.attention_impl,
        options=self.options,
        rope_grid=self.rope_grid,
        rope_start=self.rope_start,
        layer_norm_epsilon=self.layer_norm_epsilon,
        name='MultiHeadDotProductAttention_0',
    )(x, kv_mask=kv_mask)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=self.deterministic)
    x = self._drop_path(scaled(x, 'LayerScale_0'), drop_path_rate) + inputs
    y = norm(name='LayerNorm_1')(x)
    y = MlpBlock(
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        deterministic=self.deterministic,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        gelu_approximate=self.gelu_approximate,
        options=self.options,
        layer_norm_epsilon=self.layer_norm_epsilon,
        name='MlpBlock_0',
    )(y)
    y = self._drop_path(scaled(y, 'LayerScale_1'), drop_path_rate)
    outputs = nn.with_logical_constraint(x + y, ACTIVATION_AXES)
    self.sow('intermediates', 'block_output', outputs)
    return outputs, None


def _linear_taps(old: int, new: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Corner-aligned linear interpolation from `old` to `new` samples.

  The sampling of `scipy.ndimage.zoom(order=1)` (its default, corner-aligned
  grid mode), which `vit_jax.checkpoint.interpolate_posembed` uses: output i
  reads input coordinate i * (old - 1) / (new - 1) (0 when new == 1).

  Integer arithmetic from `jnp.arange(new)`, so `new` may be a symbolic
  dimension (`jax.export` with symbolic height and width): the integer part
  of each coordinate is exact and its fraction the float32 nearest to
  remainder / (new - 1).

  Returns:
    (low, high, frac): output i = (1 - frac[i]) * in[low[i]] +
    frac[i] * in[high[i]].
  """
  numerator = jnp.arange(new, dtype=jnp.int32) * (old - 1)
  denominator = jnp.maximum(jnp.asarray(new, jnp.int32) - 1, 1)
  low = numerator // denominator
  frac = (numerator - low * denominator).astype(jnp.float32) / (
      denominator.astype(jnp.float32)
  )
  return low, jnp.minimum(low + 1, old - 1), frac


def resize_posemb_grid(
    grid: jax.Array,
    new_size: Sequence[int],
    *,
    method: str = 'bilinear',
    antialias: bool = False,
) -> jax.Array:
  """Resizes position embeddings laid out on a grid, in jax.

  The numbers of `vit_jax.checkpoint.interpolate_posembed` (and so of
  `load_pretrained`) for the same method, computed in the forward pass.

  Args:
    grid: [h, w, D] (or [n, D]: one axis) embeddings.
    new_size: The new leading sizes, (h', w') (or (n',)); with 'bilinear'
      they may be symbolic (`jax.export` shape polymorphism).
    method: 'bilinear': corner-aligned, as `scipy.ndimage.zoom(order=1)`;
      'bicubic': half-pixel-centred, `jax.image.resize`'s (timm's);
      'linear': half-pixel-centred linear, antialiased when shrinking
      (`jax.image.resize`'s default; big_vision FlexiViT's).
    antialias: With 'bicubic': `jax.image.resize`'s antialiasing, which
      changes a shrinking resize only ('linear' always has it).

  Returns:
    [h', w', D] float32 (or [n', D]).
  """
  if method not in POSEMB_RESIZE_METHODS:
    raise ValueError(
        f'Unknown position-embedding resize {method!r}; use one '
        f'of {POSEMB_RESIZE_METHODS}.'
    )
  if antialias and method != 'bicubic':
    raise ValueError(
        "posemb_antialias=True needs posemb_resize='bicubic' "
        "('bilinear' has no antialiasing, 'linear' always has it)."
    )
  grid = grid.astype(jnp.float32)
  # Symbolic sizes (`jax.export`) as they are; numpy integers or a list as
  # Python ints.
  sizes: tuple[Any, ...] = tuple(
      n if jax.export.is_symbolic_dim(n) else int(n) for n in new_size
  )
  symbolic = any(jax.export.is_symbolic_dim(n) for n in sizes)
  if not symbolic and sizes == tuple(grid.shape[:-1]):
    return grid
  if method == 'bicubic':
    return jax.image.resize(
        grid, (*sizes, grid.shape[-1]), method='bicubic', antialias=antialias
    )
  if method == 'linear':
    return jax.image.resize(
        grid, (*new_size, grid.shape[-1]), method='linear', antialias=True
    )
  # One axis at a time, as scipy does; each output a two-tap blend (a gather
  # and a lerp: exact in float32, unlike a matmul at default precision).
  for axis, new in enumerate(sizes):
    low, high, frac = _linear_taps(grid.shape[axis], new)
    shape = [1] * grid.ndim
    shape[axis] = new
    weight = jnp.reshape(frac, shape)
    grid = (
        jnp.take(grid, low, axis=axis) * (1 - weight)
        + jnp.take(grid, high, axis=axis) * weight
    )
  return grid


def linear_resize_matrix(old: int, new: int) -> np.ndarray:
  """One axis of `tf.image.resize(..., 'bilinear')` as a [new, old] matrix.

  TensorFlow 2's bilinear resize without antialiasing (the resize of
  big_vision's and this project's input pipelines): output i reads input
  coordinate (i + 0.5) * old / new - 0.5, blending its two neighbours, and
  coordinates outside [0, old - 1] read the edge sample.

  Args:
    old: Input samples.
    new: Output samples.

  Returns:
    float64 [new, old]: `resized = matrix @ samples`.
  """
  coords = (np.arange(new) + 0.5) * (old / new) - 0.5
  floor = np.floor(coords)
  low = np.clip(floor, 0, old - 1).astype(np.int64)
  high = np.clip(np.ceil(coords), 0, old - 1).astype(np.int64)
  frac = coords - floor
  matrix = np.zeros((new, old))
  rows = np.arange(new)
  np.add.at(matrix, (rows, low), 1 - frac)
  np.add.at(matrix, (rows, high), frac)
  return matrix


@functools.cache
def _pi_resize_matrices(
    old_hw: tuple[int, int], new_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
  """Per axis, the matrix taking an `old_hw` kernel to a `new_hw` one."""
  # The 2-D resize of a patch is B x A^T with A, B one axis's resizes (the
  # Kronecker product A (x) B on flattened patches), and the pseudo-inverse
  # of a Kronecker product is that of its factors: the 2-D pseudo-inverse
  # resize is two small 1-D ones.
  rows = np.linalg.pinv(linear_resize_matrix(old_hw[0], new_hw[0]).T)
  cols = np.linalg.pinv(linear_resize_matrix(old_hw[1], new_hw[1]).T)
  return rows, cols


def resample_patch_embedding(
    kernel: jax.Array | np.ndarray, new_hw: Sequence[int]
) -> jax.Array:
  """FlexiViT's pseudo-inverse (PI) resize of a patch-embedding kernel.

  Beyer et al. 2023 ("FlexiViT", section 3.4; big_vision's
  `resample_patchemb`): the kernel w' of the new patch size that gives the
  old kernel's embeddings on resized patches, <resize(x), w'> = <x, w>, for
  every patch x when the patch grows (resize: `tf.image.resize` bilinear,
  `linear_resize_matrix`), and the least-squares such kernel when it
  shrinks: w' = pinv(R^T) w with R the resize's matrix. Differentiable in
  `kernel` (the matrices are constants of the shapes).

  Args:
    kernel: [h, w, channels, features] (`embedding/kernel`).
    new_hw: The new patch size (h', w').

  Returns:
    [h', w', channels, features] in the kernel's dtype (the kernel itself
    when the size is unchanged).
  """
  if kernel.ndim != 4:
    raise ValueError(
        'resample_patch_embedding: the kernel must be [h, w, channels, '
        f'features], got shape {tuple(kernel.shape)}.'
    )
  old_hw = (int(kernel.shape[0]), int(kernel.shape[1]))
  new = tuple(int(n) for n in new_hw)
  if len(new) != 2 or min(new) < 1:
    raise ValueError(
        f'resample_patch_embedding: new_hw={tuple(new_hw)!r} must be two '
        'positive sizes (h, w).'
    )
  new_h, new_w = new
  if (new_h, new_w) == old_hw:
    return jnp.asarray(kernel)
  rows, cols = _pi_resize_matrices(old_hw, (new_h, new_w))
  return jnp.einsum(
      'Hh,Ww,hwcd->HWcd',
      jnp.asarray(rows, jnp.float32),
      jnp.asarray(cols, jnp.float32),
      jnp.asarray(kernel, jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
  ).astype(kernel.dtype)


class FlexiPatchEmbedding(nn.Module):
  """A patch embedding whose stored kernel is resampled to the patch size.

  The parameters are `nn.Conv`'s (`kernel` [h, w, C, D] with (h, w) =
  `stored_size`, `bias` [D]); a call cuts the images into `patch_size` patches
  with the kernel's pseudo-inverse resize (`resample_patch_embedding`), so
  gradients reach the stored kernel. `VisionTransformer` uses it, under the
  name `embedding`, when its patch size differs from `patches.size`.

  Attributes:
    features: Token width D.
    stored_size: The stored kernel's (h, w).
    patch_size: The (h, w) the images are cut into.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
    use_bias: Whether there is a `bias` (none with `pre_norm`, as timm).
  """

  features: int
  stored_size: tuple[int, int]
  patch_size: tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Embeddings [B, H / ph, W / pw, D] of images [B, H, W, C]."""
    kernel = self.param(
        'kernel',
        nn.linear.default_kernel_init,
        (*self.stored_size, x.shape[-1], self.features),
        self.param_dtype,
    )
    kernel = resample_patch_embedding(kernel, self.patch_size)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=self.patch_size,
        padding='VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    if not self.use_bias:
      return y
    bias = self.param(
        'bias', nn.initializers.zeros, (self.features,), self.param_dtype
    )
    return y + bias.astype(y.dtype)


def _naflex_axis_weights(
    stored: int, sizes: jax.Array, coords: jax.Array
) -> jax.Array:
  """Resize weights along one axis, at each token's coordinate.

  Args:
    stored: Entries of the table along this axis.
    sizes: [B] int: each example's patches along this axis.
    coords: [B, N] int: each token's index along it.

  Returns:
    [B, N, stored] float32: token n of example b takes
    sum_a w[b, n, a] * table[a] along this axis.
  """
  # A sequence of N patches has at most N along either axis: N output
  # samples cover every grid, whatever its shape.
  length = coords.shape[1]
  identity = jnp.eye(stored, dtype=jnp.float32)

  def one_example(size, coord):
    # The resize is linear, so resizing the identity gives its matrix:
    # row i holds output sample i's weights on the stored entries.
    weights = jax.image.scale_and_translate(
        identity,
        (length, stored),
        spatial_dims=(0,),
        scale=jnp.reshape(size / stored, (1,)).astype(jnp.float32),
        translation=jnp.zeros((1,), jnp.float32),
        method='bilinear',
        antialias=True,
    )
    return jnp.take(weights, coord, axis=0)

  return jax.vmap(one_example)(sizes, coords)


def naflex_position_embeddings(
    table: jax.Array, rows: jax.Array, columns: jax.Array
) -> jax.Array:
  """Each NaFlex patch's position embedding (SigLIP 2's NaFlex ViT).

  Per example, the learned (gh, gw) table is resampled to the example's own
  patch grid, (max row + 1) x (max column + 1), with
  `jax.image.scale_and_translate` (bilinear, antialiased: a triangle filter
  widened when shrinking), and each patch takes the entry at its (row,
  column): big_vision's `naflex_vit._pos_emb_resize`. The resize is
  separable, so it is computed as per-axis weights at the patches'
  coordinates: no resized grid per example is built, and grids up to the
  sequence length along a side work (big_vision resizes to a fixed 64x64).

  Args:
    table: [gh, gw, D] learned embeddings.
    rows: [B, N] int: each patch's row in its image's patch grid (0 for
      padding).
    columns: [B, N] int: its column.

  Returns:
    [B, N, D] float32.
  """
  gh, gw, dim = table.shape
  batch, length = rows.shape
  row_weights = _naflex_axis_weights(gh, jnp.max(rows, axis=1) + 1, rows)
  col_weights = _naflex_axis_weights(gw, jnp.max(columns, axis=1) + 1, columns)
  # [B, N, gh * gw]: each patch's weight on every stored entry; one matmul
  # with the flattened table then gives every embedding.
  weights = jnp.reshape(
      row_weights[..., :, None] * col_weights[..., None, :],
      (batch, length, gh * gw),
  )
  return jnp.einsum(
      'bnk,kd->bnd',
      weights,
      jnp.reshape(table.astype(jnp.float32), (gh * gw, dim)),
      precision=jax.lax.Precision.HIGHEST,
  )


def naflex_init_inputs(
    patch_size: tuple[int, int], *, seq_len: int = 1, channels: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """NaFlex inputs of one example to `init` a model with (`naflex=True`).

  The parameters' shapes depend on neither the sequence length nor the
  patches' grid, so any length initialises the same model.

  Args:
    patch_size: (ph, pw) of the model's patches.
    seq_len: Tokens of the sequence.
    channels: Image channels.

  Returns:
    (patches [1, seq_len, ph*pw*channels] zeros, ptype [1, seq_len] ones,
    rows and columns [1, seq_len]: a 1 x seq_len grid).
  """
  ph, pw = patch_size
  columns = np.arange(seq_len, dtype=np.int32)[None]
  return (
      np.zeros((1, seq_len, ph * pw * channels), np.float32),
      np.ones((1, seq_len), np.int32),
      np.zeros_like(columns),
      columns,
  )


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings of shape (1, tokens, hidden).

  With NaFlex inputs (`__call__`'s `positions`) the table is a grid
  (rows, columns, hidden) instead, resampled per example
  (`naflex_position_embeddings`).

  Attributes:
    param_dtype: Parameter dtype.
    grid_size: With a run-time grid (`__call__`'s `grid`): the patch grid
      the stored table holds (and is created for); None: the input's grid
      at initialisation, and when applied, the input's grid if the token
      counts agree (as `load_pretrained` keeps a table of the right length),
      else the square grid (of a square image, with non-square patches).
      With NaFlex positions: the grid the table is created for (None:
      `NAFLEX_POSEMB_GRID`); applied, the table's own shape says it.
    resize: See `resize_posemb_grid`'s `method`.
    antialias: See `resize_posemb_grid`.
    patch_shape: Input pixels per token (h, w), for inferring the grid.
  """

  param_dtype: Dtype = jnp.float32
  grid_size: tuple[int, int] | None = None
  resize: str = 'bilinear'
  antialias: bool = False
  patch_shape: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      grid: tuple[int, int] | None = None,
      positions: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """`x` plus its embeddings.

    Args:
      x: Tokens [B, T, D]: a class token (or none), then the patches.
      grid: The patches' grid (h, w) when the stored table is resized to it
        (`dynamic_image_size`); None: the table must fit `x` as it is.
      positions: NaFlex: (rows, columns), int [B, T] each, every token's
        place in its own image's patch grid (no class token); the 2-D table
        is resampled per example (`naflex_position_embeddings`).

    Returns:
      [B, T, D].
    """
    if positions is not None:
      return x + self._at_positions(x, positions).astype(x.dtype)
    if grid is not None:
      gh, gw = grid  # A list, too.
      return x + self._resized(x, (gh, gw)).astype(x.dtype)
    shape = (1, x.shape[1], x.shape[2])
    if self.has_variable('params', 'pos_embedding'):
      stored: tuple[int, ...] = self.get_variable(
          'params', 'pos_embedding'
      ).shape
      if tuple(stored) != shape:
        raise ValueError(
            f'Position embeddings {tuple(stored)} do not match the input '
            f'sequence {shape}: the parameters were made for another image '
            'size. Resize them with vit_jax.checkpoint.load_pretrained (or '
            'interpolate_posembed) for this resolution, or build the model '
            'with dynamic_image_size=True.'
        )
    posemb = self.param('pos_embedding', _POSEMB_INIT, shape, self.param_dtype)
    return x + posemb.astype(x.dtype)

  def _at_positions(
      self, x: jax.Array, positions: tuple[jax.Array, jax.Array]
  ) -> jax.Array:
    """The 2-D table's embeddings of NaFlex tokens [B, T, D]."""
    dim = x.shape[-1]
    table: jax.Array
    if self.has_variable('params', 'pos_embedding'):  # Any grid.
      table = self.get_variable('params', 'pos_embedding')
    else:
      gh, gw = self.grid_size or NAFLEX_POSEMB_GRID
      table = self.param(
          'pos_embedding', _POSEMB_INIT, (gh, gw, dim), self.param_dtype
      )
    # A fixed-size model's table (1, tokens, D) is 3-D too: a NaFlex grid
    # has at least two rows and columns.
    if table.ndim != 3 or table.shape[2] != dim or min(table.shape[:2]) < 2:
      raise ValueError(
          f'Position embeddings {tuple(table.shape)} are not a (rows, '
          f'columns, {dim}) grid of at least 2x2, as a NaFlex model '
          '(naflex=True) needs: load a NaFlex checkpoint (SigLIP 2 NaFlex), '
          "not a fixed-size model's (1, tokens, D) table."
      )
    rows, columns = positions
    return naflex_position_embeddings(table, rows, columns)

  def _resized(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """The table resized to `grid`, the class token's entry as it is."""
    n_tokens, dim = x.shape[1], x.shape[2]
    extra = n_tokens - grid[0] * grid[1]
    if extra not in (0, 1):
      raise ValueError(
          f'{n_tokens} tokens are not a {grid[0]}x{grid[1]} '
          'patch grid and at most one class token.'
      )
    posemb: jax.Array
    if self.has_variable('params', 'pos_embedding'):  # Any length.
      posemb = self.get_variable('params', 'pos_embedding')
    else:
      made_for = self.grid_size or grid
      posemb = self.param(
          'pos_embedding',
          _POSEMB_INIT,
          (1, extra + made_for[0] * made_for[1], dim),
          self.param_dtype,
      )
    stored = posemb.shape[1] - extra
    old = self.grid_size
    if old is None:
      old = (
          grid
          if stored == grid[0] * grid[1]
          else _square_image_grid(stored, self.patch_shape)
      )
    if old[0] * old[1] != stored or posemb.shape[2] != dim:
      raise ValueError(
          f'Position embeddings {tuple(posemb.shape)} do not hold a '
          f'{old[0]}x{old[1]} grid of width {dim} (plus {extra} class '
          'token): set posemb_grid_size to the grid they were made for.'
      )
    table = resize_posemb_grid(
        jnp.reshape(posemb[0, extra:], (*old, dim)),
        grid,
        method=self.resize,
        antialias=self.antialias,
    )
    return jnp.concatenate(
        [
            posemb[:, :extra].astype(jnp.float32),
            jnp.reshape(table, (1, grid[0] * grid[1], dim)),
        ],
        axis=1,
    )


def _square_image_grid(
    num_tokens: int, patch_shape: tuple[int, int]
) -> tuple[int, int]:
  """The (h, w) grid of a square image of `num_tokens` patches.

  As `vit_jax.checkpoint.square_image_grid` infers it for `load_pretrained`.

  Raises:
    ValueError: no square image gives that many patches.
  """
  ph, pw = patch_shape
  side = math.isqrt(num_tokens * ph * pw)
  if side * side != num_tokens * ph * pw or side % ph or side % pw:
    raise ValueError(
        f'Cannot infer the patch grid of {num_tokens} stored position '
        'embeddings (not a square image): set posemb_grid_size=(h, w) to the '
        'grid they were made for.'
    )
  return side // ph, side // pw


def posemb_sincos_2d(
    h: int, w: int, width: int, temperature: float = 10_000.0
) -> np.ndarray:
  """The fixed 2-D sine-cosine position embeddings of big_vision.

  A patch at row y, column x gets [sin(x w_k), cos(x w_k), sin(y w_k),
  cos(y w_k)] over k = 0..width/4-1, with frequencies w_k =
  temperature^(-k / (width/4 - 1)) (MoCo v3's table, as big_vision writes it).

  Args:
    h: Rows of the patch grid.
    w: Columns.
    width: Token width D, a multiple of 4.
    temperature: Longest wavelength.

  Returns:
    float64 [1, h * w, width], row-major over the grid.
  """
  if width % 4:
    raise ValueError(
        f"posemb='sincos2d' needs a hidden size divisible by 4, "
        f'got {width}.'
    )
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  y, x = np.mgrid[:h, :w]
  x = np.outer(x.reshape(-1), omega)
  y = np.outer(y.reshape(-1), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[
      None
  ]


class PositionEmbedding2D(nn.Module):
  """Learned row and column embeddings of D/2 each (paper Appendix D.4).

  The patch in row i, column j gets [row_i, column_j].

  Attributes:
    param_dtype: Parameter dtype.
    dynamic: Resize the stored rows and columns to the input's grid (each
      along its one axis: the 2-D resize of the table they make).
    grid_size: With `dynamic`: the grid the tables are created for (None:
      the input's at initialisation).
    resize: See `resize_posemb_grid`'s `method`.
    antialias: See `resize_posemb_grid`.
  """

  param_dtype: Dtype = jnp.float32
  dynamic: bool = False
  grid_size: tuple[int, int] | None = None
  resize: str = 'bilinear'
  antialias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, h: int, w: int) -> jax.Array:
    """Patch tokens [B, h*w, D] (row-major) plus their embeddings."""
    d = x.shape[-1]
    if d % 2:
      raise ValueError(f"posemb='learn2d' needs an even hidden size, got {d}.")
    made_for = (self.grid_size or (h, w)) if self.dynamic else (h, w)
    rows: jax.Array
    cols: jax.Array
    if self.dynamic and self.has_variable('params', 'row'):  # Any length.
      rows, cols = (self.get_variable('params', k) for k in ('row', 'column'))
    else:
      rows = self.param(
          'row', _POSEMB_INIT, (made_for[0], d // 2), self.param_dtype
      )
      cols = self.param(
          'column', _POSEMB_INIT, (made_for[1], d // 2), self.param_dtype
      )
    if self.dynamic:
      rows, cols = (
          resize_posemb_grid(
              t, (n,), method=self.resize, antialias=self.antialias
          )
          for t, n in ((rows, h), (cols, w))
      )
    table = jnp.concatenate(
        [
            jnp.broadcast_to(rows[:, None], (h, w, d // 2)),
            jnp.broadcast_to(cols[None, :], (h, w, d // 2)),
        ],
        axis=-1,
    )
    return x + jnp.reshape(table, (h * w, d)).astype(x.dtype)


class MAPHead(nn.Module):
  """Multi-head attention pooling (big_vision's MAPHead).

  A learned probe attends over the tokens with the model's head count, then
  a residual MLP block on its LayerNorm: probe' = a + MLP(LN(a)).

  Attributes:
    num_heads: Attention heads.
    mlp_dim: MLP hidden width.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
    layer_norm_epsilon: LayerNorm epsilon.
    gelu_approximate: See `MlpBlock`.
    norm: The kind of its norm (`LayerNorm_0`), one of `NORM_KINDS`: the
      model's (timm's AttentionPoolLatent takes the model's norm layer; its
      attention and MLP are the 2020 ViT's whatever the blocks' options).
  """

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  layer_norm_epsilon: float = _LAYER_NORM_EPSILON
  gelu_approximate: bool = True
  norm: str = 'layernorm'

  @nn.compact
  def __call__(
      self, x: jax.Array, kv_mask: jax.Array | None = None
  ) -> jax.Array:
    """Pools tokens [B, T, D] into [B, D], over those `kv_mask` [B, T]
    keeps (None: all)."""
    n, _, d = x.shape
    probe = self.param(
        'probe', nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype
    )
    probe = jnp.tile(probe.astype(self.dtype), (n, 1, 1))
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        attention_impl='einsum',
        name='MultiHeadDotProductAttention_0',
    )(probe, inputs_kv=x, kv_mask=kv_mask)
    y = make_norm(
        self.norm,
        epsilon=self.layer_norm_epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='LayerNorm_0',
    )(x)
    x = x + MlpBlock(
        mlp_dim=self.mlp_dim,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        gelu_approximate=self.gelu_approximate,
        name='MlpBlock_0',
    )(y)
    return x[:, 0]


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
    remat: Rematerialise each block in the backward pass (saves memory):
      `remat_policy='full'`.
    scan: Run the blocks with `nn.scan` (compile time independent of depth).
    attention_impl: See `MultiHeadDotProductAttention`.
    remat_policy: One of `REMAT_POLICIES`; None: 'full' with `remat`, else
      'none'.
    stochastic_depth: See `VisionTransformer`.
    layer_norm_epsilon: LayerNorm epsilon.
    gelu_approximate: See `MlpBlock`.
    posemb_grid_size: See `AddPositionEmbs.grid_size`.
    posemb_resize: See `AddPositionEmbs.resize`.
    posemb_antialias: See `AddPositionEmbs.antialias`.
    patch_shape: See `AddPositionEmbs.patch_shape`.
    block_options: The blocks' options (`BlockOptions`).
    pre_norm: A norm on the tokens before the first block (after the
      position embeddings): `pre_norm` (CLIP's and Perception Encoder's).
    final_norm: The norm after the last block (`encoder_norm`); False when
      the model norms the pooled features instead (`fc_norm`).
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
  attention_impl: str = 'auto'
  remat_policy: str | None = None
  stochastic_depth: float = 0.0
  layer_norm_epsilon: float = _LAYER_NORM_EPSILON
  gelu_approximate: bool = True
  posemb_grid_size: tuple[int, int] | None = None
  posemb_resize: str = 'bilinear'
  posemb_antialias: bool = False
  patch_shape: tuple[int, int] = (1, 1)
  block_options: BlockOptions = BlockOptions()
  pre_norm: bool = False
  final_norm: bool = True

  def drop_path_rates(self) -> list[float]:
    """Each block's stochastic-depth rate: 0 at the first, linear up to
    `stochastic_depth` at the last (Huang et al., 2016)."""
    if self.num_layers == 1:
      return [self.stochastic_depth]
    return [
        self.stochastic_depth * i / (self.num_layers - 1)
        for i in range(self.num_layers)
    ]

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      extra_tokens: jax.Array | None = None,
      grid: tuple[int, int] | None = None,
      positions: tuple[jax.Array, jax.Array] | None = None,
      kv_mask: jax.Array | None = None,
      patch_grid: tuple[int, int] | None = None,
      prefix_tokens: int = 0,
      unembedded_prefix: jax.Array | None = None,
  ) -> jax.Array:
    """Position embeddings, the blocks and the final LayerNorm.

    Args:
      x: Tokens [B, T, D].
      extra_tokens: [B, R, D] appended to the sequence after the position
        embeddings (e.g. registers, which have no position).
      grid: The patch grid (h, w) of `x` when the position embeddings are
        resized to it in the forward pass; None: they fit `x` as stored.
      positions: NaFlex: each token's (row, column) in its image's patch
        grid, two int [B, T] arrays (see `AddPositionEmbs`).
      kv_mask: [B, T] bool, the tokens attention may look at (False: NaFlex
        padding); None: all.
      patch_grid: The patch grid (rows, columns) of the patch tokens, for
        RoPE (`block_options.rope`).
      prefix_tokens: Tokens before the patches (a class token), which RoPE
        leaves as they are.
      unembedded_prefix: [B, P, D] put in front of the sequence after the
        position embeddings (a class token without a position embedding of
        its own, timm's `no_embed_class`).

    Returns:
      [B, (P +) T (+ R), D].
    """
    if self.add_position_embedding:
      x = AddPositionEmbs(
          param_dtype=self.param_dtype,
          grid_size=self.posemb_grid_size,
          resize=self.posemb_resize,
          antialias=self.posemb_antialias,
          patch_shape=self.patch_shape,
          name='posembed_input',
      )(x, grid, positions)
      x = nn.Dropout(rate=self.dropout_rate)(
          x, deterministic=self.deterministic
      )
    if unembedded_prefix is not None:
      x = jnp.concatenate([unembedded_prefix.astype(x.dtype), x], axis=1)
    if extra_tokens is not None:
      x = jnp.concatenate([x, extra_tokens.astype(x.dtype)], axis=1)
      if kv_mask is not None:  # Appended tokens are never padding.
        kv_mask = jnp.pad(
            kv_mask, [(0, 0), (0, extra_tokens.shape[1])], constant_values=True
        )
    x = x.astype(self.dtype)
    norm = functools.partial(
        make_norm,
        self.block_options.norm,
        epsilon=self.layer_norm_epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    if self.pre_norm:  # timm's norm_pre: every token, registers included.
      x = norm(name='pre_norm')(x)
    block_cls = Encoder1DBlock
    policy = remat_policy_of(self.remat, self.remat_policy)
    if policy != 'none':
      # Under scan, common-subexpression elimination cannot undo the remat, so
      # the (costly) CSE barrier is only needed in the unrolled loop.
      block_cls = nn.remat(
          block_cls,
          prevent_cse=not self.scan,
          policy=(
              None
              if policy == 'full'
              else getattr(jax.checkpoint_policies, policy)
          ),
      )
    block_kwargs = dict(
        mlp_dim=self.mlp_dim,
        num_heads=self.num_heads,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        deterministic=self.deterministic,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        attention_impl=self.attention_impl,
        layer_norm_epsilon=self.layer_norm_epsilon,
        gelu_approximate=self.gelu_approximate,
        options=self.block_options,
        rope_grid=patch_grid,
        rope_start=prefix_tokens,
    )
    # Without stochastic depth the blocks take no rate: the same program as
    # before the option existed.
    rates = self.drop_path_rates() if self.stochastic_depth else None
    if self.scan:
      block_cls = nn.scan(
          block_cls,
          variable_axes={'params': 0, 'intermediates': 0},
          split_rngs={'params': True, 'dropout': True},
          # The mask is the same in every layer.
          in_axes=0 if kv_mask is None else (0, nn.broadcast),
          length=self.num_layers,
      )
      block = block_cls(name='encoderblock', **block_kwargs)
      # Each iteration gets its layer's rate.
      layer_rates = None if rates is None else jnp.asarray(rates, jnp.float32)
      if kv_mask is not None:
        x, _ = block(x, layer_rates, kv_mask)
      elif rates is None:
        x, _ = block(x)
      else:
        x, _ = block(x, layer_rates)
    else:
      for i in range(self.num_layers):
        block = block_cls(name=f'encoderblock_{i}', **block_kwargs)
        if kv_mask is not None:
          x, _ = block(x, None if rates is None else rates[i], kv_mask)
        else:
          x, _ = block(x) if rates is None else block(x, rates[i])
    if not self.final_norm:
      return x
    return norm(name='encoder_norm')(x)


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
    classifier: 'token' (class token), 'gap' (mean of the patch tokens),
      'map' (multi-head attention pooling, `MAPHead_0`), 'unpooled' (all
      patch tokens, for dense tasks) or 'token_unpooled' (class token kept
      in the sequence).
    head_bias_init: Initial value of the head bias.
    model_name: Registry name, informational.
    dtype: Computation dtype (e.g. jnp.bfloat16).
    param_dtype: Parameter dtype.
    remat: Rematerialise encoder blocks in the backward pass.
    scan: Scan over encoder blocks.
    attention_impl: How attention is computed, one of `ATTENTION_IMPLS`
      ('auto': per backend, logged); the parameters are the same for all.
    remat_policy: What the backward pass recomputes, one of
      `REMAT_POLICIES` (None: 'full' with `remat`, else 'none').
    posemb: Position embeddings, one of `POSEMB_KINDS`.
    stochastic_depth: Drop-path rate of the last block in training; block i
      of L drops its residual branches with probability
      `stochastic_depth * i / (L - 1)`: 0 for the first, rising linearly
      (Huang et al., 2016's rule, as DeiT and timm use it), since early
      blocks' features feed every later one. 0 turns it off.
    num_registers: Learned register tokens (Darcet et al., 2023) appended to
      the sequence after the position embeddings; no pooling sees them.
    layer_norm_epsilon: Epsilon of every LayerNorm (1e-6 in the paper's and
      big_vision's code; transformers' google/vit-* configs use 1e-12).
    gelu_approximate: tanh GELU (default, the paper's code) or exact GELU.
    dynamic_image_size: Apply to images of any size whose sides are
      multiples of the patch size (total stride), square or not: learned
      position embeddings are resized to the input's patch grid in the
      forward pass (the class token's kept as is), with the numbers
      `vit_jax.checkpoint.load_pretrained` gives for that grid. The
      parameters are those of the fixed-size model, so any checkpoint
      applies. False: the input must fit the embeddings as they are.
    posemb_resize: With `dynamic_image_size`, how embeddings are resized,
      one of `POSEMB_RESIZE_METHODS` ('bilinear': `load_pretrained`'s
      default, corner-aligned; 'bicubic': its `posemb_method='bicubic'`).
    posemb_antialias: With 'bicubic': antialias a shrinking resize
      (`jax.image.resize`'s; `load_pretrained` has none).
    posemb_grid_size: With `dynamic_image_size` (or another patch size
      than `patches.size`), the patch grid (h, w) the learned embeddings are
      made for; None: the grid of the images `init` sees, and for a stored
      table of another length than the input's grid, the grid of a square
      image. With `naflex`: the grid of the 2-D table `init` creates (None:
      `NAFLEX_POSEMB_GRID`, 16x16).
    run_patch_size: FlexiViT: the patch size (h, w) (or an int) the images
      are cut into when it is not `patches.size`, the size of the stored
      kernel: the kernel is resampled to it in the forward pass
      (`resample_patch_embedding`) and learned position embeddings are
      resized to the new grid (`posemb_resize`). None: `patches.size`. A
      call's `patch_size` takes precedence. Plain ViTs only (no ResNet).
    flexi_patch_sizes: FlexiViT training: the square patch sizes a run
      draws one of per step (`vit_jax.train`); the model, at any of them,
      is `run_patch_size`'s. Empty: one patch size.
    naflex: Take NaFlex inputs (SigLIP 2's NaFlex ViT, big_vision's
      `naflex_vit.py`): a tuple (patches [B, N, P*P*C] float, each patch
      flattened in (row, column, channel) order; ptype [B, N] int, 1 for a
      patch and 0 for padding, which comes last; rows [B, N] and columns
      [B, N] int, each patch's place in its own image's patch grid), so
      that every image keeps its aspect ratio. The patches are embedded by
      a dense layer (`embedding`, kernel [P*P*C, D]); the learned position
      embeddings are a (rows, columns, D) table resampled to each image's
      grid (`naflex_position_embeddings`); padding gets no attention weight
      in any `attention_impl` and no weight in 'gap' / 'map' pooling. No
      class token or registers; `posemb` 'learn' (the 2-D table) or 'none'.
    layer_scale: LayerScale's initial value (Touvron et al., 2021): each
      residual branch is multiplied by a learned per-channel scale
      (`LayerScale_0/scale` after attention, `LayerScale_1/scale` after the
      MLP); None: none.
    qk_norm: Normalise each head's queries and keys (`query_norm`,
      `key_norm` in the attention, the kind `norm` says) before the dot
      product.
    mlp: 'gelu' (Dense_0 -> GELU -> Dense_1) or 'swiglu' (SiLU(Dense_0 x) *
      Dense_2 x -> Dense_1; `mlp_dim` is the width of each branch).
    mlp_norm: A norm on the MLP's hidden activations before Dense_1
      (`MlpBlock_0/LayerNorm_0`; EVA-02's "scale_mlp").
    norm: 'layernorm' or 'rmsnorm' for every norm of the model (the module
      names stay `LayerNorm_0`, `encoder_norm`, ...; RMSNorm has a scale and
      no bias).
    qkv_bias: Biases of the query, key and value projections: True, False,
      or 'qv' (query and value only, EVA-02's: a key bias changes no
      attention weight).
    proj_bias: Bias of the attention's output projection.
    mlp_bias: Biases of the MLP's Dense layers.
    rope: Rotary position embeddings on the patch tokens' queries and keys,
      one of `rope.ROPE_KINDS` or None (see `vit_jax.models.rope`).
    rope_options: The RoPE convention's settings, (name, value) pairs or a
      mapping (see `vit_jax.models.rope`).
    class_token: A class token in the sequence (`cls`); None: when the
      classifier pools it ('token', 'token_unpooled'). 'gap' averages the
      other tokens (timm's avg pool); 'map' attends over every token, the
      class token included (timm's Eva models', Perception Encoder's).
    posemb_class_token: With `posemb='learn'`, whether the class token has a
      position embedding of its own (the published layout); False: the
      table covers the patches only (timm's `no_embed_class`).
    pre_norm: A norm on the tokens before the first block
      (`Transformer/pre_norm`; CLIP's and Perception Encoder's); the patch
      embedding then has no bias, as in timm.
    embed_norm: A norm on the patch embeddings before the position
      embeddings (`embedding_norm`; AIMv2's).
    fc_norm: With 'gap' pooling, the final norm comes after the pooling
      (`fc_norm`) instead of before it (`Transformer/encoder_norm`).
    map_num_heads: Heads of the MAP head; None: the encoder's.
    map_mlp_dim: MLP width of the MAP head; None: the encoder's.
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
  attention_impl: str = 'auto'
  remat_policy: str | None = None
  posemb: str = 'learn'
  stochastic_depth: float = 0.0
  num_registers: int = 0
  layer_norm_epsilon: float = _LAYER_NORM_EPSILON
  gelu_approximate: bool = True
  dynamic_image_size: bool = False
  posemb_resize: str = 'bilinear'
  posemb_antialias: bool = False
  posemb_grid_size: tuple[int, int] | None = None
  run_patch_size: Any = None
  flexi_patch_sizes: tuple[int, ...] = ()
  naflex: bool = False
  # The block options of today's ViT families (DINOv2/v3, EVA-02, AIMv2,
  # Perception Encoder, SigLIP 2); each default is the 2020 ViT's, with its
  # published parameter names.
  layer_scale: float | None = None
  qk_norm: bool = False
  mlp: str = 'gelu'
  mlp_norm: bool = False
  norm: str = 'layernorm'
  qkv_bias: bool | str = True
  proj_bias: bool = True
  mlp_bias: bool = True
  rope: str | None = None
  rope_options: Any = ()
  class_token: bool | None = None
  posemb_class_token: bool = True
  pre_norm: bool = False
  embed_norm: bool = False
  fc_norm: bool = False
  map_num_heads: int | None = None
  map_mlp_dim: int | None = None

  @property
  def block_options(self) -> BlockOptions:
    """The encoder blocks' options, from this model's fields."""
    return BlockOptions(
        layer_scale=self.layer_scale,
        qk_norm=self.qk_norm,
        mlp=self.mlp,
        mlp_norm=self.mlp_norm,
        norm=self.norm,
        qkv_bias=self.qkv_bias,
        proj_bias=self.proj_bias,
        mlp_bias=self.mlp_bias,
        rope=self.rope,
        rope_options=rope_lib.canonical_options(self.rope_options),
    )

  @property
  def has_class_token(self) -> bool:
    """Whether a class token (`cls`) is in the sequence (`class_token`)."""
    if self.class_token is None:
      return self.classifier in ('token', 'token_unpooled')
    return bool(self.class_token)

  def _check_block_options(self) -> None:
    """Refuses bad options in one line (`check_options`)."""
    check_options(
        {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    )

  @property
  def total_stride(self) -> tuple[int, int]:
    """Input pixels per token along (height, width)."""
    ph, pw = self.patch_size_at(None)
    stride = resnet.total_stride(self.resnet)
    return ph * stride, pw * stride

  def patch_size_at(self, patch_size: Any) -> tuple[int, int]:
    """The (h, w) patches a call cuts: `patch_size`, else `run_patch_size`,
    else `patches.size`.

    Raises:
      ValueError: another size than `patches.size` for a hybrid, or a size
        that is not positive.
    """
    stored = patch_size_of(self.patches)
    for value in (patch_size, self.run_patch_size):
      if value is None:
        continue
      size = patch_size_of(value)
      if min(size) < 1:
        raise ValueError(f'patch_size={value!r}: patch sizes are positive.')
      if size != stored and self.resnet is not None:
        raise ValueError(
            f'patch_size={value!r}: another patch size than patches.size '
            f'{stored} needs a plain ViT; {self.model_name or "this model"} '
            'has a ResNet stem.'
        )
      return size
    return stored

  def _check_image(
      self, images: jax.Array, patch_size: tuple[int, int]
  ) -> None:
    if images.ndim != 4:
      raise ValueError(f'images must be NHWC (4-D), got shape {images.shape}.')
    stride = resnet.total_stride(self.resnet)
    sh, sw = patch_size[0] * stride, patch_size[1] * stride
    h, w = images.shape[1:3]
    if h % sh or w % sw:
      kind = 'patch size' if self.resnet is None else 'total stride'
      raise ValueError(
          f'Image size {h}x{w} is not divisible by the {kind} {sh}x{sw} of '
          f'{self.model_name or "this model"}: resize or crop the images to a '
          f'multiple of it (e.g. '
          f'{max(1, h // sh) * sh}x{max(1, w // sw) * sw}).'
      )

  def _check_naflex(self, inputs: Any) -> tuple[jax.Array, ...]:
    """The NaFlex input tuple, after refusing what NaFlex cannot take."""
    refused = (
        (
            self.has_class_token,
            f'classifier={self.classifier!r}, class_token='
            f'{self.class_token!r} (a class token)',
            "classifier='map' or 'gap' without class_token",
        ),
        (
            self.num_registers > 0,
            f'num_registers={self.num_registers}',
            'num_registers=0',
        ),
        (self.resnet is not None, 'a ResNet stem (hybrid)', 'a plain ViT'),
        (self.transformer is None, 'transformer=None', 'a transformer'),
        (
            self.posemb not in ('learn', 'none'),
            f'posemb={self.posemb!r}',
            "posemb='learn' (the 2-D table) or 'none'",
        ),
        (
            self.dynamic_image_size,
            'dynamic_image_size=True',
            'dynamic_image_size=False (every example has its own grid)',
        ),
        (
            bool(self.flexi_patch_sizes) or self.run_patch_size is not None,
            'FlexiViT patch sizes (flexi_patch_sizes / run_patch_size)',
            "one patch size, the patches' (NaFlex patchifies in the input)",
        ),
        (
            self.posemb_resize != 'bilinear',
            f'posemb_resize={self.posemb_resize!r}',
            "the default 'bilinear' (NaFlex resamples with antialiased "
            'bilinear)',
        ),
    )
    for bad, what, fix in refused:
      if bad:
        raise ValueError(f'naflex=True does not take {what}: use {fix}.')
    if not isinstance(inputs, (tuple, list)) or len(inputs) != 4:
      raise ValueError(
          'naflex=True takes the tuple (patches [B, N, P*P*C], ptype [B, N], '
          f'rows [B, N], columns [B, N]), got {type(inputs).__name__}'
          f'{getattr(inputs, "shape", "")}.'
      )
    patches, ptype, rows, columns = (jnp.asarray(a) for a in inputs)
    ph, pw = patch_size_of(self.patches)
    if patches.ndim != 3 or patches.shape[-1] % (ph * pw):
      raise ValueError(
          f'NaFlex patches {patches.shape} are not [batch, tokens, '
          f'{ph}*{pw}*channels] for the {ph}x{pw} patches of '
          f'{self.model_name or "this model"}.'
      )
    for name, a in (('ptype', ptype), ('rows', rows), ('columns', columns)):
      if a.shape != patches.shape[:2]:
        raise ValueError(
            f'NaFlex {name} {a.shape} does not match the patches '
            f'{patches.shape[:2]} (one per token).'
        )
    return patches, ptype, rows, columns

  @nn.compact
  def __call__(
      self,
      inputs: Any,
      *,
      train: bool,
      patch_transform: Callable[[jax.Array], jax.Array] | None = None,
      output: str = 'logits',
      patch_size: Any = None,
  ) -> jax.Array:
    """Logits `[batch, num_classes]` (or features without a head).

    The two keyword hooks serve training objectives other than
    classification (`vit_jax.objectives`), which keep their own parameters in
    a module around this one.

    Args:
      inputs: Images `[batch, height, width, 3]` in [-1, 1]; with `naflex`,
        the tuple (patches, ptype, rows, columns) (see `naflex`).
      train: Enables dropout (needs a 'dropout' rng).
      patch_transform: Applied to the patch embeddings `[batch, patches, D]`
        (row-major patch order) before the class token and the encoder, e.g.
        to mask some of them.
      output: 'logits' (pooled, through the representation layer and head)
        or 'tokens': the encoder's output sequence `[batch, tokens, D]`
        (class token first when the model has one; with `naflex`, the
        padding tokens too, their values meaningless).
      patch_size: FlexiViT: the patch size (h, w) or int of this call (a
        static value); None: `run_patch_size` (see there).

    Returns:
      As `output` says.
    """
    if output not in OUTPUTS:
      raise ValueError(f'Unknown output {output!r}; use one of {OUTPUTS}.')
    if self.classifier not in CLASSIFIERS:
      raise ValueError(
          f'Unknown classifier {self.classifier!r}; use one of '
          f'{CLASSIFIERS}.'
      )
    if self.posemb not in POSEMB_KINDS:
      raise ValueError(
          f'Unknown posemb {self.posemb!r}; use one of ' f'{POSEMB_KINDS}.'
      )
    if not 0.0 <= self.stochastic_depth < 1.0:
      raise ValueError(
          f'stochastic_depth={self.stochastic_depth}: a drop '
          'probability in [0, 1).'
      )
    if self.num_registers < 0:
      raise ValueError(f'num_registers={self.num_registers} is negative.')
    if self.posemb_resize not in POSEMB_RESIZE_METHODS:
      raise ValueError(
          f'Unknown posemb_resize {self.posemb_resize!r}; use '
          f'one of {POSEMB_RESIZE_METHODS}.'
      )
    if self.posemb_antialias and self.posemb_resize != 'bicubic':
      raise ValueError(
          "posemb_antialias=True needs posemb_resize='bicubic' "
          "('bilinear' has no antialiasing, 'linear' always has it)."
      )
    self._check_block_options()
    ph, pw = self.patch_size_at(patch_size)
    stored_patch = patch_size_of(self.patches)
    flexible = bool(self.flexi_patch_sizes) or (ph, pw) != stored_patch
    # NaFlex: the tokens attention and pooling look at, and each token's
    # (row, column) in its image's patch grid.
    token_mask: jax.Array | None = None
    positions: tuple[jax.Array, jax.Array] | None = None
    if self.naflex:
      patches, ptype, rows, columns = self._check_naflex(inputs)
      if (ph, pw) != stored_patch:
        raise ValueError(
            f'naflex=True does not take patch_size={patch_size!r}: the '
            f'patches come cut at {stored_patch} in the input.'
        )
      # A dense layer on the flattened patches: the patch convolution's
      # numbers, its kernel reshaped to [P*P*C, D].
      x = nn.Dense(
          self.hidden_size,
          use_bias=not self.pre_norm,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name='embedding',
      )(patches.astype(self.dtype))
      valid = ptype == 1
      # An example without a single patch (a batch's filler) counts all its
      # tokens instead, so that its outputs stay finite.
      token_mask = jnp.logical_or(
          valid, jnp.logical_not(jnp.any(valid, axis=1, keepdims=True))
      )
      positions = (rows, columns)
    else:
      self._check_image(inputs, (ph, pw))
      x = inputs.astype(self.dtype)
      if self.resnet is not None:
        x = resnet.bit_stem_and_stages(
            x,
            num_layers=tuple(config_value(self.resnet, 'num_layers')),
            width_factor=config_value(self.resnet, 'width_factor', 1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
      if (ph, pw) == stored_patch:
        x = nn.Conv(
            features=self.hidden_size,
            kernel_size=(ph, pw),
            strides=(ph, pw),
            padding='VALID',
            # timm's patch embedding has no bias when a norm follows the
            # position embeddings (`pre_norm`).
            use_bias=not self.pre_norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='embedding',
        )(x)
      else:  # The same parameters, resampled to this patch size.
        x = FlexiPatchEmbedding(
            features=self.hidden_size,
            stored_size=stored_patch,
            patch_size=(ph, pw),
            use_bias=not self.pre_norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='embedding',
        )(x)

    if (patch_transform or output == 'tokens') and self.transformer is None:
      raise ValueError(
          "patch_transform and output='tokens' need a "
          'transformer (this model has none).'
      )
    if self.transformer is not None:
      if self.naflex:
        n, _, c = x.shape
        h = w = 0  # No common grid: each example has its own (`positions`).
      else:
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))
      encoder_fields = {
          k: config_value(self.transformer, k)
          for k in ('num_layers', 'mlp_dim', 'num_heads')
      }
      for k, default in (
          ('dropout_rate', 0.1),
          ('attention_dropout_rate', 0.1),
          ('add_position_embedding', True),
      ):
        encoder_fields[k] = config_value(self.transformer, k, default)
      if self.embed_norm:  # timm's PatchEmbed norm: before any position.
        x = make_norm(
            self.norm,
            epsilon=self.layer_norm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='embedding_norm',
        )(x)
      if patch_transform is not None:
        x = patch_transform(x)
      # A tuple (hashable) when the config gives a list.
      posemb_grid_size: tuple[int, int] | None = None
      if self.posemb_grid_size is not None:
        gh, gw = self.posemb_grid_size
        posemb_grid_size = (gh, gw)
      if self.posemb == 'learn2d':
        x = PositionEmbedding2D(
            param_dtype=self.param_dtype,
            dynamic=self.dynamic_image_size or flexible,
            grid_size=posemb_grid_size,
            resize=self.posemb_resize,
            antialias=self.posemb_antialias,
            name='posembed_2d',
        )(x, h, w)
      elif self.posemb == 'sincos2d':
        x = x + jnp.asarray(posemb_sincos_2d(h, w, c), x.dtype)
      if self.posemb != 'learn':
        # Added here, before the class token: the encoder adds none.
        encoder_fields['add_position_embedding'] = False
        if self.posemb != 'none':
          x = nn.Dropout(rate=encoder_fields['dropout_rate'])(
              x, deterministic=not train
          )
      unembedded_prefix = None
      if self.has_class_token:
        cls = self.param(
            'cls', nn.initializers.zeros, (1, 1, c), self.param_dtype
        )
        cls = jnp.tile(cls.astype(x.dtype), (n, 1, 1))
        if encoder_fields['add_position_embedding'] and (
            not self.posemb_class_token
        ):
          # timm's no_embed_class: the table covers the patches; the class
          # token joins after it is added.
          unembedded_prefix = cls
        else:
          x = jnp.concatenate([cls, x], axis=1)
      registers = None
      if self.num_registers:
        registers = self.param(
            'registers',
            _POSEMB_INIT,
            (1, self.num_registers, c),
            self.param_dtype,
        )
        registers = jnp.tile(registers, (n, 1, 1))
      x = Encoder(
          deterministic=not train,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          remat=self.remat,
          scan=self.scan,
          attention_impl=self.attention_impl,
          remat_policy=self.remat_policy,
          stochastic_depth=self.stochastic_depth,
          layer_norm_epsilon=self.layer_norm_epsilon,
          gelu_approximate=self.gelu_approximate,
          posemb_grid_size=posemb_grid_size,
          posemb_resize=self.posemb_resize,
          posemb_antialias=self.posemb_antialias,
          # The stored table's grid is inferred at the stored patch size.
          patch_shape=(
              stored_patch[0] * resnet.total_stride(self.resnet),
              stored_patch[1] * resnet.total_stride(self.resnet),
          ),
          block_options=self.block_options,
          pre_norm=self.pre_norm,
          final_norm=not self.fc_norm,
          name='Transformer',
          **encoder_fields,
      )(
          x,
          extra_tokens=registers,
          grid=(h, w) if self.dynamic_image_size or flexible else None,
          positions=positions,
          kv_mask=token_mask,
          patch_grid=(h, w),
          prefix_tokens=1 if self.has_class_token else 0,
          unembedded_prefix=unembedded_prefix,
      )
      if self.num_registers:  # Registers are working memory, not output.
        x = x[:, : -self.num_registers]
      if output == 'tokens':
        return x

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap' and token_mask is not None:
      counted = token_mask[..., None].astype(x.dtype)
      x = jnp.sum(x * counted, axis=1) / jnp.sum(counted, axis=1)
    elif self.classifier == 'gap':
      if self.has_class_token:  # timm's avg pool: the non-prefix tokens.
        x = x[:, 1:]
      x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    elif self.classifier == 'map':
      if self.transformer is None:
        raise ValueError("classifier='map' needs a transformer.")
      # Over every token, a class token included: timm's Eva pooling
      # (Perception Encoder's).
      x = MAPHead(
          num_heads=self.map_num_heads
          or config_value(self.transformer, 'num_heads'),
          mlp_dim=self.map_mlp_dim or config_value(self.transformer, 'mlp_dim'),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          layer_norm_epsilon=self.layer_norm_epsilon,
          gelu_approximate=self.gelu_approximate,
          norm=self.norm,
          name='MAPHead_0',
      )(x, kv_mask=token_mask)
    if self.fc_norm:  # After the 'gap' pool, instead of encoder_norm.
      x = make_norm(
          self.norm,
          epsilon=self.layer_norm_epsilon,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name='fc_norm',
      )(x)

    if self.representation_size is not None:
      x = nn.Dense(
          self.representation_size,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name='pre_logits',
      )(x)
      x = jnp.tanh(x)
    self.sow('intermediates', 'pre_logits', x)

    if self.num_classes:
      x = nn.Dense(
          self.num_classes,
          kernel_init=nn.initializers.zeros,
          bias_init=nn.initializers.constant(self.head_bias_init),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name='head',
      )(x)
    return x


__all__ = [
    'AddPositionEmbs',
    'BLOCK_OPTION_FIELDS',
    'BlockOptions',
    'CLASSIFIERS',
    'Encoder',
    'Encoder1DBlock',
    'MAPHead',
    'MLP_KINDS',
    'MlpBlock',
    'MultiHeadDotProductAttention',
    'NAFLEX_POSEMB_GRID',
    'NORM_KINDS',
    'OUTPUTS',
    'POSEMB_KINDS',
    'POSEMB_RESIZE_METHODS',
    'FLEXIVIT_PATCH_SIZES',
    'FlexiPatchEmbedding',
    'LayerScale',
    'PositionEmbedding2D',
    'QKV_BIAS_KINDS',
    'VisionTransformer',
    'check_options',
    'config_value',
    'linear_resize_matrix',
    'make_norm',
    'naflex_init_inputs',
    'naflex_position_embeddings',
    'patch_size_of',
    'posemb_sincos_2d',
    'resample_patch_embedding',
    'resize_posemb_grid',
]
