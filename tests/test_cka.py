"""Known-answer tests of CKA (vit_jax.analysis.cka, .representations), the
layers the models sow for it, and the `cka` subcommand of the analysis CLI.

The references below are numpy and share no code with the JAX path: linear
CKA from the features' cross-covariances (not from Gram matrices), and the
unbiased HSIC as the U-statistic over every 4-tuple of distinct examples
(the definition HSIC_1 is a closed form of, Song et al. 2012, Theorem 2).
"""

import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import random_images
from helpers import randomize
from helpers import tiny_model
from vit_jax import analysis
from vit_jax import sharding
from vit_jax.analysis import cka
from vit_jax.analysis import representations
import vit_jax.models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# numpy references.


def numpy_linear_cka(x, y):
  """Kornblith et al. (2019), eq. for linear CKA in feature space."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x = x - x.mean(0)
  y = y - y.mean(0)
  return np.linalg.norm(y.T @ x) ** 2 / (
      np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
  )


def numpy_hsic_u(x, y):
  """HSIC as the U-statistic (1/(n)_4) sum over distinct (i, j, q, r) of
  k_ij (l_ij + l_qr - 2 l_iq), linear kernels."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  k, l = x @ x.T, y @ y.T
  n = len(x)
  total = 0.0
  for i, j, q, r in itertools.permutations(range(n), 4):
    total += k[i, j] * (l[i, j] + l[q, r] - 2 * l[i, q])
  return total / (n * (n - 1) * (n - 2) * (n - 3))


def numpy_minibatch_cka(x, y, batch):
  """Nguyen et al. (2021): per-batch unbiased HSIC, averaged, then the
  ratio; batches of fewer than 4 examples left out."""
  xy = xx = yy = 0.0
  for start in range(0, len(x), batch):
    bx, by = x[start : start + batch], y[start : start + batch]
    if len(bx) < 4:
      continue
    xy += numpy_hsic_u(bx, by)
    xx += numpy_hsic_u(bx, bx)
    yy += numpy_hsic_u(by, by)
  return xy / np.sqrt(xx * yy)


def _related(n, p=6, q=5, seed=0):
  """Two dependent representations of n examples (CKA well inside (0, 1))."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, p))
  y = np.tanh(base @ rng.normal(size=(p, q)) / np.sqrt(p))
  y = y + 0.3 * rng.normal(size=(n, q))
  x = base + 2.0  # An offset: centring must handle it.
  return x.astype(np.float32), y.astype(np.float32)


def _random_params(model, images, seed=0):
  """Random weights of `model`'s shapes (`randomize`), nothing compiled."""
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), images
  )
  return randomize(shapes['params'], seed=seed)


def _minibatch(x, y, batch, mesh=None):
  """`MinibatchCKA` over x, y in batches of `batch` (last one padded)."""
  acc = cka.MinibatchCKA(None if mesh is None else cka.make_hsic_fn(mesh))
  for start in range(0, len(x), batch):
    real = min(batch, len(x) - start)
    pad = lambda a, real=real, start=start: np.concatenate(
        [
            a[start : start + real],
            np.zeros((batch - real,) + a.shape[1:], a.dtype),
        ]
    )
    mask = (np.arange(batch) < real).astype(np.float32)
    acc.update([pad(x)], [pad(y)], mask)
  return acc.result()[0, 0]


# ---------------------------------------------------------------------------
# The estimators.


def test_cka_of_a_representation_with_itself_is_1():
  x, _ = _related(64)
  assert cka.linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
  assert cka.linear_cka(x, x, unbiased=True) == pytest.approx(1.0, abs=1e-6)
  assert _minibatch(x, x, 16) == pytest.approx(1.0, abs=1e-6)


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
  x, y = _related(200)
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  moved = (3.7 * x @ q).astype(np.float32)
  reference = cka.linear_cka(x, y)
  assert 0.2 < reference < 0.9
  assert cka.linear_cka(x, moved) == pytest.approx(1.0, abs=1e-5)
  assert cka.linear_cka(moved, y) == pytest.approx(reference, abs=1e-5)
  assert cka.linear_cka(0.01 * x, 50 * y) == pytest.approx(reference, abs=1e-5)
  assert _minibatch(moved, y, 40) == pytest.approx(
      _minibatch(x, y, 40), abs=1e-5
  )


