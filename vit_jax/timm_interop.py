"""timm `.safetensors` files of the models `vit_jax.timm_models` lists.

`load_timm(path, timm_model)` reads the state dict of a timm model named in
`TIMM_MODELS` (e.g. 'vit_small_patch14_reg4_dinov2') into the registry model
of the same architecture; `to_timm(model, params, path, timm_model=NAME)`
writes one that `timm.create_model(NAME, pretrained=False)` (of the same
depth and width) strict-loads. Both read one table of tensor rules per state
dict layout (`LAYOUT_RULES`), built from the model's options, so a round
trip gives back the same bits. Plain ViTs without a timm model name go
through `vit_jax.interop.to_timm` / `from_timm` as before.

Only safetensors files are read or written (a pickled `.bin` / `.pth` is
never opened); no torch or timm is needed.
"""

from collections.abc import Callable, Mapping
import difflib
from typing import Any

import jax
import jax.numpy as jnp

from vit_jax import checkpoint
from vit_jax import interop
from vit_jax import interop_eva
from vit_jax import timm_models
import vit_jax.models
from vit_jax.models import vit as vit_lib

Params = interop.Params
_Rule = interop._Rule  # pylint: disable=protected-access
_SAME = interop._SAME  # pylint: disable=protected-access
_LINEAR = interop._LINEAR  # pylint: disable=protected-access
_CONV = interop._CONV  # pylint: disable=protected-access
_HEADS_IN = interop._HEADS_IN  # pylint: disable=protected-access
_HEADS_OUT = interop._HEADS_OUT  # pylint: disable=protected-access
_HEADS_BIAS = interop._HEADS_BIAS  # pylint: disable=protected-access

# What `to_timm` stores in the file's metadata: the timm model's name.
TIMM_MODEL_METADATA_KEY = 'vit_jax.timm_model'
# Registry models whose timm model packs SwiGLU's two input projections in
# one `mlp.fc1` (timm's `SwiGLUPacked`: SiLU branch first, then the branch
# it multiplies); the others keep them apart (`SwiGLU`'s `fc1_g`, `fc1_x`).
_PACKED_SWIGLU = frozenset(
    {
        'DINOv2-g_14',
        *(
            name
            for name, storage in interop_eva.EVA_STORAGE.items()
            if storage.swiglu_packed
        ),
    }
)

Rules = Callable[[vit_lib.VisionTransformer, int], list[_Rule]]


def _norm(theirs: str, ours: str, kind: str) -> list[_Rule]:
  """A LayerNorm (weight, bias) or an RMSNorm (weight only)."""
  rules = [_Rule(theirs + '.weight', _SAME, (ours + '/scale',))]
  if kind == 'layernorm':
    rules.append(_Rule(theirs + '.bias', _SAME, (ours + '/bias',)))
  return rules


def _linear(
    theirs: str, ours: tuple[str, ...], kernel: Any, bias: Any = _SAME
) -> list[_Rule]:
  """A Linear of one or more of our layers (concatenated); `bias`: None for
  none."""
  rules = [
      _Rule(theirs + '.weight', kernel, tuple(o + '/kernel' for o in ours))
  ]
  if bias is not None:
    rules.append(
        _Rule(theirs + '.bias', bias, tuple(o + '/bias' for o in ours))
    )
  return rules


def _has_class_token(model: Any) -> bool:
  if model.class_token is None:
    return model.classifier in ('token', 'token_unpooled')
  return bool(model.class_token)


