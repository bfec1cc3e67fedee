"""FlexiViT: the pseudo-inverse resize of the patch embedding, a model at any
patch size, `load_pretrained(patch_size=...)` and training with a patch size
per step, against NumPy references written here (big_vision's own code in
tests/test_parity_big_vision.py, opt-in).
"""

import collections
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import random_images
from helpers import randomize
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import train
import vit_jax.models
from vit_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tf_bilinear_resize(x, new_hw):
  """`tf.image.resize(x, new_hw, 'bilinear')` of one [h, w] channel, pixel
  by pixel: half-pixel centres, no antialiasing, edges clamped (TF's
  `resize_bilinear` with `half_pixel_centers=True`)."""
  old_h, old_w = x.shape
  out = np.zeros(new_hw)
  for i in range(new_hw[0]):
    for j in range(new_hw[1]):
      value = 0.0
      y = (i + 0.5) * old_h / new_hw[0] - 0.5
      xx = (j + 0.5) * old_w / new_hw[1] - 0.5
      y0, x0 = math.floor(y), math.floor(xx)
      for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xi, wx in ((x0, 1 - (xx - x0)), (x0 + 1, xx - x0)):
          yc, xc = min(max(yi, 0), old_h - 1), min(max(xi, 0), old_w - 1)
          value += wy * wx * x[yc, xc]
      out[i, j] = value
  return out


def direct_pi_resize(kernel, new_hw):
  """The pseudo-inverse resize built as FlexiViT defines it: R the resize of
  flattened patches (its columns: resized basis patches), w' = pinv(R^T) w."""
  old_h, old_w = kernel.shape[:2]
  columns = []
  for k in range(old_h * old_w):
    basis = np.zeros(old_h * old_w)
    basis[k] = 1.0
    columns.append(tf_bilinear_resize(basis.reshape(old_h, old_w), new_hw))
  resize = np.stack([c.reshape(-1) for c in columns], axis=1)
  flat = np.asarray(kernel, np.float64).reshape(old_h * old_w, -1)
  return (np.linalg.pinv(resize.T) @ flat).reshape(
      *new_hw, *kernel.shape[2:]
  ), resize


def resize_channels(x, new_hw):
  """`tf_bilinear_resize` of each channel of an [h, w, c] array."""
  return np.stack(
      [tf_bilinear_resize(x[..., c], new_hw) for c in range(x.shape[-1])],
      axis=-1,
  )


def test_the_reference_resize_is_tf_image_resize():
  tf = pytest.importorskip('tensorflow')
  x = np.random.default_rng(0).normal(size=(5, 7))
  for new in ((8, 11), (3, 4), (10, 3)):
    want = tf.image.resize(x[None, ..., None], new, method='bilinear')
    np.testing.assert_allclose(
        tf_bilinear_resize(x, new), want.numpy()[0, ..., 0], atol=1e-6
    )


@pytest.mark.parametrize(
    'old,new', [((4, 4), (8, 8)), ((5, 5), (8, 8)), ((4, 6), (7, 9))]
)
def test_growing_patches_keep_every_embedding(old, new):
  # FlexiViT's defining property: <resize(x), PI-resize(w)> = <x, w> for
  # every patch x when the patch grows.
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(*old, 3, 5)).astype(np.float32)
  patches = rng.normal(size=(4, *old, 3))
  new_kernel = np.asarray(checkpoint.resample_patch_embedding(kernel, new))
  assert new_kernel.shape == (*new, 3, 5)
  for x in patches:
    want = np.einsum('hwc,hwcd->d', x, kernel)
    got = np.einsum('hwc,hwcd->d', resize_channels(x, new), new_kernel)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    'old,new',
    [((8, 8), (4, 4)), ((8, 8), (12, 12)), ((6, 6), (4, 5)), ((5, 4), (7, 3))],
)
def test_the_resize_is_the_pseudo_inverse_of_the_patch_resize(old, new):
  kernel = np.random.default_rng(2).normal(size=(*old, 3, 4))
  want, _ = direct_pi_resize(kernel, new)
  got = checkpoint.resample_patch_embedding(kernel.astype(np.float32), new)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_the_same_size_is_the_kernel_itself():
  # No resampling (and no rounding) when the size is unchanged.
  kernel = jnp.asarray(np.random.default_rng(3).normal(size=(4, 4, 3, 2)))
  assert checkpoint.resample_patch_embedding(kernel, (4, 4)) is kernel


