"""The Colab notebooks run top to bottom and are stored without outputs.

The fine-tune notebook runs with exactly the defaults it picks on a CPU
(Colab's default runtime), in a plain one-device kernel; the inspect notebook
with tiny settings injected.
"""

import io
import json
import os
import pathlib
import sys
import types
import urllib.request

import jax
from nbclient import NotebookClient
import nbformat
import numpy as np
import pytest

from helpers import write_published_npz
from vit_jax import checkpoint
import vit_jax.models

# The slow tier: notebook kernels.
pytestmark = pytest.mark.slow

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
# The CI-sized model: ViT 'testing' (1 block, width 10) on 16-pixel images.
TINY = dict(
    MODEL='testing',
    IMAGE_SIZE=16,
    MODEL_OVERRIDES={'patches': {'size': (4, 4)}},
)
# What the fine-tune notebook runs with its defaults on a CPU (a few minutes
# on 2 cores) and on a GPU or TPU (the full run: hours on a CPU).
CPU_DEFAULTS = dict(MODEL='ViT-Ti_16', IMAGE_SIZE=64, STEPS=100, BATCH=32)
ACCELERATOR_DEFAULTS = dict(
    MODEL='ViT-B_16', IMAGE_SIZE=224, STEPS=300, BATCH=64
)
VIT_MODELS = 'https://storage.googleapis.com/vit_models/'
TI16_I21K = (
    VIT_MODELS + 'augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-'
    'do_0.0-sd_0.0.npz'
)


def _notebook_paths():
  return sorted(NOTEBOOKS.glob('*.ipynb'))


def test_both_notebooks_exist():
  assert [p.name for p in _notebook_paths()] == [
      'vit_jax_finetune.ipynb',
      'vit_jax_inspect.ipynb',
  ]