def test_not_invariant_to_an_arbitrary_invertible_linear_map():
  x, y = _related(200)
  # Invertible (condition number 20) but not orthogonal times a scalar.
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  a = (q * np.linspace(1.0, 20.0, 6)).astype(np.float32)
  assert np.linalg.matrix_rank(a) == 6
  assert cka.linear_cka(x, x @ a) < 0.9
  assert abs(cka.linear_cka(x @ a, y) - cka.linear_cka(x, y)) > 0.02
  assert _minibatch(x, x @ a, 40) < 0.9


def _numpy_unbiased_cka(x, y):
  return numpy_hsic_u(x, y) / np.sqrt(numpy_hsic_u(x, x) * numpy_hsic_u(y, y))


@pytest.mark.parametrize(
    'shape', [(90, 6, 5), (9, 14, 12)], ids=['features_route', 'gram_route']
)
def test_full_batch_cka_matches_the_numpy_references(shape):
  n, p, q = shape
  x, y = _related(n, p=p, q=q, seed=3)
  np.testing.assert_allclose(
      cka.linear_cka(x, y), numpy_linear_cka(x, y), rtol=1e-5
  )
  np.testing.assert_allclose(
      cka.linear_cka(x[:9], y[:9], unbiased=True),
      _numpy_unbiased_cka(x[:9], y[:9]),
      rtol=1e-4,
  )


def test_minibatch_cka_matches_the_numpy_reference():
  # 30 examples, batches of 8: the last, of 6, is padded and masked.
  x, y = _related(30, seed=3)
  np.testing.assert_allclose(
      _minibatch(x, y, 8), numpy_minibatch_cka(x, y, 8), rtol=1e-4
  )


def test_a_batch_of_fewer_than_4_examples_is_left_out():
  x, y = _related(27, seed=4)  # Batches of 8: 8, 8, 8 and 3.
  np.testing.assert_allclose(
      _minibatch(x, y, 8), _minibatch(x[:24], y[:24], 8), rtol=1e-6
  )
  with pytest.raises(ValueError, match='at least 4 examples'):
    _minibatch(x[:3], y[:3], 8)


@pytest.mark.slow
def test_minibatch_estimate_is_the_full_batch_one_on_1_and_8_devices():
  # Linearly related Gaussians: the estimator's spread over draws of the
  # data is a few 1e-4 here, so 1e-3 tests the estimator, not luck.
  rng = np.random.default_rng(6)
  x = rng.normal(size=(16384, 4))
  y = x @ rng.normal(size=(4, 4)) + rng.normal(size=(16384, 4))
  x, y = (x + 2.0).astype(np.float32), y.astype(np.float32)
  one = sharding.make_mesh(devices=jax.devices()[:1])
  eight = sharding.make_mesh()
  assert eight.devices.size == 8
  on_one = _minibatch(x, y, 512, one)
  on_eight = _minibatch(x, y, 512, eight)
  np.testing.assert_allclose(on_eight, on_one, rtol=1e-5)
  assert abs(on_one - cka.linear_cka(x, y)) < 1e-3
  assert abs(on_one - cka.linear_cka(x, y, unbiased=True)) < 1e-3


@pytest.mark.slow
def test_several_layers_at_once_are_each_pair():
  x, y = _related(48, seed=6)
  z = x[:, :3] ** 2
  acc = cka.MinibatchCKA()
  for start in range(0, 48, 16):
    s = slice(start, start + 16)
    acc.update([x[s], z[s]], [y[s], x[s], z[s]])
  matrix = acc.result()
  assert matrix.shape == (2, 3)
  for i, a in enumerate((x, z)):
    for j, b in enumerate((y, x, z)):
      np.testing.assert_allclose(matrix[i, j], _minibatch(a, b, 16), rtol=1e-5)


