"""Tests of the orbax checkpointer: run description, damaged steps."""

import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import run_checkpoints

STATE = {'w': jnp.arange(100.0), 'b': jnp.ones(3)}


def save_steps(workdir, steps, meta=None):
  """Writes `steps` (state scaled by the step) synchronously."""
  saver = run_checkpoints.Checkpointer(
      str(workdir), meta or {'model_name': 'A'}, async_save=False
  )
  for step in steps:
    saver.save(
        step,
        jax.tree_util.tree_map(lambda x, s=step: x * s, STATE),
        {'position': step * 16},
    )
  saver.wait()
  saver.close()


def abstract():
  return jax.eval_shape(lambda: STATE)


def test_a_checkpoint_of_a_different_model_is_reported(tmp_path):
  save_steps(tmp_path, [1])
  reader = run_checkpoints.Checkpointer(str(tmp_path), {'model_name': 'B'})
  with pytest.raises(
      run_checkpoints.IncompatibleCheckpointError,
      match="model_name: checkpoint 'A' vs config 'B'",
  ):
    reader.restore_latest(abstract())
  # Not mistaken for damage: nothing was moved.
  assert not (tmp_path / run_checkpoints.CORRUPT_DIR).exists()


def test_corrupt_step_falls_back_to_the_previous_one(tmp_path, caplog):
  save_steps(tmp_path, [2, 4])
  step_4 = tmp_path / run_checkpoints.CHECKPOINT_DIR / '4'
  for path in (step_4 / 'state').rglob('*'):
    if path.is_file() and path.stat().st_size > 16:
      with open(path, 'r+b') as f:
        f.truncate(16)
  reader = run_checkpoints.Checkpointer(str(tmp_path), {'model_name': 'A'})
  step, got, data = reader.restore_latest(abstract())
  assert step == 2 and data == {'position': 32}
  np.testing.assert_array_equal(got['w'], np.arange(100.0) * 2)
  assert 'Checkpoint step 4' in caplog.text and 'cannot be read' in caplog.text
  # Kept for inspection, out of orbax's way.
  assert (tmp_path / run_checkpoints.CORRUPT_DIR / '4' / 'state').is_dir()
  assert reader.manager.all_steps() == [2]
  # The run goes on and can save step 4 again.
  reader.save(4, STATE, {'position': 64})
  reader.wait()
  assert reader.restore_latest(abstract())[0] == 4
  reader.close()


def test_no_readable_step_is_refused_and_nothing_is_moved(tmp_path):
  save_steps(tmp_path, [1])
  shutil.rmtree(tmp_path / run_checkpoints.CHECKPOINT_DIR / '1' / 'state')
  reader = run_checkpoints.Checkpointer(str(tmp_path), {'model_name': 'A'})
  for _ in range(2):  # Asking again finds the same step, not an empty run.
    with pytest.raises(
        run_checkpoints.NoReadableCheckpointError,
        match=r'No checkpoint in .* can be read \(steps \[1\]; '
        r'step 1: .*nothing was moved.*--overwrite',
    ) as e:
      reader.restore_latest(abstract())
    assert '\n' not in str(e.value)  # One line for the command line.
  assert reader.manager.all_steps() == [1]
  assert not (tmp_path / run_checkpoints.CORRUPT_DIR).exists()


@pytest.mark.parametrize(
    'other',
    [
        {'w': jnp.arange(100.0), 'b': jnp.ones(3), 'extra': jnp.ones(2)},
        {'w': jnp.arange(100.0)},
        {'w': jnp.arange(50.0), 'b': jnp.ones(3)},
    ],
    ids=['extra_array', 'missing_array', 'other_shape'],
)
def test_a_checkpoint_of_another_structure_is_refused_and_left_in_place(
    tmp_path, other
):
  save_steps(tmp_path, [1, 2])
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
  reader = run_checkpoints.Checkpointer(str(tmp_path), {'model_name': 'A'})
  with pytest.raises(
      run_checkpoints.IncompatibleCheckpointError,
      match=r'step 2 holds the train state of another model or '
      r'optimizer .*it is not damaged and was left as it is',
  ):
    reader.restore_latest(jax.eval_shape(lambda: other))
  reader.close()
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before


def test_a_field_only_the_checkpoint_has_also_counts(tmp_path):
  # An MPP (self-supervised) run's workdir used with a classification
  # config: reported, not mistaken for a damaged checkpoint.
  save_steps(tmp_path, [1], meta={'model_name': 'A', 'objective': 'mpp'})
  reader = run_checkpoints.Checkpointer(str(tmp_path), {'model_name': 'A'})
  with pytest.raises(
      run_checkpoints.IncompatibleCheckpointError,
      match="objective: checkpoint 'mpp' vs config None",
  ):
    reader.restore_latest(abstract())
  assert not (tmp_path / run_checkpoints.CORRUPT_DIR).exists()


@pytest.mark.slow
def test_first_ctrl_c_asks_for_a_save_the_second_stops_at_once():
  script = (
      'import os, signal, time\n'
      'from vit_jax import run_checkpoints\n'
      'with run_checkpoints.PreemptionWatcher() as watcher:\n'
      '  os.kill(os.getpid(), signal.SIGINT)\n'
      '  print("saving at the next step:", watcher.reached(1), watcher.reason,'
      ' flush=True)\n'
      '  os.kill(os.getpid(), signal.SIGINT)\n'
      '  time.sleep(30)\n'
      '  print("still running")\n'
  )
  result = subprocess.run(
      [sys.executable, '-c', script],
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.stdout.splitlines() == [
      'saving at the next step: True Interrupted (Ctrl-C)'
  ], result.stdout
  assert result.returncode == 130, result.stderr[-2000:]
  assert 'Second Ctrl-C: stopping now, without saving.' in result.stderr
  assert 'Traceback' not in result.stderr
