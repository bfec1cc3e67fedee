"""The bad-input matrix: every mistake gets an actionable message, and
nothing that was already saved is touched.

Each case calls `train.train_and_evaluate` (what the CLI runs) the way a user
would get it wrong. Cases about the config and the data run against a copy
of a finished run's workdir and check that every file in it is unchanged;
cases about `.npz` files check that the file and a fresh workdir hold nothing
new.
"""

import glob
import logging
import os
import re
import shutil

import numpy as np
import pytest

from helpers import make_image_folder
from helpers import PickleExploit
from helpers import snapshot
from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import run_checkpoints
from vit_jax import train
from vit_jax import workdir as workdir_lib
from vit_jax.evaluators import classification
import vit_jax.models

# The slow tier: training runs.
pytestmark = pytest.mark.slow


def tiny_config(tfds_dir):
  """configs/digits.py:runlocal with the 'testing' model (8 devices)."""
  from configs import digits  # pylint: disable=g-import-not-at-top

  config = digits.get_config('runlocal')
  config.model_name = 'testing'
  config.tfds_data_dir = tfds_dir
  return config


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, tfds_dir):
  workdir = str(tmp_path_factory.mktemp('finished'))
  train.train_and_evaluate(tiny_config(tfds_dir), workdir)
  return workdir


@pytest.fixture
def existing_run(finished_run, tmp_path):
  """A private copy of the finished run, and its file hashes."""
  workdir = str(tmp_path / 'existing')
  shutil.copytree(finished_run, workdir)
  return workdir, snapshot(workdir)


def _folder_with_one_class(root):
  make_image_folder(root, classes=('only',))


def _folder_with_a_corrupt_image(root):
  paths = make_image_folder(root)
  with open(paths[4], 'r+b') as f:
    f.truncate(40)


def _folder_of_22_per_class(root):
  # 24 images per class, of which the automatic 10% test split takes 2.
  make_image_folder(root, per_class=24)