def test_gradients_reach_the_stored_kernel():
  # d<resample(w), g>/dw = pinv(R^T)^T g: the stored kernel trains.
  rng = np.random.default_rng(4)
  kernel = rng.normal(size=(4, 4, 1, 1)).astype(np.float32)
  upstream = rng.normal(size=(6, 6, 1, 1)).astype(np.float32)
  grad = jax.grad(
      lambda w: jnp.sum(vit.resample_patch_embedding(w, (6, 6)) * upstream)
  )(kernel)
  _, resize = direct_pi_resize(kernel, (6, 6))
  want = np.linalg.pinv(resize.T).T @ upstream.reshape(-1)
  np.testing.assert_allclose(
      np.asarray(grad).reshape(-1), want, rtol=1e-4, atol=1e-5
  )


def _flexi_pair(classifier='token'):
  """A model with 8x8 stored patches and a 2x2 position grid (16 px), its
  random parameters, and the same model built with 4x4 patches."""
  fields = dict(
      transformer={'num_layers': 1},
      classifier=classifier,
      posemb_grid_size=(2, 2),
      posemb_resize='linear',
  )
  flexi = vit_jax.models.get_model(
      'testing', num_classes=5, patches={'size': (8, 8)}, **fields
  )
  images = random_images((2, 16, 16, 3), seed=5)
  shapes = jax.eval_shape(
      lambda: flexi.init(jax.random.key(0), images, train=False)
  )
  params = randomize(shapes['params'], seed=6)
  fixed = vit_jax.models.get_model(
      'testing',
      num_classes=5,
      patches={'size': (4, 4)},
      **{**fields, 'posemb_grid_size': None},
  )
  return flexi, fixed, params, images


def _as_fixed_params(params, new_hw, grid):
  """`params` with the kernel PI-resized and the position grid resized (a
  growing grid: half-pixel linear, as 'linear' is without shrinking)."""
  flat = checkpoint.flatten(params)
  kernel, _ = direct_pi_resize(np.asarray(flat['embedding/kernel']), new_hw)
  flat['embedding/kernel'] = kernel.astype(np.float32)
  key = 'Transformer/posembed_input/pos_embedding'
  posemb = np.asarray(flat[key])
  extra = posemb.shape[1] - 4
  table = resize_channels(posemb[0, extra:].reshape(2, 2, -1), grid)
  flat[key] = np.concatenate(
      [posemb[:, :extra], table.reshape(1, -1, posemb.shape[-1])], axis=1
  ).astype(np.float32)
  return checkpoint.unflatten(flat)


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_a_model_at_another_patch_size_is_the_resampled_model(classifier):
  flexi, fixed, params, images = _flexi_pair(classifier)
  want = fixed.apply(
      {'params': _as_fixed_params(params, (4, 4), (4, 4))},
      images,
      train=False,
  )
  if classifier == 'token':
    got = flexi.apply({'params': params}, images, train=False, patch_size=4)
  else:  # The attribute says what the call's argument says.
    got = flexi.clone(run_patch_size=(4, 4)).apply(
        {'params': params}, images, train=False
    )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_hybrid_refuses_another_patch_size():
  model, size = helpers.tiny_model('hybrid', run_patch_size=2)
  with pytest.raises(ValueError, match='needs a plain ViT'):
    model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)


