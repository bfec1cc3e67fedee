"""timm files of DINOv2, SigLIP 2 and AIMv2 (`vit_jax.timm_interop`).

No torch: the timm state dicts are written here from our parameters by an
independent writer (timm's tensor names and PyTorch layouts, spelled out by
hand from timm's `vision_transformer.py`, `layers/mlp.py` and
`layers/attention_pool.py`), then read back by `load_timm`.
"""

import functools
import os

import jax
import numpy as np
import pytest

from helpers import random_images
from helpers import randomize
from helpers import run_module
from vit_jax import checkpoint
from vit_jax import convert
from vit_jax import interop
from vit_jax import loading
from vit_jax import timm_interop
from vit_jax import timm_models
import vit_jax.models

safetensors_numpy = pytest.importorskip('safetensors.numpy')

# Tiny versions of each family: (timm model name, width, MLP width, layers,
# image size). Widths are multiples of the family's head size.
FAMILIES = {
    'dinov2': ('vit_small_patch14_dinov2', 128, 96, 2, 28),
    'dinov2_reg4': ('vit_base_patch14_reg4_dinov2', 128, 96, 2, 28),
    'dinov2_giant': ('vit_giant_patch14_dinov2', 128, 48, 2, 28),
    'siglip2': ('vit_base_patch16_siglip_256', 128, 96, 2, 32),
    'siglip2_gap': ('vit_so400m_patch16_siglip_gap_384', 144, 96, 2, 32),
    'aimv2': ('aimv2_large_patch14_224', 256, 80, 2, 28),
}
NUM_CLASSES = 7


@functools.cache
def tiny(family, num_classes=NUM_CLASSES):
  """(timm name, model, random params, images) of a tiny `family` (built
  once: the tests only read them)."""
  name, width, mlp, layers, size = FAMILIES[family]
  entry = timm_models.TIMM_MODELS[name]
  model = vit_jax.models.get_model(
      entry.registry,
      num_classes=num_classes,
      hidden_size=width,
      transformer={
          'num_layers': layers,
          'num_heads': width // entry.head_dim,
          'mlp_dim': mlp,
      },
      **entry.options,
  )
  images = random_images((2, size, size, 3))
  # Every value is replaced: the shapes are all that is needed (no
  # initialisation to compile).
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False)
  )['params']
  return name, model, randomize(shapes, seed=len(family)), images


# ----------------------------------------------------------------------------
# The independent writer: timm's names, PyTorch's layouts.
# ----------------------------------------------------------------------------


def _linear(out, theirs, flat, ours, bias=True):
  out[theirs + '.weight'] = flat[ours + '/kernel'].T  # (in, out) -> (out, in)
  if bias:
    out[theirs + '.bias'] = flat[ours + '/bias']


def _norm(out, theirs, flat, ours, rms=False):
  out[theirs + '.weight'] = flat[ours + '/scale']
  if not rms:
    out[theirs + '.bias'] = flat[ours + '/bias']


def _heads_in(kernel):
  """q/k/v kernel (D, heads, head_dim) -> Linear weight (heads*head_dim, D)."""
  return kernel.reshape(kernel.shape[0], -1).T


