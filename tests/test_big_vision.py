"""big_vision and SigLIP files: `checkpoint.load` against a NumPy forward pass
written from big_vision's layout (tests/numpy_reference.py), never against
vit_jax's own code path.

The files are made here the way big_vision's `utils.save_checkpoint` lays
them out (flat `params/...` keys), from random weights.
"""

import logging

import jax
import numpy as np
import pytest
import scipy.ndimage

import helpers
import numpy_reference
from vit_jax import checkpoint
import vit_jax.models

# The slow tier: a model per layout compiled twice (ours, the reference).
pytestmark = pytest.mark.slow

_POOL = {'tok': 'token', 'gap': 'gap', 'map': 'map'}
_SIZE = 16  # 4x4 patches of 4 pixels.


def _model(pool, posemb, num_classes=5, scan=False):
  return vit_jax.models.get_model(
      'testing',
      num_classes=num_classes,
      classifier=_POOL[pool],
      posemb=posemb,
      hidden_size=8,
      patches={'size': (4, 4)},
      scan=scan,
      transformer={'num_layers': 2, 'mlp_dim': 16, 'num_heads': 2},
  )


def big_vision_flat(pool, posemb, *, stacked=False, head=True, seed=0):
  """Random big_vision-layout parameters {'embedding/kernel': ..., ...}."""
  model = _model(pool, 'none', num_classes=5 if head else 0)
  images = helpers.random_images((1, _SIZE, _SIZE, 3))
  ours = checkpoint.flatten(
      helpers.randomize(helpers.init_params(model, images), seed=seed)
  )
  rng = np.random.default_rng(seed + 1)
  flat = {}
  for key, value in ours.items():
    # The names big_vision's modules get are vit_jax's Linen names.
    flat[key] = np.asarray(value)
  if posemb == 'learn':
    flat['pos_embedding'] = rng.normal(size=(1, 16, 8)).astype(np.float32)
  if stacked:
    blocks = sorted(
        k for k in flat if k.startswith('Transformer/encoderblock_')
    )
    per_layer = {}
    for key in blocks:
      _, block, rest = key.split('/', 2)
      per_layer.setdefault(rest, {})[int(block.rsplit('_', 1)[1])] = flat.pop(
          key
      )
    for rest, layers in per_layer.items():
      flat['Transformer/encoderblock/' + rest] = np.stack(
          [layers[i] for i in sorted(layers)]
      )
  return flat


def _write(path, flat, prefix='params/'):
  np.savez(path, **{prefix + k: v for k, v in flat.items()})


@pytest.mark.parametrize(
    'pool,posemb,stacked',
    [
        ('tok', 'learn', False),
        ('gap', 'sincos2d', True),
        ('map', 'learn', True),
        ('map', 'sincos2d', False),
        ('tok', 'sincos2d', True),
        ('gap', 'learn', False),
    ],
)
def test_big_vision_classifiers_give_the_reference_logits(
    tmp_path, caplog, pool, posemb, stacked
):
  flat = big_vision_flat(pool, posemb, stacked=stacked)
  path = str(tmp_path / 'bv.npz')
  _write(path, flat)
  with caplog.at_level(logging.INFO):
    params = checkpoint.load(path)
  assert checkpoint.LAYOUT_BIG_VISION in caplog.text or (
      posemb == 'sincos2d' and pool != 'map'
  )  # Nothing big_vision-only.
  if stacked:
    assert 'stacked (scan) blocks' in caplog.text
  images = helpers.random_images((3, _SIZE, _SIZE, 3), seed=4)
  want = numpy_reference.big_vision_logits(
      flat, images, pool=pool, posemb=posemb
  )
  for scan in (False, True):
    model = _model(pool, posemb, scan=scan)
    tree = checkpoint.stack_encoder_blocks(params) if scan else params
    got = model.apply({'params': tree}, images, train=False)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_class_token_gets_no_position_embedding(tmp_path):
  flat = big_vision_flat('tok', 'learn')
  path = str(tmp_path / 'bv.npz')
  _write(path, flat)
  posemb = checkpoint.load(path)['Transformer']['posembed_input'][
      'pos_embedding'
  ]
  assert posemb.shape == (1, 17, 8)
  np.testing.assert_array_equal(posemb[:, 0], 0)
  np.testing.assert_array_equal(posemb[:, 1:], flat['pos_embedding'])


