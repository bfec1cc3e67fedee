"""Interchange with transformers and timm: ViT weights both ways.

`from_transformers(path) -> (model, params)`, `to_transformers(model,
params, out_dir)`, `to_timm(model, params, path)`, `from_timm(path)`;
`spec_from_params` / `model_from_spec` for a plain ViT in an `.npz`;
`check_output` / `write_output` write output files safely. Their command
line is `python -m vit_jax.convert`; `vit_jax.loading` reads any of these
inputs, runs and `.npz` files too.

Layouts. vit_jax keeps the published parameter tree (attention kernels
(D, H, D/H) and (H, D/H, D), Dense kernels (in, out), an HWIO patch
convolution on NHWC images). transformers' `ViTForImageClassification` and
timm's `VisionTransformer` keep PyTorch's: Linear weights (out, in), an OIHW
convolution on NCHW images, q, k and v as three matrices (transformers) or
one stacked `qkv` (timm). The conversion only transposes and reshapes, so a
round trip gives back the same bits.

The transformers files use the key names transformers has always written
(`vit.encoder.layer.N.attention.attention.query.weight`, ...): version 5
renames them in memory but still reads and writes these, so the files work
with transformers 4.x and 5.x.

Numerics. transformers' ViT configs carry two choices that differ from the
paper code: `hidden_act` ('gelu' is the exact erf GELU; the paper's tanh
approximation is 'gelu_pytorch_tanh') and `layer_norm_eps` (1e-12 in the
google/vit-* configs, 1e-6 in the paper code). They map onto the model's
`gelu_approximate` and `layer_norm_epsilon`, both ways. timm's `act_layer`
('gelu' or 'gelu_tanh') and LayerNorm eps likewise; `to_timm` stores them
(and the other constructor arguments) in the file's metadata, and
`create_timm_model(path)` builds the matching timm model.

Safety: only safetensors files are read or written. A pickled
`pytorch_model.bin` is never opened (`torch.load` can execute code); a
directory holding only such a file gets a message saying how to convert it.

Dependencies: `safetensors` (the `interop` extra); torch, transformers and
timm are never imported here except by `create_timm_model`.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import json
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoint
import vit_jax.models
from vit_jax.models import vit as vit_lib

Params = Any

TRANSFORMERS_CONFIG = 'config.json'
TRANSFORMERS_WEIGHTS = 'model.safetensors'
TRANSFORMERS_INDEX = 'model.safetensors.index.json'
_PICKLED_WEIGHTS = ('pytorch_model.bin', 'pytorch_model.bin.index.json')
_OTHER_WEIGHTS = ('tf_model.h5', 'flax_model.msgpack')
# What `to_timm` stores in the file's metadata (json).
TIMM_METADATA_KEY = 'vit_jax.timm_kwargs'

# transformers' `hidden_act` names -> gelu_approximate. 'gelu_new' and
# 'gelu_pytorch_tanh' are both the tanh approximation (one written out, one
# torch's); 'gelu' is the exact erf GELU.
_TRANSFORMERS_ACTS = {
    'gelu': False,
    'gelu_pytorch_tanh': True,
    'gelu_new': True,
}
_TIMM_ACTS = {'gelu': False, 'gelu_tanh': True}
_ARCHITECTURES = ('ViTForImageClassification', 'ViTModel')
# The position embeddings' path in the published layout.
POSEMB_PATH = 'Transformer/posembed_input/pos_embedding'


class ConversionError(ValueError):
  """A checkpoint or model that cannot be converted as asked (says why)."""


# ----------------------------------------------------------------------------
# What a ViT is, in the terms every format shares.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VitSpec:
  """The architecture and numerics of a plain ViT, format-neutral.

  Attributes:
    hidden_size: Token width D.
    num_layers: Encoder blocks.
    num_heads: Attention heads.
    mlp_dim: MLP hidden width.
    patch_size: (height, width) of a patch.
    grid: (rows, columns) of the patch grid the position embeddings cover.
    classifier: 'token', 'gap' or 'map'.
    num_classes: Head size; 0 for none.
    representation_size: Width of the tanh pre-logits layer, or None.
    gelu_approximate: tanh GELU (True) or exact erf GELU.
    layer_norm_epsilon: Epsilon of every LayerNorm.
    dropout_rate: Dropout after attention and in the MLPs (training only).
    attention_dropout_rate: Dropout on the attention weights.
  """

  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: tuple[int, int]
  grid: tuple[int, int]
  classifier: str = 'token'
  num_classes: int = 0
  representation_size: int | None = None
  gelu_approximate: bool = True
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0

  @property
  def image_size(self) -> tuple[int, int]:
    """The (height, width) the position embeddings were made for."""
    return (
        self.grid[0] * self.patch_size[0],
        self.grid[1] * self.patch_size[1],
    )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def square_grid(num_patches: int, what: str) -> tuple[int, int]:
  """(side, side) of `num_patches` position embeddings on a square grid.

  Args:
    num_patches: Position embeddings of the patches (no class token).
    what: What they are, for the error message.

  Returns:
    The grid's (rows, columns).

  Raises:
    ConversionError: `num_patches` is not a square.
  """
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ConversionError(
        f'{what}: {num_patches} position embeddings are not a square grid; '
        'pass image_size=(height, width).'
    )
  return side, side


def _grid_of(
    num_patches: int, patch: tuple[int, int], image_size: Any, what: str
) -> tuple[int, int]:
  if image_size is None:
    return square_grid(num_patches, what)
  h, w = (
      (image_size, image_size)
      if isinstance(image_size, int)
      else tuple(image_size)
  )
  grid = (h // patch[0], w // patch[1])
  if grid[0] * grid[1] != num_patches:
    raise ConversionError(
        f'{what}: image size {h}x{w} with {patch[0]}x{patch[1]} patches '
        f'makes {grid[0] * grid[1]} patches, but there are {num_patches} '
        'position embeddings.'
    )
  return grid


def _flat_params(params: Params) -> dict[str, np.ndarray]:
  """Linen-named, unscanned, host float32 {'a/b': array}."""
  tree = checkpoint.unstack_encoder_blocks(params)
  flat = {}
  for key, value in checkpoint.flatten(tree).items():
    value = np.asarray(value)
    # bfloat16 has no numpy-native encoding; the published files are float32.
    if value.dtype.kind == 'V' or value.dtype.name == 'bfloat16':
      value = value.astype(np.float32)
    flat[key] = value
  return flat


def _classifier(map_head: bool, class_token: bool) -> str:
  """The `classifier` of a model with a MAP head and / or a class token."""
  if map_head:
    return 'map'
  return 'token' if class_token else 'gap'


def _count_layers(flat: Mapping[str, Any]) -> int:
  layers = 0
  while f'Transformer/encoderblock_{layers}/LayerNorm_0/scale' in flat:
    layers += 1
  return layers


def spec_from_params(
    params: Params,
    *,
    gelu_approximate: bool = True,
    layer_norm_epsilon: float = 1e-6,
    image_size: Any = None,
) -> VitSpec:
  """The architecture of a published-layout ViT tree, from its shapes alone.

  Attention kernels are (D, H, D/H), so the head count is in the shapes; the
  GELU kind and the LayerNorm epsilon are not (the defaults are the paper
  code's).

  Args:
    params: A ViT parameter tree (e.g. from `checkpoint.load`).
    gelu_approximate: See `VitSpec`.
    layer_norm_epsilon: See `VitSpec`.
    image_size: Needed only when the patch grid is not square.

  Returns:
    The `VitSpec`.

  Raises:
    ConversionError: not a plain ViT (a hybrid, a Mixer, other position
      embeddings, registers), naming what was found.
  """
  flat = _flat_params(params)
  tops = sorted({k.split('/', 1)[0] for k in flat})
  if 'embedding/kernel' not in flat or not _count_layers(flat):
    raise ConversionError(
        f'Not a ViT parameter tree (top-level entries {tops}): expected '
        'embedding/kernel and Transformer/encoderblock_0/...'
    )
  if any(k.startswith(('conv_root/', 'block1/')) for k in flat):
    raise ConversionError(
        'A ResNet hybrid (conv_root, block*): transformers and timm have '
        'other models for hybrids; only plain ViTs convert.'
    )
  if 'registers' in flat or any(k.startswith('posembed_2d/') for k in flat):
    raise ConversionError(
        'Registers and 2-D learned position embeddings have no equivalent '
        "in transformers' or timm's ViT."
    )
  if POSEMB_PATH not in flat:
    raise ConversionError(
        f'No {POSEMB_PATH}: fixed (sincos2d) or no position embeddings have '
        "no equivalent in transformers' ViT."
    )
  ph, pw, channels, hidden = flat['embedding/kernel'].shape
  if channels != 3:
    raise ConversionError(
        f'embedding/kernel has {channels} input channels; '
        'only RGB (3) models convert.'
    )
  query = flat[
      'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/'
      'query/kernel'
  ]
  mlp = flat['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel']
  classifier = _classifier(
      any(k.startswith('MAPHead_0/') for k in flat), 'cls' in flat
  )
  prefix_tokens = 1 if classifier == 'token' else 0
  num_patches = flat[POSEMB_PATH].shape[1] - prefix_tokens
  return VitSpec(
      hidden_size=int(hidden),
      num_layers=_count_layers(flat),
      num_heads=int(query.shape[1]),
      mlp_dim=int(mlp.shape[1]),
      patch_size=(int(ph), int(pw)),
      grid=_grid_of(num_patches, (ph, pw), image_size, POSEMB_PATH),
      classifier=classifier,
      num_classes=int(flat['head/kernel'].shape[1])
      if 'head/kernel' in flat
      else 0,
      representation_size=(
          int(flat['pre_logits/kernel'].shape[1])
          if 'pre_logits/kernel' in flat
          else None
      ),
      gelu_approximate=bool(gelu_approximate),
      layer_norm_epsilon=float(layer_norm_epsilon),
  )


def spec_from_model(
    model: Any, params: Params, *, image_size: Any = None
) -> VitSpec:
  """The `VitSpec` of a `VisionTransformer` and its parameters.

  Raises:
    ConversionError: the model is not a VisionTransformer, or uses an option
      that transformers' and timm's ViTs lack (named), or its fields and
      the parameters' shapes disagree.
  """
  if not isinstance(model, vit_lib.VisionTransformer):
    raise ConversionError(
        f'{type(model).__name__} is not a VisionTransformer: only ViTs '
        'convert to transformers and timm.'
    )
  unsupported = []
  if model.resnet is not None:
    unsupported.append('resnet (a hybrid)')
  if model.posemb != 'learn':
    unsupported.append(f'posemb={model.posemb!r}')
  if model.num_registers:
    unsupported.append(f'num_registers={model.num_registers}')
  if model.classifier not in ('token', 'gap', 'map'):
    unsupported.append(f'classifier={model.classifier!r}')
  if model.transformer is None:
    unsupported.append('transformer=None')
  elif not vit_lib.config_value(
      model.transformer, 'add_position_embedding', True
  ):
    unsupported.append('transformer.add_position_embedding=False')
  # Today's families' options (none of which the plain formats have):
  # their timm models convert with `timm_model=` (`vit_jax.timm_interop`).
  for field in dataclasses.fields(model):
    if field.name in vit_lib.BLOCK_OPTION_FIELDS:
      value = getattr(model, field.name)
      if value != field.default:
        unsupported.append(f'{field.name}={value!r}')
  if unsupported:
    raise ConversionError(
        f'{model.model_name or "This model"} uses option(s) that '
        f'transformers\' and timm\'s ViT lack: {", ".join(unsupported)}.'
    )
  spec = spec_from_params(
      params,
      gelu_approximate=model.gelu_approximate,
      layer_norm_epsilon=model.layer_norm_epsilon,
      image_size=image_size,
  )
  fields = {
      'hidden_size': model.hidden_size,
      'num_layers': vit_lib.config_value(model.transformer, 'num_layers'),
      'num_heads': vit_lib.config_value(model.transformer, 'num_heads'),
      'mlp_dim': vit_lib.config_value(model.transformer, 'mlp_dim'),
      'patch_size': vit_lib.patch_size_of(model.patches),
      'classifier': model.classifier,
      'num_classes': model.num_classes or 0,
      'representation_size': model.representation_size,
  }
  wrong = [
      f'{name}: model {value!r}, parameters {getattr(spec, name)!r}'
      for name, value in fields.items()
      if tuple(np.atleast_1d(value))
      != tuple(np.atleast_1d(getattr(spec, name)))
  ]
  if wrong:
    raise ConversionError(
        'The parameters do not fit the model (shape '
        'mismatch): ' + '; '.join(wrong) + '.'
    )
  return dataclasses.replace(
      spec,
      dropout_rate=float(
          vit_lib.config_value(model.transformer, 'dropout_rate', 0.0)
      ),
      attention_dropout_rate=float(
          vit_lib.config_value(model.transformer, 'attention_dropout_rate', 0.0)
      ),
  )


def _registered_name(spec: VitSpec) -> str | None:
  """The registry's ViT of this size, if there is one (e.g. 'ViT-B_16')."""
  for name in vit_jax.models.MODEL_NAMES:
    if not name.startswith('ViT-'):
      continue
    fields = vit_jax.models.get_config(name)
    transformer = fields['transformer']
    if (
        fields['hidden_size'],
        transformer['num_layers'],
        transformer['num_heads'],
        transformer['mlp_dim'],
        vit_lib.patch_size_of(fields['patches']),
    ) == (
        spec.hidden_size,
        spec.num_layers,
        spec.num_heads,
        spec.mlp_dim,
        spec.patch_size,
    ):
      return name
  return None


def model_from_spec(spec: VitSpec, **overrides: Any) -> Any:
  """A `VisionTransformer` of `spec` (the registry's name when it has one).

  Args:
    spec: The architecture.
    **overrides: Other module fields (e.g. `dtype`).

  Returns:
    `vit_jax.models.get_model(name, ...)` when a registered ViT has this
    size, else a `VisionTransformer` with the same fields.
  """
  fields = dict(
      patches={'size': spec.patch_size},
      hidden_size=spec.hidden_size,
      transformer={
          'num_layers': spec.num_layers,
          'num_heads': spec.num_heads,
          'mlp_dim': spec.mlp_dim,
          'dropout_rate': spec.dropout_rate,
          'attention_dropout_rate': spec.attention_dropout_rate,
      },
      classifier=spec.classifier,
      representation_size=spec.representation_size,
      gelu_approximate=spec.gelu_approximate,
      layer_norm_epsilon=spec.layer_norm_epsilon,
      **overrides,
  )
  name = _registered_name(spec)
  if name is not None:
    return vit_jax.models.get_model(
        name, num_classes=spec.num_classes, **fields
    )
  return vit_lib.VisionTransformer(num_classes=spec.num_classes, **fields)


# ----------------------------------------------------------------------------
# Layout conversions: one table of rules per format, read both ways (numpy;
# exact: transposes and reshapes only, so a round trip gives back the bits).
# ----------------------------------------------------------------------------


class _Layout(NamedTuple):
  """How one of our arrays is laid out in a PyTorch state dict.

  Attributes:
    to_torch: Our array -> theirs.
    from_torch: (their array, our shape) -> ours.
    torch_shape: Our shape -> theirs.
  """

  to_torch: Callable[[np.ndarray], np.ndarray]
  from_torch: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


_SAME = _Layout(lambda x: x, lambda y, s: y.reshape(s), tuple)
# Dense kernel (in, out) -> Linear weight (out, in).
_LINEAR = _Layout(lambda x: x.T, lambda y, s: y.T, lambda s: tuple(reversed(s)))
# Patch convolution HWIO (on NHWC images) -> OIHW (on NCHW images).
_CONV = _Layout(
    lambda x: x.transpose(3, 2, 0, 1),
    lambda y, s: y.transpose(2, 3, 1, 0),
    lambda s: (s[3], s[2], s[0], s[1]),
)
# q/k/v kernel (D, H, D/H) -> Linear weight (H*D/H, D).
_HEADS_IN = _Layout(
    lambda x: x.reshape(x.shape[0], -1).T,
    lambda y, s: y.T.reshape(s),
    lambda s: (s[1] * s[2], s[0]),
)
# Attention output kernel (H, D/H, D) -> Linear weight (D, H*D/H).
_HEADS_OUT = _Layout(
    lambda x: x.reshape(-1, x.shape[-1]).T,
    lambda y, s: y.T.reshape(s),
    lambda s: (s[2], s[0] * s[1]),
)
# q/k/v bias (H, D/H) -> (H*D/H,).
_HEADS_BIAS = _Layout(
    lambda x: x.reshape(-1), lambda y, s: y.reshape(s), lambda s: (s[0] * s[1],)
)


class _Rule(NamedTuple):
  """One tensor of theirs: ours, in `layout`, concatenated on axis 0."""

  theirs: str
  layout: _Layout
  ours: tuple[str, ...]


_BLOCK = 'Transformer/encoderblock_{i}/'
_ATTENTION = _BLOCK + 'MultiHeadDotProductAttention_0/'
_MAP_ATTENTION = 'MAPHead_0/MultiHeadDotProductAttention_0/'


def _linear(theirs: str, ours: str, kernel: _Layout = _LINEAR) -> list[_Rule]:
  return [
      _Rule(theirs + '.weight', kernel, (ours + '/kernel',)),
      _Rule(theirs + '.bias', _SAME, (ours + '/bias',)),
  ]


def _norm(theirs: str, ours: str) -> list[_Rule]:
  return [
      _Rule(theirs + '.weight', _SAME, (ours + '/scale',)),
      _Rule(theirs + '.bias', _SAME, (ours + '/bias',)),
  ]


def _projection(
    theirs: str, attention: str, names: Sequence[str]
) -> list[_Rule]:
  """q, k and/or v as one Linear (timm stacks them; transformers does not)."""
  return [
      _Rule(
          theirs + '.weight',
          _HEADS_IN,
          tuple(f'{attention}{n}/kernel' for n in names),
      ),
      _Rule(
          theirs + '.bias',
          _HEADS_BIAS,
          tuple(f'{attention}{n}/bias' for n in names),
      ),
  ]


def _transformers_rules(spec: VitSpec, prefix: str) -> list[_Rule]:
  """transformers' `ViTModel` names (under `prefix`), classifier, pooler."""
  e = prefix + 'embeddings.'
  rules = [
      _Rule(e + 'cls_token', _SAME, ('cls',)),
      _Rule(e + 'position_embeddings', _SAME, (POSEMB_PATH,)),
      *_linear(e + 'patch_embeddings.projection', 'embedding', _CONV),
      *_norm(prefix + 'layernorm', 'Transformer/encoder_norm'),
  ]
  for i in range(spec.num_layers):
    block, attention = _BLOCK.format(i=i), _ATTENTION.format(i=i)
    layer = f'{prefix}encoder.layer.{i}.'
    rules += _norm(layer + 'layernorm_before', block + 'LayerNorm_0')
    for name in ('query', 'key', 'value'):
      rules += _projection(
          f'{layer}attention.attention.{name}', attention, (name,)
      )
    rules += _linear(
        layer + 'attention.output.dense', attention + 'out', _HEADS_OUT
    )
    rules += _norm(layer + 'layernorm_after', block + 'LayerNorm_1')
    rules += _linear(layer + 'intermediate.dense', block + 'MlpBlock_0/Dense_0')
    rules += _linear(layer + 'output.dense', block + 'MlpBlock_0/Dense_1')
  if spec.representation_size is not None:
    rules += _linear('pooler.dense', 'pre_logits')
  if spec.num_classes:
    rules += _linear('classifier', 'head')
  return rules


def _timm_rules(spec: VitSpec) -> list[_Rule]:
  """timm's `VisionTransformer` names (`attn_pool` for the MAP head)."""
  rules = [
      _Rule('pos_embed', _SAME, (POSEMB_PATH,)),
      *_linear('patch_embed.proj', 'embedding', _CONV),
      *_norm('norm', 'Transformer/encoder_norm'),
  ]
  if spec.classifier == 'token':
    rules.append(_Rule('cls_token', _SAME, ('cls',)))

  def attention(theirs, ours, projections):
    return [
        *(
            rule
            for stacked, names in projections
            for rule in _projection(theirs + stacked, ours, names)
        ),
        *_linear(theirs + 'proj', ours + 'out', _HEADS_OUT),
    ]

  def mlp(theirs, ours):
    return _linear(theirs + 'fc1', ours + 'Dense_0') + _linear(
        theirs + 'fc2', ours + 'Dense_1'
    )

  for i in range(spec.num_layers):
    block, b = _BLOCK.format(i=i), f'blocks.{i}.'
    rules += _norm(b + 'norm1', block + 'LayerNorm_0')
    rules += attention(
        b + 'attn.',
        _ATTENTION.format(i=i),
        [('qkv', ('query', 'key', 'value'))],
    )
    rules += _norm(b + 'norm2', block + 'LayerNorm_1')
    rules += mlp(b + 'mlp.', block + 'MlpBlock_0/')
  if spec.classifier == 'map':
    rules += _attn_pool_rules()
  if spec.num_classes:
    rules += _linear('head', 'head')
  return rules


def _attn_pool_rules() -> list[_Rule]:
  """timm's `AttentionPoolLatent` (`attn_pool`) as our `MAPHead_0`.

  The MAP head of timm's ViTs and Eva models alike: `latent` (the probe),
  `q` and the stacked `kv` projections, `proj`, `norm` and a GELU `mlp`.
  """
  rules = [_Rule('attn_pool.latent', _SAME, ('MAPHead_0/probe',))]
  rules += _projection('attn_pool.q', _MAP_ATTENTION, ('query',))
  rules += _projection('attn_pool.kv', _MAP_ATTENTION, ('key', 'value'))
  rules += _linear('attn_pool.proj', _MAP_ATTENTION + 'out', _HEADS_OUT)
  rules += _norm('attn_pool.norm', 'MAPHead_0/LayerNorm_0')
  for i in (1, 2):
    rules += _linear(
        f'attn_pool.mlp.fc{i}', f'MAPHead_0/MlpBlock_0/Dense_{i - 1}'
    )
  return rules


def _to_torch(
    flat: Mapping[str, np.ndarray], rules: Sequence[_Rule]
) -> dict[str, np.ndarray]:
  """Our flat parameters -> their state dict (contiguous, for safetensors)."""
  return {
      rule.theirs: np.ascontiguousarray(
          np.concatenate([rule.layout.to_torch(flat[key]) for key in rule.ours])
      )
      for rule in rules
  }


def _torch_shapes(
    rules: Sequence[_Rule], ours: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
  """The shape of each of their tensors, from our shapes."""
  shapes = {}
  for rule in rules:
    parts = [rule.layout.torch_shape(tuple(ours[key])) for key in rule.ours]
    shapes[rule.theirs] = (sum(p[0] for p in parts), *parts[0][1:])
  return shapes


def _from_torch(
    tensors: Mapping[str, np.ndarray],
    rules: Sequence[_Rule],
    model: Any,
    image_size: tuple[int, int],
    where: str,
) -> Params:
  """Their state dict -> our parameter tree for `model`, checked first.

  The expected shapes are the model's own (abstract initialisation), so a
  file that does not fit is refused naming each missing, unexpected or
  mis-shaped tensor before anything is converted.
  """
  abstract = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, *image_size, 3)), train=False
      )
  )['params']
  ours = {k: tuple(v.shape) for k, v in checkpoint.flatten(abstract).items()}
  want = _torch_shapes(rules, ours)
  _check_keys(list(tensors), list(want), where)
  wrong = [
      f'{k}: found {tuple(tensors[k].shape)}, expected {shape}'
      for k, shape in sorted(want.items())
      if tuple(tensors[k].shape) != shape
  ]
  if wrong:
    raise ConversionError(f'{where}: shape mismatch: ' + '; '.join(wrong) + '.')
  flat = {}
  for rule in rules:
    sizes = [rule.layout.torch_shape(ours[key])[0] for key in rule.ours]
    parts = np.split(np.asarray(tensors[rule.theirs]), np.cumsum(sizes)[:-1])
    for key, part in zip(rule.ours, parts):
      flat[key] = np.ascontiguousarray(rule.layout.from_torch(part, ours[key]))
  return checkpoint.unflatten(flat)


