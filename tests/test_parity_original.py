"""Logits parity with the original google-research vit_jax implementation.

The original code is not on PyPI and its package is also called `vit_jax`, so
this test needs a copy of it importable as `orig_vit_jax`; it is skipped
otherwise (the NumPy-reference tests in test_checkpoint.py always run). Make
the copy with `tests/make_original_oracle.sh <vision_transformer clone> DIR`
and run:

  VIT_JAX_ORIGINAL_PATH=DIR python -m pytest tests/test_parity_original.py

Checks, on the real registered architectures at 224 px, with random weights:
* an official-layout `.npz` (pre-Linen numbering, old GroupNorm shapes) gives
  the same logits in our model as in the original (max abs diff < 1e-4);
* a file written by our `save` gives the same logits in the original code,
  loaded with the original `checkpoint.load`;
* after `load_pretrained` to 384 px both implementations agree on every
  parameter and on the logits.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_images
from helpers import randomize
from helpers import write_published_npz
from vit_jax import checkpoint
import vit_jax.models

if os.environ.get('VIT_JAX_ORIGINAL_PATH'):
  sys.path.insert(0, os.environ['VIT_JAX_ORIGINAL_PATH'])
orig_models = pytest.importorskip(
    'orig_vit_jax.models',
    reason='set VIT_JAX_ORIGINAL_PATH to a copy of the original code',
)
orig_checkpoint = pytest.importorskip('orig_vit_jax.checkpoint')
orig_configs = pytest.importorskip('orig_vit_jax.configs.models')

MAX_ABS_DIFF = 1e-4
MODELS = ['ViT-Ti_16', 'ViT-B_16', 'R+ViT-Ti_16', 'R50+ViT-B_16', 'Mixer-B_16']


def _apply(model, params, images):
  return np.asarray(
      jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
          params, images
      )
  )


def _random_original_params(name, num_classes, size, seed=0):
  model = orig_models.get_model(name, num_classes=num_classes)
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False
      )
  )
  # Small weights keep the deep models' activations in a sane range.
  return model, randomize(shapes['params'], seed=seed, scale=0.05)


@pytest.mark.parametrize('name', MODELS)
def test_official_layout_file_gives_original_logits(tmp_path, name):
  orig_model, params = _random_original_params(name, 10, 224)
  path = str(tmp_path / f'{name}.npz')
  write_published_npz(params, path, old_groupnorm=name.startswith('R'))
  images = random_images((2, 224, 224, 3), seed=1)
  # The original reads the file with its own loader.
  expected = _apply(orig_model, orig_checkpoint.load(path), images)
  ours = _apply(
      vit_jax.models.get_model(name, num_classes=10),
      checkpoint.load(path),
      images,
  )
  diff = np.abs(ours - expected).max()
  print(
      f'{name} official-layout file: max |logit| {np.abs(expected).max():.3f}, '
      f'max abs diff {diff:.2e}'
  )
  assert np.abs(expected).max() > 0.1
  assert diff < MAX_ABS_DIFF


@pytest.mark.parametrize('name', MODELS)
def test_file_written_by_save_gives_the_same_logits_in_original(tmp_path, name):
  model = vit_jax.models.get_model(name, num_classes=10)
  images = random_images((2, 224, 224, 3), seed=2)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False)
  )['params']
  params = randomize(shapes, seed=3, scale=0.05)
  path = str(tmp_path / f'{name}.npz')
  checkpoint.save(params, path)
  ours = _apply(model, params, images)
  orig_model = orig_models.get_model(name, num_classes=10)
  theirs = _apply(orig_model, orig_checkpoint.load(path), images)
  diff = np.abs(ours - theirs).max()
  print(f'{name} saved by vit_jax, run in original: max abs diff {diff:.2e}')
  assert np.abs(ours).max() > 0.1
  assert diff < MAX_ABS_DIFF


@pytest.mark.parametrize('name', ['ViT-Ti_16', 'R50+ViT-B_16'])
def test_load_pretrained_to_higher_resolution_matches_original(tmp_path, name):
  _, pretrained = _random_original_params(name, 1000, 224)
  path = str(tmp_path / f'{name}.npz')
  write_published_npz(pretrained, path, old_groupnorm=name.startswith('R'))
  images = random_images((1, 384, 384, 3), seed=4)

  orig_model = orig_models.get_model(name, num_classes=5)
  orig_init = jax.jit(
      lambda: orig_model.init(jax.random.key(0), images, train=False)
  )()['params']
  theirs = orig_checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=orig_init,
      model_config=orig_configs.MODEL_CONFIGS[name],
  )

  model = vit_jax.models.get_model(name, num_classes=5)
  init = jax.jit(lambda: model.init(jax.random.key(0), images, train=False))()[
      'params'
  ]
  ours = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init,
      model_config=vit_jax.models.get_config(name),
  )

  flat_ours, flat_theirs = checkpoint.flatten(ours), checkpoint.flatten(theirs)
  assert sorted(flat_ours) == sorted(flat_theirs)
  for key, value in flat_theirs.items():
    np.testing.assert_allclose(
        flat_ours[key], value, atol=1e-6, rtol=0, err_msg=key
    )
  # A random head so that the logits depend on every layer.
  head = randomize({'head': ours['head']}, seed=6)['head']
  ours['head'] = head
  theirs = checkpoint.unflatten(flat_theirs)
  theirs['head'] = head
  diff = np.abs(
      _apply(model, ours, images) - _apply(orig_model, theirs, images)
  ).max()
  print(f'{name} load_pretrained 224->384: max abs diff {diff:.2e}')
  assert diff < MAX_ABS_DIFF
