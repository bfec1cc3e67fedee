"""Known-answer tests of the inspection functions, and the analysis CLI."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import init_params
from helpers import random_images
from helpers import randomize
from helpers import tiny_model
from vit_jax import analysis
from vit_jax.analysis import inspect

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _identity_attention(layers=3, batch=2, heads=4, tokens=5):
  eye = np.eye(tokens, dtype=np.float32)
  return np.broadcast_to(eye, (layers, batch, heads, tokens, tokens)).copy()


def test_self_attention_has_distance_0_and_identity_rollout():
  weights = _identity_attention()
  np.testing.assert_array_equal(
      inspect.mean_attention_distance(weights, (2, 2), (16, 16)),
      np.zeros((3, 4)),
  )
  for residual in (True, False):
    np.testing.assert_allclose(
        inspect.attention_rollout(weights, add_residual=residual),
        np.broadcast_to(np.eye(5), (2, 5, 5)),
        atol=1e-7,
    )


def test_uniform_attention_gives_the_analytic_distance():
  # 2x2 grid of 16-pixel patches: from any patch, the four patches are at
  # 0, 16, 16 and 16*sqrt(2) pixels.
  tokens = 5  # Class token + 4 patches.
  weights = np.full((2, 3, 4, tokens, tokens), 1 / tokens, np.float32)
  distance = inspect.mean_attention_distance(weights, (2, 2), (16, 16))
  np.testing.assert_allclose(distance, (32 + 16 * np.sqrt(2)) / 4, rtol=1e-6)
  # 1x3 grid, 8-pixel patches, no class token: mean over the 9 ordered pairs
  # of |i - j| * 8 = 8 * (0+1+2+1+0+1+2+1+0) / 9.
  weights = np.full((1, 1, 1, 3, 3), 1 / 3, np.float32)
  np.testing.assert_allclose(
      inspect.mean_attention_distance(
          weights, (1, 3), (8, 8), num_prefix_tokens=0
      ),
      [[8 * 8 / 9]],
      rtol=1e-6,
  )


def test_rollout_multiplies_the_head_averaged_layers():
  rng = np.random.default_rng(0)
  raw = rng.random((2, 1, 3, 4, 4))
  weights = raw / raw.sum(-1, keepdims=True)
  a = [w.mean(axis=1)[0] + np.eye(4) for w in weights]
  a = [m / m.sum(-1, keepdims=True) for m in a]
  np.testing.assert_allclose(
      inspect.attention_rollout(weights)[0], a[1] @ a[0], rtol=1e-6
  )
  maps = inspect.class_token_map(inspect.attention_rollout(weights), (1, 3))
  assert maps.shape == (1, 1, 3) and np.isclose(maps.max(), 1.0)


def test_position_embedding_similarity_diagonal_is_1():
  posemb = np.random.default_rng(0).normal(size=(1, 1 + 12, 8))
  sim = inspect.position_embedding_similarity(posemb, (3, 4))
  assert sim.shape == (3, 4, 3, 4)
  flat = sim.reshape(12, 12)
  np.testing.assert_allclose(np.diag(flat), 1.0, rtol=1e-6)
  np.testing.assert_allclose(flat, flat.T, rtol=1e-6)
  assert np.abs(flat).max() <= 1 + 1e-6
  with pytest.raises(ValueError, match='13 position embeddings do not fill'):
    inspect.position_embedding_similarity(posemb, (3, 4), has_class_token=False)


def test_embedding_filters_are_orthonormal_principal_components():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(4, 4, 3, 32))
  components, ratios = inspect.embedding_filters(kernel, num_components=6)
  assert components.shape == (6, 4, 4, 3)
  flat = components.reshape(6, -1).astype(np.float64)
  np.testing.assert_allclose(flat @ flat.T, np.eye(6), atol=1e-5)
  assert np.all(np.diff(ratios) <= 1e-7) and 0 < ratios.sum() <= 1
  # The first component is the direction of largest variance of the filters.
  filters = kernel.reshape(48, 32).T
  filters = filters - filters.mean(0)
  top = np.linalg.eigh(filters.T @ filters)[1][:, -1]
  assert abs(abs(top @ flat[0]) - 1) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize('scan', [False, True])
def test_attention_weights_of_a_model(scan):
  model, size = tiny_model('vit', scan=scan)
  images = random_images((3, size, size, 3))
  params = randomize(init_params(model, images))
  weights = analysis.attention_weights(model, params, images)
  assert weights.shape == (2, 3, 2, 17, 17)  # layers, batch, heads, T, T
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  if scan:
    loop, _ = tiny_model('vit')
    from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top

    np.testing.assert_allclose(
        analysis.attention_weights(
            loop, checkpoint.unstack_encoder_blocks(params), images
        ),
        weights,
        atol=1e-6,
    )


@pytest.mark.slow
def test_mixer_has_no_attention_weights():
  model, size = tiny_model('mixer')
  images = random_images((1, size, size, 3))
  with pytest.raises(ValueError, match='only for ViT and hybrid'):
    analysis.attention_weights(model, init_params(model, images), images)


@pytest.mark.slow
def test_analyze_writes_figures_and_numbers(tmp_path):
  model, size = tiny_model('vit')
  images = random_images((4, size, size, 3))
  params = jax.device_get(randomize(init_params(model, images)))
  results = analysis.analyze(
      model, params, images, str(tmp_path), titles=list('abcd')
  )
  for name in analysis.FIGURES:
    with open(tmp_path / name, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
  saved = json.load(open(tmp_path / analysis.RESULTS_FILE))
  assert saved['grid'] == [4, 4] and saved['num_images'] == 4
  assert np.array(saved['mean_attention_distance_px']).shape == (2, 2)
  assert saved == json.loads(json.dumps(results))


@pytest.mark.slow
def test_analysis_and_evaluate_clis_on_a_training_run(digits_run, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  # A copy of the shared run (conftest): both CLIs write into the workdir.
  workdir, tfds_dir = str(tmp_path / 'run'), digits_run.tfds_dir
  shutil.copytree(digits_run.workdir, workdir)
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'vit_jax.analysis',
          f'--workdir={workdir}',
          '--images=digits',
          f'--tfds_data_dir={tfds_dir}',
          '--num_images=16',
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = os.path.join(workdir, 'analysis')
  assert sorted(os.listdir(out)) == sorted(
      list(analysis.FIGURES) + [analysis.RESULTS_FILE]
  )
  saved = json.load(open(os.path.join(out, analysis.RESULTS_FILE)))
  assert saved['num_images'] == 16 and saved['grid'] == [4, 4]
  # One block, three heads (ViT-Ti width), runlocal model.
  assert np.array(saved['mean_attention_distance_px']).shape == (1, 3)

  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.evaluate', f'--workdir={workdir}'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.load(open(os.path.join(workdir, 'eval_results.json')))
  # Its progress: the final line of the top-1 pass and the few-shot total.
  assert re.search(
      r'eval: 5 batches, 299 images in \d+\.\d s\n', result.stderr
  ), result.stderr[-3000:]
  assert re.search(
      r'fewshot digits: [\d,]+ pool and 299 test images '
      r'featurised in \d+\.\d s',
      result.stderr,
  )
  assert saved['params'].endswith('step 4')
  assert saved['eval/examples'] == 299
  assert 0 <= saved['eval/accuracy'] <= saved['eval/top5'] <= 1
  # configs/digits.py:runlocal probes 1 and 5 shots.
  assert {'fewshot/digits_1shot', 'fewshot/digits_5shot'} <= set(saved)
  # The same numbers the training run logged at its last step.
  logged = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  final = [l for l in logged if 'fewshot/digits_5shot' in l][-1]
  assert final['fewshot/digits_5shot'] == saved['fewshot/digits_5shot']
  assert final['eval/accuracy'] == saved['eval/accuracy']

  # The same parameters as an .npz with the experiment config.
  out = str(tmp_path / 'npz_eval')
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'vit_jax.evaluate',
          '--config=configs/digits.py:runlocal',
          f'--config.tfds_data_dir={tfds_dir}',
          '--nofewshot',
          f'--params={os.path.join(workdir, "final_params.npz")}',
          f'--out={out}',
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  from_npz = json.load(open(os.path.join(out, 'eval_results.json')))
  assert from_npz['eval/accuracy'] == saved['eval/accuracy']
  assert not any(k.startswith('fewshot/') for k in from_npz)


@pytest.mark.slow
def test_model_from_a_published_npz(tmp_path):
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.analysis import __main__ as cli  # pylint: disable=g-import-not-at-top
  import vit_jax.models  # pylint: disable=g-import-not-at-top

  model = vit_jax.models.get_model('testing', num_classes=7)
  images = random_images((1, 32, 32, 3))
  checkpoint.save(init_params(model, images), str(tmp_path / 'm.npz'))
  loaded, params, size, names = cli.model_from_npz(
      str(tmp_path / 'm.npz'), 'testing'
  )
  assert size == 32 and names is None and loaded.num_classes == 7
  assert analysis.attention_weights(loaded, params, images).shape == (
      1,
      1,
      2,
      5,
      5,
  )


@pytest.mark.slow
@pytest.mark.parametrize(
    'module', ['vit_jax.evaluate', 'vit_jax.analysis.__main__']
)
def test_evaluate_and_analysis_do_not_import_the_training_loop(module):
  code = (
      f'import sys, {module}; '
      'assert "vit_jax.train" not in sys.modules, "vit_jax.train imported"'
  )
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, env=env)


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['classification', 'mpp'])
def test_model_from_a_workdir_of_either_objective(tmp_path, objective):
  """The model of a run's config.json, with or without its classifier."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import run_checkpoints  # pylint: disable=g-import-not-at-top
  from vit_jax.analysis import __main__ as cli  # pylint: disable=g-import-not-at-top
  import vit_jax.models  # pylint: disable=g-import-not-at-top
  from vit_jax.objectives import mpp  # pylint: disable=g-import-not-at-top

  config = config_lib.get_base()
  config.model_name = 'testing'
  config.model = {'patches': {'size': (4, 4)}}
  config.image_size = 16
  config.objective = objective
  workdir = str(tmp_path)
  with open(os.path.join(workdir, config_lib.CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort())
  with open(os.path.join(workdir, 'class_names.json'), 'w') as f:
    json.dump({'class_names': list('abc')}, f)
  images = random_images((2, 16, 16, 3))
  run = config_lib.parse(config)
  args = run.model.model_args()
  if objective == 'mpp':  # What a pre-training run trained and saved.
    cfg = run.objective.mpp
    trained = mpp.MaskedPatchPredictor(
        vit_jax.models.get_model(num_classes=None, **args),
        num_outputs=cfg.num_outputs((4, 4)),
    )
    params = trained.init(
        jax.random.key(0),
        images,
        mpp.sample_corruption(jax.random.key(1), 2, 16, cfg),
        train=False,
    )['params']
    assert 'mpp_head' in params and 'head' not in params
  else:
    params = init_params(
        vit_jax.models.get_model(num_classes=3, **args), images
    )
  checkpoint.save(
      params, os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE)
  )
  model, loaded, size, names = cli.model_from_workdir(workdir)
  assert (size, names) == (16, tuple('abc'))
  assert model.num_classes == (None if objective == 'mpp' else 3)
  assert analysis.attention_weights(model, loaded, images).shape == (
      1,
      2,
      2,
      17,
      17,
  )
