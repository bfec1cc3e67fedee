"""Tests of the orbax checkpointer: run description, damaged steps."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpointing

STATE = {'w': jnp.arange(100.0), 'b': jnp.ones(3)}


def save_steps(workdir, steps, meta=None):
  """Writes `steps` (state scaled by the step) synchronously."""
  saver = checkpointing.Checkpointer(str(workdir),
                                     meta or {'model_name': 'A'},
                                     async_save=False)
  for step in steps:
    saver.save(step, jax.tree_util.tree_map(lambda x, s=step: x * s, STATE),
               {'position': step * 16})
  saver.wait()
  saver.close()


def abstract():
  return jax.eval_shape(lambda: STATE)


def test_a_checkpoint_of_a_different_model_is_reported(tmp_path):
  save_steps(tmp_path, [1])
  reader = checkpointing.Checkpointer(str(tmp_path), {'model_name': 'B'})
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match="model_name: checkpoint 'A' vs config 'B'"):
    reader.restore_latest(abstract())
  # Not mistaken for damage: nothing was moved.
  assert not (tmp_path / checkpointing.CORRUPT_DIR).exists()


def test_corrupt_step_falls_back_to_the_previous_one(tmp_path, caplog):
  save_steps(tmp_path, [2, 4])
  step_4 = tmp_path / checkpointing.CHECKPOINT_DIR / '4'
  for path in (step_4 / 'state').rglob('*'):
    if path.is_file() and path.stat().st_size > 16:
      with open(path, 'r+b') as f:
        f.truncate(16)
  reader = checkpointing.Checkpointer(str(tmp_path), {'model_name': 'A'})
  step, got, data = reader.restore_latest(abstract())
  assert step == 2 and data == {'position': 32}
  np.testing.assert_array_equal(got['w'], np.arange(100.0) * 2)
  assert 'Checkpoint step 4' in caplog.text and 'cannot be read' in caplog.text
  # Kept for inspection, out of orbax's way.
  assert (tmp_path / checkpointing.CORRUPT_DIR / '4' / 'state').is_dir()
  assert reader.manager.all_steps() == [2]
  # The run goes on and can save step 4 again.
  reader.save(4, STATE, {'position': 64})
  reader.wait()
  assert reader.restore_latest(abstract())[0] == 4
  reader.close()


def test_no_readable_step_is_an_error_that_says_what_happens_next(tmp_path):
  save_steps(tmp_path, [1])
  shutil.rmtree(tmp_path / checkpointing.CHECKPOINT_DIR / '1' / 'state')
  reader = checkpointing.Checkpointer(str(tmp_path), {'model_name': 'A'})
  with pytest.raises(checkpointing.NoReadableCheckpointError,
                     match=r'(?s)No checkpoint in .* could be read.*step 1: '
                     r'.*starts this run from scratch'):
    reader.restore_latest(abstract())
  assert reader.restore_latest(abstract()) is None


def test_a_field_only_the_checkpoint_has_also_counts(tmp_path):
  # An MPP (self-supervised) run's workdir used with a classification
  # config: reported, not mistaken for a damaged checkpoint.
  save_steps(tmp_path, [1], meta={'model_name': 'A', 'objective': 'mpp'})
  reader = checkpointing.Checkpointer(str(tmp_path), {'model_name': 'A'})
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match="objective: checkpoint 'mpp' vs config None"):
    reader.restore_latest(abstract())
  assert not (tmp_path / checkpointing.CORRUPT_DIR).exists()
