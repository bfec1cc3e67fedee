"""Few-shot linear probe and classification evaluator."""

import logging
import re

import jax
import ml_collections
import numpy as np
import pytest

from helpers import init_params
from helpers import random_images
from helpers import randomize
from helpers import tiny_model
from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax import sharding
from vit_jax.evaluators import classification
from vit_jax.evaluators import fewshot


def test_solver_matches_numpy_lstsq():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, 12))
  y = rng.integers(0, 4, size=30)
  l2 = 0.7
  w, b = fewshot.solve_least_squares(x, y, 4, l2)
  # Ridge regression as an ordinary least-squares problem: stack sqrt(l2) I
  # under the design matrix (not under the bias column) and zeros under the
  # targets.
  design = np.concatenate([x, np.ones((30, 1))], axis=1)
  reg = np.concatenate([np.sqrt(l2) * np.eye(12), np.zeros((12, 1))], axis=1)
  targets = 2.0 * np.eye(4)[y] - 1.0
  reference = np.linalg.lstsq(
      np.concatenate([design, reg]),
      np.concatenate([targets, np.zeros((12, 4))]),
      rcond=None,
  )[0]
  np.testing.assert_allclose(w, reference[:-1], atol=1e-5)
  np.testing.assert_allclose(b, reference[-1], atol=1e-5)


def test_separable_problem_is_solved_exactly():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(5, 16)) * 10
  train_y = np.repeat(np.arange(5), 30)
  test_y = np.repeat(np.arange(5), 40)
  train_x = centres[train_y] + rng.normal(size=(150, 16)) * 0.1
  test_x = centres[test_y] + rng.normal(size=(200, 16)) * 0.1
  results = fewshot.few_shot_accuracies(
      train_x, train_y, test_x, test_y, 5, shots=(1, 5, 10), seeds=3
  )
  assert results == {1: [1.0] * 3, 5: [1.0] * 3, 10: [1.0] * 3}


def test_shots_are_k_per_class_and_depend_on_the_seed():
  labels = np.repeat(np.arange(3), 10)
  a = fewshot.draw_shots(labels, 4, 3, seed=0)
  b = fewshot.draw_shots(labels, 4, 3, seed=1)
  assert len(a) == 12 and len(set(a)) == 12
  np.testing.assert_array_equal(labels[a], np.tile(np.arange(3), 4))
  assert set(a) != set(b)
  with pytest.raises(
      ValueError,
      match='class 0 has 10 examples in the pool, ' 'fewer than 11 shots',
  ):
    fewshot.draw_shots(labels, 11, 3, seed=0)


def test_l2_selection_prefers_regularisation_on_noise():
  rng = np.random.default_rng(2)
  # Pure noise features: heavy regularisation cannot hurt, weak can.
  x = rng.normal(size=(5 * 3, 40))
  y = np.tile(np.arange(3), 5)
  grid = (1e-6, 1e6)
  assert fewshot.select_l2(x, y, 5, 3, grid, default_l2=1.0) in grid
  assert fewshot.select_l2(x, y, 1, 3, grid, default_l2=0.5) == 0.5


# Separable classes (noise 0.1) whose centred means u = (1, 0), v = (3, 1),
# w = -(u + v) defeat heavy regularisation: as l2 -> inf the ridge scores
# tend to (x - mean) . (mu_c - mean), and u . u = 1 < u . v = 3 sends class 0
# to class 1; a weak l2 fits the three clusters exactly (affine in 2-D).
_SEPARABLE_MEANS = np.array([[1.0, 0.0], [3.0, 1.0], [-4.0, -1.0]])


def _l2_problems(seed, shots=5, num_classes=3):
  """(noise features, separable features, labels) in draw_shots order."""
  rng = np.random.default_rng(seed)
  y = np.tile(np.arange(num_classes), shots)
  noise = rng.normal(size=(len(y), 200))
  separable = _SEPARABLE_MEANS[y] + 0.1 * rng.normal(size=(len(y), 2))
  return noise, separable, y


def test_l2_selection_is_larger_on_noise_than_on_separable_features():
  """Pins select_l2: noise picks a larger l2 than separable features.

  On noise every l2 is at chance and ties go to the larger value; on the
  separable problem the largest grid value misclassifies a class (see
  _SEPARABLE_MEANS). Over 9 seeds, the median noise pick exceeds every
  separable pick (checked on 100 disjoint groups of 9 seeds).
  """
  grid = fewshot.DEFAULT_L2_GRID
  noise_picks, separable_picks = [], []
  for seed in range(9):
    noise, separable, y = _l2_problems(seed)
    noise_picks.append(fewshot.select_l2(noise, y, 5, 3, grid, 1.0))
    separable_picks.append(fewshot.select_l2(separable, y, 5, 3, grid, 1.0))
  assert max(separable_picks) < max(grid)
  assert np.median(noise_picks) > max(separable_picks)


