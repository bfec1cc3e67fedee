"""The Colab notebooks run top to bottom (tiny settings injected) and are
stored without outputs."""

import json
import os
import pathlib
import sys

import nbformat
from nbclient import NotebookClient
import numpy as np
import pytest

from helpers import init_params
from helpers import random_images
from helpers import randomize
from vit_jax import checkpoint
import vit_jax.models

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
# The CI-sized model: ViT 'testing' (1 block, width 10) on 16-pixel images.
TINY = dict(MODEL='testing', IMAGE_SIZE=16,
            MODEL_OVERRIDES={'patches': {'size': (4, 4)}})


def _notebook_paths():
  return sorted(NOTEBOOKS.glob('*.ipynb'))


def test_both_notebooks_exist():
  assert [p.name for p in _notebook_paths()] == [
      'vit_jax_finetune.ipynb', 'vit_jax_inspect.ipynb']


@pytest.mark.parametrize('path', _notebook_paths(), ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source
  tagged = [c for c in notebook.cells
            if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1  # Where `_execute` injects its settings.


def _execute(name, tmp_path, monkeypatch, **settings):
  """Runs notebooks/<name> with `settings` assigned after its parameters
  cell, in a kernel of this interpreter; returns the text it printed."""
  # A kernelspec of this very interpreter: never some other environment's.
  kernels = tmp_path / 'jupyter' / 'kernels' / 'vit_jax_test'
  kernels.mkdir(parents=True)
  (kernels / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': 'vit_jax tests', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  index = next(i for i, c in enumerate(notebook.cells)
               if 'parameters' in c.metadata.get('tags', []))
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      '\n'.join(f'{k} = {v!r}' for k, v in settings.items())))
  NotebookClient(notebook, timeout=600, kernel_name='vit_jax_test',
                 resources={'metadata': {'path': str(tmp_path)}}).execute()
  texts = []
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      texts.append(output.get('text', '') or
                   output.get('data', {}).get('text/plain', ''))
  return '\n'.join(texts), notebook


def _count_images(notebook):
  return sum('image/png' in o.get('data', {})
             for c in notebook.cells for o in c.get('outputs', []))


@pytest.fixture
def tiny_checkpoint(tmp_path):
  """A published-layout npz of the tiny model with a 1000-class head."""
  model = vit_jax.models.get_model(TINY['MODEL'], num_classes=1000,
                                   **TINY['MODEL_OVERRIDES'])
  size = TINY['IMAGE_SIZE']
  params = randomize(init_params(model, random_images((1, size, size, 3))))
  path = str(tmp_path / 'pretrained.npz')
  checkpoint.save(params, path)
  return path, params


@pytest.mark.slow
def test_finetune_notebook_runs_on_digits(tmp_path, monkeypatch,
                                          tiny_checkpoint):
  workdir = tmp_path / 'run'
  text, notebook = _execute(
      'vit_jax_finetune.ipynb', tmp_path, monkeypatch, **TINY,
      CHECKPOINT=tiny_checkpoint[0], DATASET='digits',
      TFDS_DATA_DIR=str(tmp_path / 'tfds'), TFDS_DOWNLOAD=False, STEPS=20,
      BATCH=32, BASE_LR=0.1, WORKDIR=str(workdir))
  assert f'Fine-tuning from {tiny_checkpoint[0]}' in text
  assert 'NOTE' not in text
  assert 'on 299 test images' in text  # The whole digits test split.
  # 8 devices (conftest's XLA_FLAGS reach the kernel): the sharded step.
  assert '8 CPU device(s)' in text
  # Curves, predictions, rollout.
  assert _count_images(notebook) == 3
  saved = checkpoint.load(str(workdir / 'testing_digits.npz'))
  final = checkpoint.load(str(workdir / 'final_params.npz'))
  np.testing.assert_array_equal(saved['head']['kernel'],
                                final['head']['kernel'])
  # Fine-tuned from the checkpoint: the encoder moved away from it, but
  # started there (not from a random initialisation).
  pretrained = tiny_checkpoint[1]['Transformer']['encoder_norm']['scale']
  tuned = saved['Transformer']['encoder_norm']['scale']
  assert 0 < np.abs(tuned - pretrained).max() < 0.5
  steps = [json.loads(l)['step'] for l in
           (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert steps[-1] == 20


@pytest.mark.slow
def test_inspect_notebook_falls_back_to_random_init(tmp_path, monkeypatch):
  out = tmp_path / 'inspect'
  text, notebook = _execute(
      'vit_jax_inspect.ipynb', tmp_path, monkeypatch, **TINY,
      CHECKPOINT=str(tmp_path / 'missing.npz'), NUM_IMAGES=8,
      TFDS_DATA_DIR=str(tmp_path / 'tfds'), OUT=str(out))
  assert 'NOTE' in text and 'RANDOMLY INITIALISED' in text
  from vit_jax import analysis  # pylint: disable=g-import-not-at-top
  assert sorted(os.listdir(out)) == sorted(
      [*analysis.FIGURES, analysis.RESULTS_FILE])
  assert _count_images(notebook) == len(analysis.FIGURES)