def test_mismatched_example_counts_are_refused():
  x, y = _related(20)
  with pytest.raises(ValueError, match='x has 20 examples and y has 19'):
    cka.linear_cka(x, y[:19])
  with pytest.raises(ValueError, match='same examples'):
    cka.hsic_sums([x], [y[:19]])
  with pytest.raises(ValueError, match=r'\[examples, features\]'):
    cka.linear_cka(x[None], y)
  with pytest.raises(ValueError, match='before any update'):
    cka.MinibatchCKA().result()


# ---------------------------------------------------------------------------
# The models' layers.


@pytest.mark.slow
def test_resnet_sows_its_unit_outputs_only_on_request():
  model, size = _resnet_classifier()
  x = random_images((2, size, size, 3))
  variables = {'params': _random_params(model, x)}
  logits, state = jax.jit(
      lambda v, x: model.apply(v, x, train=False, mutable=['intermediates'])
  )(variables, x)
  inter = state['intermediates']
  # Width 32 (outputs 4x): 4x4 after the root, stage 2 halves it.
  assert inter['block1']['unit1']['unit_output'][0].shape == (2, 4, 4, 128)
  assert inter['block2']['unit1']['unit_output'][0].shape == (2, 2, 2, 256)
  # Immutable: nothing stored, the same logits.
  assert set(
      jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  ) == {'params'}
  np.testing.assert_array_equal(
      logits, jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  )


def _resnet_classifier():
  """A BiT ResNet classifier as configs/digits_resnet.py builds one."""
  return (
      vit_jax.models.get_model(
          'R26+ViT-S_32',
          num_classes=3,
          transformer=None,
          classifier='gap',
          hidden_size=16,
          patches={'size': (1, 1)},
          resnet={'num_layers': (1, 1), 'width_factor': 0.5},
      ),
      16,
  )


@pytest.mark.parametrize('kind', ['vit', 'hybrid', 'resnet', 'mixer'])
def test_depth_layers_of_each_family(kind):
  model, size = _resnet_classifier() if kind == 'resnet' else tiny_model(kind)
  x = random_images((1, size, size, 3))
  # Shapes only: `available_layers` evaluates nothing either.
  params = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x
  )['params']
  layers = representations.available_layers(model, params, size)
  depth = representations.depth_layers(list(layers))
  blocks = [
      'Transformer/encoderblock_0/block_input',
      'Transformer/encoderblock_0/block_output',
      'Transformer/encoderblock_1/block_output',
  ]
  units = [
      'block1/unit1/unit_input',
      'block1/unit1/unit_output',
      'block2/unit1/unit_output',
  ]
  expected = {
      'vit': blocks,
      'hybrid': units + blocks,
      'resnet': units,
      'mixer': [
          'MixerBlock_0/block_input',
          'MixerBlock_0/block_output',
          'MixerBlock_1/block_output',
      ],
  }[kind]
  assert depth == expected
  assert list(layers)[-1] == 'pre_logits'
  assert [representations.short_label(n) for n in depth] == {
      'vit': ['emb', 'b1', 'b2'],
      'hybrid': ['stem', 's1u1', 's2u1', 'emb', 'b1', 'b2'],
      'resnet': ['stem', 's1u1', 's2u1'],
      'mixer': ['emb', 'b1', 'b2'],
  }[kind]


