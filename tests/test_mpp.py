"""Masked patch prediction: corruption, targets, loss, model, training."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_images
from vit_jax import checkpoint
from vit_jax import run_checkpoints
from vit_jax import train
import vit_jax.models
from vit_jax.objectives import mpp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_corruption_statistics_match_50_and_80_10_10():
  cfg = mpp.MppConfig()
  batch, patches = 1024, 64
  c = jax.device_get(
      mpp.sample_corruption(jax.random.key(0), batch, patches, cfg)
  )
  corrupted = c['corrupted']
  np.testing.assert_array_equal(corrupted.sum(1), 32)  # Exactly 50%/image.
  assert not (c['replace_mask'] & c['replace_random']).any()
  assert not ((c['replace_mask'] | c['replace_random']) & ~corrupted).any()
  n = corrupted.sum()
  for name, p in (('replace_mask', 0.8), ('replace_random', 0.1)):
    observed = c[name].sum() / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(observed - p) < 4 * sigma, (name, observed)
  kept = (corrupted & ~c['replace_mask'] & ~c['replace_random']).sum() / n
  assert abs(kept - 0.1) < 4 * np.sqrt(0.09 / n)
  # Which patches are corrupted is uniform over positions.
  per_position = corrupted.mean(0)
  assert abs(per_position - 0.5).max() < 5 * np.sqrt(0.25 / batch)
  assert c['random_source'].min() >= 0
  assert c['random_source'].max() < batch * patches


def test_3bit_target_of_a_hand_made_patch():
  cfg = mpp.MppConfig()
  image = np.zeros((1, 8, 8, 3), np.float32)
  image[0, :4, :4] = (1.0, -1.0, 0.1)  # Patch 0: top-left.
  image[0, :4, 4:] = (-0.76, 0.24, 0.99)  # Patch 1.
  target = np.asarray(mpp.targets(jnp.asarray(image), (4, 4), cfg))
  # Levels: floor((v + 1) / 2 * 8) clipped to 0..7; red most significant.
  # Patch 0: r 8 -> 7, g 0, b 4.4 -> 4: 7*64 + 0*8 + 4 = 452.
  # Patch 1: r 0.96 -> 0, g 4.96 -> 4, b 7.96 -> 7: 0 + 32 + 7 = 39.
  # Patches 2, 3: zeros -> level 4 each: 4*64 + 4*8 + 4 = 292.
  np.testing.assert_array_equal(target, [[452, 39, 292, 292]])


def test_4x4_and_l2_targets():
  image = random_images((2, 16, 16, 3))
  four = np.asarray(
      mpp.targets(jnp.asarray(image), (8, 8), mpp.MppConfig(target='4x4'))
  )
  assert four.shape == (2, 4, 16)
  # Cell (row 1, col 2) of patch 3 (bottom-right) covers pixels 10:12, 12:14.
  cell = image[0, 10:12, 12:14].reshape(-1, 3).mean(0)
  levels = np.clip(np.floor((cell + 1) / 2 * 8), 0, 7).astype(int)
  assert four[0, 3, 1 * 4 + 2] == levels[0] * 64 + levels[1] * 8 + levels[2]
  l2 = np.asarray(
      mpp.targets(jnp.asarray(image), (8, 8), mpp.MppConfig(target='l2'))
  )
  np.testing.assert_array_equal(l2[1, 2], image[1, 8:, :8].reshape(-1))
  with pytest.raises(ValueError, match="target='4x4' needs patches divisible"):
    mpp.targets(jnp.asarray(image), (2, 2), mpp.MppConfig(target='4x4'))


@pytest.mark.slow
@pytest.mark.parametrize('target', ['3bit', '4x4', 'l2'])
def test_only_corrupted_patches_contribute_to_the_loss(target):
  cfg = mpp.MppConfig(target=target)
  rng = np.random.default_rng(0)
  width = cfg.num_outputs((8, 8))
  predictions = jnp.asarray(rng.normal(size=(2, 4, width)), jnp.float32)
  goal = mpp.targets(jnp.asarray(random_images((2, 16, 16, 3))), (8, 8), cfg)
  corrupted = jnp.asarray(
      [[True, False, True, False], [False, False, True, True]]
  )

  def loss(p):
    return mpp.loss_and_accuracy(p, goal, corrupted, cfg)[0]

  grads = np.asarray(jax.grad(loss)(predictions))
  assert np.all(grads[~np.asarray(corrupted)] == 0)
  assert np.all(np.abs(grads[np.asarray(corrupted)]).sum(-1) > 0)
  changed = predictions.at[0, 1].add(5.0)  # An uncorrupted patch.
  assert loss(changed) == loss(predictions)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"config.mpp.target='rgb'"):
    mpp.MppConfig(target='rgb')
  with pytest.raises(ValueError, match='mask_prob=0.8 and random_prob=0.3'):
    mpp.MppConfig(random_prob=0.3)
  with pytest.raises(
      ValueError, match=r'Unknown config.mpp field\(s\) ' r"\['rate'\]"
  ):
    mpp.MppConfig.from_dict({'rate': 0.5})


def _mpp_model(**overrides):
  backbone = vit_jax.models.get_model(
      'testing', num_classes=None, patches={'size': (4, 4)}, **overrides
  )
  return mpp.MaskedPatchPredictor(backbone, num_outputs=512)


def test_fully_masked_images_are_indistinguishable_and_tree_is_separate():
  model = _mpp_model()
  images = jnp.asarray(random_images((2, 16, 16, 3)))
  everything = {
      'corrupted': jnp.ones((2, 16), bool),
      'replace_mask': jnp.ones((2, 16), bool),
      'replace_random': jnp.zeros((2, 16), bool),
      'random_source': jnp.zeros((2, 16), jnp.int32),
  }
  variables = model.init(jax.random.key(0), images, everything, train=False)
  out = model.apply(variables, images, everything, train=False)
  assert out.shape == (2, 16, 512)
  # Every patch embedding is the [mask] token: the images look the same.
  np.testing.assert_allclose(out[0], out[1], atol=1e-6)
  nothing = dict(
      everything,
      corrupted=everything['corrupted'] & False,
      replace_mask=everything['replace_mask'] & False,
  )
  out = model.apply(variables, images, nothing, train=False)
  assert not np.allclose(out[0], out[1])
  # The classification tree plus exactly the two MPP parameters.
  plain = vit_jax.models.get_model(
      'testing', num_classes=None, patches={'size': (4, 4)}
  )
  plain_keys = set(
      checkpoint.flatten(
          plain.init(jax.random.key(0), images, train=False)['params']
      )
  )
  mpp_keys = set(checkpoint.flatten(variables['params']))
  assert mpp_keys - plain_keys == {
      'mpp_head/kernel',
      'mpp_head/bias',
      'mpp_mask_token',
  }
  assert plain_keys <= mpp_keys


def test_load_pretrained_drops_the_mpp_head_and_token(tmp_path):
  model = _mpp_model()
  images = jnp.asarray(random_images((1, 16, 16, 3)))
  c = mpp.sample_corruption(jax.random.key(1), 1, 16, mpp.MppConfig())
  params = model.init(jax.random.key(0), images, c, train=False)['params']
  path = str(tmp_path / 'mpp.npz')
  checkpoint.save(params, path)
  classifier = vit_jax.models.get_model(
      'testing', num_classes=10, patches={'size': (4, 4)}
  )
  init = classifier.init(jax.random.key(2), images, train=False)['params']
  loaded = checkpoint.load_pretrained(
      pretrained_path=path, init_params=init, model_config=classifier
  )
  flat = checkpoint.flatten(loaded)
  assert not any(k.startswith('mpp_') for k in flat)
  np.testing.assert_array_equal(flat['head/kernel'], 0)
  np.testing.assert_array_equal(
      flat['embedding/kernel'], checkpoint.flatten(params)['embedding/kernel']
  )


# Written by the code before objectives were a family (vit_jax 0.1, when the
# ViT itself held the MPP head): the 'testing' model with 4x4 patches, one
# block, random weights; the layout every MPP run's final_params.npz has.
BEFORE_OBJECTIVES = os.path.join(
    REPO, 'tests', 'data', 'mpp_before_objectives.npz'
)


@pytest.mark.slow
def test_an_mpp_checkpoint_from_before_objectives_loads_and_fine_tunes(
    tmp_path,
):
  """Its keys are exactly the new MaskedPatchPredictor's; the predictor runs
  on it; and a classification run fine-tunes from it (head and token
  dropped, the encoder kept)."""
  model = _mpp_model(transformer={'num_layers': 1})
  images = jnp.asarray(random_images((2, 16, 16, 3)))
  c = mpp.sample_corruption(jax.random.key(1), 2, 16, mpp.MppConfig())
  old = checkpoint.load(BEFORE_OBJECTIVES)
  init = model.init(jax.random.key(0), images, c, train=False)['params']
  shapes = lambda tree: {
      k: np.shape(v)
      for k, v in checkpoint.flatten(  # pylint: disable=g-long-lambda
          tree
      ).items()
  }
  assert shapes(old) == shapes(init)
  # The [mask] token of the file is what fully masked images see.
  everything = dict(
      c,
      replace_mask=jnp.ones((2, 16), bool),
      replace_random=jnp.zeros((2, 16), bool),
  )
  out = model.apply({'params': old}, images, everything, train=False)
  np.testing.assert_allclose(out[0], out[1], atol=1e-5)
  moved = dict(old, mpp_mask_token=old['mpp_mask_token'] + 1.0)
  assert not np.allclose(
      model.apply({'params': moved}, images, everything, train=False), out
  )

  from configs import finetune  # pylint: disable=g-import-not-at-top

  config = finetune.get_config('ti16,digits,runlocal')
  config.model_name = 'testing'
  config.model = {'patches': {'size': (4, 4)}, 'transformer': {'num_layers': 1}}
  config.tfds_data_dir = str(tmp_path / 'tfds')
  config.pretrained_path = BEFORE_OBJECTIVES
  config.total_steps, config.warmup_steps = 1, 0
  config.base_lr = 1e-12  # The one step leaves the encoder as loaded.
  config.evals.fewshot.every = 0
  workdir = str(tmp_path / 'tuned')
  train.train_and_evaluate(config, workdir)
  tuned = checkpoint.flatten(
      checkpoint.load(os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE))
  )
  assert not any(k.startswith('mpp_') for k in tuned)
  for key, value in checkpoint.flatten(old).items():
    if not key.startswith('mpp_'):
      np.testing.assert_allclose(tuned[key], value, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_mpp_pretraining_on_digits_then_finetuning_through_the_cli(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  pretrain, tfds_dir = str(tmp_path / 'mpp'), str(tmp_path / 'tfds')
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'vit_jax.main',
          '--config=configs/mpp_pretrain.py:runlocal',
          f'--workdir={pretrain}',
          f'--config.tfds_data_dir={tfds_dir}',
          '--config.total_steps=60',
          '--config.log_every=10',
          '--config.eval_every=60',
          '--config.checkpoint_every=60',
          '--config.evals.fewshot.every=0',
          '--config.model.transformer.num_layers=1',
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [
      json.loads(l) for l in open(os.path.join(pretrain, train.METRICS_FILE))
  ]
  losses = [l['train/loss'] for l in lines if 'train/loss' in l]
  assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
  assert all('train/mpp_accuracy' in l for l in lines if 'train/loss' in l)
  final = [l for l in lines if 'eval/mpp_accuracy' in l][-1]
  assert final['eval/mpp_accuracy'] > 0.3 and final['eval/examples'] == 299

  tuned = str(tmp_path / 'tuned')
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'vit_jax.main',
          '--config=configs/finetune.py:ti16,digits,runlocal',
          f'--workdir={tuned}',
          f'--config.tfds_data_dir={tfds_dir}',
          f'--config.pretrained_path={pretrain}/'
          f'{run_checkpoints.FINAL_PARAMS_FILE}',
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'load_pretrained: dropping' in result.stderr
  assert 'mpp_head' in result.stderr and 'mpp_mask_token' in result.stderr
  a = checkpoint.flatten(
      checkpoint.load(os.path.join(pretrain, run_checkpoints.FINAL_PARAMS_FILE))
  )
  b = checkpoint.flatten(
      checkpoint.load(os.path.join(tuned, run_checkpoints.FINAL_PARAMS_FILE))
  )
  assert 'head/kernel' in b and not any(k.startswith('mpp_') for k in b)
  # Fine-tuning started from the pre-trained encoder (4 steps move it a
  # little, not back to a random initialisation).
  key = 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'
  assert np.corrcoef(a[key].ravel(), b[key].ravel())[0, 1] > 0.9
