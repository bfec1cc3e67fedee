"""`dynamic_image_size`: one model, one set of parameters, any image size.

The references are independent of the model's resize: `load_pretrained`'s
checkpoint surgery (scipy for 'bilinear') and `scipy.ndimage.zoom(order=1)`
written out here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from helpers import init_params
from helpers import random_images
from helpers import randomize
from helpers import tiny_model
from vit_jax import checkpoint
from vit_jax.models import vit

# The tiny ViT: 4x4 patches, trained at 16x16 px (a 4x4 grid).
_SIZE = 16


def _logits(model, params, x):
  return np.asarray(
      jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
          params, x
      )
  )


def _flat(tree):
  return checkpoint.flatten(tree)


def _trained(tmp_path, **extra):
  """(params, path) of a tiny ViT with random weights, saved as .npz."""
  model, size = tiny_model('vit', **extra)
  assert size == _SIZE
  params = randomize(init_params(model, random_images((1, size, size, 3))))
  path = str(tmp_path / 'trained.npz')
  checkpoint.save(params, path)
  return params, path


def _zoom_reference(posemb, old, new, extra):
  """The patch embeddings zoomed by scipy (order=1), the class token's kept."""
  dim = posemb.shape[-1]
  grid = np.asarray(posemb)[0, extra:].reshape(*old, dim)
  grid = scipy.ndimage.zoom(
      grid, (new[0] / old[0], new[1] / old[1], 1), order=1
  )
  return np.concatenate(
      [np.asarray(posemb)[:, :extra], grid.reshape(1, new[0] * new[1], dim)],
      axis=1,
  )


@pytest.mark.slow
@pytest.mark.parametrize('posemb', ['learn', 'learn2d', 'sincos2d', 'none'])
def test_off_or_at_the_trained_size_nothing_changes(posemb):
  """The parameter tree is the fixed-size model's; at its size, the logits
  are bit for bit the same."""
  fixed, _ = tiny_model('vit', posemb=posemb, hidden_size=8)
  dynamic, _ = tiny_model(
      'vit', posemb=posemb, hidden_size=8, dynamic_image_size=True
  )
  x = random_images((2, _SIZE, _SIZE, 3), seed=1)
  params = init_params(fixed, x)
  flat, flat_dynamic = _flat(params), _flat(init_params(dynamic, x))
  assert sorted(flat) == sorted(flat_dynamic)
  for key in flat:
    np.testing.assert_array_equal(flat[key], flat_dynamic[key], err_msg=key)
  params = randomize(params)
  np.testing.assert_array_equal(
      _logits(dynamic, params, x), _logits(fixed, params, x)
  )
  if posemb in ('sincos2d', 'none'):  # Nothing to resize at any size.
    x = random_images((2, 8, 24, 3), seed=1)
    np.testing.assert_array_equal(
        _logits(dynamic, params, x), _logits(fixed, params, x)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    'scan,classifier,height,width',
    [
        (False, 'token', 32, 32),
        (True, 'token', 32, 32),
        (False, 'token', 16, 32),
        (True, 'token', 16, 32),
        (False, 'gap', 12, 8),
        (True, 'gap', 28, 20),
    ],
)
def test_equals_load_pretrained_at_the_new_size(
    tmp_path, scan, classifier, height, width
):
  """Square, rectangular and smaller grids; with and without a class token
  and `scan`."""
  options = dict(scan=scan, classifier=classifier)
  params, path = _trained(tmp_path, **options)
  dynamic, _ = tiny_model('vit', dynamic_image_size=True, **options)
  fixed, _ = tiny_model('vit', **options)
  x = random_images((2, height, width, 3), seed=2)
  loaded = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init_params(fixed, x),
      model_config=fixed,
      new_grid_size=(height // 4, width // 4),
  )
  loaded['head'] = params['head']  # load_pretrained resets it.
  np.testing.assert_allclose(
      _logits(dynamic, params, x), _logits(fixed, loaded, x), atol=1e-5, rtol=0
  )


@pytest.mark.slow
def test_bicubic_equals_load_pretrained_bicubic(tmp_path):
  params, path = _trained(tmp_path)
  dynamic, _ = tiny_model(
      'vit', dynamic_image_size=True, posemb_resize='bicubic'
  )
  bilinear, _ = tiny_model('vit', dynamic_image_size=True)
  fixed, _ = tiny_model('vit')
  x = random_images((2, 24, 32, 3), seed=3)
  loaded = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init_params(fixed, x),
      model_config=fixed,
      new_grid_size=(6, 8),
      posemb_method='bicubic',
  )
  loaded['head'] = params['head']
  logits = _logits(dynamic, params, x)
  np.testing.assert_allclose(
      logits, _logits(fixed, loaded, x), atol=1e-5, rtol=0
  )
  assert np.abs(logits - _logits(bilinear, params, x)).max() > 1e-4