def test_depth_order_is_numeric_not_alphabetical():
  names = [f'Transformer/encoderblock_{i}/block_output' for i in (10, 2, 1)]
  names += [
      'pre_logits',
      'Transformer/encoderblock_1/block_input',
      'block1/unit1/unit_output',
      'block1/unit1/unit_input',
  ]
  assert sorted(names, key=representations.depth_key) == [
      'block1/unit1/unit_input',
      'block1/unit1/unit_output',
      'Transformer/encoderblock_1/block_input',
      'Transformer/encoderblock_1/block_output',
      'Transformer/encoderblock_2/block_output',
      'Transformer/encoderblock_10/block_output',
      'pre_logits',
  ]


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['hybrid', 'mixer'])
def test_block_inputs_are_the_encoder_input_and_the_previous_outputs(kind):
  """The block inputs the analysis sows (the models do not): the first is
  what the position embedding returns (the Mixer: its patch embedding),
  captured here by flax instead; the others are the previous outputs."""
  model, size = tiny_model(kind)
  x = random_images((2, size, size, 3))
  params = _random_params(model, x)
  layers = representations.available_layers(model, params, size)
  got = dict(
      zip(
          layers,
          jax.jit(representations.representation_fn(model, list(layers)))(
              params, x
          ),
      )
  )
  first = 'Transformer/posembed_input' if kind == 'hybrid' else 'stem'
  _, state = jax.jit(
      lambda p, x: model.apply(
          {'params': p},
          x,
          train=False,
          mutable=['intermediates'],
          capture_intermediates=lambda m, _: m.name == first.split('/')[-1],
      )
  )(params, x)
  captured = state['intermediates']
  for part in first.split('/'):
    captured = captured[part]
  start = (
      'Transformer/encoderblock_0/block_input'
      if kind == 'hybrid'
      else 'MixerBlock_0/block_input'
  )
  np.testing.assert_array_equal(
      got[start], captured['__call__'][0].reshape(2, -1)
  )
  pairs = [
      (
          'Transformer/encoderblock_1/block_input',
          'Transformer/encoderblock_0/block_output',
      ),
      ('block2/unit1/unit_input', 'block1/unit1/unit_output'),
  ]
  if kind == 'mixer':
    pairs = [('MixerBlock_1/block_input', 'MixerBlock_0/block_output')]
  for later, earlier in pairs:
    np.testing.assert_array_equal(got[later], got[earlier])


@pytest.mark.slow
def test_vit_options_without_posembed_input_or_class_token():
  """Registers, the MAP head and a fixed 2-D position table: the encoder
  input is still the first layer, and the registers (which follow the
  patches and have no position) stay out of the attention distance."""
  model, size = tiny_model(
      'vit',
      num_registers=2,
      classifier='map',
      posemb='sincos2d',
      hidden_size=12,
  )
  images = random_images((8, size, size, 3))
  params = _random_params(model, images)
  result = representations.minibatch_cka(model, params, images, batch_size=8)
  assert result['layers_a'][0] == 'Transformer/encoderblock_0/block_input'
  np.testing.assert_allclose(np.diag(result['matrix']), 1.0, rtol=1e-5)
  # 16 patches and 2 registers, no class token.
  weights = analysis.attention_weights(model, params, images)
  assert weights.shape[-1] == 18
  np.testing.assert_allclose(
      analysis._attention_distance(model, params, images),  # pylint: disable=protected-access
      analysis.mean_attention_distance(
          weights[..., :16, :16], (4, 4), (4, 4), num_prefix_tokens=0
      ),
      rtol=1e-6,
  )


@pytest.mark.slow
def test_scanned_layers_have_the_unrolled_names_and_values():
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top

  scanned, size = tiny_model('vit', scan=True)
  loop, _ = tiny_model('vit')
  x = random_images((5, size, size, 3))
  params = _random_params(scanned, x)
  layers = list(representations.available_layers(scanned, params, size))
  assert 'Transformer/encoderblock_1/block_input' in layers
  got = jax.jit(representations.representation_fn(scanned, layers))(params, x)
  want = jax.jit(representations.representation_fn(loop, layers))(
      checkpoint.unstack_encoder_blocks(params), x
  )
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_pooling_flattens_or_averages_the_tokens():
  tokens = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  np.testing.assert_array_equal(
      representations.pool(tokens, 'flatten'), tokens.reshape(2, 12)
  )
  np.testing.assert_array_equal(
      representations.pool(tokens, 'mean'), tokens.mean(1)
  )
  feature_map = tokens.reshape(2, 3, 1, 4)
  np.testing.assert_array_equal(
      representations.pool(feature_map, 'mean'), tokens.mean(1)
  )
  with pytest.raises(ValueError, match="Unknown pooling 'max'"):
    representations.pool(tokens, 'max')