def timm_state_dict(model, params):
  """The timm `VisionTransformer` state dict of our `params`."""
  flat = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
  rms = model.norm == 'rmsnorm'
  out = {
      'patch_embed.proj.weight': flat['embedding/kernel'].transpose(3, 2, 0, 1),
      'patch_embed.proj.bias': flat['embedding/bias'],
      'pos_embed': flat['Transformer/posembed_input/pos_embedding'],
  }
  if 'cls' in flat:
    out['cls_token'] = flat['cls']
  if 'registers' in flat:
    out['reg_token'] = flat['registers']
  if model.embed_norm:
    _norm(out, 'patch_embed.norm', flat, 'embedding_norm', rms)
  layers = model.transformer['num_layers']
  for i in range(layers):
    ours, b = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
    att = ours + 'MultiHeadDotProductAttention_0/'
    _norm(out, b + 'norm1', flat, ours + 'LayerNorm_0', rms)
    out[b + 'attn.qkv.weight'] = np.concatenate(
        [
            _heads_in(flat[att + n + '/kernel'])
            for n in ('query', 'key', 'value')
        ]
    )
    if model.qkv_bias:
      out[b + 'attn.qkv.bias'] = np.concatenate(
          [
              flat[att + n + '/bias'].reshape(-1)
              for n in ('query', 'key', 'value')
          ]
      )
    kernel = flat[att + 'out/kernel']  # (heads, head_dim, D)
    out[b + 'attn.proj.weight'] = kernel.reshape(-1, kernel.shape[-1]).T
    if model.proj_bias:
      out[b + 'attn.proj.bias'] = flat[att + 'out/bias']
    _norm(out, b + 'norm2', flat, ours + 'LayerNorm_1', rms)
    mlp = ours + 'MlpBlock_0/'
    if model.mlp == 'gelu':
      _linear(out, b + 'mlp.fc1', flat, mlp + 'Dense_0', model.mlp_bias)
    elif model.model_name == 'DINOv2-g_14':
      # timm's SwiGLUPacked (GluMlp, gate_last=False): fc1's first half goes
      # through SiLU, the second half multiplies it.
      out[b + 'mlp.fc1.weight'] = np.concatenate(
          [flat[mlp + 'Dense_0/kernel'].T, flat[mlp + 'Dense_2/kernel'].T]
      )
      out[b + 'mlp.fc1.bias'] = np.concatenate(
          [flat[mlp + 'Dense_0/bias'], flat[mlp + 'Dense_2/bias']]
      )
    else:  # timm's SwiGLU: SiLU(fc1_g x) * fc1_x x.
      _linear(out, b + 'mlp.fc1_g', flat, mlp + 'Dense_0', model.mlp_bias)
      _linear(out, b + 'mlp.fc1_x', flat, mlp + 'Dense_2', model.mlp_bias)
    _linear(out, b + 'mlp.fc2', flat, mlp + 'Dense_1', model.mlp_bias)
    if model.layer_scale is not None:
      out[b + 'ls1.gamma'] = flat[ours + 'LayerScale_0/scale']
      out[b + 'ls2.gamma'] = flat[ours + 'LayerScale_1/scale']
  _norm(out, 'norm', flat, 'Transformer/encoder_norm', rms)
  if model.classifier == 'map':
    att = 'MAPHead_0/MultiHeadDotProductAttention_0/'
    out['attn_pool.latent'] = flat['MAPHead_0/probe']
    out['attn_pool.q.weight'] = _heads_in(flat[att + 'query/kernel'])
    out['attn_pool.q.bias'] = flat[att + 'query/bias'].reshape(-1)
    out['attn_pool.kv.weight'] = np.concatenate(
        [_heads_in(flat[att + n + '/kernel']) for n in ('key', 'value')]
    )
    out['attn_pool.kv.bias'] = np.concatenate(
        [flat[att + n + '/bias'].reshape(-1) for n in ('key', 'value')]
    )
    kernel = flat[att + 'out/kernel']
    out['attn_pool.proj.weight'] = kernel.reshape(-1, kernel.shape[-1]).T
    out['attn_pool.proj.bias'] = flat[att + 'out/bias']
    _norm(out, 'attn_pool.norm', flat, 'MAPHead_0/LayerNorm_0')
    _linear(out, 'attn_pool.mlp.fc1', flat, 'MAPHead_0/MlpBlock_0/Dense_0')
    _linear(out, 'attn_pool.mlp.fc2', flat, 'MAPHead_0/MlpBlock_0/Dense_1')
  if 'head/kernel' in flat:
    _linear(out, 'head', flat, 'head')
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_timm_file(path, model, params, drop=(), extra=None):
  tensors = timm_state_dict(model, params)
  for key in drop:
    del tensors[key]
  tensors.update(extra or {})
  safetensors_numpy.save_file(tensors, str(path))
  return str(path)