def vision_transformer_rules(
    model: vit_lib.VisionTransformer, num_layers: int
) -> list[_Rule]:
  """timm's `vision_transformer.VisionTransformer` tensors of `model`.

  Read from the model's options: LayerScale (`ls1.gamma`, `ls2.gamma`),
  QK-norm (`attn.q_norm`, `attn.k_norm`), the MLP (GELU `fc1`/`fc2`, SwiGLU
  packed `fc1` or `fc1_g`/`fc1_x`), RMSNorm (weights only), biases, class
  token, registers (`reg_token`), `norm_pre`, `patch_embed.norm`, `fc_norm`
  and the MAP head (`attn_pool`).

  Args:
    model: A `VisionTransformer`.
    num_layers: Its encoder blocks.

  Returns:
    The rules, one per timm tensor.
  """
  options = model.block_options
  kind = options.norm
  mlp_bias = _SAME if options.mlp_bias else None
  rules = [
      *_linear('patch_embed.proj', ('embedding',), _CONV),
      _Rule('pos_embed', _SAME, (interop.POSEMB_PATH,)),
  ]
  if _has_class_token(model):
    rules.append(_Rule('cls_token', _SAME, ('cls',)))
  if model.num_registers:
    rules.append(_Rule('reg_token', _SAME, ('registers',)))
  if model.embed_norm:
    rules += _norm('patch_embed.norm', 'embedding_norm', kind)
  if model.pre_norm:
    rules += _norm('norm_pre', 'Transformer/pre_norm', kind)

  def mlp(theirs: str, ours: str, swiglu: bool) -> list[_Rule]:
    if not swiglu:
      return [
          *_linear(theirs + 'fc1', (ours + 'Dense_0',), _LINEAR, mlp_bias),
          *_linear(theirs + 'fc2', (ours + 'Dense_1',), _LINEAR, mlp_bias),
      ]
    if model.model_name in _PACKED_SWIGLU:
      first = _linear(
          theirs + 'fc1',
          (ours + 'Dense_0', ours + 'Dense_2'),
          _LINEAR,
          mlp_bias,
      )
    else:
      first = [
          *_linear(theirs + 'fc1_g', (ours + 'Dense_0',), _LINEAR, mlp_bias),
          *_linear(theirs + 'fc1_x', (ours + 'Dense_2',), _LINEAR, mlp_bias),
      ]
    return first + _linear(
        theirs + 'fc2', (ours + 'Dense_1',), _LINEAR, mlp_bias
    )

  for i in range(num_layers):
    block, b = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
    attention = block + 'MultiHeadDotProductAttention_0/'
    rules += _norm(b + 'norm1', block + 'LayerNorm_0', kind)
    rules += _linear(
        b + 'attn.qkv',
        tuple(attention + n for n in ('query', 'key', 'value')),
        _HEADS_IN,
        _HEADS_BIAS if options.qkv_bias else None,
    )
    if options.qk_norm:
      rules += _norm(b + 'attn.q_norm', attention + 'query_norm', kind)
      rules += _norm(b + 'attn.k_norm', attention + 'key_norm', kind)
    rules += _linear(
        b + 'attn.proj',
        (attention + 'out',),
        _HEADS_OUT,
        _SAME if options.proj_bias else None,
    )
    rules += _norm(b + 'norm2', block + 'LayerNorm_1', kind)
    rules += mlp(b + 'mlp.', block + 'MlpBlock_0/', options.mlp == 'swiglu')
    if options.mlp_norm:
      rules += _norm(b + 'mlp.norm', block + 'MlpBlock_0/LayerNorm_0', kind)
    if options.layer_scale is not None:
      rules.append(
          _Rule(b + 'ls1.gamma', _SAME, (block + 'LayerScale_0/scale',))
      )
      rules.append(
          _Rule(b + 'ls2.gamma', _SAME, (block + 'LayerScale_1/scale',))
      )
  if model.fc_norm:
    rules += _norm('fc_norm', 'fc_norm', kind)
  else:
    rules += _norm('norm', 'Transformer/encoder_norm', kind)
  if model.classifier == 'map':
    pool, ours = 'attn_pool.', 'MAPHead_0/'
    attention = ours + 'MultiHeadDotProductAttention_0/'
    rules.append(_Rule(pool + 'latent', _SAME, (ours + 'probe',)))
    rules += _linear(pool + 'q', (attention + 'query',), _HEADS_IN, _HEADS_BIAS)
    rules += _linear(
        pool + 'kv',
        (attention + 'key', attention + 'value'),
        _HEADS_IN,
        _HEADS_BIAS,
    )
    rules += _linear(pool + 'proj', (attention + 'out',), _HEADS_OUT)
    rules += _norm(pool + 'norm', ours + 'LayerNorm_0', kind)
    rules += _linear(pool + 'mlp.fc1', (ours + 'MlpBlock_0/Dense_0',), _LINEAR)
    rules += _linear(pool + 'mlp.fc2', (ours + 'MlpBlock_0/Dense_1',), _LINEAR)
  if model.num_classes:
    rules += _linear('head', ('head',), _LINEAR)
  return rules