def test_load_pretrained_resamples_the_kernel_and_resizes_the_grid(tmp_path):
  flexi, fixed, params, images = _flexi_pair()
  path = str(tmp_path / 'p8.npz')
  helpers.write_published_npz(params, path)
  init = jax.tree_util.tree_map(
      lambda x: np.zeros(x.shape, x.dtype),
      jax.eval_shape(
          lambda: fixed.init(jax.random.key(0), images, train=False)
      )['params'],
  )
  loaded = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init,
      model_config=fixed,
      patch_size=4,
      posemb_method='linear',
  )
  want = checkpoint.flatten(_as_fixed_params(params, (4, 4), (4, 4)))
  got = checkpoint.flatten(loaded)
  for key in ('embedding/kernel', 'Transformer/posembed_input/pos_embedding'):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5)
  with pytest.raises(checkpoint.CheckpointError, match=r'patch_size=\(4, 4\)'):
    checkpoint.load_pretrained(
        pretrained_path=path, init_params=init, model_config=fixed
    )
  with pytest.raises(checkpoint.CheckpointError, match='build the model'):
    checkpoint.load_pretrained(
        pretrained_path=path,
        init_params=init,
        model_config=fixed,
        patch_size=2,
    )


def test_patch_sizes_are_drawn_per_step_from_the_seed_and_step_alone():
  sizes = (2, 4, 8)
  draws = [train.flexi_patch_size(0, s, sizes) for s in range(1, 3001)]
  # A resumed run (a fresh call for the same step) draws the same size.
  assert draws[1000:1010] == [
      train.flexi_patch_size(0, s, sizes) for s in range(1001, 1011)
  ]
  counts = collections.Counter(draws)
  assert set(counts) == set(sizes)
  # Uniform: each about 1000 of 3000 (binomial std ~26).
  assert all(880 < n < 1120 for n in counts.values()), counts
  other_seed = [train.flexi_patch_size(1, s, sizes) for s in range(1, 3001)]
  assert other_seed != draws


def test_each_drawn_size_gets_one_step_built_once():
  built = []

  def make_step(model):
    built.append(model.run_patch_size)
    return model.run_patch_size

  model = vit_jax.models.get_model('testing', num_classes=3)
  steps = train.FlexiTrainSteps((2, 4, 8), 7, make_step, model)
  used = [steps(s) for s in range(1, 40)]
  assert used == [
      (p, p)
      for p in (train.flexi_patch_size(7, s, (2, 4, 8)) for s in range(1, 40))
  ]
  assert sorted(built) == [(2, 2), (4, 4), (8, 8)]


def _runlocal():
  return config_lib.load_config_file(
      os.path.join(REPO, 'configs', 'flexivit.py') + ':s,runlocal'
  )


@pytest.mark.parametrize(
    'change,message',
    [
        ({'image_size': 20}, r'\[8\] do not divide config.image_size=20'),
        ({'objective': 'mpp'}, 'needs the classification objective'),
        ({'model.flexi_patch_sizes': (4, 0)}, 'positive integers'),
    ],
)
def test_runs_that_cannot_train_are_refused(change, message):
  config = _runlocal()
  for field, value in change.items():
    if field.startswith('model.'):
      config.model[field[len('model.') :]] = value
    else:
      config[field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.parse(config)


@pytest.mark.slow
def test_the_runlocal_config_trains_at_several_patch_sizes(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'vit_jax.main',
          '--config=configs/flexivit.py:s,runlocal',
          f'--workdir={tmp_path}',
          f'--config.tfds_data_dir={tmp_path / "tfds"}',
          '--config.total_steps=6',
          '--config.checkpoint_every=3',
          '--config.eval_every=6',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  first_at = [
      int(line.rsplit('patch size ', 1)[1].split()[0])
      for line in result.stderr.splitlines()
      if 'FlexiViT: step' in line
  ]
  drawn = [train.flexi_patch_size(0, s, (2, 4, 8)) for s in range(1, 7)]
  assert first_at == list(dict.fromkeys(drawn))
  assert len(first_at) >= 2
  assert (tmp_path / 'final_params.npz').exists()