def logits(model, params, images):
  # Jitted: one compilation is faster than running the ops one by one.
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  return np.asarray(apply(params, images))


# ----------------------------------------------------------------------------
# Loading and writing.
# ----------------------------------------------------------------------------


# Compiles two models (>= 5 s on a loaded CPU).
@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_timm_file_loads_with_our_logits(family, tmp_path):
  name, model, params, images = tiny(family)
  path = write_timm_file(tmp_path / 'model.safetensors', model, params)
  loaded_model, loaded = timm_interop.load_timm(path, name)
  flat, back = checkpoint.flatten(params), checkpoint.flatten(loaded)
  assert sorted(back) == sorted(flat)
  for key, value in flat.items():
    np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(value), key)
  np.testing.assert_array_equal(
      logits(loaded_model, loaded, images), logits(model, params, images)
  )


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_to_timm_writes_timm_state_dict_and_round_trips(family, tmp_path):
  name, model, params, _ = tiny(family)
  path = str(tmp_path / 'ours.safetensors')
  timm_interop.to_timm(model, params, path, timm_model=name)
  written = safetensors_numpy.load_file(path)
  expected = timm_state_dict(model, params)
  assert sorted(written) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(written[key], value, key)
  _, back = timm_interop.load_timm(path, name)
  for key, value in checkpoint.flatten(params).items():
    np.testing.assert_array_equal(
        np.asarray(checkpoint.flatten(back)[key]), np.asarray(value), key
    )


# Compiles two models (>= 5 s on a loaded CPU).
@pytest.mark.slow
def test_our_timm_file_loads_without_the_name(tmp_path):
  name, model, params, images = tiny('aimv2')
  path = str(tmp_path / 'ours.safetensors')
  timm_interop.to_timm(model, params, path, timm_model=name)
  loaded = loading.load_model(path)  # The name is in the file's metadata.
  assert loaded.model.model_name == 'AIMv2-L_14'
  np.testing.assert_array_equal(
      logits(loaded.model, loaded.params, images),
      logits(model, params, images),
  )


# Compiles two models (>= 5 s on a loaded CPU).
@pytest.mark.slow
def test_features_tower_without_head(tmp_path):
  name, model, params, images = tiny('dinov2_reg4', num_classes=0)
  path = write_timm_file(tmp_path / 'model.safetensors', model, params)
  loaded_model, loaded = timm_interop.load_timm(path, name)
  assert not loaded_model.num_classes
  assert loaded_model.num_registers == 4
  assert not loaded_model.posemb_class_token
  np.testing.assert_array_equal(
      logits(loaded_model, loaded, images), logits(model, params, images)
  )


# Compiles two models (>= 5 s on a loaded CPU).
@pytest.mark.slow
def test_load_model_reads_timm_file_at_its_resolution(tmp_path):
  name, model, params, images = tiny('siglip2')
  path = write_timm_file(tmp_path / 'model.safetensors', model, params)
  loaded = loading.load_model(path, timm_model=name)
  assert loaded.image_size == (32, 32)
  assert loaded.model.model_name == 'SigLIP2-B_16'
  np.testing.assert_array_equal(
      logits(loaded.model, loaded.params, images),
      logits(model, params, images),
  )


def test_every_timm_model_builds_its_registry_model():
  for name, entry in timm_models.TIMM_MODELS.items():
    assert entry.layout in timm_interop.LAYOUT_RULES, name
    config = vit_jax.models.get_config(entry.registry, **entry.options)
    assert config['hidden_size'] % entry.head_dim == 0, name
    assert (
        config['hidden_size'] // entry.head_dim
        == config['transformer']['num_heads']
    ), name


