"""The workdir is the run's identity; a second command never costs a run.

In-process cases call `train.train_and_evaluate` (what the CLI runs) on a
finished run and check that every file of it is byte-identical afterwards;
the command-line cases check what a person sees: one `error:` line, no
traceback, nothing written.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import assert_refused
from helpers import doc_text
from helpers import make_image_folder
from helpers import snapshot
from helpers import unlogged_lines
from vit_jax import cli
from vit_jax import config_lib
from vit_jax import run_checkpoints
from vit_jax import train
from vit_jax import workdir as workdir_lib
from vit_jax.models import vit

# The slow tier: training runs and the command line.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_config(folder, tfds_dir):
  """configs/digits.py:runlocal with the 'testing' model, on a folder."""
  config = config_lib.load_config_file(
      os.path.join(REPO, 'configs/digits.py:runlocal')
  )
  config.model_name = 'testing'
  config.tfds_data_dir = tfds_dir
  config.dataset = 'image_folder'
  config.image_folder = folder
  config.image_folder_test_percent = 30
  config.batch_eval = 16
  return config


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('folders')
  make_image_folder(str(root / 'a'))
  make_image_folder(str(root / 'b'), seed=1)  # The same classes.
  return str(root / 'a'), str(root / 'b'), str(root / 'tfds')


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, folders):
  workdir = str(tmp_path_factory.mktemp('finished'))
  train.train_and_evaluate(folder_config(folders[0], folders[2]), workdir)
  return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished_run, workdir)
  return workdir, snapshot(workdir)


CHANGED = {
    'optimizer': {'optimizer': 'sgd'},
    'grad_clip_norm': {'grad_clip_norm': 0.0},
    'weight_decay': {'weight_decay': 0.5},
    'mu_dtype': {'mu_dtype': 'bfloat16'},
    'ema_decay': {'ema_decay': 0.9},
    'dataset': {'dataset': 'digits', 'image_folder': ''},
    'image_folder': {'image_folder': 'b'},
    'model': {'model.transformer.dropout_rate': 0.3},
}


@pytest.mark.parametrize('field', sorted(CHANGED))
def test_a_changed_field_is_refused_in_one_line_and_the_run_stays_intact(
    run_copy, folders, field
):
  workdir, before = run_copy
  config = folder_config(folders[0], folders[2])
  for name, value in CHANGED[field].items():
    if name == 'image_folder' and value == 'b':
      value = folders[1]
    config_lib.apply_overrides(
        config, [(name, repr(value) if isinstance(value, str) else str(value))]
    )
  with pytest.raises(workdir_lib.WorkdirError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert '\n' not in message
  assert re.search(
      rf'holds a run of another config \({re.escape(field)}\S*: '
      r'run .*, command ',
      message,
  ), message
  assert '--workdir' in message and '--overwrite' in message
  assert snapshot(workdir) == before
  # The run's own command afterwards: finished, nothing written.
  metrics = train.train_and_evaluate(
      folder_config(folders[0], folders[2]), workdir
  )
  assert metrics['finished_at_step'] == 4
  assert (
      metrics['eval/accuracy']
      == json.loads(
          open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()[-1]
      )['eval/accuracy']
  )
  assert snapshot(workdir) == before


def test_other_classes_are_refused(run_copy, folders, tmp_path):
  workdir, before = run_copy
  folder = str(tmp_path / 'other')
  make_image_folder(folder, classes=('cat', 'dog', 'emu'))
  # The same config text (folder a), the folder's content changed.
  shutil.rmtree(folders[0] + '_moved', ignore_errors=True)
  config = folder_config(folder, folders[2])
  run_config = os.path.join(workdir, config_lib.CONFIG_FILE)
  with open(run_config) as f:
    saved = json.load(f)
  saved['image_folder'] = folder  # As if the folder's files had changed.
  with open(run_config, 'w') as f:
    json.dump(saved, f)
  before = snapshot(workdir)
  with pytest.raises(
      workdir_lib.WorkdirError,
      match=r"holds a run on classes \['cat', 'dog', 'fox'\]; "
      r"the data now has \['cat', 'dog', 'emu'\]",
  ):
    train.train_and_evaluate(config, workdir)
  assert snapshot(workdir) == before


def test_watch_fields_and_total_steps_continue_the_run_and_are_recorded(
    run_copy, folders
):
  workdir, before = run_copy
  config = folder_config(folders[0], folders[2])
  config_lib.apply_overrides(
      config, [('total_steps', '6'), ('eval_every', '2'), ('log_every', '1')]
  )
  train.train_and_evaluate(config, workdir)
  after = snapshot(workdir)
  # config.json is the run's; the new values are beside it.
  assert after[config_lib.CONFIG_FILE] == before[config_lib.CONFIG_FILE]
  changes = [
      json.loads(l)
      for l in open(os.path.join(workdir, workdir_lib.CONFIG_CHANGES_FILE))
  ]
  assert [c['step'] for c in changes] == [4]
  assert changes[0]['changes'] == {
      'total_steps': [4, 6],
      'eval_every': [4, 2],
      'log_every': [2, 1],
  }
  steps = [
      json.loads(l)['step']
      for l in open(os.path.join(workdir, 'metrics.jsonl'))
  ]
  assert max(steps) == 6 and steps == sorted(steps)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '2',
      '4',
      '6',
  ]


def test_overwrite_starts_over_and_deletes_only_run_outputs(run_copy, folders):
  workdir, before = run_copy
  mine = os.path.join(workdir, 'notes.txt')
  with open(mine, 'w') as f:
    f.write('mine')
  config = folder_config(folders[0], folders[2])
  config_lib.apply_overrides(
      config, [('optimizer', 'sgd'), ('checkpoint_every', '4')]
  )
  train.train_and_evaluate(config, workdir, overwrite=True)
  assert open(mine).read() == 'mine'
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['4']
  saved = json.load(open(os.path.join(workdir, config_lib.CONFIG_FILE)))
  assert saved['optimizer'] == 'sgd'
  assert len(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))) == 1


def test_a_run_without_its_config_json_or_with_only_metrics_is_refused(
    run_copy, folders
):
  workdir, _ = run_copy
  os.remove(os.path.join(workdir, config_lib.CONFIG_FILE))
  before = snapshot(workdir)
  with pytest.raises(
      workdir_lib.WorkdirError,
      match=r'holds run files .* but ' r'no config.json',
  ):
    train.train_and_evaluate(folder_config(folders[0], folders[2]), workdir)
  assert snapshot(workdir) == before


def test_metrics_without_checkpoints_are_never_truncated(run_copy, folders):
  workdir, _ = run_copy
  config = folder_config(folders[0], folders[2])
  config_lib.apply_overrides(config, [('checkpoint_every', '1')])
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  os.remove(os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE))
  before = snapshot(workdir)
  # 4 steps logged, checkpoints every step: checkpoints were lost, not
  # still being written: starting at 0 would truncate the metrics.
  with pytest.raises(
      workdir_lib.WorkdirError,
      match=r'metrics.jsonl records ' r'4 steps but no checkpoint is left',
  ):
    train.train_and_evaluate(config, workdir)
  assert snapshot(workdir) == before
  # Killed before its first checkpoint completed (at most 2 x 2 steps
  # logged): the same command starts over and recomputes those steps.
  train.train_and_evaluate(folder_config(folders[0], folders[2]), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_a_missing_pretrained_file_is_refused_before_anything_is_written(
    folders, tmp_path
):
  workdir = str(tmp_path / 'new')
  config = folder_config(folders[0], folders[2])
  config.pretrained_path = str(tmp_path / 'missing.npz')
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def test_a_run_directory_as_pretrained_path_fine_tunes_its_final_params(
    finished_run, folders, tmp_path, caplog
):
  caplog.set_level('INFO', logger='absl')
  config = folder_config(folders[0], folders[2])
  config.pretrained_path = finished_run
  config.total_steps = 2
  train.train_and_evaluate(config, str(tmp_path / 'ft'))
  assert 'is a training run: fine-tuning its final_params.npz' in caplog.text
  empty = str(tmp_path / 'empty_run')
  os.makedirs(empty)
  config.pretrained_path = empty
  with pytest.raises(
      FileNotFoundError, match=r'is a directory without ' r'final_params.npz'
  ):
    train.train_and_evaluate(config, str(tmp_path / 'ft2'))
  assert not os.path.exists(str(tmp_path / 'ft2'))


# ----------------------------------------------------------------------------
# Resuming is exact, however often: every checkpoint (data position
# included) and the final parameters equal an uninterrupted run's.
# ----------------------------------------------------------------------------


def read_checkpoints(workdir):
  """{step: ({'state path': array}, data item)} of every checkpoint."""
  directory = os.path.join(workdir, run_checkpoints.CHECKPOINT_DIR)
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={
          'state': ocp.StandardCheckpointHandler(),
          'data': ocp.JsonCheckpointHandler(),
      },
  )
  out = {}
  for step in manager.all_steps():
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()
        ),
    )
    flat = {
        '/'.join(
            str(getattr(k, 'key', getattr(k, 'idx', k))) for k in p
        ): np.asarray(v)
        for p, v in __import__('jax').tree_util.tree_flatten_with_path(
            restored['state']
        )[0]
    }
    out[step] = (flat, dict(restored['data']))
  manager.close()
  return out


def test_resumed_twice_writes_the_same_checkpoints_and_positions(
    folders, tmp_path, monkeypatch
):
  config = folder_config(folders[0], folders[2])
  config_lib.apply_overrides(
      config,
      [
          ('total_steps', '6'),
          ('checkpoint_every', '2'),
          ('keep_checkpoints', '10'),
          ('log_every', '1'),
          ('eval_every', '6'),
          ('pp.inception_crop', 'True'),
          ('model.transformer.dropout_rate', '0.1'),
      ],
  )
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, straight)
  # Stopped at steps 3 and 5 (the preemption save), resumed each time.
  for stop in (3, 5):
    monkeypatch.setattr(
        run_checkpoints.PreemptionWatcher,
        'reached',
        lambda self, step, stop=stop: step == stop,
    )
    metrics = train.train_and_evaluate(config, resumed)
    assert metrics['preempted_at_step'] == stop
  monkeypatch.undo()
  train.train_and_evaluate(config, resumed)
  a, b = read_checkpoints(straight), read_checkpoints(resumed)
  assert sorted(a) == [2, 4, 6] and sorted(b) == [2, 3, 4, 5, 6]
  batch = config.batch
  for step in b:
    assert b[step][1]['position'] == step * batch, step
  for step in a:
    assert a[step][1] == b[step][1], step
    assert sorted(a[step][0]) == sorted(b[step][0])
    for key in a[step][0]:
      np.testing.assert_array_equal(
          a[step][0][key], b[step][0][key], err_msg=f'step {step} {key}'
      )
  final = [
      np.load(os.path.join(w, run_checkpoints.FINAL_PARAMS_FILE))
      for w in (straight, resumed)
  ]
  for key in final[0].files:
    np.testing.assert_array_equal(final[0][key], final[1][key], err_msg=key)


# ----------------------------------------------------------------------------
# What a person sees on the command line.
# ----------------------------------------------------------------------------


def run_main(*args, timeout=600):
  return subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env={
          k: v
          for k, v in os.environ.items()
          if k not in ('XLA_FLAGS', cli.TRACEBACK_VARIABLE)
      },
  )


def refusal(result):
  """The refusal line, with no hint line after it."""
  lines = assert_refused(result)
  assert len(lines) == 1, lines
  return lines[0]


@pytest.mark.slow
def test_config_refusals_are_one_line_before_anything(tmp_path):
  workdir = str(tmp_path / 'new')
  for args, expected in [
      (
          ['--config.batchsize=32'],
          r'config\.batchsize is not a field .*Did you mean config\.batch,',
      ),
      (
          ['--config.model.transformer.dropout=0.1'],
          r'Did you mean config\.model\.transformer\.dropout_rate',
      ),
      (['--config.batch=many'], r"config\.batch='many': expected int"),
      (['--config.image_folder=/tmp'], r'--config.dataset=image_folder'),
  ]:
    result = run_main(
        '--config=configs/digits.py:runlocal', f'--workdir={workdir}', *args
    )
    assert re.search(expected, refusal(result)), result.stderr
    # Nothing before it but log lines (TensorFlow's start-up lines on some
    # CPUs).
    assert unlogged_lines(result.stderr)[0].startswith('error: ')
  assert not os.path.exists(workdir)


@pytest.mark.slow
def test_identity_refusal_on_the_command_line(finished_run, folders, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished_run, workdir)
  before = snapshot(workdir)
  result = run_main(
      '--config=configs/digits.py:runlocal',
      f'--workdir={workdir}',
      '--config.model_name=testing',
      f'--config.tfds_data_dir={folders[2]}',
      '--config.dataset=image_folder',
      f'--config.image_folder={folders[0]}',
      '--config.image_folder_test_percent=30',
      '--config.batch_eval=16',
      '--config.grad_clip_norm=0',
  )
  line = refusal(result)
  assert 'grad_clip_norm: run 1.0, command 0.0' in line
  assert snapshot(workdir) == before
  # The traceback, for debugging, on request.
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'vit_jax.main',
          '--config=configs/digits.py',
          f'--workdir={workdir}',
          '--config.batchsize=1',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env={**os.environ, cli.TRACEBACK_VARIABLE: '1'},
  )
  assert 'Traceback' in result.stderr and 'batchsize' in result.stderr


@pytest.mark.slow
def test_help_exits_0_and_says_how_to_list_every_field():
  result = run_main('--help')
  assert result.returncode == 0, result.stderr
  assert '--print_config' in result.stdout and '--overwrite' in result.stdout
  assert '--config.<field>=<value>' in result.stdout


@pytest.mark.slow
def test_print_config_lists_every_field_with_value_and_comment():
  result = run_main(
      '--config=configs/finetune.py:b16,cifar10',
      '--config.model.classifier=map',
      '--print_config',
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  declared = config_lib._dotted_names(config_lib.get_base())  # pylint: disable=protected-access
  for name in declared:
    if name not in ('model', 'pp'):
      assert any(l.startswith(f'config.{name} = ') for l in lines), name
  assert 'config.batch = 512  # Global training batch.' in lines
  assert "config.model.classifier = 'map'" in lines
  assert 'config.model.transformer.dropout_rate = 0.0' in lines
  assert 'config.pp.flip = True' in lines


def readme_model_overrides():
  """Every `--config.model.<field>=<value>` README and the documentation
  pages show (one per field)."""
  found = re.findall(r'(--config\.model\.[\w.]+)=([^\s`),;]+)', doc_text())
  return [
      f'{flag}={value}'
      for flag, value in dict(found).items()
      if flag.removeprefix('--config.model.')
      not in _OTHER_KIND_OF_RUN | set(vit.BLOCK_OPTION_FIELDS)
  ]


# Fields that make another kind of run (a NaFlex model takes NaFlex batches,
# FlexiViT draws patch sizes), not an option of any config: their own runs
# test them (test_naflex_data, test_flexivit, test_readme).
_OTHER_KIND_OF_RUN = {
    'naflex',
    'flexi_patch_sizes',
    'run_patch_size',
    'posemb_grid_size',
    'posemb_resize',
    'patches.size',
}
# The block options of today's ViT families (vit.BLOCK_OPTION_FIELDS) are
# left out too: the pages show some of them refused (fc_norm without 'gap'),
# with quoted values this test's pattern does not split, and
# tests/test_block_options.py and tests/test_rope.py parse and run them.


@pytest.mark.slow
@pytest.mark.parametrize(
    'spec',
    [  # Both are :runlocal configs too.
        'configs/finetune.py:b16,cifar10,runlocal',
        'configs/pretrain_imagenet.py:b16,runlocal',
    ],
)
def test_readme_model_overrides_run_on_every_kind_of_config(spec, tmp_path):
  overrides = readme_model_overrides()
  assert len(overrides) >= 5  # classifier, dropout, attention, remat, layers
  result = run_main(
      f'--config={spec}',
      f'--workdir={tmp_path / "run"}',
      '--config.total_steps=2',
      '--config.eval_every=2',
      '--config.evals.fewshot.every=0',
      *overrides,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.load(open(tmp_path / 'run' / config_lib.CONFIG_FILE))
  assert saved['model']['classifier'] == 'map'
  assert saved['model']['transformer']['dropout_rate'] == 0.1
  assert 'MAPHead_0' in str(
      np.load(tmp_path / 'run' / 'final_params.npz').files
  )


@pytest.mark.slow
def test_ctrl_c_saves_at_the_next_step_and_exits_0(tmp_path, folders):
  workdir = str(tmp_path / 'run')
  args = [
      sys.executable,
      '-m',
      'vit_jax.main',
      '--config=configs/digits.py:runlocal',
      f'--workdir={workdir}',
      '--config.model_name=testing',
      f'--config.tfds_data_dir={folders[2]}',
      '--config.total_steps=100000',
      '--config.log_every=1',
      '--config.checkpoint_every=100000',
      '--config.eval_every=100000',
  ]
  log = open(tmp_path / 'log.txt', 'w')
  proc = subprocess.Popen(
      args,
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
  )
  deadline = time.monotonic() + 300
  while 'train/loss' not in open(tmp_path / 'log.txt').read():
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.2)
  sent = time.monotonic()
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=60) == 0
  took = time.monotonic() - sent
  log.close()
  text = open(tmp_path / 'log.txt').read()
  assert 'Traceback' not in text
  match = re.search(
      r'Interrupted \(Ctrl-C\): saved checkpoint step (\d+)', text
  )
  assert match, text[-3000:]
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [match.group(1)]
  assert took < 30, took