@pytest.fixture(scope='module')
def two_models():
  """A tiny ViT and a tiny BiT ResNet classifier with random weights, and
  10 images each (at their own sizes)."""
  vit, vit_size = tiny_model('vit')
  resnet, resnet_size = _resnet_classifier()
  images = random_images((10, vit_size, vit_size, 3))
  return (
      vit,
      _random_params(vit, images),
      images,
      resnet,
      _random_params(resnet, images, seed=1),
      images,
  )


def _by_hand(model, params, images, layers, pooling):
  return jax.jit(representations.representation_fn(model, layers, pooling))(
      params, images
  )


@pytest.mark.slow
def test_model_cka_on_1_and_8_devices_is_the_array_estimator(two_models):
  vit, vit_params, images, resnet, resnet_params, _ = two_models
  # The default batch (64) is cut to the 10 images: one batch of 10 on one
  # device, of 16 with 6 padded on eight.
  run = lambda mesh: representations.minibatch_cka(
      vit, vit_params, images, model_b=resnet, params_b=resnet_params, mesh=mesh
  )
  on_one = run(sharding.make_mesh(devices=jax.devices()[:1]))
  on_eight = run(sharding.make_mesh())
  assert (on_one['batch_size'], on_eight['batch_size']) == (10, 16)
  for key in ('matrix', 'within_a', 'within_b'):
    np.testing.assert_allclose(on_eight[key], on_one[key], rtol=2e-5, atol=1e-6)
  assert on_one['matrix'].shape == (3, 3)
  np.testing.assert_allclose(np.diag(on_one['within_a']), 1.0, rtol=1e-5)
  # The same numbers from the representations by hand.
  xs = _by_hand(vit, vit_params, images, on_one['layers_a'], 'flatten')
  ys = _by_hand(resnet, resnet_params, images, on_one['layers_b'], 'flatten')
  acc = cka.MinibatchCKA()
  acc.update(xs, ys)
  np.testing.assert_allclose(
      on_one['matrix'], acc.result(), rtol=1e-4, atol=1e-6
  )
  within = cka.MinibatchCKA()
  within.update(ys)
  np.testing.assert_allclose(
      on_one['within_b'], within.result(), rtol=1e-4, atol=1e-6
  )


@pytest.mark.slow
def test_mean_pooled_model_cka_matches_the_numpy_reference(two_models):
  """Batches of 8 + 2 (the second has too few examples and is left out)."""
  vit, vit_params, images, resnet, resnet_params, _ = two_models
  layers_a = ['Transformer/encoderblock_1/block_output']
  layers_b = ['block2/unit1/unit_output']
  result = representations.minibatch_cka(
      vit,
      vit_params,
      images,
      model_b=resnet,
      params_b=resnet_params,
      layers_a=layers_a,
      layers_b=layers_b,
      pooling='mean',
      batch_size=8,
  )
  (x,) = _by_hand(vit, vit_params, images, layers_a, 'mean')
  (y,) = _by_hand(resnet, resnet_params, images, layers_b, 'mean')
  assert x.shape == (10, 10) and y.shape == (10, 256)  # Tokens averaged.
  np.testing.assert_allclose(
      result['matrix'][0, 0],
      numpy_minibatch_cka(np.asarray(x), np.asarray(y), 8),
      rtol=1e-3,
  )