# ----------------------------------------------------------------------------
# Refusals.
# ----------------------------------------------------------------------------


def test_unknown_timm_model_lists_close_matches(tmp_path):
  with pytest.raises(interop.ConversionError) as e:
    timm_interop.load_timm(tmp_path / 'x.safetensors', 'vit_small_patch14_dino')
  assert 'vit_small_patch14_dinov2' in str(e.value)
  assert '\n' not in str(e.value)


def test_pickled_file_is_refused_unopened(tmp_path):
  path = tmp_path / 'pytorch_model.bin'
  path.write_bytes(b'not opened')
  with pytest.raises(interop.ConversionError, match='never opened'):
    timm_interop.load_timm(path, 'vit_small_patch14_dinov2')


def test_file_of_another_family_names_the_tensors(tmp_path):
  _, model, params, _ = tiny('siglip2')
  path = write_timm_file(tmp_path / 'siglip.safetensors', model, params)
  # A SigLIP file (MAP head, no class token, no LayerScale) read as DINOv2.
  with pytest.raises(interop.ConversionError) as e:
    timm_interop.load_timm(path, 'vit_base_patch14_dinov2')
  message = str(e.value)
  assert 'missing weights [blocks.0.ls1.gamma' in message
  assert 'cls_token' in message
  assert 'unexpected weights [attn_pool.kv.bias' in message
  assert '\n' not in message


def test_missing_layer_scale_is_named(tmp_path):
  name, model, params, _ = tiny('dinov2')
  path = write_timm_file(
      tmp_path / 'model.safetensors', model, params, drop=['blocks.1.ls2.gamma']
  )
  with pytest.raises(interop.ConversionError, match=r'missing.*blocks\.1\.ls2'):
    timm_interop.load_timm(path, name)


def test_mis_shaped_tensor_is_named(tmp_path):
  name, model, params, _ = tiny('dinov2')
  path = write_timm_file(
      tmp_path / 'model.safetensors',
      model,
      params,
      extra={'blocks.0.ls1.gamma': np.zeros((64,), np.float32)},
  )
  with pytest.raises(interop.ConversionError, match=r'blocks\.0\.ls1\.gamma'):
    timm_interop.load_timm(path, name)


def test_timm_model_needs_a_safetensors_input(tmp_path):
  path = tmp_path / 'params.npz'
  path.write_bytes(b'')
  with pytest.raises(interop.ConversionError, match='--timm_model'):
    loading.load_model(str(path), timm_model='vit_small_patch14_dinov2')


def test_plain_formats_refuse_family_options(tmp_path):
  _, model, params, _ = tiny('dinov2')
  with pytest.raises(interop.ConversionError, match='layer_scale'):
    interop.to_timm(model, params, str(tmp_path / 'plain.safetensors'))


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_convert_cli_timm_file_to_npz_and_back(tmp_path):
  name, model, params, images = tiny('dinov2_reg4')
  path = write_timm_file(tmp_path / 'dinov2.safetensors', model, params)
  npz = str(tmp_path / 'dinov2.npz')
  result = run_module(
      'vit_jax.convert',
      f'--input={path}',
      f'--timm_model={name}',
      f'--output={npz}',
  )
  assert result.returncode == 0, result.stderr
  entry = convert.TIMM_MODELS[name]
  loaded = loading.load_npz(
      npz,
      model_name=entry.registry,
      options={
          **entry.options,
          'hidden_size': model.hidden_size,
          'transformer': dict(model.transformer),
      },
  )
  np.testing.assert_array_equal(
      logits(loaded.model, loaded.params, images), logits(model, params, images)
  )
  # An unknown name: one line, non-zero, nothing written.
  result = run_module(
      'vit_jax.convert',
      f'--input={path}',
      '--timm_model=dinov2',
      f'--output={tmp_path / "no.npz"}',
  )
  assert result.returncode != 0
  assert 'close matches' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'no.npz')