def _digits_train_count_of_class_0():
  """Class 0's examples in digits' train split, counted from scikit-learn.

  The bundled split puts example i into test when i % 6 == 5.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  labels = datasets.load_digits().target
  return int(np.sum(labels[np.arange(len(labels)) % 6 != 5] == 0))


# (id, config changes, exception type, regexes the message must match: the
# problem and the fix). Dotted fields set nested values.
CONFIG_AND_DATA_CASES = [
    (
        'unknown_model',
        {'model_name': 'ViT-Q_16'},
        vit_jax.models.UnknownModelError,
        [
            r"Unknown model 'ViT-Q_16'",
            r'Known models: .*ViT-B_16',
            r'Pass one of these names',
        ],
    ),
    (
        'batch_vs_devices',
        {'batch': 12},
        ValueError,
        [
            r'config.batch=12 is not divisible by devices x accum_steps '
            r'= 8 x 1',
            r'Use a multiple of 8 \(e.g. config.batch=16\)',
        ],
    ),
    (
        'accum_vs_batch',
        {'batch': 32, 'accum_steps': 3},
        ValueError,
        [
            r'config.accum_steps=3 does not divide config.batch=32',
            r'with 8 devices use one of \[1, 2, 4\]',
        ],
    ),
    (
        'zero_lr',
        {'base_lr': 0.0},
        ValueError,
        [r'config.base_lr=0.0 must be positive'],
    ),
    (
        'negative_lr',
        {'base_lr': -1e-3},
        ValueError,
        [r'config.base_lr=-0.001 must be positive'],
    ),
    (
        'zero_steps',
        {'total_steps': 0},
        ValueError,
        [r'config.total_steps=0 must be positive'],
    ),
    (
        'negative_steps',
        {'total_steps': -5},
        ValueError,
        [r'config.total_steps=-5 must be positive'],
    ),
    (
        'image_size_vs_patch',
        {'image_size': 18},
        ValueError,
        [
            r'config.image_size=18 is not a multiple of the patch size 4 of '
            r'testing',
            r'use e.g. 16',
        ],
    ),
    (
        'mesh_vs_devices',
        {'mesh': (('data', 3), ('fsdp', 1))},
        ValueError,
        [
            r'needs a multiple of 3 devices but 8 are available',
            r'change the axis sizes',
        ],
    ),
    (
        'mesh_covers_too_few',
        {'mesh': (('data', 2), ('fsdp', 2))},
        ValueError,
        [r'covers 4 devices but 8 are available', r'use -1 for one axis'],
    ),
    (
        'unknown_dataset',
        {'dataset': 'cifar11'},
        ValueError,
        [
            r"Unknown dataset 'cifar11' \(config.dataset\)",
            r'Accepted: .*digits.*tfds.list_builders',
        ],
    ),
    (
        'tfds_not_prepared',
        {'dataset': 'cifar10', 'tfds_data_dir': '{empty}'},
        input_pipeline.DatasetNotPreparedError,
        [
            r"'cifar10' is not prepared in",
            r'tfds build cifar10 --data_dir=',
            r'config.tfds_download=True',
        ],
    ),
    (
        'empty_image_folder',
        {'dataset': 'image_folder', 'image_folder': '{empty}'},
        ValueError,
        [r'has no class sub-folders'],
    ),
    (
        'one_class_folder',
        {'dataset': 'image_folder', 'image_folder': _folder_with_one_class},
        ValueError,
        [r'1 class folder', r'at least 2'],
    ),
    (
        'corrupt_image',
        {
            'dataset': 'image_folder',
            'image_folder': _folder_with_a_corrupt_image,
        },
        input_pipeline.BadImageError,
        [r'img_004', r'1 unreadable', r'skip_bad_images=True'],
    ),
    # Evaluators' preconditions fail before step 1, not in the final
    # evaluation after the whole run.
    (
        'fewshot_more_shots_than_folder_images',
        {
            'dataset': 'image_folder',
            'image_folder': _folder_of_22_per_class,
            'evals.fewshot.every': 4,
            'evals.fewshot.shots': (1, 25),
            'evals.fewshot.pool_per_class': 100,
        },
        ValueError,
        [
            r"class 0 \('cat'\) has 22 examples in split 'train'",
            r'fewer than the largest of evals.fewshot.shots=\(1, 25\)',
            r'3 class\(es\) short of 25',
            r'at most 22',
            r'evals.fewshot.every=0',
        ],
    ),
    (
        'fewshot_more_shots_than_digits',
        {
            'evals.fewshot.every': 4,
            'evals.fewshot.shots': (5, 200),
            'evals.fewshot.pool_per_class': 300,
        },
        ValueError,
        [
            rf"class 0 \('0'\) has "
            rf'{_digits_train_count_of_class_0()} examples in '
            r"split 'train' of the few-shot dataset 'digits'",
            r'10 class\(es\) short of 200',
        ],
    ),
    (
        'fewshot_pool_smaller_than_shots',
        {
            'evals.fewshot.every': 4,
            'evals.fewshot.shots': (1, 20),
            'evals.fewshot.pool_per_class': 10,
        },
        ValueError,
        [
            r'evals.fewshot.pool_per_class=10 is smaller than the largest shot '
            r'count 20',
            r'raise it to at least 20',
        ],
    ),
    (
        'fewshot_no_shots',
        {'evals.fewshot.every': 4, 'evals.fewshot.shots': ()},
        ValueError,
        [r'evals.fewshot.shots=\(\) must be a non-empty list'],
    ),
    (
        'empty_eval_split',
        {
            'dataset': 'image_folder',
            'image_folder': _folder_of_22_per_class,
            'image_folder_test_percent': 0,
        },
        ValueError,
        [
            r"The evaluation split 'test' of 'image_folder' is empty",
            r'config.image_folder_test_percent',
        ],
    ),
]


@pytest.mark.parametrize(
    'changes,error,messages',
    [c[1:] for c in CONFIG_AND_DATA_CASES],
    ids=[c[0] for c in CONFIG_AND_DATA_CASES],
)
def test_config_and_data_mistakes(
    existing_run, tfds_dir, tmp_path, changes, error, messages
):
  workdir, before = existing_run
  config = tiny_config(tfds_dir)
  for field, value in changes.items():
    if value == '{empty}':
      value = str(tmp_path / f'empty_{field}')
      os.makedirs(value)
    elif callable(value):
      root = str(tmp_path / 'images')
      value(root)
      value = root
    *parents, name = field.split('.')
    section = config
    for parent in parents:
      section = section[parent]
    section[name] = value
  with pytest.raises(error) as e:
    # Even a command that asks to start over deletes nothing when refused.
    train.train_and_evaluate(config, workdir, overwrite=True)
  for message in messages:
    assert re.search(message, str(e.value)), (message, str(e.value))
  assert snapshot(workdir) == before


def test_workdir_of_a_different_model(existing_run, tfds_dir):
  workdir, before = existing_run
  config = tiny_config(tfds_dir)
  config.model_name = 'ViT-Ti_16'
  with pytest.raises(workdir_lib.WorkdirError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert 'holds a run of another config' in message
  assert "model_name: run 'testing', command 'ViT-Ti_16'" in message
  assert 'Use a new --workdir' in message
  assert snapshot(workdir) == before


def test_workdir_not_writable(tmp_path, tfds_dir):
  blocker = tmp_path / 'a_file'
  blocker.write_text('keep me')
  with pytest.raises(
      PermissionError,
      match=r'Cannot write to --workdir=.*a_file/run .*Choose a '
      r'directory you can write to',
  ):
    train.train_and_evaluate(tiny_config(tfds_dir), str(blocker / 'run'))
  assert blocker.read_text() == 'keep me'


def test_corrupt_newest_step_falls_back_to_the_previous_one(
    finished_run, existing_run, tfds_dir, caplog
):
  workdir, _ = existing_run
  newest = os.path.join(workdir, run_checkpoints.CHECKPOINT_DIR, '4')
  for path in glob.glob(os.path.join(newest, 'state', '**'), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 16:
      with open(path, 'r+b') as f:
        f.truncate(16)
  damaged = snapshot(newest)
  # As if killed before the final parameters were written (a finished run
  # is not trained again, damaged checkpoint or not).
  os.remove(os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE))
  caplog.set_level(logging.WARNING)
  metrics = train.train_and_evaluate(tiny_config(tfds_dir), workdir)
  assert re.search(r'Checkpoint step 4 in .* cannot be read', caplog.text)
  assert 'Resuming from step 2' in caplog.text
  # Resumed from step 2, trained steps 3 and 4 again, finished.
  assert metrics['eval/examples'] == 299
  steps = sorted(
      int(s)
      for s in os.listdir(os.path.join(workdir, run_checkpoints.CHECKPOINT_DIR))
      if s.isdigit()
  )
  assert steps == [2, 4]
  # The damaged step is kept, byte for byte, for inspection.
  assert (
      snapshot(os.path.join(workdir, run_checkpoints.CORRUPT_DIR, '4'))
      == damaged
  )

  # The retrained steps equal the original ones (same seed, same data order).
  def final(run):
    return checkpoint.flatten(
        checkpoint.load(os.path.join(run, run_checkpoints.FINAL_PARAMS_FILE))
    )

  original, retrained = final(finished_run), final(workdir)
  for key in original:
    np.testing.assert_array_equal(original[key], retrained[key], err_msg=key)


def test_failing_final_evaluation_keeps_the_final_parameters(
    finished_run, tfds_dir, tmp_path, monkeypatch, caplog
):
  """An evaluator that breaks at the end costs the run nothing it trained."""

  def broken_evaluate(*args, **kwargs):
    del args, kwargs
    raise RuntimeError('evaluator broke')

  monkeypatch.setattr(classification, 'evaluate', broken_evaluate)
  workdir = str(tmp_path / 'run')
  caplog.set_level(logging.ERROR)
  with pytest.raises(RuntimeError, match='evaluator broke'):
    train.train_and_evaluate(tiny_config(tfds_dir), workdir)
  assert re.search(
      r'The final evaluation failed; training finished and its '
      r'parameters are saved in .*final_params.npz',
      caplog.text,
  )

  # The final parameters are those of the same run that finished cleanly,
  # and the last step's checkpoint is complete.
  def final(run):
    return checkpoint.flatten(
        checkpoint.load(os.path.join(run, run_checkpoints.FINAL_PARAMS_FILE))
    )

  expected, saved = final(finished_run), final(workdir)
  assert sorted(saved) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(saved[key], expected[key], err_msg=key)
  assert os.path.isdir(
      os.path.join(workdir, run_checkpoints.CHECKPOINT_DIR, '4')
  )
  # Once the evaluator works, the same call evaluates without training.
  monkeypatch.undo()
  metrics = train.train_and_evaluate(tiny_config(tfds_dir), workdir)
  assert metrics['eval/examples'] == 299


# ----------------------------------------------------------------------------
# Pretrained weights (`config.pretrained_path`).
# ----------------------------------------------------------------------------


def _good_npz(path, tfds_dir, **model_overrides):
  """Parameters of the tiny model (or a variant) in the published layout."""
  config = tiny_config(tfds_dir)
  model = vit_jax.models.get_model(
      'testing', num_classes=10, **{**config.model.to_dict(), **model_overrides}
  )
  import jax  # pylint: disable=g-import-not-at-top

  params = jax.jit(
      lambda: model.init(
          jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False
      )
  )()['params']
  checkpoint.save(params, path)
  return path


def _truncated_npz(path, tfds_dir):
  data = open(_good_npz(path, tfds_dir), 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[: len(data) // 2])


def _text_file(path, tfds_dir):
  del tfds_dir
  with open(path, 'w') as f:
    f.write('not weights\n' * 20)


def _pickled_objects(path, tfds_dir):
  del tfds_dir
  payload = np.empty(1, dtype=object)
  payload[0] = PickleExploit(path + '.pwned')
  np.savez(path, **{'embedding/kernel': np.zeros((2, 2)), 'head/bias': payload})


def _deeper_model(path, tfds_dir):
  _good_npz(path, tfds_dir, transformer={'num_layers': 2})


NPZ_CASES = [
    ('missing', None, FileNotFoundError, [r'weights.npz does not exist']),
    (
        'truncated',
        _truncated_npz,
        checkpoint.CheckpointError,
        [r'weights.npz', r'truncated or corrupt', r'Re-download'],
    ),
    (
        'not_an_npz',
        _text_file,
        checkpoint.CheckpointError,
        [r'weights.npz is not a readable .npz'],
    ),
    (
        'pickled_objects',
        _pickled_objects,
        checkpoint.CheckpointError,
        [r"'head/bias' holds Python objects"],
    ),
    (
        'other_architecture',
        _deeper_model,
        checkpoint.CheckpointError,
        [
            r'weights.npz',
            r'unexpected keys',
            r'Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel',
        ],
    ),
]


@pytest.mark.parametrize(
    'make,error,messages',
    [c[1:] for c in NPZ_CASES],
    ids=[c[0] for c in NPZ_CASES],
)
def test_pretrained_npz_mistakes(tmp_path, tfds_dir, make, error, messages):
  path = str(tmp_path / 'weights.npz')
  if make:
    make(path, tfds_dir)
  before = snapshot(str(tmp_path))
  config = tiny_config(tfds_dir)
  config.pretrained_path = path
  workdir = str(tmp_path / 'run')
  with pytest.raises(error) as e:
    # Even a command that asks to start over deletes nothing when refused.
    train.train_and_evaluate(config, workdir, overwrite=True)
  for message in messages:
    assert re.search(message, str(e.value)), (message, str(e.value))
  assert not os.path.exists(path + '.pwned')  # Nothing was unpickled.
  # The file is untouched and the new workdir holds no output at all.
  assert snapshot(str(tmp_path)) == before