def _added_posemb(posemb, x, grid, **options):
  module = vit.AddPositionEmbs(**options)
  return np.asarray(
      module.apply(
          {'params': {'pos_embedding': jnp.asarray(posemb)}},
          jnp.asarray(x),
          grid,
      )
  )


@pytest.mark.parametrize('extra', [0, 1])
@pytest.mark.parametrize('new', [(8, 8), (4, 8), (7, 3), (2, 2), (1, 5)])
def test_resized_table_is_scipy_zoom_order_1(extra, new):
  posemb = random_images((1, extra + 16, 6), seed=4)
  x = np.zeros((1, extra + new[0] * new[1], 6), np.float32)
  np.testing.assert_allclose(
      _added_posemb(posemb, x, new),
      _zoom_reference(posemb, (4, 4), new, extra),
      atol=1e-6,
      rtol=0,
  )


def test_antialias_is_jax_image_resize_antialiased_bicubic():
  posemb = random_images((1, 1 + 64, 6), seed=5)  # 8x8, shrunk to 3x5.
  x = np.zeros((1, 1 + 15, 6), np.float32)
  out = _added_posemb(posemb, x, (3, 5), resize='bicubic', antialias=True)
  expected = jax.image.resize(
      posemb[0, 1:].reshape(8, 8, 6),
      (3, 5, 6),
      method='bicubic',
      antialias=True,
  )
  np.testing.assert_array_equal(out[:, 0], posemb[:, 0])
  np.testing.assert_allclose(
      out[0, 1:], np.reshape(expected, (15, 6)), atol=1e-6, rtol=0
  )
  plain = _added_posemb(posemb, x, (3, 5), resize='bicubic')
  assert np.abs(out - plain).max() > 1e-3


@pytest.mark.slow
def test_learn2d_resizes_rows_and_columns():
  """Each of the D/2-wide tables along its own axis, as scipy would."""
  model, _ = tiny_model('vit', posemb='learn2d', dynamic_image_size=True)
  fixed, _ = tiny_model('vit', posemb='learn2d')
  params = randomize(init_params(model, random_images((1, 16, 16, 3))))
  x = random_images((2, 28, 8, 3), seed=6)  # A 7x2 grid.
  resized = dict(params)
  rows, cols = (np.asarray(params['posembed_2d'][k]) for k in ('row', 'column'))
  resized['posembed_2d'] = {
      'row': scipy.ndimage.zoom(rows, (7 / 4, 1), order=1),
      'column': scipy.ndimage.zoom(cols, (2 / 4, 1), order=1),
  }
  np.testing.assert_allclose(
      _logits(model, params, x), _logits(fixed, resized, x), atol=1e-5, rtol=0
  )


@pytest.mark.slow
def test_posemb_grid_size_names_the_stored_grid(tmp_path):
  """A model made for 4x4 grids, first seen at a 4x8 one."""
  params, path = _trained(tmp_path)
  model, _ = tiny_model('vit', dynamic_image_size=True, posemb_grid_size=(4, 4))
  x = random_images((2, 16, 32, 3), seed=7)
  made = init_params(model, x)
  assert made['Transformer']['posembed_input']['pos_embedding'].shape == (
      1,
      17,
      10,
  )
  fixed, _ = tiny_model('vit')
  loaded = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init_params(fixed, x),
      model_config=fixed,
      grid_size=(4, 4),
      new_grid_size=(4, 8),
  )
  loaded['head'] = params['head']
  np.testing.assert_allclose(
      _logits(model, params, x), _logits(fixed, loaded, x), atol=1e-5, rtol=0
  )


@pytest.mark.parametrize(
    'options,shape,message',
    [
        ({}, (1, 16, 18, 3), 'not divisible by the patch size 4x4'),
        ({'posemb_resize': 'nearest'}, (1, 16, 16, 3), 'Unknown posemb_resize'),
        ({'posemb_antialias': True}, (1, 16, 16, 3), 'needs posemb_resize='),
    ],
)
def test_bad_inputs_are_refused_in_one_line(options, shape, message):
  model, _ = tiny_model('vit', dynamic_image_size=True, **options)
  with pytest.raises(ValueError, match=message) as e:
    model.init(jax.random.key(0), np.zeros(shape, np.float32), train=False)
  assert '\n' not in str(e.value)


def test_a_stored_grid_it_cannot_infer_is_refused(tmp_path):
  params, _ = _trained(tmp_path)
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  params['Transformer']['posembed_input']['pos_embedding'] = posemb[:, :13]
  model, _ = tiny_model('vit', dynamic_image_size=True)
  with pytest.raises(ValueError, match='set posemb_grid_size'):
    _logits(model, params, random_images((1, 16, 16, 3)))


