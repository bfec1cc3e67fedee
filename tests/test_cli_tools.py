"""The serving and inspection command lines: help, refusals, outputs.

python -m vit_jax.convert / export / predict / evaluate / analysis, each in
a subprocess (absl flags are process-global) on a tiny .npz model.
"""

import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import helpers
from vit_jax import config_lib
from vit_jax import convert
from vit_jax import export
from vit_jax import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
MODEL_FLAGS = ('--workdir', '--pretrained_path', '--model', '--image_size')
# A umask other than the usual 022, under which fixed modes differ from
# what it gives: 0600 files (0664 here) and 0755 directories (0775 here;
# mkdir(0755) under 027 would give 0750 like a plain directory).
UMASK = 0o002
# absl's log lines (I1207 03:12:46.48 ... file.py:12] ...): not the refusal.


def run_module(module, *args, umask=None):
  command = [sys.executable, '-m', module, *args]
  if umask is not None:  # Through a shell: no fork hook in a JAX process.
    command = ['sh', '-c', f'umask {umask:03o} && exec "$@"', 'sh', *command]
  return subprocess.run(
      command, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV
  )


def listing(root):
  """{relative path: bytes or None for a directory} under root."""
  found = {}
  for path, dirs, files in os.walk(root):
    for name in dirs:
      found[os.path.relpath(os.path.join(path, name), root)] = None
    for name in files:
      with open(os.path.join(path, name), 'rb') as f:
        found[os.path.relpath(os.path.join(path, name), root)] = f.read()
  return found


def plain_modes(tmp_path):
  """(file mode, directory mode) that open() and mkdir() give under UMASK."""
  plain = tmp_path / 'plain'
  old = os.umask(UMASK)
  try:
    plain.mkdir(exist_ok=True)
    (plain / 'file').unlink(missing_ok=True)
    (plain / 'file').write_text('x')
  finally:
    os.umask(old)
  return (
      os.stat(plain / 'file').st_mode & 0o777,
      os.stat(plain).st_mode & 0o777,
  )


def assert_modes(root, tmp_path):
  file_mode, dir_mode = plain_modes(tmp_path)
  paths = [root] + [
      os.path.join(p, n) for p, ds, fs in os.walk(root) for n in ds + fs
  ]
  modes = {os.path.relpath(p, root): os.stat(p).st_mode & 0o777 for p in paths}
  assert modes == {
      p: dir_mode if os.path.isdir(os.path.join(root, p)) else file_mode
      for p in modes
  }, (oct(file_mode), modes)


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  """A 3-class 'testing' ViT at 32 px as an .npz, and one image file."""
  root = tmp_path_factory.mktemp('cli_tools')
  helpers.write_testing_npz(root / 'model.npz')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'image.png')
  return str(root / 'model.npz')


@pytest.mark.slow
@pytest.mark.parametrize(
    'module,own',
    [
        (
            'vit_jax.predict',
            ('--images', '--labels', '--top_k', '--dynamic_image_size'),
        ),
        (
            'vit_jax.export',
            (
                '--format',
                '--out',
                '--overwrite',
                '--platforms',
                '--dynamic_image_size',
            ),
        ),
        ('vit_jax.convert', ('--input', '--output', '--overwrite', '--to')),
    ],
)
def test_help_lists_the_flags(module, own):
  result = run_module(module, '--help')
  assert result.returncode == 0, result.stderr[-3000:]
  model_flags = MODEL_FLAGS if module != 'vit_jax.convert' else ('--model',)
  for flag in own + model_flags:
    name = flag.removeprefix('--')
    assert re.search(rf'^  --(\[no\])?{name}:', result.stdout, re.M), (
        flag,
        result.stdout,
    )


@pytest.mark.slow
def test_refusals_are_one_line_and_write_nothing(npz, tmp_path):
  out = tmp_path / 'out'
  missing = str(tmp_path / 'missing')
  model = [f'--pretrained_path={npz}', '--model=testing']
  cases = [
      (
          (
              'vit_jax.convert',
              f'--input={missing}.npz',
              f'--output={out}/x.safetensors',
          ),
          (f'{missing}.npz',),
      ),
      (
          ('vit_jax.export', *model, f'--out={out}', '--platforms=gpu'),
          ('--platforms=gpu',),
      ),
      (
          ('vit_jax.predict', *model, f'--images={missing}'),
          (f'--images: {missing} does not exist',),
      ),
      (
          (
              'vit_jax.evaluate',
              '--config=configs/digits.py:runlocal',
              f'--params={npz}',
              '--config.batch_evall=8',
              f'--out={out}',
          ),
          ('config.batch_evall', 'config.batch_eval'),
      ),
      (
          ('vit_jax.analysis', *model, f'--images={missing}', f'--out={out}'),
          (f'--images={missing}',),
      ),
  ]
  for args, expected in cases:
    helpers.assert_refused(run_module(*args), *expected)
    assert not out.exists(), args
  # A flag absl rejects: the error and a hint, no usage dump.
  lines = helpers.assert_refused(
      run_module('vit_jax.predict', '--top_k=many'), '--top_k'
  )
  assert lines[1:] == ['predict.py: --help lists the flags.'], lines


