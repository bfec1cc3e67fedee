"""vit_jax.convert: transformers and timm files, without torch.

Round trips are checked bit for bit; logits of the written files are
checked against NumPy forward passes written from transformers' and timm's
modeling code (tests/numpy_reference.py), which read the files' own key
names and PyTorch layouts, and against the published-layout reference.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

import helpers
import numpy_reference as ref
from vit_jax import checkpoint
from vit_jax import convert
import vit_jax.models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = 16
# Both GELU kinds with the epsilon each is usually paired with: the paper
# code's (tanh, 1e-6) and transformers' google/vit-* configs (erf, 1e-12).
NUMERICS = [(True, 1e-6), (False, 1e-12)]
# float32 logits of order 1 against float64 references; well below the
# effect of the wrong GELU kind (checked below), which is ~1e-4 here.
TOL = 1e-5


@functools.cache
def _tiny_vit(classifier, num_classes, gelu_approximate, eps, seed, extra):
  model = vit_jax.models.get_model(
      'testing',
      num_classes=num_classes,
      patches={'size': (4, 4)},
      transformer={'num_layers': 2, 'mlp_dim': 12},
      classifier=classifier,
      gelu_approximate=gelu_approximate,
      layer_norm_epsilon=eps,
      **dict(extra),
  )
  # Shapes only (no compilation): every value is replaced anyway.
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0),
          np.zeros((1, IMAGE, IMAGE, 3), np.float32),
          train=False,
      )
  )['params']
  return model, helpers.randomize(shapes, seed=seed, scale=0.5)


def tiny_vit(
    classifier='token',
    num_classes=5,
    gelu_approximate=True,
    eps=1e-6,
    seed=0,
    **extra,
):
  """A 2-block ViT (D=10, 2 heads, MLP 12) with random weights (cached)."""
  return _tiny_vit(
      classifier,
      num_classes,
      gelu_approximate,
      eps,
      seed,
      tuple(sorted(extra.items())),
  )


def logits_of(model, params, images):
  # One compilation per distinct model (equal reprs: the same function).
  key = repr(model)
  if key not in _APPLY:
    _APPLY[key] = jax.jit(
        lambda p, x: model.apply({'params': p}, x, train=False)
    )
  return np.asarray(_APPLY[key](params, images))


_APPLY = {}


def published(params, path):
  """The published-layout flat dict `vit_logits` reads (pre-Linen names)."""
  checkpoint.save(params, path)
  with np.load(path) as f:
    return dict(f)


def assert_same_npz(a, b):
  with np.load(a) as fa, np.load(b) as fb:
    assert sorted(fa.files) == sorted(fb.files)
    for key in fa.files:
      assert fa[key].dtype == fb[key].dtype, key
      assert fa[key].shape == fb[key].shape, key
      assert np.array_equal(fa[key], fb[key]), key  # Bit for bit.


def read_transformers_dir(path):
  with open(os.path.join(path, 'config.json')) as f:
    hf = json.load(f)
  return (
      safetensors.numpy.load_file(os.path.join(str(path), 'model.safetensors')),
      hf,
  )


# ----------------------------------------------------------------------------
# transformers.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('gelu_approximate,eps', NUMERICS)
def test_npz_to_transformers_to_npz_is_bit_exact(
    tmp_path, gelu_approximate, eps
):
  model, params = tiny_vit(gelu_approximate=gelu_approximate, eps=eps)
  checkpoint.save(params, tmp_path / 'a.npz')
  convert.to_transformers(
      model, checkpoint.load(tmp_path / 'a.npz'), tmp_path / 'hf'
  )
  back, back_params = convert.from_transformers(tmp_path / 'hf')
  checkpoint.save(back_params, tmp_path / 'b.npz')
  assert_same_npz(tmp_path / 'a.npz', tmp_path / 'b.npz')
  # The numerics travel through config.json.
  assert back.gelu_approximate is gelu_approximate
  assert back.layer_norm_epsilon == eps
  _, hf = read_transformers_dir(tmp_path / 'hf')
  assert hf['hidden_act'] == (
      'gelu_pytorch_tanh' if gelu_approximate else 'gelu'
  )
  assert hf['layer_norm_eps'] == eps
  assert hf['architectures'] == ['ViTForImageClassification']
  assert (
      hf['image_size'],
      hf['patch_size'],
      hf['num_attention_heads'],
      hf['intermediate_size'],
  ) == (16, 4, 2, 12)


@pytest.mark.parametrize('gelu_approximate,eps', NUMERICS)
def test_transformers_files_give_the_reference_logits(
    tmp_path, gelu_approximate, eps
):
  model, params = tiny_vit(gelu_approximate=gelu_approximate, eps=eps)
  images = helpers.random_images((3, IMAGE, IMAGE, 3))
  expected = ref.vit_logits(
      published(params, tmp_path / 'p.npz'),
      images,
      num_heads=2,
      gelu_approximate=gelu_approximate,
      eps=eps,
  )
  convert.to_transformers(model, params, tmp_path / 'hf')
  sd, hf = read_transformers_dir(tmp_path / 'hf')
  # transformers' forward pass, on its own key names and NCHW images.
  got = ref.transformers_vit_logits(sd, hf, images.transpose(0, 3, 1, 2))
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
  # The converted-back model gives them too.
  back, back_params = convert.from_transformers(tmp_path / 'hf')
  np.testing.assert_allclose(
      logits_of(back, back_params, images), expected, atol=TOL, rtol=0
  )
  # Sanity: the logits are not trivially small (random weights).
  assert np.abs(expected).max() > 0.1


def test_the_gelu_kind_and_epsilon_change_the_logits(tmp_path):
  """The options must matter at these weights, or the tests above could
  not tell a wrong mapping of hidden_act / layer_norm_eps."""
  images = helpers.random_images((3, IMAGE, IMAGE, 3))
  _, params = tiny_vit()
  p = published(params, tmp_path / 'p.npz')
  base = ref.vit_logits(p, images, num_heads=2)
  exact = ref.vit_logits(p, images, num_heads=2, gelu_approximate=False)
  assert np.abs(base - exact).max() > 10 * TOL
  # A small epsilon only matters where the variance is small.
  p = {k: (v * 1e-4 if k == 'embedding/kernel' else v) for k, v in p.items()}
  p['embedding/bias'] = p['embedding/bias'] * 1e-4
  p['Transformer/posembed_input/pos_embedding'] *= 1e-4
  p['cls'] = p['cls'] * 1e-4
  assert (
      np.abs(
          ref.vit_logits(p, images, num_heads=2, eps=1e-12)
          - ref.vit_logits(p, images, num_heads=2)
      ).max()
      > 10 * TOL
  )


def test_eps_travels_through_transformers_at_small_activations(tmp_path):
  model, params = tiny_vit(gelu_approximate=False, eps=1e-12)
  flat = checkpoint.flatten(params)
  for key in (
      'embedding/kernel',
      'embedding/bias',
      'cls',
      'Transformer/posembed_input/pos_embedding',
  ):
    flat[key] = flat[key] * 1e-4
  params = checkpoint.unflatten(flat)
  images = helpers.random_images((3, IMAGE, IMAGE, 3))
  expected = ref.vit_logits(
      published(params, tmp_path / 'p.npz'),
      images,
      num_heads=2,
      gelu_approximate=False,
      eps=1e-12,
  )
  convert.to_transformers(model, params, tmp_path / 'hf')
  back, back_params = convert.from_transformers(tmp_path / 'hf')
  np.testing.assert_allclose(
      logits_of(back, back_params, images), expected, atol=TOL, rtol=0
  )


def test_headless_model_with_representation_is_vit_model_with_pooler(tmp_path):
  model, params = tiny_vit(num_classes=0, representation_size=6)
  images = helpers.random_images((3, IMAGE, IMAGE, 3))
  expected = logits_of(model, params, images)  # tanh(pre_logits(...)).
  assert expected.shape == (3, 6)
  checkpoint.save(params, tmp_path / 'a.npz')
  convert.to_transformers(model, params, tmp_path / 'hf')
  sd, hf = read_transformers_dir(tmp_path / 'hf')
  assert hf['architectures'] == ['ViTModel']
  assert hf['pooler_output_size'] == 6 and 'id2label' not in hf
  assert not any(k.startswith('vit.') for k in sd)  # ViTModel's own names.
  np.testing.assert_allclose(
      ref.transformers_vit_logits(sd, hf, images.transpose(0, 3, 1, 2)),
      expected,
      atol=TOL,
      rtol=0,
  )
  back, back_params = convert.from_transformers(tmp_path / 'hf')
  assert (back.num_classes, back.representation_size) == (0, 6)
  checkpoint.save(back_params, tmp_path / 'b.npz')
  assert_same_npz(tmp_path / 'a.npz', tmp_path / 'b.npz')


def test_class_names_become_id2label(tmp_path):
  model, params = tiny_vit(num_classes=3)
  convert.to_transformers(
      model, params, tmp_path / 'hf', class_names=['cat', 'dog', 'fox']
  )
  _, hf = read_transformers_dir(tmp_path / 'hf')
  assert hf['id2label'] == {'0': 'cat', '1': 'dog', '2': 'fox'}
  assert hf['label2id'] == {'cat': 0, 'dog': 1, 'fox': 2}
  assert convert.transformers_class_names(tmp_path / 'hf') == (
      'cat',
      'dog',
      'fox',
  )
  with pytest.raises(
      convert.ConversionError, match='2 class names for a ' 'head of 3'
  ):
    convert.to_transformers(
        model, params, tmp_path / 'hf2', class_names=['cat', 'dog']
    )


def test_a_hub_cache_folder_reads_like_its_snapshot(tmp_path):
  model, params = tiny_vit()
  convert.to_transformers(model, params, tmp_path / 'hf')
  # The hub cache's layout: files are links into blobs/.
  repo = tmp_path / 'models--someone--tiny-vit'
  snapshot = repo / 'snapshots' / 'abc123'
  os.makedirs(repo / 'blobs')
  os.makedirs(snapshot)
  os.makedirs(repo / 'refs')
  (repo / 'refs' / 'main').write_text('abc123')
  for name in ('config.json', 'model.safetensors'):
    os.replace(tmp_path / 'hf' / name, repo / 'blobs' / (name + '.blob'))
    os.symlink(
        os.path.join('..', '..', 'blobs', name + '.blob'), snapshot / name
    )
  for path in (snapshot, repo):
    _, got = convert.from_transformers(path)
    for key, value in checkpoint.flatten(got).items():
      assert np.array_equal(value, checkpoint.flatten(params)[key]), key


def _rewrite(path, drop=(), config=None):
  sd, hf = read_transformers_dir(path)
  safetensors.numpy.save_file(
      {k: v for k, v in sd.items() if k not in drop},
      os.path.join(str(path), 'model.safetensors'),
      metadata={'format': 'pt'},
  )
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({**hf, **(config or {})}, f)


@pytest.mark.parametrize(
    'drop,config,message',
    [
        ((), {'model_type': 'deit'}, r"model_type='deit', not a ViT"),
        (
            (),
            {'architectures': ['ViTForMaskedImageModeling']},
            r"architectures \['ViTForMaskedImageModeling'\] are not supported",
        ),
        (
            (),
            {'hidden_act': 'relu'},
            r'unsupported option\(s\): ' r"hidden_act='relu'",
        ),
        ((), {'qkv_bias': False}, 'qkv_bias=false'),
        (
            ('vit.encoder.layer.1.output.dense.bias',),
            None,
            r'missing weights \[vit.encoder.layer.1.output.dense.bias\]',
        ),
        (
            (),
            {'intermediate_size': 7},
            r'shape mismatch: '
            r'vit.encoder.layer.0.intermediate.dense.bias: '
            r'found \(12,\), expected '
            r'\(7,\)',
        ),
        (
            (),
            {'num_hidden_layers': 1},
            r'unexpected weights \[' r'vit.encoder.layer.1.attention',
        ),
    ],
)
def test_transformers_errors_name_the_problem(tmp_path, drop, config, message):
  model, params = tiny_vit()
  convert.to_transformers(model, params, tmp_path / 'hf')
  _rewrite(tmp_path / 'hf', drop, config)
  with pytest.raises(convert.ConversionError, match=message):
    convert.from_transformers(tmp_path / 'hf')


def test_a_pickled_pytorch_model_bin_is_never_opened(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top

  model, params = tiny_vit()
  convert.to_transformers(model, params, tmp_path / 'hf')
  os.remove(tmp_path / 'hf' / 'model.safetensors')
  marker = tmp_path / 'unpickled'
  with open(tmp_path / 'hf' / 'pytorch_model.bin', 'wb') as f:
    pickle.dump(helpers.PickleExploit(str(marker)), f)
  with pytest.raises(
      convert.ConversionError,
      match=r'(?s)holds only pytorch_model.bin, a '
      r'pickle.*safe_serialization=True',
  ):
    convert.from_transformers(tmp_path / 'hf')
  assert not marker.exists()


def test_no_config_or_no_weights_are_named(tmp_path):
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(convert.ConversionError, match='has no config.json'):
    convert.from_transformers(tmp_path / 'empty')
  model, params = tiny_vit()
  convert.to_transformers(model, params, tmp_path / 'hf')
  os.remove(tmp_path / 'hf' / 'model.safetensors')
  with pytest.raises(convert.ConversionError, match='has no model.safetensors'):
    convert.from_transformers(tmp_path / 'hf')


@pytest.mark.parametrize(
    'extra,message',
    [
        (dict(classifier='gap'), "classifier='gap': transformers' ViT"),
        (dict(representation_size=6), 'representation_size=6 with a head'),
        (dict(num_registers=2), 'lack: num_registers=2'),
        (dict(posemb='sincos2d', hidden_size=12), "lack: posemb='sincos2d'"),
    ],
)
def test_to_transformers_refuses_what_it_cannot_express(
    tmp_path, extra, message
):
  model, params = tiny_vit(**extra)
  with pytest.raises(convert.ConversionError, match=message):
    convert.to_transformers(model, params, tmp_path / 'hf')
  assert not os.path.exists(tmp_path / 'hf')


def test_hybrids_mixers_and_mismatched_params_are_refused(tmp_path):
  hybrid, size = helpers.tiny_model('hybrid_root')
  hybrid_params = jax.eval_shape(
      lambda: hybrid.init(
          jax.random.key(0),
          np.zeros((1, size, size, 3), np.float32),
          train=False,
      )
  )['params']
  with pytest.raises(convert.ConversionError, match='resnet'):
    convert.to_timm(hybrid, hybrid_params, tmp_path / 'h.safetensors')
  mixer, size = helpers.tiny_model('mixer')
  with pytest.raises(
      convert.ConversionError, match='not a ' 'VisionTransformer'
  ):
    convert.to_transformers(mixer, {}, tmp_path / 'm')
  model, params = tiny_vit()
  other, _ = tiny_vit(num_classes=4)
  with pytest.raises(
      convert.ConversionError,
      match=r'shape mismatch\): num_classes: model 4, ' r'parameters 5',
  ):
    convert.to_transformers(other, params, tmp_path / 'x')
  del model


# ----------------------------------------------------------------------------
# timm.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
def test_npz_to_timm_to_npz_is_bit_exact(tmp_path, classifier):
  model, params = tiny_vit(classifier=classifier, gelu_approximate=False)
  checkpoint.save(params, tmp_path / 'a.npz')
  kwargs = convert.to_timm(
      model, checkpoint.load(tmp_path / 'a.npz'), tmp_path / 'timm.safetensors'
  )
  back, back_params = convert.from_timm(tmp_path / 'timm.safetensors')
  checkpoint.save(back_params, tmp_path / 'b.npz')
  assert_same_npz(tmp_path / 'a.npz', tmp_path / 'b.npz')
  assert back.classifier == classifier and not back.gelu_approximate
  assert (
      kwargs['global_pool']
      == {'token': 'token', 'gap': 'avg', 'map': 'map'}[classifier]
  )
  assert kwargs['class_token'] == (classifier == 'token')
  assert (
      kwargs['embed_dim'],
      kwargs['depth'],
      kwargs['num_heads'],
      kwargs['patch_size'],
      kwargs['img_size'],
  ) == (10, 2, 2, 4, 16)
  assert int(kwargs['embed_dim'] * kwargs['mlp_ratio']) == 12


@pytest.mark.parametrize(
    'classifier,gelu_approximate,eps',
    [
        ('token', *NUMERICS[0]),
        ('token', *NUMERICS[1]),
        ('gap', *NUMERICS[1]),
        ('map', *NUMERICS[0]),
    ],
)
def test_timm_files_give_the_reference_logits(
    tmp_path, classifier, gelu_approximate, eps
):
  model, params = tiny_vit(
      classifier=classifier, gelu_approximate=gelu_approximate, eps=eps
  )
  images = helpers.random_images((3, IMAGE, IMAGE, 3))
  expected = logits_of(model, params, images)
  if classifier != 'map':  # The published-layout reference has no MAP.
    np.testing.assert_allclose(
        ref.vit_logits(
            published(params, tmp_path / 'p.npz'),
            images,
            num_heads=2,
            classifier=classifier,
            gelu_approximate=gelu_approximate,
            eps=eps,
        ),
        expected,
        atol=TOL,
        rtol=0,
    )
  kwargs = convert.to_timm(model, params, tmp_path / 'timm.safetensors')
  sd = safetensors.numpy.load_file(str(tmp_path / 'timm.safetensors'))
  # timm's forward pass, on its own key names and NCHW images.
  got = ref.timm_vit_logits(
      sd,
      images.transpose(0, 3, 1, 2),
      num_heads=2,
      global_pool=kwargs['global_pool'],
      act_layer=kwargs['act_layer'],
      eps=kwargs['layer_norm_eps'],
  )
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
  assert np.abs(expected).max() > 0.1
  # Read back: the same numerics (the parameters are bit-exact, above).
  back, _ = convert.from_timm(tmp_path / 'timm.safetensors')
  assert (
      back.classifier,
      back.gelu_approximate,
      back.layer_norm_epsilon,
      back.num_classes,
  ) == (classifier, gelu_approximate, eps, 5)


def test_timm_errors(tmp_path):
  model, params = tiny_vit(num_classes=0, representation_size=6)
  with pytest.raises(
      convert.ConversionError,
      match='representation_size=6: '
      "timm's VisionTransformer has no pre-logits",
  ):
    convert.to_timm(model, params, tmp_path / 'r.safetensors')
  model, params = tiny_vit()
  convert.to_timm(model, params, tmp_path / 't.safetensors')
  sd = safetensors.numpy.load_file(str(tmp_path / 't.safetensors'))
  # A timm file of timm's own: no metadata, so the head count is asked for.
  safetensors.numpy.save_file(sd, str(tmp_path / 'plain.safetensors'))
  with pytest.raises(convert.ConversionError, match='pass num_heads'):
    convert.from_timm(tmp_path / 'plain.safetensors')
  _, got = convert.from_timm(tmp_path / 'plain.safetensors', num_heads=2)
  # An activation vit_jax's ViT does not have.
  safetensors.numpy.save_file(
      sd,
      str(tmp_path / 'quick.safetensors'),
      {
          convert.TIMM_METADATA_KEY: json.dumps(
              {'num_heads': 2, 'act_layer': 'quick_gelu'}
          )
      },
  )
  with pytest.raises(
      convert.ConversionError, match="act_layer='quick_gelu' is not supported"
  ):
    convert.from_timm(tmp_path / 'quick.safetensors')
  assert np.array_equal(
      checkpoint.flatten(got)['head/kernel'],
      checkpoint.flatten(params)['head/kernel'],
  )
  del sd['blocks.1.mlp.fc2.bias']
  safetensors.numpy.save_file(sd, str(tmp_path / 'missing.safetensors'))
  with pytest.raises(
      convert.ConversionError,
      match=r'missing weights \[blocks.1.mlp.fc2.bias\]',
  ):
    convert.from_timm(tmp_path / 'missing.safetensors', num_heads=2)
  sd['fc_norm.weight'] = np.ones(10, np.float32)
  safetensors.numpy.save_file(sd, str(tmp_path / 'fc_norm.safetensors'))
  with pytest.raises(convert.ConversionError, match=r"\['fc_norm'\]"):
    convert.from_timm(tmp_path / 'fc_norm.safetensors', num_heads=2)
  (tmp_path / 'junk.safetensors').write_bytes(b'\x05\x00not safetensors')
  with pytest.raises(
      convert.ConversionError, match='not a readable safetensors file'
  ):
    convert.from_timm(tmp_path / 'junk.safetensors')


# ----------------------------------------------------------------------------
# Command line (a subprocess: absl flags are process-global).
# ----------------------------------------------------------------------------


def run_convert(*args):
  return subprocess.run(
      [sys.executable, '-m', 'vit_jax.convert', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
  )


@pytest.mark.slow
def test_cli_converts_npz_to_transformers_and_back(tmp_path):
  _, params = tiny_vit(gelu_approximate=False)
  checkpoint.save(params, tmp_path / 'a.npz')
  result = run_convert(
      f'--input={tmp_path}/a.npz',
      f'--output={tmp_path}/hf',
      '--nogelu_approximate',
      '--layer_norm_epsilon=1e-12',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Wrote {tmp_path}/hf (transformers)' in result.stdout
  _, hf = read_transformers_dir(tmp_path / 'hf')
  assert (hf['hidden_act'], hf['layer_norm_eps']) == ('gelu', 1e-12)
  result = run_convert(f'--input={tmp_path}/hf', f'--output={tmp_path}/b.npz')
  assert result.returncode == 0, result.stderr[-3000:]
  assert_same_npz(tmp_path / 'a.npz', tmp_path / 'b.npz')
  _rewrite(tmp_path / 'hf', config={'model_type': 'swin'})
  result = run_convert(
      f'--input={tmp_path}/hf', f'--output={tmp_path}/c.safetensors'
  )
  helpers.assert_refused(result, "model_type='swin', not a ViT")