def _siglip_file(path, flat):
  """A two-tower file: the image tower, a text tower, temperature, bias."""
  rng = np.random.default_rng(7)
  text = {
      'Encoder_0/encoder_norm/scale': rng.normal(size=(8,)),
      'Embed_0/embedding': rng.normal(size=(11, 8)),
      'head/kernel': rng.normal(size=(8, 8)),
  }
  arrays = {'img/' + k: v for k, v in flat.items()}
  arrays.update({'txt/' + k: v.astype(np.float32) for k, v in text.items()})
  arrays.update(
      {'t': np.array([2.3], np.float32), 'b': np.array([-10.0], np.float32)}
  )
  _write(path, arrays)


def test_siglip_image_tower_gives_the_reference_embedding(tmp_path, caplog):
  flat = big_vision_flat('map', 'learn', head=False)
  path = str(tmp_path / 'siglip.npz')
  _siglip_file(path, flat)
  images = helpers.random_images((2, _SIZE, _SIZE, 3), seed=5)
  want = numpy_reference.big_vision_logits(flat, images, pool='map')
  assert want.shape == (2, 8)
  model = _model('map', 'learn', num_classes=0)
  with caplog.at_level(logging.INFO):
    for params in (
        checkpoint.load(path, tower='img'),
        checkpoint.load(path + ':img'),
    ):
      got = model.apply({'params': params}, images, train=False)
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert "tower 'img' (skipping b, t, txt)" in caplog.text
  with pytest.raises(checkpoint.CheckpointError, match="tower='img'"):
    checkpoint.load(path)
  with pytest.raises(checkpoint.CheckpointError, match="no tower 'image'"):
    checkpoint.load(path, tower='image')


def test_load_pretrained_resizes_big_vision_position_embeddings(tmp_path):
  flat = big_vision_flat('tok', 'learn')
  path = str(tmp_path / 'bv.npz')
  _write(path, flat)
  grid = flat['pos_embedding'].reshape(4, 4, 8)
  # Square: 16 px -> 32 px, a 4x4 grid -> 8x8 (bilinear = scipy zoom 1).
  model = _model('tok', 'learn', num_classes=3)
  init = helpers.init_params(model, helpers.random_images((1, 32, 32, 3)))
  params = checkpoint.load_pretrained(
      pretrained_path=path, init_params=init, model_config=model
  )
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 65, 8)
  np.testing.assert_array_equal(posemb[0, 0], 0)  # The zero class slot.
  np.testing.assert_allclose(
      posemb[0, 1:],
      scipy.ndimage.zoom(grid, (2, 2, 1), order=1).reshape(64, 8),
      atol=1e-6,
  )
  np.testing.assert_array_equal(params['head']['kernel'], 0)  # Fresh head.
  # Rectangular: a 16x32 image, a 4x8 grid.
  init = helpers.init_params(model, helpers.random_images((1, 16, 32, 3)))
  params = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init,
      model_config=model,
      new_grid_size=(4, 8),
  )
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_allclose(
      posemb[0, 1:],
      scipy.ndimage.zoom(grid, (1, 2, 1), order=1).reshape(32, 8),
      atol=1e-6,
  )
  logits = model.apply(
      {'params': params}, helpers.random_images((1, 16, 32, 3)), train=False
  )
  assert logits.shape == (1, 3)


def test_layouts_are_told_apart(tmp_path):
  bv = big_vision_flat('map', 'sincos2d')
  assert checkpoint.detect_layout(bv) == checkpoint.LAYOUT_BIG_VISION
  model = _model('tok', 'learn')
  ours = helpers.init_params(model, helpers.random_images((1, 16, 16, 3)))
  path = str(tmp_path / 'published.npz')
  checkpoint.save(ours, path)
  with np.load(path) as f:
    published = dict(f)
  assert checkpoint.detect_layout(published) == checkpoint.LAYOUT_PUBLISHED
  assert checkpoint.detect_layout(checkpoint.flatten(ours)) == (
      checkpoint.LAYOUT_LINEN
  )
  jax.tree_util.tree_map(
      np.testing.assert_array_equal,
      checkpoint.load(path),
      jax.tree_util.tree_map(np.asarray, ours),
  )