def test_model_cka_refuses_bad_inputs(two_models):
  vit, vit_params, images, resnet, resnet_params, _ = two_models
  with pytest.raises(
      ValueError, match='images_a has 10 images and images_b ' 'has 9'
  ):
    representations.minibatch_cka(
        vit,
        vit_params,
        images,
        model_b=resnet,
        params_b=resnet_params,
        images_b=images[:9],
    )
  with pytest.raises(
      ValueError,
      match="layers_b: 'Transformer/nope' is not "
      'a layer of the model; its layers are: '
      'block1/unit1/unit_input',
  ):
    representations.minibatch_cka(
        vit,
        vit_params,
        images,
        model_b=resnet,
        params_b=resnet_params,
        layers_b=['Transformer/nope'],
    )
  with pytest.raises(ValueError, match='batch_size=2: the unbiased HSIC'):
    representations.minibatch_cka(vit, vit_params, images, batch_size=2)
  with pytest.raises(
      ValueError, match='batch_size=6 is not divisible by ' 'the 8 devices'
  ):
    representations.minibatch_cka(vit, vit_params, images, batch_size=6)
  with pytest.raises(ValueError, match="pooling='max'"):
    representations.minibatch_cka(vit, vit_params, images, pooling='max')
  with pytest.raises(ValueError, match='layers_b is only for a second model'):
    representations.minibatch_cka(
        vit, vit_params, images, layers_b=['block1/unit1/unit_input']
    )


