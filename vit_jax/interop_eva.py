"""timm's Eva layout (`timm/models/eva.py`): EVA-02, DINOv3, Perception Encoder.

The tensor rules between a timm `Eva` state dict and this library's
parameter tree, read both ways (transposes, reshapes and concatenations
only, so a round trip gives back the same bits):

  cls_token, reg_token, pos_embed      cls, registers, posembed_input
  patch_embed.proj                     embedding (no bias after norm_pre)
  norm_pre                             Transformer/pre_norm
  blocks.{i}.norm1, norm2              LayerNorm_0, LayerNorm_1
  blocks.{i}.attn.qkv (or q_proj, k_proj, v_proj), q_bias, v_bias
                                       query, key, value (EVA's key has no
                                       bias: qkv_bias='qv')
  blocks.{i}.attn.proj                 out
  blocks.{i}.gamma_1, gamma_2          LayerScale_0/scale, LayerScale_1/scale
  blocks.{i}.mlp.fc1, fc2              MlpBlock_0/Dense_0, Dense_1 (GELU);
                                       SwiGLU: fc1 stacks Dense_0 (the SiLU
                                       gate) over Dense_2, or fc1_g / fc1_x
                                       and mlp.norm (MlpBlock_0/LayerNorm_0)
  norm, fc_norm                        Transformer/encoder_norm, fc_norm
  attn_pool.*                          MAPHead_0 (latent = probe)
  head                                 head

The RoPE tables of timm's Eva are buffers, not parameters, and are not in
its state dicts. Two storage choices of timm's models are not visible in
this library's options: whether q, k and v are one Linear (`qkv_fused`) and
whether SwiGLU's two input projections are one packed Linear; `EVA_TENSORS`
says them per timm model name.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from vit_jax import interop
from vit_jax import timm_models
import vit_jax.models
from vit_jax.models import vit as vit_lib

Params = Any


class EvaTensors(NamedTuple):
  """How one timm Eva model stores what this library's options do not say.

  Attributes:
    qkv_fused: q, k and v as one Linear `attn.qkv` (timm's default); False:
      `attn.q_proj`, `attn.k_proj`, `attn.v_proj` (EVA-02 B and L).
    swiglu_packed: SwiGLU's gate and value projections packed in one Linear
      `mlp.fc1` (gate rows first; timm's `GluMlp`, used when the MLP has
      no norm and no width alignment: EVA-02 S); False: `mlp.fc1_g` and
      `mlp.fc1_x` (timm's `SwiGLU`).
  """

  qkv_fused: bool = True
  swiglu_packed: bool = False


# timm model name -> its storage choices; a name not listed has the defaults.
EVA_TENSORS: Mapping[str, EvaTensors] = {
    'eva02_small_patch14_224': EvaTensors(swiglu_packed=True),
    'eva02_base_patch14_224': EvaTensors(qkv_fused=False),
    'eva02_large_patch14_224': EvaTensors(qkv_fused=False),
}

_Rule = interop._Rule  # pylint: disable=protected-access
_SAME = interop._SAME  # pylint: disable=protected-access
_LINEAR = interop._LINEAR  # pylint: disable=protected-access
_CONV = interop._CONV  # pylint: disable=protected-access
_HEADS_IN = interop._HEADS_IN  # pylint: disable=protected-access
_HEADS_OUT = interop._HEADS_OUT  # pylint: disable=protected-access
_HEADS_BIAS = interop._HEADS_BIAS  # pylint: disable=protected-access
_linear = interop._linear  # pylint: disable=protected-access
_norm = interop._norm  # pylint: disable=protected-access
_projection = interop._projection  # pylint: disable=protected-access

_BLOCK = 'Transformer/encoderblock_{i}/'
_ATTENTION = _BLOCK + 'MultiHeadDotProductAttention_0/'
_MAP = 'MAPHead_0/'
_QKV = ('query', 'key', 'value')


def _attention_rules(
    theirs: str, ours: str, qkv_bias: bool | str, fused: bool
) -> list[Any]:
  """q, k, v and the output projection of one Eva attention layer.

  EVA's attention (`EvaAttention`) keeps the query and value biases of a
  fused qkv as `q_bias` / `v_bias` (the key's is a zero buffer);
  Perception Encoder's (`AttentionRope`) has all three in `qkv.bias`.
  """
  rules = []
  biased = {'query': bool(qkv_bias), 'key': qkv_bias is True}
  biased['value'] = biased['query']
  if fused:
    rules.append(
        _Rule(
            theirs + 'qkv.weight',
            _HEADS_IN,
            tuple(f'{ours}{n}/kernel' for n in _QKV),
        )
    )
    if qkv_bias is True:
      rules.append(_projection(theirs + 'qkv', ours, _QKV)[1])
    elif qkv_bias:
      rules += [
          _Rule(f'{theirs}{n[0]}_bias', _HEADS_BIAS, (f'{ours}{n}/bias',))
          for n in ('query', 'value')
      ]
  else:
    for n in _QKV:
      proj = f'{theirs}{n[0]}_proj.'
      rules.append(_Rule(proj + 'weight', _HEADS_IN, (f'{ours}{n}/kernel',)))
      if biased[n]:
        rules.append(_Rule(proj + 'bias', _HEADS_BIAS, (f'{ours}{n}/bias',)))
  return rules + _linear(theirs + 'proj', ours + 'out', _HEADS_OUT)


def _mlp_rules(
    theirs: str, ours: str, kind: str, norm: bool, packed: bool
) -> list[Any]:
  """One Eva MLP: GELU (`Mlp`), packed (`GluMlp`) or split (`SwiGLU`)."""
  rules = _linear(theirs + 'fc2', ours + 'Dense_1')
  if kind == 'gelu':
    rules += _linear(theirs + 'fc1', ours + 'Dense_0')
  elif packed:  # GluMlp: SiLU(first half) * second half.
    rules += [
        _Rule(theirs + 'fc1.weight', _LINEAR, (ours + 'Dense_0/kernel',
                                                ours + 'Dense_2/kernel')),
        _Rule(theirs + 'fc1.bias', _SAME, (ours + 'Dense_0/bias',
                                           ours + 'Dense_2/bias')),
    ]
  else:
    rules += _linear(theirs + 'fc1_g', ours + 'Dense_0')
    rules += _linear(theirs + 'fc1_x', ours + 'Dense_2')
  if norm:
    rules += _norm(theirs + 'norm', ours + 'LayerNorm_0')
  return rules


def eva_rules(model: vit_lib.VisionTransformer, timm_model: str) -> list[Any]:
  """The tensor rules of `model` in the layout of timm's Eva `timm_model`.

  Args:
    model: A `VisionTransformer` with the options of a `vit_jax.timm_models`
      entry of layout 'eva' (any depth, width and head count).
    timm_model: The timm model name (its `EVA_TENSORS` storage choices).

  Returns:
    `interop` rules: each timm tensor and the parameters it holds.
  """
  tensors = EVA_TENSORS.get(timm_model, EvaTensors())
  layers = vit_lib.config_value(model.transformer, 'num_layers')
  pooled_token = model.classifier in ('token', 'token_unpooled')
  rules = [_Rule('patch_embed.proj.weight', _CONV, ('embedding/kernel',))]
  if not model.pre_norm:  # timm drops the patch bias before norm_pre.
    rules.append(_Rule('patch_embed.proj.bias', _SAME, ('embedding/bias',)))
  if model.class_token or (model.class_token is None and pooled_token):
    rules.append(_Rule('cls_token', _SAME, ('cls',)))
  if model.num_registers:
    rules.append(_Rule('reg_token', _SAME, ('registers',)))
  if model.posemb == 'learn':
    rules.append(_Rule('pos_embed', _SAME, (interop.POSEMB_PATH,)))
  if model.pre_norm:
    rules += _norm('norm_pre', 'Transformer/pre_norm')
  for i in range(layers):
    b, block = f'blocks.{i}.', _BLOCK.format(i=i)
    rules += _norm(b + 'norm1', block + 'LayerNorm_0')
    rules += _attention_rules(
        b + 'attn.',
        _ATTENTION.format(i=i),
        model.qkv_bias,
        tensors.qkv_fused,
    )
    rules += _norm(b + 'norm2', block + 'LayerNorm_1')
    rules += _mlp_rules(
        b + 'mlp.',
        block + 'MlpBlock_0/',
        model.mlp,
        model.mlp_norm,
        tensors.swiglu_packed,
    )
    if model.layer_scale is not None:
      rules += [
          _Rule(f'{b}gamma_{k + 1}', _SAME, (f'{block}LayerScale_{k}/scale',))
          for k in (0, 1)
      ]
  if model.fc_norm:
    rules += _norm('fc_norm', 'fc_norm')
  else:
    rules += _norm('norm', 'Transformer/encoder_norm')
  if model.classifier == 'map':
    attention = _MAP + 'MultiHeadDotProductAttention_0/'
    rules.append(_Rule('attn_pool.latent', _SAME, (_MAP + 'probe',)))
    rules += _projection('attn_pool.q', attention, ('query',))
    rules += _projection('attn_pool.kv', attention, ('key', 'value'))
    rules += _linear('attn_pool.proj', attention + 'out', _HEADS_OUT)
    rules += _norm('attn_pool.norm', _MAP + 'LayerNorm_0')
    rules += _mlp_rules(
        'attn_pool.mlp.', _MAP + 'MlpBlock_0/', 'gelu', False, False
    )
  if model.num_classes:
    rules += _linear('head', 'head')
  return rules


def _mlp_dim(tensors: Mapping[str, Any], packed: bool) -> int:
  """Each MLP branch's width, from block 0's first MLP weight."""
  for key, branches in (
      ('blocks.0.mlp.fc1_g.weight', 1),
      ('blocks.0.mlp.fc1.weight', 2 if packed else 1),
  ):
    if key in tensors:
      return int(tensors[key].shape[0]) // branches
  raise interop.ConversionError(
      'not a timm Eva state dict: no blocks.0.mlp.fc1.weight or '
      'blocks.0.mlp.fc1_g.weight.'
  )


def eva_model(
    tensors: Mapping[str, Any],
    timm_model: str,
    *,
    where: str = 'the state dict',
    **overrides: Any,
) -> tuple[Any, tuple[int, int]]:
  """The model of a timm Eva state dict, and the image size it was made for.

  The registry entry and options of `vit_jax.timm_models.TIMM_MODELS
  [timm_model]`, at the state dict's width, depth, MLP width, head count
  (width // the entry's `head_dim`) and head size; the image size is the
  position embeddings' square grid (the entry's preprocessing size for
  models without them).

  Args:
    tensors: timm's state dict (names -> arrays; only shapes are read).
    timm_model: A timm model name of layout 'eva' in `TIMM_MODELS`.
    where: The file, for error messages.
    **overrides: More `get_model` overrides (e.g. `dtype`).

  Returns:
    (model, (height, width)).

  Raises:
    ConversionError: a name that is not an Eva model of `TIMM_MODELS`, or
      a state dict without the tensors that size the model.
  """
  entry = timm_models.TIMM_MODELS.get(timm_model)
  if entry is None or entry.layout != 'eva':
    eva_names = sorted(
        k for k, v in timm_models.TIMM_MODELS.items() if v.layout == 'eva'
    )
    raise interop.ConversionError(
        f'timm_model={timm_model!r} is not a timm Eva model this library '
        f'knows; use one of {eva_names}.'
    )
  if 'patch_embed.proj.weight' not in tensors:
    raise interop.ConversionError(
        f'{where}: not a timm Eva state dict (no patch_embed.proj.weight).'
    )
  storage = EVA_TENSORS.get(timm_model, EvaTensors())
  width, _, ph, pw = tensors['patch_embed.proj.weight'].shape
  depth = 0
  while f'blocks.{depth}.norm1.weight' in tensors:
    depth += 1
  config = vit_jax.models.get_config(entry.registry, **entry.options)
  fields: dict[str, Any] = {
      'hidden_size': int(width),
      'patches': {'size': (int(ph), int(pw))},
      'transformer': {
          'num_layers': depth,
          'num_heads': int(width) // entry.head_dim,
          'mlp_dim': _mlp_dim(tensors, storage.swiglu_packed),
      },
      'num_classes': (
          int(tensors['head.weight'].shape[0]) if 'head.weight' in tensors
          else 0
      ),
  }
  if config.get('classifier') == 'map' and 'attn_pool.mlp.fc1.weight' in (
      tensors
  ):
    fields['map_mlp_dim'] = int(tensors['attn_pool.mlp.fc1.weight'].shape[0])
  if 'pos_embed' in tensors:
    prefix = 1 if 'cls_token' in tensors else 0
    rows, cols = interop.square_grid(
        int(tensors['pos_embed'].shape[1]) - prefix, where
    )
    image_size = (rows * int(ph), cols * int(pw))
  else:
    size = entry.preprocessing['image_size']
    image_size = (size, size)
  model = vit_jax.models.get_model(
      entry.registry,
      **{**entry.options, **fields, **overrides},
  )
  return model, image_size


def from_eva(
    tensors: Mapping[str, Any],
    timm_model: str,
    *,
    where: str = 'the state dict',
    **overrides: Any,
) -> tuple[Any, Params]:
  """A timm Eva state dict as this library's model and parameters.

  Args:
    tensors: timm's state dict (names -> numpy arrays).
    timm_model: Its timm model name (see `eva_model`).
    where: The file, for error messages.
    **overrides: More `get_model` overrides.

  Returns:
    (model, params).

  Raises:
    ConversionError: missing, unexpected or mis-shaped tensors, named.
  """
  model, image_size = eva_model(
      tensors, timm_model, where=where, **overrides
  )
  rules = eva_rules(model, timm_model)
  params = interop._from_torch(  # pylint: disable=protected-access
      tensors, rules, model, image_size, where
  )
  return model, params


def to_eva(
    model: Any, params: Params, timm_model: str
) -> dict[str, np.ndarray]:
  """`params` of `model` as the state dict of timm's Eva `timm_model`.

  timm's `timm.create_model(timm_model, num_classes=..., <the model's
  width, depth and head count>)` loads it with `strict=True`.
  """
  flat = interop._flat_params(params)  # pylint: disable=protected-access
  return interop._to_torch(  # pylint: disable=protected-access
      flat, eva_rules(model, timm_model)
  )


__all__ = [
    'EVA_TENSORS',
    'EvaTensors',
    'eva_model',
    'eva_rules',
    'from_eva',
    'to_eva',
]