# Run-time resolution in the serving and inspection tools (export, evaluate,
# analysis): each compared with the checkpoint resized at load time
# (`load_pretrained`) and applied as a fixed-size model.


def _loaded_at(path, fixed, head, height, width):
  """The .npz at `path` resized by `load_pretrained` to a height x width
  input (the head it resets put back)."""
  x = np.zeros((1, height, width, 3), np.float32)
  params = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init_params(fixed, x),
      model_config=fixed,
      new_grid_size=(height // 4, width // 4),
  )
  params['head'] = head
  return params


def _float64_taps_resize(table, new):
  """Corner-aligned linear resize of [n, D] to [new, D] in float64 NumPy."""
  old = table.shape[0]
  coords = np.arange(new) * ((old - 1) / (new - 1) if new > 1 else 0.0)
  low = np.minimum(np.floor(coords).astype(int), old - 1)
  high = np.minimum(low + 1, old - 1)
  frac = (coords - low)[:, None]
  return table[low] * (1 - frac) + table[high] * frac


def test_bilinear_resize_traced_at_a_symbolic_size():
  """`jax.export` with the new size symbolic: the float64 sampling and
  scipy's zoom at every size it is called at."""
  table = random_images((5, 3), seed=8)
  (n,) = jax.export.symbolic_shape('n')
  exported = jax.export.export(
      jax.jit(lambda t, like: vit.resize_posemb_grid(t, (like.shape[0],))),
      platforms=('cpu',),
  )(
      jax.ShapeDtypeStruct(table.shape, jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.float32),
  )
  for new in (1, 2, 4, 5, 7, 9, 13):
    got = np.asarray(exported.call(table, np.zeros(new, np.float32)))
    np.testing.assert_allclose(
        got, _float64_taps_resize(table.astype(np.float64), new), atol=1e-6
    )
    np.testing.assert_allclose(
        got,
        scipy.ndimage.zoom(table, (new / 5, 1), order=1),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize('new', [1, 2, 3, 6, 8, 11, 16, 31, 64])
def test_bilinear_resize_is_the_float64_sampling(new):
  table = random_images((8, 4), seed=9)
  np.testing.assert_allclose(
      np.asarray(vit.resize_posemb_grid(jnp.asarray(table), (new,))),
      _float64_taps_resize(table.astype(np.float64), new),
      atol=1e-6,
      rtol=0,
  )


@pytest.mark.slow
def test_stablehlo_with_symbolic_height_and_width(tmp_path):
  """One artefact, called at a square and a rectangular size."""
  import json  # pylint: disable=g-import-not-at-top

  from vit_jax import export  # pylint: disable=g-import-not-at-top

  params, path = _trained(tmp_path)
  fixed, _ = tiny_model('vit')
  export.export_stablehlo(
      fixed,
      params,
      (_SIZE, _SIZE),
      tmp_path / 'out',
      platforms=('cpu',),
      dynamic_image_size=True,
  )
  exported = export.load_stablehlo(tmp_path / 'out')
  assert [str(d) for d in exported.in_avals[0].shape] == [
      'batch',
      '4*height',
      '4*width',
      '3',
  ]
  for height, width in ((32, 32), (12, 24)):
    x = random_images((2, height, width, 3), seed=10)
    want = _logits(
        fixed, _loaded_at(path, fixed, params['head'], height, width), x
    )
    np.testing.assert_allclose(
        np.asarray(exported.call(x)), want, atol=1e-5, rtol=0
    )
  info = json.loads((tmp_path / 'out' / export.SERVING_FILE).read_text())
  assert info['inputs']['images']['shape'] == [None, None, None, 3]
  assert info['inputs']['images']['multiple_of'] == [4, 4]


@pytest.mark.slow
def test_savedmodel_with_any_height_and_width(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from vit_jax import export  # pylint: disable=g-import-not-at-top

  params, path = _trained(tmp_path)
  fixed, _ = tiny_model('vit')
  export.export_savedmodel(
      fixed,
      params,
      (_SIZE, _SIZE),
      tmp_path / 'sm',
      platforms=('cpu',),
      dynamic_image_size=True,
  )
  served = tf.saved_model.load(str(tmp_path / 'sm'))
  for height, width in ((8, 8), (20, 12)):
    x = random_images((2, height, width, 3), seed=11)
    got = served.signatures['serving_default'](images=tf.constant(x))
    want = _logits(
        fixed, _loaded_at(path, fixed, params['head'], height, width), x
    )
    np.testing.assert_allclose(got['logits'].numpy(), want, atol=1e-5, rtol=0)
  # Raw 13x22 images: resized to the nearest multiples of 4 (12x24: 22/4 =
  # 5.5 rounds half to even, to 6), then to [-1, 1].
  raw = np.random.default_rng(2).integers(0, 256, (2, 13, 22, 3), np.uint8)
  resized = tf.image.resize(
      tf.constant(raw.astype(np.float32)), (12, 24), method='bilinear'
  ).numpy()
  want = _logits(
      fixed,
      _loaded_at(path, fixed, params['head'], 12, 24),
      resized / 127.5 - 1,
  )
  got = served.signatures['serving_uint8'](images=tf.constant(raw))['logits']
  np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    'options,message',
    [
        ({'posemb': 'sincos2d', 'hidden_size': 8}, "posemb='sincos2d'"),
        ({'posemb_resize': 'bicubic'}, "posemb_resize='bicubic'"),
    ],
)
def test_export_refuses_what_it_cannot_trace(tmp_path, options, message):
  from vit_jax import export  # pylint: disable=g-import-not-at-top

  model, _ = tiny_model('vit', **options)
  with pytest.raises(ValueError, match=message) as e:
    export.export_stablehlo(
        model, {}, (_SIZE, _SIZE), tmp_path / 'out', dynamic_image_size=True
    )
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'out').exists()