def _check_keys(have: Sequence[str], want: Sequence[str], where: str) -> None:
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  problems = []
  if missing:
    problems.append(f'missing weights {_names(missing)}')
  if extra:
    problems.append(f'unexpected weights {_names(extra)}')
  if problems:
    raise ConversionError(f'{where}: ' + '; '.join(problems) + '.')


def _names(keys: Sequence[str], limit: int = 12) -> str:
  more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
  return f'[{", ".join(keys[:limit])}{more}]'


# ----------------------------------------------------------------------------
# Output files: never overwritten by surprise, permissions of the umask.
# ----------------------------------------------------------------------------


def _umask() -> int:
  try:  # Linux says it without changing it.
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o22)
  os.umask(mask)
  return mask


def follow_umask(path: str) -> None:
  """Gives `path` (and, for a directory, all inside) the umask's modes.

  What `open()` and `os.mkdir()` create: 0666 / 0777 less the umask. Some
  writers use fixed modes instead (safetensors 0600 files, TensorFlow's
  SavedModel 0755 directories), which would make one export's files
  readable by the group and another's not.
  """
  mask = _umask()
  for root, dirs, files in os.walk(path) if os.path.isdir(path) else ():
    for name in dirs:
      os.chmod(os.path.join(root, name), 0o777 & ~mask)
    for name in files:
      os.chmod(os.path.join(root, name), 0o666 & ~mask)
  os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def check_output(path: str, *, overwrite: bool, flag: str = '--output') -> None:
  """Refuses, before any work, an output that would replace something.

  An existing file or a directory with files in it is replaced only with
  `overwrite`; a missing path or an empty directory is fine. A local path
  must also be creatable (its nearest existing parent a writable
  directory).

  Args:
    path: The output (file or directory; local or gs://).
    overwrite: The user asked to replace what is there.
    flag: The command line flag that gave `path` (for the message).

  Raises:
    FileExistsError: the output exists (names it and `--overwrite`).
    NotADirectoryError: a parent is a file.
    PermissionError: the parent directory is not writable.
  """
  path = str(path)
  if '://' in path:
    # pylint: disable-next=g-import-not-at-top
    import tensorflow as tf

    exists = tf.io.gfile.exists(path)
    full = exists and (
        not tf.io.gfile.isdir(path) or bool(tf.io.gfile.listdir(path))
    )
  else:
    exists = os.path.lexists(path)
    full = exists and (not os.path.isdir(path) or bool(os.listdir(path)))
  if full and not overwrite:
    what = 'a directory with files' if os.path.isdir(path) else 'a file'
    raise FileExistsError(
        f'{flag}={path} exists ({what}): pass --overwrite to replace it, or '
        'choose another path.'
    )
  if '://' in path or exists:
    return
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(
        f'{flag}={path}: {parent} is a file, not a ' 'directory.'
    )
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(
        f'{flag}={path}: cannot create it, {parent} is ' 'not writable.'
    )


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    import shutil  # pylint: disable=g-import-not-at-top

    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def write_output(path: str, write: Callable[[str], Any]) -> Any:
  """`write(stage)` on a new path beside `path`, then moved to `path`.

  What was at `path` (a file, or a directory and everything in it) is
  replaced only once the new output is complete: an interrupted or failed
  write leaves the old output as it was, and a replaced directory holds
  only the new files afterwards (with the modes `write` gave them; the
  writers here follow the umask). Call `check_output` first: this replaces
  anything.

  Args:
    path: The output (local).
    write: Writes a file or a directory at the path it is given.

  Returns:
    What `write` returns.
  """
  path = os.path.abspath(str(path))
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  stage = os.path.join(parent, f'.{name}.new-{os.getpid()}')
  old = os.path.join(parent, f'.{name}.old-{os.getpid()}')
  _remove(stage)
  try:
    result = write(stage)
    if os.path.isfile(stage) and not os.path.isdir(path):
      os.replace(stage, path)  # Atomic, over a file or nothing.
    else:
      if os.path.lexists(path):
        os.rename(path, old)
      try:
        os.rename(stage, path)
      except OSError:
        if os.path.lexists(old):
          os.rename(old, path)  # The old output back where it was.
        raise
      _remove(old)
  finally:
    _remove(stage)
  return result


