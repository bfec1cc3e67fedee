"""EVA-02, DINOv3 and Perception Encoder in timm's Eva layout (no torch).

Tiny versions of each family: a state dict in timm's names, written here by
hand from timm/models/eva.py, loads into the same parameters and logits;
`to_eva` writes the same tensors; round trips keep every bit; bad files and
names are refused naming what is wrong. The comparison with timm's own code
is tests/test_timm_parity_eva.py (opt-in, torch and timm).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from helpers import random_images
from helpers import randomize
from vit_jax import checkpoint
from vit_jax import interop
from vit_jax import loading
from vit_jax import timm_interop
from vit_jax import timm_models
import vit_jax.models

WIDTH = 128  # Two heads of the families' 64.
MLP_DIM = 96
MAP_MLP_DIM = 160
DEPTH = 2

# One timm model of each storage variant.
FAMILIES = (
    'eva02_small_patch14_224',  # packed SwiGLU, fused qkv, q/v biases
    'eva02_base_patch14_224',  # q_proj/k_proj/v_proj, SwiGLU with its norm
    'vit_small_patch16_dinov3',  # GELU, LayerScale, registers, no posemb
    'vit_small_plus_patch16_dinov3_qkvb',  # split SwiGLU, q/v biases
    'vit_pe_core_base_patch16_224',  # norm_pre, MAP head, qkv.bias
)


def _side(timm_name):
  """The image side of a 3x3 patch grid."""
  return 42 if 'patch14' in timm_name else 48


def _tiny(timm_name, **extra):
  entry = timm_models.TIMM_MODELS[timm_name]
  fields = {
      'hidden_size': WIDTH,
      'transformer': {
          'num_layers': DEPTH,
          'num_heads': WIDTH // entry.head_dim,
          'mlp_dim': MLP_DIM,
      },
      **entry.options,
      **extra,
  }
  if vit_jax.models.get_config(entry.registry).get('classifier') == 'map':
    fields['map_mlp_dim'] = MAP_MLP_DIM
  return vit_jax.models.get_model(entry.registry, num_classes=7, **fields)


def _model_and_params(timm_name, seed=0):
  """A tiny model of the family and random parameters of its shapes."""
  model = _tiny(timm_name)
  size = _side(timm_name)
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False
      )
  )['params']
  return model, randomize(shapes, seed=seed)


def _timm_state_dict(timm_name, params):
  """timm's Eva state dict of `params`, spelled out from timm's eva.py.

  Linear weights are (out, in); the patch convolution OIHW; timm's heads
  are the leading part of a projection's output features.
  """
  p = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
  eva02 = timm_name.startswith('eva02')
  fused_qkv = timm_name not in (
      'eva02_base_patch14_224',
      'eva02_large_patch14_224',
  )
  packed_swiglu = timm_name == 'eva02_small_patch14_224'
  pe = timm_name.startswith('vit_pe_core')
  sd = {}

  def weight(kernel):  # Dense (in, out) -> Linear (out, in).
    return kernel.T

  def heads_in(kernel):  # (D, heads, head_dim) -> (heads * head_dim, D).
    d = kernel.shape[0]
    return kernel.reshape(d, -1).T

  def heads_out(kernel):  # (heads, head_dim, D) -> (D, heads * head_dim).
    return kernel.reshape(-1, kernel.shape[-1]).T

  sd['patch_embed.proj.weight'] = p['embedding/kernel'].transpose(3, 2, 0, 1)
  if not pe:  # Eva's PatchEmbed has bias=not use_pre_transformer_norm.
    sd['patch_embed.proj.bias'] = p['embedding/bias']
  sd['cls_token'] = p['cls']
  if not (eva02 or pe):
    sd['reg_token'] = p['registers']
  if eva02 or pe:
    sd['pos_embed'] = p['Transformer/posembed_input/pos_embedding']
  if pe:
    sd['norm_pre.weight'] = p['Transformer/pre_norm/scale']
    sd['norm_pre.bias'] = p['Transformer/pre_norm/bias']
  for i in range(DEPTH):
    ours, b = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
    att = ours + 'MultiHeadDotProductAttention_0/'
    for n in (1, 2):
      sd[f'{b}norm{n}.weight'] = p[f'{ours}LayerNorm_{n - 1}/scale']
      sd[f'{b}norm{n}.bias'] = p[f'{ours}LayerNorm_{n - 1}/bias']
    q, k, v = (
        heads_in(p[f'{att}{n}/kernel']) for n in ('query', 'key', 'value')
    )
    if fused_qkv:
      sd[b + 'attn.qkv.weight'] = np.concatenate([q, k, v])
    else:
      sd[b + 'attn.q_proj.weight'] = q
      sd[b + 'attn.k_proj.weight'] = k
      sd[b + 'attn.v_proj.weight'] = v
    if pe:  # AttentionRope: one bias for q, k and v.
      sd[b + 'attn.qkv.bias'] = np.concatenate(
          [p[f'{att}{n}/bias'].reshape(-1) for n in ('query', 'key', 'value')]
      )
    elif eva02 or timm_name.endswith('_qkvb'):
      q_bias = p[att + 'query/bias'].reshape(-1)
      v_bias = p[att + 'value/bias'].reshape(-1)
      if fused_qkv:
        sd[b + 'attn.q_bias'] = q_bias
        sd[b + 'attn.v_bias'] = v_bias
      else:
        sd[b + 'attn.q_proj.bias'] = q_bias
        sd[b + 'attn.v_proj.bias'] = v_bias
    sd[b + 'attn.proj.weight'] = heads_out(p[att + 'out/kernel'])
    sd[b + 'attn.proj.bias'] = p[att + 'out/bias']
    if not (eva02 or pe):  # DINOv3's LayerScale.
      sd[b + 'gamma_1'] = p[ours + 'LayerScale_0/scale']
      sd[b + 'gamma_2'] = p[ours + 'LayerScale_1/scale']
    mlp = ours + 'MlpBlock_0/'
    if packed_swiglu:  # GluMlp: fc1 = [gate; value], SiLU on the gate.
      sd[b + 'mlp.fc1.weight'] = np.concatenate(
          [weight(p[mlp + 'Dense_0/kernel']), weight(p[mlp + 'Dense_2/kernel'])]
      )
      sd[b + 'mlp.fc1.bias'] = np.concatenate(
          [p[mlp + 'Dense_0/bias'], p[mlp + 'Dense_2/bias']]
      )
    elif mlp + 'Dense_2/kernel' in p:  # SwiGLU: fc1_g (gate), fc1_x.
      sd[b + 'mlp.fc1_g.weight'] = weight(p[mlp + 'Dense_0/kernel'])
      sd[b + 'mlp.fc1_g.bias'] = p[mlp + 'Dense_0/bias']
      sd[b + 'mlp.fc1_x.weight'] = weight(p[mlp + 'Dense_2/kernel'])
      sd[b + 'mlp.fc1_x.bias'] = p[mlp + 'Dense_2/bias']
    else:
      sd[b + 'mlp.fc1.weight'] = weight(p[mlp + 'Dense_0/kernel'])
      sd[b + 'mlp.fc1.bias'] = p[mlp + 'Dense_0/bias']
    if timm_name == 'eva02_base_patch14_224':  # scale_mlp
      sd[b + 'mlp.norm.weight'] = p[mlp + 'LayerNorm_0/scale']
      sd[b + 'mlp.norm.bias'] = p[mlp + 'LayerNorm_0/bias']
    sd[b + 'mlp.fc2.weight'] = weight(p[mlp + 'Dense_1/kernel'])
    sd[b + 'mlp.fc2.bias'] = p[mlp + 'Dense_1/bias']
  if eva02:  # global_pool='avg': fc_norm after the pool, no final norm.
    sd['fc_norm.weight'] = p['fc_norm/scale']
    sd['fc_norm.bias'] = p['fc_norm/bias']
  else:
    sd['norm.weight'] = p['Transformer/encoder_norm/scale']
    sd['norm.bias'] = p['Transformer/encoder_norm/bias']
  if pe:  # AttentionPoolLatent: latent, q, kv, proj, norm, mlp.
    pool = 'MAPHead_0/MultiHeadDotProductAttention_0/'
    sd['attn_pool.latent'] = p['MAPHead_0/probe']
    sd['attn_pool.q.weight'] = heads_in(p[pool + 'query/kernel'])
    sd['attn_pool.q.bias'] = p[pool + 'query/bias'].reshape(-1)
    sd['attn_pool.kv.weight'] = np.concatenate(
        [heads_in(p[pool + 'key/kernel']), heads_in(p[pool + 'value/kernel'])]
    )
    sd['attn_pool.kv.bias'] = np.concatenate(
        [p[pool + 'key/bias'].reshape(-1), p[pool + 'value/bias'].reshape(-1)]
    )
    sd['attn_pool.proj.weight'] = heads_out(p[pool + 'out/kernel'])
    sd['attn_pool.proj.bias'] = p[pool + 'out/bias']
    sd['attn_pool.norm.weight'] = p['MAPHead_0/LayerNorm_0/scale']
    sd['attn_pool.norm.bias'] = p['MAPHead_0/LayerNorm_0/bias']
    for n in (1, 2):
      dense = f'MAPHead_0/MlpBlock_0/Dense_{n - 1}/'
      sd[f'attn_pool.mlp.fc{n}.weight'] = weight(p[dense + 'kernel'])
      sd[f'attn_pool.mlp.fc{n}.bias'] = p[dense + 'bias']
  sd['head.weight'] = weight(p['head/kernel'])
  sd['head.bias'] = p['head/bias']
  return sd


def _assert_same_tree(a, b):
  fa, fb = checkpoint.flatten(a), checkpoint.flatten(b)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    np.testing.assert_array_equal(
        np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key
    )


def _save(state, path):
  safetensors_numpy.save_file(
      {k: np.ascontiguousarray(v) for k, v in state.items()}, str(path)
  )
  return str(path)


@pytest.mark.parametrize('timm_name', sorted(FAMILIES))
def test_timm_state_dict_loads_to_the_same_params_and_logits(
    timm_name, tmp_path
):
  model, params = _model_and_params(timm_name)
  path = _save(_timm_state_dict(timm_name, params), tmp_path / 'm.safetensors')
  loaded_model, loaded = timm_interop.load_timm(path, timm_name)
  _assert_same_tree(loaded, params)
  assert loaded_model == model  # The same fields, so the same function.
  size = _side(timm_name)
  images = random_images((2, size, size, 3))
  both = jax.jit(
      lambda a, b, x: (
          model.apply({'params': a}, x, train=False),
          loaded_model.apply({'params': b}, x, train=False),
      )
  )
  want, got = both(params, loaded, images)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize('timm_name', sorted(FAMILIES))
def test_to_timm_writes_timms_tensors(timm_name, tmp_path):
  model, params = _model_and_params(timm_name)
  path = str(tmp_path / 'm.safetensors')
  timm_interop.to_timm(model, params, path, timm_model=timm_name)
  written = safetensors_numpy.load_file(path)
  want = _timm_state_dict(timm_name, params)
  assert sorted(written) == sorted(want)
  for key, value in want.items():
    assert written[key].shape == value.shape, key
    np.testing.assert_array_equal(written[key], value, err_msg=key)


@pytest.mark.parametrize('timm_name', sorted(FAMILIES))
def test_round_trip_keeps_every_bit(timm_name, tmp_path):
  model, params = _model_and_params(timm_name, seed=3)
  first, second = tmp_path / 'a.safetensors', tmp_path / 'b.safetensors'
  timm_interop.to_timm(model, params, str(first), timm_model=timm_name)
  loaded_model, loaded = timm_interop.load_timm(str(first), timm_name)
  _assert_same_tree(loaded, params)
  timm_interop.to_timm(loaded_model, loaded, str(second), timm_model=timm_name)
  a, b = safetensors_numpy.load_file(first), safetensors_numpy.load_file(second)
  assert sorted(a) == sorted(b)
  for key, value in a.items():
    assert b[key].tobytes() == value.tobytes(), key


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
  name = 'vit_small_patch16_dinov3'
  _, params = _model_and_params(name)
  state = _timm_state_dict(name, params)
  missing = dict(state)
  del missing['blocks.1.gamma_2']
  with pytest.raises(
      interop.ConversionError, match=r'missing .*blocks\.1\.gamma_2'
  ):
    timm_interop.load_timm(_save(missing, tmp_path / 'a.safetensors'), name)
  # A `_qkvb` file read as the model without q/v biases.
  _, biased = _model_and_params('vit_small_patch16_dinov3_qkvb')
  extra = _timm_state_dict('vit_small_patch16_dinov3_qkvb', biased)
  with pytest.raises(interop.ConversionError, match=r'unexpected .*q_bias'):
    timm_interop.load_timm(_save(extra, tmp_path / 'b.safetensors'), name)
  wrong = dict(state, cls_token=np.zeros((1, 2, WIDTH), np.float32))
  with pytest.raises(interop.ConversionError, match=r'cls_token: found'):
    timm_interop.load_timm(_save(wrong, tmp_path / 'c.safetensors'), name)


def test_every_eva_timm_model_has_its_registry_heads():
  eva = {k: v for k, v in timm_models.TIMM_MODELS.items() if v.layout == 'eva'}
  for name, entry in eva.items():
    config = vit_jax.models.get_config(entry.registry, **entry.options)
    assert config['hidden_size'] == (
        config['transformer']['num_heads'] * entry.head_dim
    ), name


@pytest.mark.parametrize(
    'timm_name, size',
    [
        ('vit_small_patch16_dinov3', (256, 256)),  # No table: timm's size.
        ('eva02_small_patch14_224', (42, 42)),  # The table's 3x3 grid.
    ],
)
def test_load_model_reads_the_file_at_its_resolution(timm_name, size, tmp_path):
  _, params = _model_and_params(timm_name)
  path = _save(_timm_state_dict(timm_name, params), tmp_path / 'm.safetensors')
  loaded = loading.load_model(path, timm_model=timm_name)
  assert loaded.image_size == size
  _assert_same_tree(loaded.params, params)


# timm 1.0.31's parameter counts of `timm.create_model(NAME,
# num_classes=0)` (the features towers, at their own resolution).
TIMM_FEATURE_COUNTS = {
    'eva02_small_patch14_224': 21_621_120,
    'eva02_base_patch14_224': 85_758_720,
    'eva02_large_patch14_224': 303_268_800,
    'vit_small_patch16_dinov3': 21_586_944,
    'vit_small_patch16_dinov3_qkvb': 21_596_160,
    'vit_small_plus_patch16_dinov3': 28_683_264,
    'vit_small_plus_patch16_dinov3_qkvb': 28_692_480,
    'vit_base_patch16_dinov3': 85_641_216,
    'vit_base_patch16_dinov3_qkvb': 85_659_648,
    'vit_large_patch16_dinov3': 303_079_424,
    'vit_large_patch16_dinov3_qkvb': 303_128_576,
    'vit_huge_plus_patch16_dinov3': 840_509_440,
    'vit_huge_plus_patch16_dinov3_qkvb': 840_591_360,
    'vit_7b_patch16_dinov3': 6_716_030_976,
    'vit_pe_core_base_patch16_224': 92_886_528,
    'vit_pe_core_large_patch14_336': 316_102_656,
}


def test_every_eva_timm_model_has_a_feature_count():
  assert set(TIMM_FEATURE_COUNTS) == {
      k for k, v in timm_models.TIMM_MODELS.items() if v.layout == 'eva'
  }


@pytest.mark.slow
@pytest.mark.parametrize('timm_name', sorted(TIMM_FEATURE_COUNTS))
def test_feature_tower_has_timms_parameter_count(timm_name):
  entry = timm_models.TIMM_MODELS[timm_name]
  model = vit_jax.models.get_model(
      entry.registry, num_classes=0, **entry.options
  )
  side = entry.preprocessing['image_size']
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False
      )
  )['params']
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  assert count == TIMM_FEATURE_COUNTS[timm_name]
