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
