"""Saving and resuming training runs with an orbax `CheckpointManager`.

A step directory `<workdir>/checkpoints/<step>/` holds three items:
  state: the `TrainState` (params, optimizer state, EMA params, step), saved
         asynchronously and restored straight into its shardings;
  data:  the training iterator's state (`input_pipeline.state_at`), JSON;
  meta:  what the run is (model name, classes, image size, layout), JSON,
         checked on resume so that a workdir of another model is reported
         instead of failing deep inside orbax.
orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous steps intact (the temporary
directory is removed at the next start). A step directory that cannot be read
(damaged disk, files deleted by hand) is moved to
`<workdir>/corrupt_checkpoints/` and the previous step is used instead, with a
warning.

`PreemptionWatcher` turns SIGTERM (what Cloud TPU maintenance events and most
schedulers send before killing a job) into "save at the next step boundary";
on several hosts, JAX's preemption sync point makes them agree on the step.
"""

from collections.abc import Mapping
import json
import os
import signal
import threading
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt_checkpoints'
# The run's final parameters in the published layout (`checkpoint.save`).
FINAL_PARAMS_FILE = 'final_params.npz'


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different run configuration."""


class NoReadableCheckpointError(RuntimeError):
  """Every checkpoint step in the workdir failed to restore."""


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings to restore into."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)


class Checkpointer:
  """Saves and restores (state, data-iterator state) for one workdir.

  Args:
    workdir: Run directory (local or gs://).
    meta: Description of the run, compared on restore (e.g. model name).
    keep: Checkpoints to keep (older ones are deleted).
    async_save: Write in the background while training continues.
  """

  def __init__(self, workdir: str, meta: Mapping[str, Any], *, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.join(workdir, CHECKPOINT_DIR)
    self.corrupt_directory = os.path.join(workdir, CORRUPT_DIR)
    # Compared with what JSON gives back (tuples come back as lists).
    self.meta = json.loads(json.dumps(dict(meta)))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            create=True,
            # Leftovers of a save that was killed half-way.
            cleanup_tmp_directories=True),
        item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
    """Starts saving `step` (returns before the write ends when async)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(dict(data_state)),
        meta=ocp.args.JsonSave(self.meta)))

  def _check_meta(self, step: int) -> None:
    saved = self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
    # Over both sides' keys: a field only one of them has also differs.
    different = {k: (saved.get(k), self.meta.get(k))
                 for k in set(saved) | set(self.meta)
                 if saved.get(k) != self.meta.get(k)}
    if different:
      details = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}'
                          for k, (a, b) in sorted(different.items()))
      raise IncompatibleCheckpointError(
          f'{self.directory} holds a checkpoint (step {step}) of a different '
          f'run ({details}). Use a new --workdir for this config, or restore '
          'the original config to resume that run.')

  def restore(self, step: int, abstract_state: Any
              ) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the shardings carried by `abstract_state`."""
    self._check_meta(step)
    logging.info('Restoring checkpoint step %d from %s', step, self.directory)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['data'])

  def restore_latest(self, abstract_state: Any
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest readable step; None when there is no checkpoint.

    A step that fails to restore is moved to `corrupt_checkpoints/` (kept,
    not deleted, so nothing is lost if the failure was not the files' fault)
    and the next older step is tried, with a warning.

    Returns:
      (step, state, data-iterator state), or None for a fresh workdir.

    Raises:
      IncompatibleCheckpointError: the checkpoints are of a different run.
      NoReadableCheckpointError: steps exist but none could be read.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, abstract_state)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # orbax / tensorstore raise many types (KeyError, ValueError,
        # JSONDecodeError, OSError) for missing or damaged files.
        failures.append(f'step {step}: {type(e).__name__}: {e}'[:500])
        self._move_aside(step)
        logging.warning(
            'Checkpoint step %d in %s cannot be read (%s); moved it to %s and '
            'falling back to the previous step.', step, self.directory,
            failures[-1], self.corrupt_directory)
        continue
      if failures:
        logging.warning('Resuming from step %d; the newer step(s) that could '
                        'not be read are in %s.', step, self.corrupt_directory)
      return step, state, data
    if failures:
      raise NoReadableCheckpointError(
          f'No checkpoint in {self.directory} could be read; the damaged '
          f'steps were moved to {self.corrupt_directory}:\n  '
          + '\n  '.join(failures) + '\nRunning the same command again '
          'starts this run from scratch; to keep the damaged steps out of the '
          'way for good, delete that directory or use a new --workdir.')
    return None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      tf.io.gfile.makedirs(self.corrupt_directory)
      target = os.path.join(self.corrupt_directory, str(step))
      suffix = 1
      while tf.io.gfile.exists(target):
        target = os.path.join(self.corrupt_directory, f'{step}.{suffix}')
        suffix += 1
      tf.io.gfile.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'vit_jax:move_aside:{step}')
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def load_params(workdir: str, *, ema: bool = True,
                step: int | None = None) -> tuple[int, Any]:
  """Parameters from a run's checkpoint, without its optimizer state.

  Args:
    workdir: Run directory.
    ema: Prefer the EMA parameters when the run kept them.
    step: Checkpoint step (default: the newest).

  Returns:
    (step, parameters as host numpy arrays).

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
  """
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_names=('state',),
      item_handlers={'state': ocp.StandardCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
        f'No checkpoint in {directory}: point --workdir at a training run '
        '(or pass an .npz).')
  # Restored onto this process's first device, whatever mesh saved it (a
  # run trained on several devices is inspected or evaluated on one).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      manager.item_metadata(step)['state'])
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))['state']
  manager.close()
  params = state.get('ema_params') if ema else None
  if params is None:
    params = state['params']
  return step, jax.tree_util.tree_map(np.asarray, params)


class PreemptionWatcher:
  """Tells the training loop when to save and stop because of a SIGTERM.

  Single process: a SIGTERM handler sets a flag, read at the next step
  boundary. Several processes (after `jax.distributed.initialize`): JAX's
  preemption service receives the SIGTERM on any host, and
  `reached_preemption_sync_point` becomes true on every host at the same step.
  `reached(step)` must be called at every step, on every process.

  Use as a context manager; the previous SIGTERM handler is restored on exit.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._previous = None
    self._distributed = jax.distributed.is_initialized()

  def __enter__(self) -> 'PreemptionWatcher':
    # Signal handlers can only be set from the main thread; elsewhere (e.g. a
    # notebook's worker thread) the run simply is not preemption-aware.
    if (not self._distributed
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._requested.set()

  def reached(self, step: int) -> bool:
    """True when the run should save at `step` and stop."""
    if self._distributed:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service is off.
        return False
    return self._requested.is_set()