def test_l2_selection_matches_leave_one_shot_out_in_numpy():
  """Pins select_l2 to a numpy leave-one-shot-out argmax (larger on ties).

  Fold f holds out rows f * K .. f * K + K - 1 (shot f of every class); the
  ridge fit is numpy lstsq on the system stacked with sqrt(l2) I.
  """
  grid = fewshot.DEFAULT_L2_GRID
  shots, k = 5, 3
  for seed in range(3):
    _, x, y = _l2_problems(seed, shots, k)
    totals = []  # Held-out hits summed over the folds (exact ties).
    for l2 in grid:
      hits = 0
      for f in range(shots):
        held = np.zeros(len(y), bool)
        held[f * k : (f + 1) * k] = True
        design = np.concatenate([x[~held], np.ones((len(x) - k, 1))], 1)
        design = np.concatenate(
            [
                design,
                np.concatenate([np.sqrt(l2) * np.eye(2), np.zeros((2, 1))], 1),
            ],
            0,
        )
        targets = np.concatenate(
            [
                np.where(y[~held, None] == np.arange(k), 1.0, -1.0),
                np.zeros((2, k)),
            ]
        )
        sol = np.linalg.lstsq(design, targets, rcond=None)[0]
        scores = x[held] @ sol[:2] + sol[2]
        hits += int(np.sum(scores.argmax(1) == y[held]))
      totals.append(hits)
    assert max(totals) > min(totals)  # The choice is not a trivial tie.
    want = max(l2 for l2, t in zip(grid, totals) if t == max(totals))
    assert fewshot.select_l2(x, y, shots, k, grid, 1.0) == want


def _digits_config(tfds_dir, **fewshot_fields):
  config = config_lib.get_base()
  config.model_name = 'testing'
  config.model = {'patches': {'size': (4, 4)}}
  config.image_size = 16
  config.batch = 16
  config.batch_eval = 64
  config.tfds_data_dir = tfds_dir
  config.evals.fewshot.update(fewshot_fields)
  return config


def _evaluator(config, model, mesh, shardings):
  run = config_lib.parse(config)
  return fewshot.FewShotEvaluator(
      run.evals.fewshot, run.data, model, mesh, shardings
  )


@pytest.mark.slow
def test_fewshot_evaluator_on_digits_replicated_and_fsdp(tmp_path):
  config = _digits_config(
      str(tmp_path), shots=(1, 5), seeds=2, pool_per_class=10, every=1
  )
  model, _ = tiny_model('vit', num_classes=10)
  params = randomize(init_params(model, random_images((1, 16, 16, 3))))
  runs = []
  for mesh_axes in ((('data', -1), ('fsdp', 1)), (('data', 1), ('fsdp', -1))):
    mesh = sharding.make_mesh(mesh_axes)
    shardings = sharding.tree_shardings(params, mesh, fsdp_min_size=1)
    placed = sharding.put_global(jax.device_get(params), shardings)
    evaluator = _evaluator(config, model, mesh, shardings)
    runs.append((evaluator.features(placed), evaluator.run(placed)))
  ((x, y), (tx, ty)), metrics = runs[0]
  assert x.shape[1] == tx.shape[1] == 10  # pre_logits of 'testing'
  assert np.bincount(y, minlength=10).min() >= 10
  assert len(tx) == 299
  assert set(metrics) == {
      'fewshot/digits_1shot',
      'fewshot/digits_1shot_std',
      'fewshot/digits_5shot',
      'fewshot/digits_5shot_std',
  }
  # Random features still beat chance (10%) on digits with 5 shots.
  assert metrics['fewshot/digits_5shot'] > 0.2
  # FSDP-sharded parameters give the same features (to float rounding).
  ((fx, fy), (ftx, fty)), _ = runs[1]
  np.testing.assert_array_equal(y, fy)
  np.testing.assert_allclose(x, fx, atol=1e-5)
  np.testing.assert_allclose(tx, ftx, atol=1e-5)


