"""Logits parity with big_vision's own ViT and SigLIP code (opt-in).

big_vision is not on PyPI; this test imports it from a clone and is skipped
otherwise (tests/test_big_vision.py checks the same layouts against a NumPy
reference in every run):

  git clone https://github.com/google-research/big_vision /tmp/big_vision
  pip install einops   # imported by big_vision.utils
  VIT_JAX_BIG_VISION_PATH=/tmp/big_vision \
      python -m pytest tests/test_parity_big_vision.py

Each case initialises big_vision's model with random weights, writes them the
way big_vision names them (`utils.tree_flatten_with_names` of
`{'params': ...}`, as its .npz checkpoints), loads the file with
`vit_jax.checkpoint.load` and compares logits (or SigLIP image embeddings) at
224 px, float32; FlexiViT's at 240 px at several patch sizes, and its
patch-embedding resize; SigLIP 2's NaFlex image tower on padded
256-token sequences of two aspect ratios.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_images
from helpers import randomize
from vit_jax import checkpoint
import vit_jax.models

if os.environ.get('VIT_JAX_BIG_VISION_PATH'):
  sys.path.insert(0, os.environ['VIT_JAX_BIG_VISION_PATH'])
bv_vit = pytest.importorskip(
    'big_vision.models.vit',
    reason='set VIT_JAX_BIG_VISION_PATH to a big_vision clone',
)
bv_utils = pytest.importorskip('big_vision.utils')
bv_two_towers = pytest.importorskip(
    'big_vision.models.proj.image_text.two_towers'
)
bv_flexi = pytest.importorskip('big_vision.models.proj.flexi.vit')

MAX_ABS_DIFF = 1e-4
_POOL = {'tok': 'token', 'gap': 'gap', 'map': 'map'}
_SIZE = 224


def _write_big_vision_npz(params, path):
  """Writes `params` as big_vision's .npz checkpoints name them."""
  names_and_values, _ = bv_utils.tree_flatten_with_names({'params': params})
  np.savez(
      path, **{name: np.asarray(value) for name, value in names_and_values}
  )


def _random_init(model, seed, scale=0.05):
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, _SIZE, _SIZE, 3)), train=False
      )
  )
  # Small weights keep 12 layers' activations in a sane range.
  return randomize(shapes['params'], seed=seed, scale=scale)


@pytest.mark.parametrize(
    'variant,name,pool,posemb,scan',
    [
        ('Ti/16', 'ViT-Ti_16', 'tok', 'learn', False),
        ('Ti/16', 'ViT-Ti_16', 'gap', 'sincos2d', True),
        ('Ti/16', 'ViT-Ti_16', 'map', 'learn', True),
        ('Ti/16', 'ViT-Ti_16', 'map', 'sincos2d', False),
        ('B/16', 'ViT-B_16', 'gap', 'learn', False),
    ],
)
def test_big_vision_classifier_file_gives_its_logits(
    tmp_path, variant, name, pool, posemb, scan
):
  bv_model = bv_vit.Model(
      num_classes=10, variant=variant, pool_type=pool, posemb=posemb, scan=scan
  )
  params = _random_init(bv_model, seed=len(pool) + scan)
  path = str(tmp_path / 'bv.npz')
  _write_big_vision_npz(params, path)
  images = random_images((2, _SIZE, _SIZE, 3), seed=1)
  want, _ = bv_model.apply({'params': params}, images, train=False)
  model = vit_jax.models.get_model(
      name, num_classes=10, classifier=_POOL[pool], posemb=posemb
  )
  got = model.apply({'params': checkpoint.load(path)}, images, train=False)
  diff = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
  print(
      f'{variant} pool={pool} posemb={posemb} scan={scan}: max abs logit '
      f'difference {diff:.2e} (logits up to '
      f'{float(np.max(np.abs(want))):.2f})'
  )
  assert diff < MAX_ABS_DIFF