# ----------------------------------------------------------------------------
# safetensors files.
# ----------------------------------------------------------------------------


def _safetensors_numpy():
  try:
    # pylint: disable-next=g-import-not-at-top
    import safetensors.numpy
  except ImportError as e:
    raise ImportError(
        'Reading and writing transformers / timm files needs safetensors: '
        "pip install 'vit_jax[interop]' (or pip install safetensors)."
    ) from e
  return safetensors


def _read_safetensors(
    path: str,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of one .safetensors file."""
  safetensors = _safetensors_numpy()
  try:
    with safetensors.safe_open(path, framework='np') as f:
      metadata = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except (OSError, ValueError, TypeError) as e:
    raise ConversionError(
        f'{path} is not a readable safetensors file: '
        f'{type(e).__name__}: {e}'
    ) from e
  except Exception as e:  # pylint: disable=broad-except
    # safetensors raises its own SafetensorError (e.g. a truncated header).
    raise ConversionError(
        f'{path} is not a readable safetensors file: '
        f'{type(e).__name__}: {e}'
    ) from e
  return tensors, metadata


def _write_safetensors(
    tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str]
) -> None:
  """Atomic write: a reader never sees a partial file."""
  safetensors = _safetensors_numpy()
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    safetensors.numpy.save_file(dict(tensors), tmp, metadata=dict(metadata))
    # safetensors creates its files 0600 whatever the umask; the weights
    # are shared like every other file written here.
    follow_umask(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ----------------------------------------------------------------------------
# transformers.
# ----------------------------------------------------------------------------


def _resolve_hub_cache(path: str) -> str:
  """A hub cache repository folder (models--org--name) -> its snapshot."""
  refs = os.path.join(path, 'refs', 'main')
  snapshots = os.path.join(path, 'snapshots')
  if os.path.isdir(snapshots) and not os.path.exists(
      os.path.join(path, TRANSFORMERS_CONFIG)
  ):
    if os.path.exists(refs):
      with open(refs, encoding='utf-8') as f:
        return os.path.join(snapshots, f.read().strip())
    found = sorted(os.listdir(snapshots))
    if len(found) == 1:
      return os.path.join(snapshots, found[0])
    raise ConversionError(
        f'{path} is a hub cache folder with snapshots {found} and no '
        'refs/main: pass one snapshot directory.'
    )
  return path


def read_transformers_config(path: str) -> dict[str, Any]:
  """The `config.json` of a transformers directory (checked to be a ViT)."""
  path = _resolve_hub_cache(str(path))
  file = os.path.join(path, TRANSFORMERS_CONFIG)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'{path} is not a directory (a transformers '
        f'model is a directory with {TRANSFORMERS_CONFIG}'
        f' and {TRANSFORMERS_WEIGHTS}).'
    )
  if not os.path.exists(file):
    raise ConversionError(
        f'{path} has no {TRANSFORMERS_CONFIG}: not a '
        'transformers model directory.'
    )
  with open(file, encoding='utf-8') as f:
    hf = json.load(f)
  model_type = hf.get('model_type')
  if model_type != 'vit':
    raise ConversionError(
        f"{file}: model_type={model_type!r}, not a ViT ('vit'): only "
        "transformers' ViTForImageClassification and ViTModel convert."
    )
  architectures = hf.get('architectures') or []
  other = [a for a in architectures if a not in _ARCHITECTURES]
  if other:
    raise ConversionError(
        f'{file}: architectures {other} are not supported; '
        f'use one of {list(_ARCHITECTURES)}.'
    )
  return hf


def _transformers_weights(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a transformers directory (sharded or not)."""
  index = os.path.join(path, TRANSFORMERS_INDEX)
  single = os.path.join(path, TRANSFORMERS_WEIGHTS)
  if os.path.exists(single):
    return _read_safetensors(single)[0]
  if os.path.exists(index):
    with open(index, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    tensors = {}
    for shard in shards:
      tensors.update(_read_safetensors(os.path.join(path, shard))[0])
    return tensors
  present = sorted(os.listdir(path))
  pickled = [f for f in present if f in _PICKLED_WEIGHTS]
  if pickled:
    raise ConversionError(
        f'{path} holds only {pickled[0]}, a pickle: vit_jax never opens '
        'pickles (torch.load can execute code in the file). Where you trust '
        'the file, convert it to safetensors with transformers, e.g.\n'
        '  python -c "from transformers import ViTForImageClassification '
        f"as M; M.from_pretrained('{path}').save_pretrained('{path}_st', "
        'safe_serialization=True)"\n'
        f'and convert {path}_st.'
    )
  other = [f for f in present if f in _OTHER_WEIGHTS]
  raise ConversionError(
      f'{path} has no {TRANSFORMERS_WEIGHTS} (missing weights; found '
      f'{other or present}). Save the model with '
      'save_pretrained(..., safe_serialization=True).'
  )


def _transformers_spec(
    hf: Mapping[str, Any],
    num_patches: int,
    pooler: bool,
    num_classes: int,
    where: str,
) -> VitSpec:
  """The VitSpec of a transformers ViT config, refusing what has none."""
  act = hf.get('hidden_act', 'gelu')
  unsupported = []
  if act not in _TRANSFORMERS_ACTS:
    unsupported.append(
        f'hidden_act={act!r} (supported: ' f'{sorted(_TRANSFORMERS_ACTS)})'
    )
  if hf.get('qkv_bias', True) is not True:
    unsupported.append('qkv_bias=false')
  if hf.get('num_channels', 3) != 3:
    unsupported.append(f'num_channels={hf.get("num_channels")}')
  hidden = int(hf.get('hidden_size', 768))
  heads = int(hf.get('num_attention_heads', 12))
  if hf.get('head_dim') not in (None, hidden // heads):
    unsupported.append(
        f'head_dim={hf.get("head_dim")} (not hidden_size / '
        'num_attention_heads)'
    )
  if pooler and hf.get('pooler_act', 'tanh') != 'tanh':
    unsupported.append(
        f'pooler_act={hf.get("pooler_act")!r} (the ' 'pre-logits layer is tanh)'
    )
  if unsupported:
    raise ConversionError(
        f'{where}: unsupported option(s): ' + ', '.join(unsupported) + '.'
    )
  patch = hf.get('patch_size', 16)
  patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
  return VitSpec(
      hidden_size=hidden,
      num_layers=int(hf.get('num_hidden_layers', 12)),
      num_heads=heads,
      mlp_dim=int(hf.get('intermediate_size', 3072)),
      patch_size=patch,
      grid=_grid_of(num_patches, patch, hf.get('image_size', 224), where),
      classifier='token',
      num_classes=num_classes,
      representation_size=(
          int(hf.get('pooler_output_size') or hidden) if pooler else None
      ),
      gelu_approximate=_TRANSFORMERS_ACTS[act],
      layer_norm_epsilon=float(hf.get('layer_norm_eps', 1e-12)),
      dropout_rate=float(hf.get('hidden_dropout_prob', 0.0)),
      attention_dropout_rate=float(hf.get('attention_probs_dropout_prob', 0.0)),
  )


def transformers_class_names(path: str) -> tuple[str, ...] | None:
  """The `id2label` names of a transformers directory, in index order."""
  hf = read_transformers_config(path)
  id2label = hf.get('id2label') or {}
  if not id2label:
    return None
  return tuple(
      str(id2label[str(i)] if str(i) in id2label else id2label[i])
      for i in range(len(id2label))
  )


def from_transformers(path: str, **overrides: Any) -> tuple[Any, Params]:
  """A transformers ViT directory as a vit_jax model and parameters.

  Reads `config.json` and `model.safetensors` (or a sharded
  `model.safetensors.index.json`) of `ViTForImageClassification` or
  `ViTModel`; a hub cache snapshot directory (or its `models--org--name`
  folder) works the same. The model's `gelu_approximate` and
  `layer_norm_epsilon` follow `hidden_act` and `layer_norm_eps`, so its
  logits are transformers'. A `ViTModel` with a pooler becomes a model
  without a head whose output is the pooler's (`pre_logits`, tanh); without
  a pooler, the class token's final embedding.

  Args:
    path: The directory.
    **overrides: Other module fields for the model (e.g. `dtype`).

  Returns:
    (model, params): a `VisionTransformer` (the registry's name when its
    size is registered) and the published-layout parameter tree (numpy).

  Raises:
    ConversionError: not a ViT (`model_type`, `architectures`), unsupported
      options (named), missing, unexpected or mis-shaped weights, or only a
      pickled `pytorch_model.bin` (never opened).
  """
  path = _resolve_hub_cache(str(path))
  hf = read_transformers_config(path)
  tensors = _transformers_weights(path)
  prefix = 'vit.' if any(k.startswith('vit.') for k in tensors) else ''
  pooler = 'pooler.dense.weight' in tensors
  num_classes = (
      tensors['classifier.weight'].shape[0]
      if 'classifier.weight' in tensors
      else 0
  )
  posemb = tensors.get(prefix + 'embeddings.position_embeddings')
  if posemb is None:
    raise ConversionError(
        f'{path}: missing weights ' f'[{prefix}embeddings.position_embeddings].'
    )
  spec = _transformers_spec(
      hf,
      posemb.shape[1] - 1,
      pooler,
      num_classes,
      os.path.join(path, TRANSFORMERS_CONFIG),
  )
  # Masked-image-modeling files carry a mask token no classifier uses.
  tensors = {
      k: v for k, v in tensors.items() if k != prefix + 'embeddings.mask_token'
  }
  model = model_from_spec(spec, **overrides)
  return model, _from_torch(
      tensors, _transformers_rules(spec, prefix), model, spec.image_size, path
  )


def transformers_config(
    spec: VitSpec,
    *,
    class_names: Sequence[str] | None = None,
    architecture: str = 'ViTForImageClassification',
) -> dict[str, Any]:
  """The `config.json` of a `VitSpec` for transformers' ViT."""
  image = spec.image_size
  patch = spec.patch_size
  hf = {
      'architectures': [architecture],
      'model_type': 'vit',
      'hidden_size': spec.hidden_size,
      'num_hidden_layers': spec.num_layers,
      'num_attention_heads': spec.num_heads,
      'intermediate_size': spec.mlp_dim,
      'hidden_act': 'gelu_pytorch_tanh' if spec.gelu_approximate else 'gelu',
      'layer_norm_eps': spec.layer_norm_epsilon,
      'hidden_dropout_prob': spec.dropout_rate,
      'attention_probs_dropout_prob': spec.attention_dropout_rate,
      'image_size': image[0] if image[0] == image[1] else list(image),
      'patch_size': patch[0] if patch[0] == patch[1] else list(patch),
      'num_channels': 3,
      'qkv_bias': True,
      'initializer_range': 0.02,
      'encoder_stride': patch[0],
  }
  if spec.representation_size is not None:
    hf.update(pooler_output_size=spec.representation_size, pooler_act='tanh')
  if spec.num_classes:
    names = (
        list(class_names)
        if class_names
        else [f'LABEL_{i}' for i in range(spec.num_classes)]
    )
    if len(names) != spec.num_classes:
      raise ConversionError(
          f'{len(names)} class names for a head of {spec.num_classes} '
          'classes.'
      )
    hf['id2label'] = {str(i): str(n) for i, n in enumerate(names)}
    hf['label2id'] = {str(n): i for i, n in enumerate(names)}
  return hf


def to_transformers(
    model: Any,
    params: Params,
    out_dir: str,
    *,
    class_names: Sequence[str] | None = None,
    image_size: Any = None,
) -> str:
  """Writes `config.json` + `model.safetensors` for transformers.

  A model with a head becomes `ViTForImageClassification` (the same logits
  from `ViTForImageClassification.from_pretrained(out_dir)`); one without a
  head becomes `ViTModel`, with its pooler when the model has a
  representation layer (`pre_logits`: the pooler is a tanh Dense on the
  class token). Supported: class-token ViTs with learned position
  embeddings; either GELU and any LayerNorm epsilon (written as
  `hidden_act` and `layer_norm_eps`).

  Args:
    model: A `VisionTransformer`.
    params: Its parameters (scanned or not; host or device arrays).
    out_dir: Output directory (created).
    class_names: `id2label` names, one per class (default LABEL_i).
    image_size: (height, width) when the patch grid is not square.

  Returns:
    `out_dir`.

  Raises:
    ConversionError: an option transformers' ViT lacks (named): another
      classifier than 'token' (transformers' ViT classifies the class
      token), a representation layer under a head
      (`ViTForImageClassification` has none), a hybrid, other position
      embeddings, registers; or parameters that do not fit the model.
  """
  spec = spec_from_model(model, params, image_size=image_size)
  if spec.classifier != 'token':
    raise ConversionError(
        f"classifier={spec.classifier!r}: transformers' ViT classifies the "
        "class token ('token') only; use to_timm for 'gap' and 'map'."
    )
  if spec.representation_size is not None and spec.num_classes:
    raise ConversionError(
        f'representation_size={spec.representation_size} with a head: '
        "transformers' ViTForImageClassification has no pre-logits layer "
        "(its classifier reads the class token directly; ViTModel's tanh "
        'pooler is not used by it). Fine-tune without representation_size, '
        'or convert the model without its head (num_classes=0: ViTModel '
        'with the pooler).'
    )
  flat = _flat_params(params)
  architecture = 'ViTForImageClassification' if spec.num_classes else 'ViTModel'
  prefix = 'vit.' if spec.num_classes else ''
  tensors = _to_torch(flat, _transformers_rules(spec, prefix))
  hf = transformers_config(
      spec, class_names=class_names, architecture=architecture
  )
  # fileio imports TensorFlow (seconds): only when writing.
  from vit_jax import fileio  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  _write_safetensors(
      tensors, os.path.join(out_dir, TRANSFORMERS_WEIGHTS), {'format': 'pt'}
  )
  fileio.write_text_atomic(
      os.path.join(out_dir, TRANSFORMERS_CONFIG),
      json.dumps(hf, indent=2, sort_keys=True) + '\n',
  )
  return out_dir


# ----------------------------------------------------------------------------
# timm.
# ----------------------------------------------------------------------------


def timm_kwargs(spec: VitSpec) -> dict[str, Any]:
  """timm `VisionTransformer(**kwargs)` arguments of a `VitSpec`.

  `layer_norm_eps` is not a timm argument: pass
  `norm_layer=functools.partial(timm.layers.LayerNorm, eps=...)` (as
  `create_timm_model` does).
  """
  ratio = spec.mlp_dim / spec.hidden_size
  if int(spec.hidden_size * ratio) != spec.mlp_dim:
    raise ConversionError(
        f'mlp_dim={spec.mlp_dim} is not int(hidden_size * mlp_ratio) for '
        "any float mlp_ratio: timm's Block cannot have it."
    )
  image = spec.image_size
  return {
      'img_size': image[0] if image[0] == image[1] else list(image),
      'patch_size': (
          spec.patch_size[0]
          if spec.patch_size[0] == spec.patch_size[1]
          else list(spec.patch_size)
      ),
      'embed_dim': spec.hidden_size,
      'depth': spec.num_layers,
      'num_heads': spec.num_heads,
      'mlp_ratio': ratio,
      'num_classes': spec.num_classes,
      'global_pool': {'token': 'token', 'gap': 'avg', 'map': 'map'}[
          spec.classifier
      ],
      'class_token': spec.classifier == 'token',
      # The LayerNorm before pooling, as here (timm's default for 'avg'
      # would normalise after pooling instead).
      'fc_norm': False,
      'act_layer': 'gelu_tanh' if spec.gelu_approximate else 'gelu',
      'layer_norm_eps': spec.layer_norm_epsilon,
  }


def to_timm(
    model: Any, params: Params, path: str, *, image_size: Any = None
) -> dict[str, Any]:
  """Writes a timm `vision_transformer` state dict as `.safetensors`.

  timm's `VisionTransformer(**kwargs).load_state_dict(state, strict=True)`
  accepts it, with the returned kwargs (also stored in the file's metadata
  under `TIMM_METADATA_KEY`; `create_timm_model(path)` does all of it).
  Supported classifiers: 'token', 'gap' (timm 'avg' with `fc_norm=False`)
  and 'map' (timm's `AttentionPoolLatent`).

  Args:
    model: A `VisionTransformer`.
    params: Its parameters.
    path: Output `.safetensors` file.
    image_size: (height, width) when the patch grid is not square.

  Returns:
    The timm constructor arguments (plus `layer_norm_eps`).

  Raises:
    ConversionError: options timm's ViT lacks (a representation layer,
      hybrids, other position embeddings, registers), naming them.
  """
  spec = spec_from_model(model, params, image_size=image_size)
  if spec.representation_size is not None:
    raise ConversionError(
        f"representation_size={spec.representation_size}: timm's "
        'VisionTransformer has no pre-logits layer.'
    )
  kwargs = timm_kwargs(spec)
  tensors = _to_torch(_flat_params(params), _timm_rules(spec))
  _write_safetensors(
      tensors, path, {'format': 'pt', TIMM_METADATA_KEY: json.dumps(kwargs)}
  )
  return kwargs


def from_timm(
    path: str,
    *,
    num_heads: int | None = None,
    gelu_approximate: bool | None = None,
    layer_norm_epsilon: float | None = None,
    image_size: Any = None,
    **overrides: Any,
) -> tuple[Any, Params]:
  """A timm ViT `.safetensors` state dict as a vit_jax model and params.

  Files written by `to_timm` carry their constructor arguments; for other
  timm ViT files, pass `num_heads` (the one thing the shapes do not say);
  the GELU kind and epsilon default to timm's (exact GELU, 1e-6).

  Raises:
    ConversionError: missing, unexpected or mis-shaped weights, or timm
      options vit_jax's ViT lacks (e.g. `fc_norm`, registers).
  """
  tensors, metadata = _read_safetensors(str(path))
  kwargs = (
      json.loads(metadata[TIMM_METADATA_KEY])
      if (TIMM_METADATA_KEY in metadata)
      else {}
  )
  if 'patch_embed.proj.weight' not in tensors or 'pos_embed' not in tensors:
    raise ConversionError(
        f'{path}: not a timm VisionTransformer state dict (missing weights '
        '[patch_embed.proj.weight, pos_embed]).'
    )
  unsupported = sorted(
      {k.split('.')[0] for k in tensors}
      & {'fc_norm', 'reg_token', 'norm_pre', 'dist_token'}
  )
  if unsupported:
    raise ConversionError(
        f'{path}: unsupported timm option(s) with weights ' f'{unsupported}.'
    )
  heads = num_heads or kwargs.get('num_heads')
  if not heads:
    raise ConversionError(
        f'{path} was not written by vit_jax (no {TIMM_METADATA_KEY} '
        'metadata): pass num_heads (the shapes do not say it).'
    )
  d, _, ph, pw = tensors['patch_embed.proj.weight'].shape
  depth = 0
  while f'blocks.{depth}.norm1.weight' in tensors:
    depth += 1
  classifier = _classifier(
      'attn_pool.latent' in tensors, 'cls_token' in tensors
  )
  prefix_tokens = 1 if classifier == 'token' else 0
  if gelu_approximate is None:
    act = kwargs.get('act_layer', 'gelu')
    if act not in _TIMM_ACTS:
      raise ConversionError(
          f'{path}: act_layer={act!r} is not supported '
          f'(supported: {sorted(_TIMM_ACTS)}).'
      )
    gelu_approximate = _TIMM_ACTS[act]
  if layer_norm_epsilon is None:
    layer_norm_epsilon = kwargs.get('layer_norm_eps', 1e-6)
  mlp = tensors.get('blocks.0.mlp.fc1.weight')
  spec = VitSpec(
      hidden_size=int(d),
      num_layers=depth,
      num_heads=int(heads),
      mlp_dim=int(mlp.shape[0]) if mlp is not None else 0,
      patch_size=(int(ph), int(pw)),
      grid=_grid_of(
          tensors['pos_embed'].shape[1] - prefix_tokens,
          (ph, pw),
          image_size or kwargs.get('img_size'),
          path,
      ),
      classifier=classifier,
      num_classes=(
          int(tensors['head.weight'].shape[0])
          if 'head.weight' in tensors
          else 0
      ),
      gelu_approximate=bool(gelu_approximate),
      layer_norm_epsilon=float(layer_norm_epsilon),
  )
  model = model_from_spec(spec, **overrides)
  return model, _from_torch(
      tensors, _timm_rules(spec), model, spec.image_size, str(path)
  )


def create_timm_model(path: str) -> Any:
  """The timm model of a `to_timm` file, with its weights (strict load).

  Imports torch and timm (not needed anywhere else in vit_jax).
  """
  # pylint: disable=g-import-not-at-top
  import functools

  import timm.layers
  from timm.models import vision_transformer
  import torch
  # pylint: enable=g-import-not-at-top
  tensors, metadata = _read_safetensors(str(path))
  if TIMM_METADATA_KEY not in metadata:
    raise ConversionError(
        f'{path} has no {TIMM_METADATA_KEY} metadata: '
        'not written by vit_jax.convert.to_timm.'
    )
  kwargs = json.loads(metadata[TIMM_METADATA_KEY])
  eps = kwargs.pop('layer_norm_eps')
  model = vision_transformer.VisionTransformer(
      **kwargs, norm_layer=functools.partial(timm.layers.LayerNorm, eps=eps)
  )
  model.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
      strict=True,
  )
  return model.eval()