@pytest.mark.slow
def test_unknown_representation_lists_the_sown_names(tmp_path):
  config = _digits_config(str(tmp_path), representation='nope')
  model, _ = tiny_model('vit', num_classes=10)
  mesh = sharding.make_mesh()
  params = init_params(model, random_images((1, 16, 16, 3)))
  shardings = jax.tree_util.tree_map(
      lambda _: sharding.replicated(mesh), params
  )
  evaluator = _evaluator(config, model, mesh, shardings)
  with pytest.raises(
      ValueError, match=r"representation='nope' is not sown.*" r'pre_logits'
  ):
    evaluator.features(params)


@pytest.mark.slow
def test_classification_top1_and_top5(tmp_path, caplog):
  config = ml_collections.ConfigDict(
      {
          'dataset': 'digits',
          'tfds_data_dir': str(tmp_path),
          'image_size': 16,
          'batch': 16,
          'batch_eval': 64,
          'model_name': 'testing',
          'model': {'patches': {'size': (4, 4)}},
      }
  )
  model, _ = tiny_model('vit', num_classes=10)
  mesh = sharding.make_mesh()
  params = randomize(init_params(model, random_images((1, 16, 16, 3))))
  shardings = jax.tree_util.tree_map(
      lambda _: sharding.replicated(mesh), params
  )
  eval_fn = classification.make_eval_fn(model, mesh, shardings)
  ds, _ = input_pipeline.eval_dataset(config_lib.section(config, 'data'))
  caplog.set_level(logging.INFO, logger='absl')
  metrics = classification.evaluate(
      params, eval_fn, ds, sharding.batch_sharding(mesh)
  )
  # The final progress line: 299 test digits in ceil(299 / 64) batches.
  assert any(
      re.fullmatch(r'eval: 5 batches, 299 images in \d+\.\d s', m)
      for m in caplog.messages
  ), caplog.messages
  # Recompute on the host from the logits.
  images, labels = [], []
  for batch in ds.as_numpy_iterator():
    keep = batch['mask'] > 0
    images.append(batch['image'][keep])
    labels.append(batch['labels'][keep].argmax(-1))
  images, labels = np.concatenate(images), np.concatenate(labels)
  logits = np.asarray(model.apply({'params': params}, images, train=False))
  ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(-1)
  assert metrics['eval/examples'] == 299
  np.testing.assert_allclose(metrics['eval/accuracy'], np.mean(ranks == 0))
  np.testing.assert_allclose(metrics['eval/top5'], np.mean(ranks < 5))
  assert metrics['eval/top5'] > metrics['eval/accuracy']


@pytest.mark.slow
def test_fewshot_on_another_dataset_uses_its_own_splits(tmp_path):
  from helpers import make_image_folder  # pylint: disable=g-import-not-at-top

  make_image_folder(tmp_path / 'images')
  # Trained on 100 digits; probed on a 3-class image folder.
  config = _digits_config(
      str(tmp_path),
      shots=(1, 2),
      seeds=2,
      pool_per_class=3,
      every=1,
      dataset='image_folder',
  )
  config.train_split = 'train[:100]'
  config.image_folder = str(tmp_path / 'images')
  config.image_folder_test_percent = 30
  model, _ = tiny_model('vit', num_classes=10)
  mesh = sharding.make_mesh()
  params = randomize(init_params(model, random_images((1, 16, 16, 3))))
  shardings = jax.tree_util.tree_map(
      lambda _: sharding.replicated(mesh), params
  )
  evaluator = _evaluator(config, model, mesh, shardings)
  assert evaluator.info.num_classes == 3
  metrics = evaluator.run(params)
  assert set(metrics) >= {
      'fewshot/image_folder_1shot',
      'fewshot/image_folder_2shot',
  }
  # The folder's colours are trivially separable.
  assert metrics['fewshot/image_folder_2shot'] > 0.5


def test_progress_lines_every_tenth_of_the_batches(caplog):
  caplog.set_level(logging.INFO, logger='absl')
  progress = classification.Progress('eval', 20, quiet_s=0.0)
  for _ in range(20):
    progress.step()
  lines = [
      re.fullmatch(r'eval: (\d+)/20 batches \(\d+\.\d s\)', m)
      for m in caplog.messages
  ]
  assert [m and m[1] for m in lines] == [str(i) for i in range(2, 21, 2)]
  caplog.clear()
  # Unknown total: by time only (here never within quiet_s).
  progress = classification.Progress('eval', None, quiet_s=60.0)
  for _ in range(5):
    progress.step()
  assert progress.done == 5 and not caplog.messages