def test_siglip_image_tower_gives_its_embeddings(tmp_path):
  # SigLIP B/16's image tower: MAP pooling, no head (out_dim None).
  bv_model = bv_two_towers.Model(
      image={'variant': 'B/16', 'pool_type': 'map'},
      out_dim=(None, 768),
      text_model='proj.image_text.text_transformer',
      text={'variant': 'B', 'vocab_size': 100},
  )
  shapes = jax.eval_shape(
      lambda: bv_model.init(
          jax.random.key(0),
          jnp.zeros((1, _SIZE, _SIZE, 3)),
          jnp.zeros((1, 16), jnp.int32),
      )
  )
  params = randomize(shapes['params'], seed=3, scale=0.05)
  path = str(tmp_path / 'siglip.npz')
  _write_big_vision_npz(params, path)
  images = random_images((2, _SIZE, _SIZE, 3), seed=2)
  _, _, out = bv_model.apply({'params': params}, images, None)
  want = np.asarray(out['img/pre_logits'])
  model = vit_jax.models.get_model('ViT-B_16', num_classes=0, classifier='map')
  got = np.asarray(
      model.apply(
          {'params': checkpoint.load(path, tower='img')}, images, train=False
      )
  )
  diff = float(np.max(np.abs(got - want)))
  print(
      f'SigLIP B/16 image tower: max abs embedding difference {diff:.2e} '
      f'(embeddings up to {float(np.max(np.abs(want))):.2f})'
  )
  assert diff < MAX_ABS_DIFF
  normalized = got / np.linalg.norm(got, axis=1, keepdims=True)
  np.testing.assert_allclose(normalized, out['img/normalized'], atol=1e-5)


@pytest.mark.parametrize('new_hw', [(8, 8), (16, 16), (30, 30), (48, 48)])
def test_patch_embedding_resize_is_big_vision_resample_patchemb(new_hw):
  # A 32x32 kernel of FlexiViT's initialisation scale (1 / sqrt(width)).
  kernel = np.random.default_rng(0).normal(size=(32, 32, 3, 16)) / 4
  kernel = kernel.astype(np.float32)
  want = np.asarray(bv_flexi.resample_patchemb(jnp.asarray(kernel), new_hw))
  got = np.asarray(checkpoint.resample_patch_embedding(kernel, new_hw))
  diff = float(np.max(np.abs(got - want)))
  print(
      f'resample_patchemb 32x32 -> {new_hw}: max abs difference {diff:.2e} '
      f'(values up to {float(np.max(np.abs(want))):.2f})'
  )
  assert diff < MAX_ABS_DIFF