@pytest.mark.parametrize('path', _notebook_paths(), ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source
  tagged = [
      c for c in notebook.cells if 'parameters' in c.metadata.get('tags', [])
  ]
  assert len(tagged) == 1  # Where `_execute` injects its settings.


def _plain_environment(**extra):
  """os.environ as a plain CPU machine (Colab's CPU runtime) has it: without
  conftest's 8 simulated devices and test-only PRNG."""
  env = dict(os.environ, **extra)
  env.pop('JAX_DEFAULT_PRNG_IMPL', None)
  flags = [
      f
      for f in env.pop('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count')
  ]
  if flags:
    env['XLA_FLAGS'] = ' '.join(flags)
  return env


def _text(cells):
  return '\n'.join(
      output.get('text', '') or output.get('data', {}).get('text/plain', '')
      for cell in cells
      for output in cell.get('outputs', [])
  )


def _execute(
    name,
    tmp_path,
    monkeypatch,
    *,
    kernel_env=None,
    before_cell=None,
    **settings,
):
  """Runs notebooks/<name> with `settings` assigned after its parameters
  cell, in a kernel of this interpreter (environment `kernel_env`, default
  this process's); returns the text it printed and the notebook.

  `before_cell(cell, text)`, when given, runs before each cell with the text
  printed so far, and may stop the run by raising.
  """
  # A kernelspec of this very interpreter: never some other environment's.
  kernels = tmp_path / 'jupyter' / 'kernels' / 'vit_jax_test'
  kernels.mkdir(parents=True)
  (kernels / 'kernel.json').write_text(
      json.dumps(
          {
              'argv': [
                  sys.executable,
                  '-m',
                  'ipykernel_launcher',
                  '-f',
                  '{connection_file}',
              ],
              'display_name': 'vit_jax tests',
              'language': 'python',
          }
      )
  )
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  index = next(
      i
      for i, c in enumerate(notebook.cells)
      if 'parameters' in c.metadata.get('tags', [])
  )
  notebook.cells.insert(
      index + 1,
      nbformat.v4.new_code_cell(
          '\n'.join(f'{k} = {v!r}' for k, v in settings.items())
      ),
  )
  client = NotebookClient(
      notebook,
      timeout=600,
      kernel_name='vit_jax_test',
      resources={'metadata': {'path': str(tmp_path)}},
  )
  with client.setup_kernel(env=dict(kernel_env or os.environ)):
    for position, cell in enumerate(notebook.cells):
      if before_cell:
        before_cell(cell, _text(notebook.cells[:position]))
      client.execute_cell(cell, position)
  return _text(notebook.cells), notebook


def _count_images(notebook):
  return sum(
      'image/png' in o.get('data', {})
      for c in notebook.cells
      for o in c.get('outputs', [])
  )


def _finetune_cells():
  """The fine-tune notebook's parameters cell and its defaults cell."""
  cells = nbformat.read(
      NOTEBOOKS / 'vit_jax_finetune.ipynb', as_version=4
  ).cells
  index = next(
      i
      for i, c in enumerate(cells)
      if 'parameters' in c.metadata.get('tags', [])
  )
  return cells[index].source, cells[index + 1].source


def _run_settings_cells(backend, overrides=''):
  """Runs the parameters cell, `overrides` and the defaults cell as if on
  `backend`; returns their variables."""
  parameters, defaults = _finetune_cells()
  namespace = {'jax': types.SimpleNamespace(default_backend=lambda: backend)}
  for source in (parameters, overrides, defaults):
    exec(source, namespace)  # pylint: disable=exec-used
  return namespace


@pytest.mark.parametrize('backend', ['cpu', 'gpu', 'tpu'])
def test_finetune_notebook_picks_defaults_by_backend(backend, capsys):
  namespace = _run_settings_cells(backend)
  expected = CPU_DEFAULTS if backend == 'cpu' else ACCELERATOR_DEFAULTS
  assert {k: namespace[k] for k in expected} == expected
  printed = capsys.readouterr().out
  assert printed.count('\n') == 1  # One line.
  if backend == 'cpu':
    assert namespace['CHECKPOINT'] == TI16_I21K
    assert (
        'CPU runtime, so quick CPU defaults: '
        "MODEL='ViT-Ti_16', IMAGE_SIZE=64, STEPS=100, BATCH=32."
    ) in printed
    assert (
        "full run (MODEL='ViT-B_16', IMAGE_SIZE=224, STEPS=300, BATCH=64) "
        'switch to a GPU or TPU runtime (Colab: Runtime > Change runtime '
        'type)'
    ) in printed
  else:
    assert namespace['CHECKPOINT'] == VIT_MODELS + 'imagenet21k/ViT-B_16.npz'
    assert printed.startswith(
        f'{backend.upper()} runtime, so the full-run '
        "defaults: MODEL='ViT-B_16', IMAGE_SIZE=224"
    )


def test_finetune_notebook_settings_override_the_defaults(capsys):
  namespace = _run_settings_cells(
      'cpu', "MODEL = 'ViT-S_16'\nSTEPS = 7\nCHECKPOINT = 'mine.npz'"
  )
  assert (
      namespace['MODEL'],
      namespace['STEPS'],
      namespace['CHECKPOINT'],
      namespace['IMAGE_SIZE'],
      namespace['BATCH'],
  ) == ('ViT-S_16', 7, 'mine.npz', 64, 32)
  assert 'quick CPU defaults: IMAGE_SIZE=64, BATCH=32.' in (
      capsys.readouterr().out
  )
  # Without CHECKPOINT: the model's own ImageNet-21k checkpoint.
  assert _run_settings_cells('gpu', "MODEL = 'ViT-S_16'")['CHECKPOINT'] == (
      VIT_MODELS + 'augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-'
      'sd_0.0.npz'
  )
  assert _run_settings_cells('gpu', "MODEL = 'ViT-L_16'")['CHECKPOINT'] == (
      VIT_MODELS + 'imagenet21k/ViT-L_16.npz'
  )


@pytest.fixture
def cached_ti16_checkpoint(tmp_path, monkeypatch):
  """A ViT-Ti_16 checkpoint in the layout and shapes of the official
  ImageNet-21k file (224 px, 21,843 classes), put into a download cache as
  `TI16_I21K`: the notebook's default checkpoint, without network.

  Weights: N(0, 0.02), zero biases, unit scales except the encoder norm's
  1.5, which tells the checkpoint apart from a random initialisation.
  """
  model = vit_jax.models.get_model(CPU_DEFAULTS['MODEL'], num_classes=21843)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32),
  )['params']
  rng = np.random.default_rng(0)

  def fill(path, shape):
    keys = '/'.join(p.key for p in path)
    if keys == 'Transformer/encoder_norm/scale':
      return np.full(shape.shape, 1.5, np.float32)
    if keys.endswith('/scale'):
      return np.ones(shape.shape, np.float32)
    if keys.endswith('/bias'):
      return np.zeros(shape.shape, np.float32)
    return rng.normal(scale=0.02, size=shape.shape).astype(np.float32)

  npz = tmp_path / 'Ti_16-i21k.npz'
  write_published_npz(jax.tree_util.tree_map_with_path(fill, shapes), npz)
  cache = tmp_path / 'cache'
  # `download` as it would fetch it: the cache layout stays its own business.
  with monkeypatch.context() as patch:
    patch.setattr(
        urllib.request,
        'urlopen',
        lambda url, timeout: io.BytesIO(npz.read_bytes()),
    )
    checkpoint.download(TI16_I21K, cache_dir=str(cache))
  return cache