# The tensor rules of each state dict layout (`TimmModel.layout`): one
# function (model, num_layers) -> rules per layout.
LAYOUT_RULES: dict[str, Rules] = {
    'vision_transformer': vision_transformer_rules,
    'eva': interop_eva.eva_rules,
}


def timm_model_entry(timm_model: str) -> timm_models.TimmModel:
  """The `TIMM_MODELS` entry of a timm model name.

  Raises:
    ConversionError: an unknown name, with the closest known ones.
  """
  entry = timm_models.TIMM_MODELS.get(timm_model)
  if entry is None:
    names = list(timm_models.TIMM_MODELS)
    # Spelled alike, else containing what was given (e.g. 'dinov2').
    close = (
        difflib.get_close_matches(timm_model, names, n=5, cutoff=0.5)
        or [n for n in names if timm_model.lower() in n][:5]
    )
    hint = (
        f'close matches: {", ".join(close)}'
        if close
        else 'see vit_jax.convert.TIMM_MODELS for the names'
    )
    raise interop.ConversionError(
        f'timm_model={timm_model!r} is not a timm model vit_jax reads '
        f'({hint}).'
    )
  return entry


def _model_rules(model: Any, num_layers: int, layout: str) -> list[_Rule]:
  return LAYOUT_RULES[layout](model, num_layers)


def _check_rules_cover(
    model: Any, rules: list[_Rule], image_size: tuple[int, int], where: str
) -> None:
  """Every parameter of `model` has exactly one rule (else a tensor would be
  left out, or written twice)."""
  abstract = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, *image_size, 3)), train=False
      )
  )['params']
  have = set(checkpoint.flatten(abstract))
  covered = [key for rule in rules for key in rule.ours]
  left = sorted(have - set(covered))
  extra = sorted(set(covered) - have)
  if left or extra or len(covered) != len(set(covered)):
    raise interop.ConversionError(
        f'{where}: the tensor rules do not fit the model (parameters '
        f'without a rule {left}, rules without a parameter {extra}).'
    )


def _count_blocks(tensors: Mapping[str, Any]) -> int:
  depth = 0
  while f'blocks.{depth}.norm1.weight' in tensors:
    depth += 1
  return depth


def _file_shapes(
    tensors: Mapping[str, Any],
    entry: timm_models.TimmModel,
    fields: Mapping[str, Any],
    where: str,
) -> dict[str, Any]:
  """Depth, width, MLP width, heads and classes (and a MAP head's MLP width
  when the registry sizes it apart) of a timm state dict, from its
  shapes."""
  needed = ['patch_embed.proj.weight', 'blocks.0.norm1.weight']
  swiglu = fields.get('mlp') == 'swiglu'
  packed = swiglu and entry.registry in _PACKED_SWIGLU
  mlp_key = (
      'blocks.0.mlp.fc1_g.weight'
      if swiglu and not packed
      else 'blocks.0.mlp.fc1.weight'
  )
  needed.append(mlp_key)
  missing = [k for k in needed if k not in tensors]
  if missing:
    raise interop.ConversionError(
        f"{where}: not a state dict of timm's {entry.layout} layout as "
        f'{entry.registry} has it: missing weights '
        f'{interop._names(missing)}; '  # pylint: disable=protected-access
        f'found e.g. {interop._names(sorted(tensors), 6)}.'  # pylint: disable=protected-access
    )
  width = int(tensors['patch_embed.proj.weight'].shape[0])
  if width % entry.head_dim:
    raise interop.ConversionError(
        f'{where}: width {width} is not a multiple of the head size '
        f'{entry.head_dim} of {entry.registry}.'
    )
  shapes = {
      'num_layers': _count_blocks(tensors),
      'hidden_size': width,
      'mlp_dim': int(tensors[mlp_key].shape[0]) // (2 if packed else 1),
      'num_heads': width // entry.head_dim,
      'num_classes': (
          int(tensors['head.weight'].shape[0])
          if 'head.weight' in tensors
          else 0
      ),
  }
  map_mlp = 'attn_pool.mlp.fc1.weight'
  if fields.get('map_mlp_dim') is not None and map_mlp in tensors:
    shapes['map_mlp_dim'] = int(tensors[map_mlp].shape[0])
  return shapes