@pytest.mark.slow
def test_analyze_cka_writes_heatmaps_and_numbers(two_models, tmp_path):
  vit, vit_params, images, resnet, resnet_params, _ = two_models
  saved = analysis.analyze_cka(
      vit,
      vit_params,
      images,
      str(tmp_path),
      name_a='vit',
      model_b=resnet,
      params_b=resnet_params,
      name_b='resnet',
      batch_size=8,
  )
  for name in analysis.CKA_FIGURES:
    with open(tmp_path / name, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
  on_disk = json.load(open(tmp_path / analysis.CKA_RESULTS_FILE))
  assert on_disk == json.loads(json.dumps(saved))
  a, b = on_disk['models']['a'], on_disk['models']['b']
  assert a['labels'] == ['emb', 'b1', 'b2']
  assert b['labels'] == ['stem', 's1u1', 's2u1']
  assert np.array(on_disk['between']).shape == (3, 3)
  # Each block's CKA with its input: the heatmap's entry below the diagonal.
  assert [r['cka'] for r in a['with_input']] == [
      a['within'][1][0],
      a['within'][2][1],
  ]
  assert [r['input'] for r in b['with_input']] == [
      'block1/unit1/unit_input',
      'block1/unit1/unit_output',
  ]
  assert np.array(a['mean_attention_distance_px']).shape == (2, 2)
  assert b['mean_attention_distance_px'] is None  # No attention.


# ---------------------------------------------------------------------------
# The command line.


def _workdir(path, model_overrides, params, image_size):
  """A training run's files as vit_jax.main leaves them (no training)."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import run_checkpoints  # pylint: disable=g-import-not-at-top

  config = config_lib.get_base()
  config.model_name, config.model = model_overrides
  config.image_size = image_size
  os.makedirs(path)
  with open(os.path.join(path, config_lib.CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort())
  with open(os.path.join(path, 'class_names.json'), 'w') as f:
    json.dump({'class_names': list('abc')}, f)
  checkpoint.save(params, os.path.join(path, run_checkpoints.FINAL_PARAMS_FILE))
  return str(path)


def _image_folder(path, count=12):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  os.makedirs(path)
  for i in range(count):
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
        os.path.join(path, f'{i:02d}.png')
    )
  return str(path)


@pytest.mark.slow
def test_cka_command_line(tmp_path):
  """One process (flags are process-global) runs the CLI's main over bad
  flag sets, each of which must stop with its usage error, then the
  subcommand for real through `app.run`, as `python -m` does."""
  images = random_images((1, 16, 16, 3))
  vit = vit_jax.models.get_model(
      'testing', num_classes=3, patches={'size': (4, 4)}
  )
  run_a = _workdir(
      tmp_path / 'vit',
      ('testing', {'patches': {'size': (4, 4)}}),
      _random_params(vit, images),
      16,
  )
  resnet, _ = _resnet_classifier()
  run_b = _workdir(
      tmp_path / 'resnet',
      (
          'R26+ViT-S_32',
          {
              'transformer': None,
              'classifier': 'gap',
              'hidden_size': 16,
              'patches': {'size': (1, 1)},
              'resnet': {'num_layers': (1, 1), 'width_factor': 0.5},
          },
      ),
      _random_params(resnet, images),
      16,
  )
  folder = _image_folder(tmp_path / 'images')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  common = [f'--workdir={run_a}', f'--images={folder}', '--num_images=12']
  bad = {
      'both_b': [
          'cka',
          *common,
          f'--workdir_b={run_b}',
          '--pretrained_path_b=x.npz',
          '--model_b=testing',
      ],
      'model_b_alone': ['cka', *common, '--model_b=testing'],
      'layer': ['cka', *common, '--layers=Transformer/nope'],
      'layer_b': [
          'cka',
          *common,
          f'--workdir_b={run_b}',
          '--layers_b=block9/unit1/unit_input',
      ],
      'no_subcommand': [*common, f'--workdir_b={run_b}'],
      'unknown_subcommand': ['ckaa', *common],
  }
  out = tmp_path / 'out'
  good = [
      'cka',
      *common,
      f'--workdir_b={run_b}',
      '--cka_batch=8',
      f'--out={out}',
  ]
  driver = (
      'import json, sys\n'
      'from absl import app, flags\n'
      'from vit_jax.analysis import __main__ as cli\n'
      'errors = {}\n'
      f'for name, args in {bad!r}.items():\n'
      '  flags.FLAGS.unparse_flags()\n'
      '  try:\n'
      "    cli.main(flags.FLAGS(['prog'] + args))\n"
      "    errors[name] = 'no error'\n"
      '  except app.UsageError as e:\n'
      '    errors[name] = str(e)\n'
      'print(json.dumps(errors))\n'
      'flags.FLAGS.unparse_flags()\n'
      f'app.run(cli.main, argv=["vit_jax.analysis", *{good!r}])\n'
  )
  result = subprocess.run(
      [sys.executable, '-c', driver],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  errors = json.loads(
      next(
          line
          for line in result.stdout.splitlines()
          if line.startswith('{"both_b"')
      )
  )
  assert errors['both_b'].startswith(
      'Pass at most one of --workdir_b or ' '--pretrained_path_b'
  )
  assert errors['model_b_alone'].startswith(
      '--model_b names the model of ' '--pretrained_path_b'
  )
  assert errors['layer'].startswith(
      "--layers: 'Transformer/nope' is not a " 'layer of the model'
  )
  assert errors['layer_b'].startswith(
      "--layers_b: 'block9/unit1/unit_input' is not a layer"
  )
  assert errors['no_subcommand'] == (
      '--workdir_b: only for the cka '
      'subcommand (python -m vit_jax.analysis '
      'cka ...).'
  )
  assert errors['unknown_subcommand'].startswith(
      "Unexpected arguments: ['ckaa']"
  )
  assert sorted(os.listdir(out)) == sorted(
      [*analysis.CKA_FIGURES, analysis.CKA_RESULTS_FILE]
  )
  saved = json.load(open(out / analysis.CKA_RESULTS_FILE))
  assert (saved['num_images'], saved['batch_size']) == (12, 8)
  assert saved['models']['a']['name'] == 'vit'
  assert saved['models']['b']['name'] == 'resnet'
  # 'testing' has one block: its input and output; the ResNet root block's
  # output and two units.
  assert np.array(saved['between']).shape == (2, 3)