CPU_RUN = (
    'ViT-Ti_16 on digits at 64 px: 100 steps of batch 32 (base_lr '
    '0.01) on 1 device(s).'
)


@pytest.mark.slow
def test_finetune_notebook_runs_its_cpu_defaults(
    tmp_path, monkeypatch, cached_ti16_checkpoint
):
  """The notebook as a CPU user first runs it: its own defaults, one device.
  Set are only where it reads and writes (and no tfds download); its default
  checkpoint URL is found in the download cache."""

  def stop_unless_cpu_defaults(cell, text):
    # The accelerator defaults would run for hours and take ~19 GB here.
    if 'train_and_evaluate(' in cell.source:
      assert CPU_RUN in text, f'Not the CPU defaults; stopped:\n{text}'

  workdir = tmp_path / 'run'
  text, notebook = _execute(
      'vit_jax_finetune.ipynb',
      tmp_path,
      monkeypatch,
      kernel_env=_plain_environment(VIT_JAX_CACHE=str(cached_ti16_checkpoint)),
      before_cell=stop_unless_cpu_defaults,
      TFDS_DATA_DIR=str(tmp_path / 'tfds'),
      TFDS_DOWNLOAD=False,
      WORKDIR=str(workdir),
  )
  assert '1 CPU device(s)' in text  # A plain CPU runtime.
  assert (
      'CPU runtime, so quick CPU defaults: '
      "MODEL='ViT-Ti_16', IMAGE_SIZE=64, STEPS=100, BATCH=32. For the "
      'full run'
  ) in text
  assert f'Fine-tuning from {TI16_I21K}' in text
  assert 'NOTE' not in text
  assert CPU_RUN in text
  assert 'on 299 test images' in text  # The whole digits test split.
  # Curves, predictions, rollout.
  assert _count_images(notebook) == 3
  saved = checkpoint.load(str(workdir / 'ViT-Ti_16_digits.npz'))
  final = checkpoint.load(str(workdir / 'final_params.npz'))
  np.testing.assert_array_equal(
      saved['head']['kernel'], final['head']['kernel']
  )
  assert saved['head']['kernel'].shape == (192, 10)
  # Position embeddings interpolated from 14x14 patches (224 px) to 4x4.
  assert saved['Transformer']['posembed_input']['pos_embedding'].shape == (
      1,
      17,
      192,
  )
  # Fine-tuned from the checkpoint: the encoder moved away from it, but
  # started there (a random initialisation has unit scales).
  tuned = saved['Transformer']['encoder_norm']['scale']
  assert 0 < np.abs(tuned - 1.5).max() < 0.1
  steps = [
      json.loads(l)['step']
      for l in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  assert steps[-1] == 100


@pytest.mark.slow
def test_inspect_notebook_falls_back_to_random_init(tmp_path, monkeypatch):
  out = tmp_path / 'inspect'
  text, notebook = _execute(
      'vit_jax_inspect.ipynb',
      tmp_path,
      monkeypatch,
      **TINY,
      CHECKPOINT=str(tmp_path / 'missing.npz'),
      NUM_IMAGES=8,
      TFDS_DATA_DIR=str(tmp_path / 'tfds'),
      OUT=str(out),
  )
  assert 'NOTE' in text and 'RANDOMLY INITIALISED' in text
  from vit_jax import analysis  # pylint: disable=g-import-not-at-top

  assert sorted(os.listdir(out)) == sorted(
      [*analysis.FIGURES, analysis.RESULTS_FILE, 'cka']
  )
  # The CKA cell: one model, so its heatmap and the sheet (shown).
  assert sorted(os.listdir(out / 'cka')) == sorted(
      ['cka_within_a.png', 'cka_sheet.png', analysis.CKA_RESULTS_FILE]
  )
  assert 'CKA of each block with its input: [' in text
  assert _count_images(notebook) == len(analysis.FIGURES) + 1