@pytest.mark.slow
def test_evaluate_names_its_own_fewshot_switch(npz, tmp_path):
  # Prepared here: tfds's progress bars are no part of the refusal.
  tfds_dir = str(tmp_path / 'tfds')
  input_pipeline.get_source(
      config_lib.section(
          {'dataset': 'digits', 'tfds_data_dir': tfds_dir}, 'data'
      )
  )
  # digits has ~150 training images per class: 200 shots cannot be drawn.
  result = run_module(
      'vit_jax.evaluate',
      '--config=configs/digits.py:runlocal',
      f'--config.tfds_data_dir={tfds_dir}',
      f'--params={npz}',
      '--config.evals.fewshot.shots=200',
      '--config.evals.fewshot.pool_per_class=200',
      f'--out={tmp_path}/out',
  )
  lines = helpers.assert_refused(
      result, "few-shot dataset 'digits'", 'off with --nofewshot'
  )
  assert 'every=0' not in lines[0]
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_export_replaces_an_output_only_with_overwrite(npz, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'mine.txt').write_bytes(b"the user's file\n")
  before = listing(out)
  args = (
      'vit_jax.export',
      f'--pretrained_path={npz}',
      '--model=testing',
      f'--out={out}',
      '--platforms=cpu',
  )
  result = run_module(*args, umask=UMASK)
  helpers.assert_refused(result, f'--out={out} exists', '--overwrite')
  assert listing(out) == before
  # Over the user's file, then a SavedModel over the StableHLO export:
  # only the new export's files each time.
  result = run_module(*args, '--overwrite', umask=UMASK)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(listing(out)) == [export.STABLEHLO_FILE, export.SERVING_FILE]
  assert export.load_stablehlo(str(out)).out_avals[0].shape[-1] == 3
  assert_modes(out, tmp_path)
  result = run_module(*args, '--overwrite', '--format=savedmodel', umask=UMASK)
  assert result.returncode == 0, result.stderr[-3000:]
  assert {p.split('/')[0] for p in listing(out)} == {
      'saved_model.pb',
      'fingerprint.pb',
      'variables',
      'assets',
      export.SERVING_FILE,
  }
  assert_modes(out, tmp_path)
  assert sorted(os.listdir(tmp_path)) == ['out', 'plain']  # Nothing staged.


@pytest.mark.slow
def test_convert_replaces_an_output_only_with_overwrite(npz, tmp_path):
  timm = tmp_path / 'model.safetensors'
  timm.write_bytes(b"the user's file\n")
  args = ('vit_jax.convert', f'--input={npz}', '--model=testing')
  result = run_module(*args, f'--output={timm}', umask=UMASK)
  helpers.assert_refused(result, f'--output={timm} exists', '--overwrite')
  assert timm.read_bytes() == b"the user's file\n"
  result = run_module(*args, f'--output={timm}', '--overwrite', umask=UMASK)
  assert result.returncode == 0, result.stderr[-3000:]
  model, _ = convert.from_timm(str(timm))
  assert model.num_classes == 3
  assert_modes(timm, tmp_path)
  hf = tmp_path / 'hf'
  hf.mkdir()
  (hf / 'mine.txt').write_text('x')
  result = run_module(*args, f'--output={hf}', umask=UMASK)
  helpers.assert_refused(result, f'--output={hf} exists', '--overwrite')
  assert sorted(listing(hf)) == ['mine.txt']
  result = run_module(*args, f'--output={hf}', '--overwrite', umask=UMASK)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(listing(hf)) == [
      convert.TRANSFORMERS_CONFIG,
      convert.TRANSFORMERS_WEIGHTS,
  ]
  assert_modes(hf, tmp_path)


@pytest.mark.slow
def test_analysis_at_the_images_own_size(npz, tmp_path):
  """A folder of 40x70 images: run at 32x64 (the nearest multiples of the
  16 px patches), a 2x4 grid; the position table on its 2x2 trained grid."""
  import json  # pylint: disable=g-import-not-at-top

  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(2):
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), np.uint8)).save(
        folder / f'{i}.png'
    )
  model = [f'--pretrained_path={npz}', '--model=testing']
  out = tmp_path / 'out'
  result = run_module(
      'vit_jax.analysis',
      *model,
      f'--images={folder}',
      '--dynamic_image_size',
      f'--out={out}',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((out / 'analysis.json').read_text())
  assert saved['grid'] == [2, 4]
  assert saved['position_similarity_grid'] == [2, 2]
  # Another size without the switch, and a folder of two sizes, refused.
  helpers.assert_refused(
      run_module(
          'vit_jax.analysis',
          *model,
          f'--images={folder}',
          '--image_size=64',
          f'--out={tmp_path}/b',
      ),
      '--image_size=64',
      'add --dynamic_image_size',
  )
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / '2.png')
  helpers.assert_refused(
      run_module(
          'vit_jax.analysis',
          *model,
          f'--images={folder}',
          '--dynamic_image_size',
          f'--out={tmp_path}/c',
      ),
      'come to 2 sizes (16x16, 32x64)',
      'pass --image_size',
  )
  assert not (tmp_path / 'b').exists() and not (tmp_path / 'c').exists()
