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
whether SwiGLU's two input projections are one packed Linear; `EVA_STORAGE`
says them per registry model. `vit_jax.timm_interop` reads and writes the
files (`LAYOUT_RULES['eva']` is `eva_rules`).
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

from vit_jax import interop
from vit_jax.models import vit as vit_lib


class EvaStorage(NamedTuple):
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


# Registry model -> the storage choices of its timm models (the `_qkvb`
# variants of a DINOv3 store the same way); a name not listed: the defaults.
EVA_STORAGE: Mapping[str, EvaStorage] = {
    'EVA02-S_14': EvaStorage(swiglu_packed=True),
    'EVA02-B_14': EvaStorage(qkv_fused=False),
    'EVA02-L_14': EvaStorage(qkv_fused=False),
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
        _Rule(
            theirs + 'fc1.weight',
            _LINEAR,
            (ours + 'Dense_0/kernel', ours + 'Dense_2/kernel'),
        ),
        _Rule(
            theirs + 'fc1.bias',
            _SAME,
            (ours + 'Dense_0/bias', ours + 'Dense_2/bias'),
        ),
    ]
  else:
    rules += _linear(theirs + 'fc1_g', ours + 'Dense_0')
    rules += _linear(theirs + 'fc1_x', ours + 'Dense_2')
  if norm:
    rules += _norm(theirs + 'norm', ours + 'LayerNorm_0')
  return rules


def eva_rules(model: vit_lib.VisionTransformer, num_layers: int) -> list[Any]:
  """The tensors of `model` in the layout of timm's Eva.

  Args:
    model: A registry `VisionTransformer` (`model_name` says its
      `EVA_STORAGE`) with the options of a `vit_jax.timm_models` entry of
      layout 'eva', at any depth, width and head count.
    num_layers: Its encoder blocks.

  Returns:
    `interop` rules: each timm tensor and the parameters it holds.
  """
  storage = EVA_STORAGE.get(model.model_name or '', EvaStorage())
  rules = [_Rule('patch_embed.proj.weight', _CONV, ('embedding/kernel',))]
  if not model.pre_norm:  # timm drops the patch bias before norm_pre.
    rules.append(_Rule('patch_embed.proj.bias', _SAME, ('embedding/bias',)))
  if model.has_class_token:
    rules.append(_Rule('cls_token', _SAME, ('cls',)))
  if model.num_registers:
    rules.append(_Rule('reg_token', _SAME, ('registers',)))
  if model.posemb == 'learn':
    rules.append(_Rule('pos_embed', _SAME, (interop.POSEMB_PATH,)))
  if model.pre_norm:
    rules += _norm('norm_pre', 'Transformer/pre_norm')
  for i in range(num_layers):
    b, block = f'blocks.{i}.', _BLOCK.format(i=i)
    rules += _norm(b + 'norm1', block + 'LayerNorm_0')
    rules += _attention_rules(
        b + 'attn.',
        _ATTENTION.format(i=i),
        model.qkv_bias,
        storage.qkv_fused,
    )
    rules += _norm(b + 'norm2', block + 'LayerNorm_1')
    rules += _mlp_rules(
        b + 'mlp.',
        block + 'MlpBlock_0/',
        model.mlp,
        model.mlp_norm,
        storage.swiglu_packed,
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
    rules += interop._attn_pool_rules()  # pylint: disable=protected-access
  if model.num_classes:
    rules += _linear('head', 'head')
  return rules


__all__ = ['EVA_STORAGE', 'EvaStorage', 'eva_rules']