def load_timm(
    path: str, timm_model: str, **overrides: Any
) -> tuple[Any, Params]:
  """A timm `.safetensors` of `timm_model` as a vit_jax model and params.

  The model is `TIMM_MODELS[timm_model]`'s registry model with its options,
  of the depth, width, MLP width, classes and position-embedding grid the
  file's tensors have (heads: width // the entry's head size), so smaller
  files of the same family (tests) load too.

  Args:
    path: The `.safetensors` state dict (as `timm`'s `model.state_dict()`).
    timm_model: A timm model name in `vit_jax.timm_models.TIMM_MODELS`.
    **overrides: Other `get_model` fields (e.g. `dtype`).

  Returns:
    (model, params); the image size is the one the position embeddings
    cover (`image_size_of`).

  Raises:
    ConversionError: an unknown name, a file that is not safetensors, or
      missing, unexpected or mis-shaped tensors (named).
  """
  path = str(path)
  entry = timm_model_entry(timm_model)
  if not path.endswith('.safetensors'):
    raise interop.ConversionError(
        f'{path}: timm_model={timm_model!r} reads a .safetensors state dict '
        'only (pickled .bin / .pth files are never opened): save it with '
        'safetensors.torch.save_file(model.state_dict(), ...).'
    )
  tensors, _ = interop._read_safetensors(path)  # pylint: disable=protected-access
  fields = vit_jax.models.get_config(
      entry.registry, **{**entry.options, **overrides}
  )
  shapes = _file_shapes(tensors, entry, fields, path)
  model = vit_jax.models.get_model(
      entry.registry,
      num_classes=shapes['num_classes'],
      **{
          **entry.options,
          **overrides,
          'hidden_size': shapes['hidden_size'],
          # The file's patch size (a smaller model's too, as its width).
          'patches': {'size': _patch_size(tensors, path)},
          **{k: shapes[k] for k in ('map_mlp_dim',) if k in shapes},
          'transformer': {
              'num_layers': shapes['num_layers'],
              'num_heads': shapes['num_heads'],
              'mlp_dim': shapes['mlp_dim'],
          },
      },
  )
  rules = _model_rules(model, shapes['num_layers'], entry.layout)
  # Names first: a file of another family is told by its tensors' names.
  interop._check_keys(  # pylint: disable=protected-access
      list(tensors), [rule.theirs for rule in rules], path
  )
  image_size = _init_size(
      model,
      entry,
      tensors['pos_embed'].shape[1] if 'pos_embed' in tensors else None,
      path,
  )
  _check_rules_cover(model, rules, image_size, path)
  params = interop._from_torch(  # pylint: disable=protected-access
      tensors, rules, model, image_size, path
  )
  return model, params


def _patch_size(tensors: Mapping[str, Any], where: str) -> tuple[int, int]:
  """(height, width) of the patches the file's patch embedding cuts."""
  kernel = tensors.get('patch_embed.proj.weight')
  if kernel is None or len(kernel.shape) != 4:
    raise interop.ConversionError(
        f'{where}: no patch embedding (patch_embed.proj.weight [D, C, P, P]):'
        ' not a timm ViT state dict.'
    )
  return int(kernel.shape[2]), int(kernel.shape[3])