def test_models_without_the_option_are_refused():
  from vit_jax import loading  # pylint: disable=g-import-not-at-top
  import vit_jax.models  # pylint: disable=g-import-not-at-top

  mixer = vit_jax.models.get_model('Mixer-B_16', num_classes=3)
  with pytest.raises(ValueError, match='a.npz: MlpMixer has no dynamic_image'):
    loading.dynamic_model(mixer, 'a.npz')
  model, _ = tiny_model('vit')
  assert loading.dynamic_model(model, 'b.npz').dynamic_image_size


def _numpy_rollout(weights):
  """Abnar & Zuidema's rollout: [layers, batch, heads, T, T] -> [batch, T,
  T]."""
  a = weights.astype(np.float64).mean(axis=2)
  a = a + np.eye(a.shape[-1])
  a = a / a.sum(-1, keepdims=True)
  joint = a[0]
  for layer in a[1:]:
    joint = np.einsum('bij,bjk->bik', layer, joint)
  return joint


@pytest.mark.slow
def test_rollout_on_a_rectangular_grid(tmp_path):
  """The class token's rollout at a 4x8 grid: row r, column c of the map is
  patch r * 8 + c of the fixed-size model resized at load time."""
  from vit_jax import analysis  # pylint: disable=g-import-not-at-top

  params, path = _trained(tmp_path)
  fixed, _ = tiny_model('vit')
  dynamic = fixed.clone(dynamic_image_size=True)
  x = random_images((2, 16, 32, 3), seed=12)
  weights = analysis.attention_weights(dynamic, params, x)
  grid = analysis.grid_of(dynamic, x.shape[1:3])
  assert grid == (4, 8)
  maps = analysis.class_token_map(analysis.attention_rollout(weights), grid)
  reference = _numpy_rollout(
      analysis.attention_weights(
          fixed, _loaded_at(path, fixed, params['head'], 16, 32), x
      )
  )[:, 0, 1:]
  reference = reference / reference.max(-1, keepdims=True)
  for r in range(4):
    for c in range(8):
      np.testing.assert_allclose(
          maps[:, r, c], reference[:, r * 8 + c], atol=1e-5, rtol=0
      )


@pytest.mark.slow
def test_evaluate_at_another_size(tmp_path):
  """Digits at 24 px by a model trained at 16: the metrics of the checkpoint
  resized at load time."""
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import evaluate  # pylint: disable=g-import-not-at-top

  model, _ = tiny_model('vit', num_classes=10)
  params = randomize(init_params(model, random_images((1, 16, 16, 3))))
  path = str(tmp_path / 'trained.npz')
  checkpoint.save(params, path)
  config = config_lib.get_base()
  config.dataset = 'digits'
  config.tfds_data_dir = str(tmp_path / 'tfds')
  config.model_name = 'testing'
  config.model = {'patches': {'size': (4, 4)}, 'transformer': {'num_layers': 2}}
  config.image_size = 24
  config.batch_eval = 96
  got = evaluate.evaluate_params(
      config, params, fewshot=False, dynamic_image_size=True
  )
  want = evaluate.evaluate_params(
      config,
      _loaded_at(path, model, params['head'], 24, 24),
      fewshot=False,
  )
  assert got['eval/examples'] == want['eval/examples'] == 299
  np.testing.assert_allclose(got['eval/loss'], want['eval/loss'], rtol=1e-5)
  assert got['eval/accuracy'] == want['eval/accuracy']
  with pytest.raises(ValueError, match='dynamic_image_size=True'):
    evaluate.evaluate_params(config, params, fewshot=False)