@pytest.mark.parametrize('pool', ['gap', 'tok'])
def test_flexivit_file_gives_its_logits_at_every_patch_size(tmp_path, pool):
  # big_vision's FlexiViT: a 32x32 kernel and a 7x7 position grid, resampled
  # to the patch size that gives `seqhw` tokens per side of a 240 px image.
  bv_model = bv_flexi.Model(
      num_classes=10, variant='Ti', pool_type=pool, depth=4
  )
  shapes = jax.eval_shape(
      lambda: bv_model.init(jax.random.key(0), jnp.zeros((1, 240, 240, 3)))
  )
  params = randomize(shapes['params'], seed=7, scale=0.05)
  path = str(tmp_path / 'flexivit.npz')
  _write_big_vision_npz(params, path)
  model = vit_jax.models.get_model(
      'ViT-Ti_16',
      num_classes=10,
      patches={'size': (32, 32)},
      posemb_grid_size=(7, 7),
      posemb_resize='linear',
      classifier=_POOL[pool],
      transformer={'num_layers': 4},
  )
  loaded = {'params': checkpoint.load(path)}
  images = random_images((2, 240, 240, 3), seed=3)
  for seqhw in (5, 6, 8, 15, 30):  # Patches of 48, 40, 30, 16, 8 pixels.
    want, _ = bv_model.apply({'params': params}, images, seqhw=seqhw)
    got = model.apply(loaded, images, train=False, patch_size=240 // seqhw)
    diff = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
    print(
        f'FlexiViT Ti pool={pool} seqhw={seqhw} (patch {240 // seqhw}): max '
        f'abs logit difference {diff:.2e} (logits up to '
        f'{float(np.max(np.abs(want))):.2f})'
    )
    assert diff < MAX_ABS_DIFF


def _naflex_batch(grids, seq_len, patch, seed):
  """NaFlex tuples (patches, ptype, rows, columns) of images of the given
  patch grids, each padded to seq_len (padding: random values, ptype 0)."""
  rng = np.random.default_rng(seed)
  features = patch * patch * 3
  patches = rng.uniform(-1, 1, (len(grids), seq_len, features))
  ptype = np.zeros((len(grids), seq_len), np.int32)
  rows = np.zeros((len(grids), seq_len), np.int32)
  cols = np.zeros((len(grids), seq_len), np.int32)
  for b, (h, w) in enumerate(grids):
    ptype[b, : h * w] = 1
    rows[b, : h * w], cols[b, : h * w] = (a.ravel() for a in np.mgrid[:h, :w])
  return patches.astype(np.float32), ptype, rows, cols


@pytest.mark.parametrize(
    'aspect,grids',
    [
        # 256 tokens as SigLIP 2 NaFlex uses them; the second image of each
        # batch is padded. Against the 16x16 table: rows shrink (8, 6),
        # columns grow (32, 20), and the other way round.
        ('wide', ((8, 32), (6, 20))),
        ('tall', ((24, 10), (12, 5))),
    ],
)
def test_siglip2_naflex_image_tower_gives_its_embeddings(
    tmp_path, aspect, grids
):
  """SigLIP 2's NaFlex image tower (big_vision's naflex_vit.py: MAP pooling,
  a 16x16 position-embedding table), small, at two aspect ratios."""
  width, depth, heads, mlp, patch = 64, 2, 4, 128, 16
  bv_model = bv_two_towers.Model(
      image_model='proj.image_text.naflex_vit',
      image={
          'width': width,
          'depth': depth,
          'num_heads': heads,
          'mlp_dim': mlp,
          'pool_type': 'map',
          'nposemb': 16,
          'scan': True,
      },
      out_dim=(None, width),
      text_model='proj.image_text.text_transformer',
      text={'variant': 'mu', 'vocab_size': 100},
  )
  batch = _naflex_batch(grids, 256, patch, seed=len(aspect))
  shapes = jax.eval_shape(
      lambda: bv_model.init(
          jax.random.key(0), batch, jnp.zeros((1, 16), jnp.int32)
      )
  )
  params = randomize(shapes['params'], seed=4, scale=0.05)
  path = str(tmp_path / 'siglip2_naflex.npz')
  _write_big_vision_npz(params, path)
  # big_vision resizes the embeddings under `it_utils.batch_shmap`, which
  # is a plain call without a mesh (as here).
  _, _, out = bv_model.apply({'params': params}, batch, None)
  want = np.asarray(out['img/pre_logits'])
  model = vit_jax.models.get_model(
      'ViT-B_16',
      num_classes=0,
      classifier='map',
      naflex=True,
      hidden_size=width,
      transformer={'num_layers': depth, 'num_heads': heads, 'mlp_dim': mlp},
  )
  got = np.asarray(
      model.apply(
          {'params': checkpoint.load(path + ':img')}, batch, train=False
      )
  )
  diff = float(np.max(np.abs(got - want)))
  print(
      f'SigLIP 2 NaFlex image tower, {aspect} images {grids}: max abs '
      f'embedding difference {diff:.2e} (embeddings up to '
      f'{float(np.max(np.abs(want))):.2f})'
  )
  assert diff < MAX_ABS_DIFF