def _image_size(model: Any, table_length: int, where: str) -> tuple[int, int]:
  """The square image a position-embedding table of `table_length` covers."""
  class_entry = _has_class_token(model) and model.posemb_class_token
  grid = interop.square_grid(
      int(table_length) - int(class_entry), f'{where} position embeddings'
  )
  ph, pw = vit_lib.patch_size_of(model.patches)
  return grid[0] * ph, grid[1] * pw


def _init_size(
    model: Any,
    entry: timm_models.TimmModel,
    table_length: int | None,
    where: str,
) -> tuple[int, int]:
  """An image size `model` initialises at: the one its position-embedding
  table covers, or (no table: DINOv3's) the published weights'."""
  if table_length is None:
    side = entry.preprocessing['image_size']
    return side, side
  return _image_size(model, table_length, where)


def image_size_of(
    model: Any, params: Params, timm_model: str | None = None
) -> tuple[int, int]:
  """The (height, width) the learned position embeddings of `params` cover.

  A model without them (DINOv3) takes any size: `timm_model`'s published
  resolution (`TIMM_MODELS` preprocessing) then.
  """
  table = checkpoint.flatten(params).get(interop.POSEMB_PATH)
  if table is None and timm_model is not None:
    return _init_size(model, timm_model_entry(timm_model), None, '')
  if table is None:
    raise interop.ConversionError(
        f'{model.model_name or "This model"} has no learned position '
        'embeddings: pass its timm_model for the image size.'
    )
  return _image_size(model, table.shape[1], interop.POSEMB_PATH)


def to_timm(
    model: Any,
    params: Params,
    path: str,
    *,
    timm_model: str | None = None,
    image_size: Any = None,
) -> dict[str, Any]:
  """Writes `params` as a timm state dict (`.safetensors`).

  With `timm_model` (a name in `TIMM_MODELS`), the file is the state dict of
  that timm model (of the model's depth and width): `timm.create_model(
  timm_model, pretrained=False, ...)` strict-loads it, and `load_timm`
  reads it back bit for bit. Without it, a plain ViT is written as
  `vit_jax.interop.to_timm` does.

  Args:
    model: A `VisionTransformer`.
    params: Its parameters.
    path: Output `.safetensors` file.
    timm_model: The timm model name, or None for a plain ViT.
    image_size: Plain ViTs: (height, width) when the grid is not square.

  Returns:
    The file's metadata (timm constructor arguments for a plain ViT).

  Raises:
    ConversionError: an unknown name, or parameters that do not fit the
      model.
  """
  if timm_model is None:
    return interop.to_timm(model, params, path, image_size=image_size)
  entry = timm_model_entry(timm_model)
  params = checkpoint.unstack_encoder_blocks(params)
  flat = interop._flat_params(params)  # pylint: disable=protected-access
  num_layers = vit_lib.config_value(model.transformer, 'num_layers')
  rules = _model_rules(model, num_layers, entry.layout)
  init_size = image_size_of(model, params, timm_model)
  _check_rules_cover(model, rules, init_size, str(path))
  tensors = interop._to_torch(flat, rules)  # pylint: disable=protected-access
  metadata = {'format': 'pt', TIMM_MODEL_METADATA_KEY: timm_model}
  interop._write_safetensors(  # pylint: disable=protected-access
      tensors, str(path), metadata
  )
  return metadata


def stored_timm_model(path: str) -> str | None:
  """The timm model name `to_timm` stored in a file's metadata, or None.

  Reads the file's header only.
  """
  safetensors = interop._safetensors_numpy()  # pylint: disable=protected-access
  try:
    with safetensors.safe_open(str(path), framework='np') as f:
      return (f.metadata() or {}).get(TIMM_MODEL_METADATA_KEY)
  except Exception:  # pylint: disable=broad-except
    return None  # Not readable: the reader that follows says why.


__all__ = [
    'LAYOUT_RULES',
    'TIMM_MODEL_METADATA_KEY',
    'image_size_of',
    'load_timm',
    'stored_timm_model',
    'timm_model_entry',
    'to_timm',
    'vision_transformer_rules',
]
