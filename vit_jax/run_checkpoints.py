"""A training run's checkpoints: saving and resuming with orbax.

The training state of a run in its workdir (orbax `CheckpointManager`); the
published `.npz` files are `vit_jax.checkpoint`'s.

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
`<workdir>/corrupt_checkpoints/` when an older step can be read instead, with
a warning; when no step can be read nothing is moved and the run is refused.
A checkpoint of another structure (another model or optimizer) is never
called damaged or moved: the run is refused, naming what differs.

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
      abstract,
      shardings,
  )


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'opt_state/1/0/mu/...': shape}: the same names for a TrainState and
  for orbax's metadata of it (dicts where the state has attributes)."""

  def name(key):
    for attr in ('key', 'idx', 'name'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  return {
      '/'.join(name(k) for k in path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


class Checkpointer:
  """Saves and restores (state, data-iterator state) for one workdir.

  Args:
    workdir: Run directory (local or gs://).
    meta: Description of the run, compared on restore (e.g. model name).
    keep: Checkpoints to keep (older ones are deleted).
    async_save: Write in the background while training continues.
  """

  def __init__(
      self,
      workdir: str,
      meta: Mapping[str, Any],
      *,
      keep: int = 3,
      async_save: bool = True,
  ):
    self.directory = os.path.join(workdir, CHECKPOINT_DIR)
    self.corrupt_directory = os.path.join(workdir, CORRUPT_DIR)
    # Compared with what JSON gives back (tuples come back as lists).
    self.meta = json.loads(json.dumps(dict(meta)))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Leftovers of a save that was killed half-way.
            cleanup_tmp_directories=True,
        ),
        # Registered up front so that a step's metadata can be read
        # before anything is saved or restored (`check_structure`).
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'data': ocp.JsonCheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler(),
        },
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
    """Starts saving `step` (returns before the write ends when async)."""
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data_state)),
            meta=ocp.args.JsonSave(self.meta),
        ),
    )

  def _check_meta(self, step: int) -> None:
    saved = self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )['meta']
    # Over both sides' keys: a field only one of them has also differs.
    different = {
        k: (saved.get(k), self.meta.get(k))
        for k in set(saved) | set(self.meta)
        if saved.get(k) != self.meta.get(k)
    }
    if different:
      details = ', '.join(
          f'{k}: checkpoint {a!r} vs config {b!r}'
          for k, (a, b) in sorted(different.items())
      )
      raise IncompatibleCheckpointError(
          f'{self.directory} holds a checkpoint (step {step}) of a different '
          f'run ({details}). Use a new --workdir for this config, or restore '
          'the original config to resume that run.'
      )

  def restore(
      self, step: int, abstract_state: Any
  ) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the shardings carried by `abstract_state`."""
    self._check_meta(step)
    self.check_structure(step, abstract_state)
    logging.info('Restoring checkpoint step %d from %s', step, self.directory)
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        ),
    )
    return restored['state'], dict(restored['data'])

  def check_structure(self, step: int, abstract_state: Any) -> None:
    """Refuses a checkpoint whose arrays are not the state's (no restore).

    Raises:
      IncompatibleCheckpointError: naming the first paths that differ.
    """
    metadata = self.manager.item_metadata(step)['state']
    if metadata is None:  # Nothing to compare: the restore will tell.
      return
    saved = _shapes_by_path(metadata)
    wanted = _shapes_by_path(abstract_state)
    if saved == wanted:
      return
    only_saved = sorted(set(saved) - set(wanted))
    only_wanted = sorted(set(wanted) - set(saved))
    shapes = sorted(
        k for k in set(saved) & set(wanted) if saved[k] != wanted[k]
    )
    parts = []
    for what, keys in (
        ('only in the checkpoint', only_saved),
        ("only in this config's state", only_wanted),
        ('of another shape', shapes),
    ):
      if keys:
        parts.append(f'{len(keys)} array(s) {what}, e.g. {keys[0]}')
    raise IncompatibleCheckpointError(
        f'{self.directory} step {step} holds the train state of another '
        f'model or optimizer ({"; ".join(parts)}); it is not damaged and '
        'was left as it is. Use a new --workdir for this config, or restore '
        "the run's own config to resume it."
    )

  def restore_latest(
      self, abstract_state: Any
  ) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest readable step; None when there is no checkpoint.

    A step of another structure is refused (`check_structure`). A step
    that fails to restore is skipped for the next older one; once one is
    restored, the newer unreadable steps are moved to `corrupt_checkpoints/`
    (kept, not deleted, so nothing is lost if the failure was not the
    files' fault), with a warning. When no step can be read, nothing is
    moved.

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
        failures.append((step, f'{type(e).__name__}: {e}'[:300]))
        logging.warning(
            'Checkpoint step %d in %s cannot be read (%s); trying '
            'the previous step.',
            step,
            self.directory,
            failures[-1][1],
        )
        continue
      for failed, _ in failures:
        self._move_aside(failed)
      if failures:
        logging.warning(
            'Resuming from step %d; the newer step(s) %s that '
            'could not be read were moved to %s.',
            step,
            [f for f, _ in failures],
            self.corrupt_directory,
        )
      return step, state, data
    if failures:
      first = ' '.join(failures[0][1].split())
      raise NoReadableCheckpointError(
          f'No checkpoint in {self.directory} can be read (steps '
          f'{[f for f, _ in failures]}; step {failures[0][0]}: {first}); '
          'nothing was moved. Fix or remove the damaged steps, or use a new '
          '--workdir (--overwrite starts over here).'
      )
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


def load_params(
    workdir: str, *, ema: bool = True, step: int | None = None
) -> tuple[int, Any]:
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
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_names=('state',),
      item_handlers={'state': ocp.StandardCheckpointHandler()},
  )
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
        f'No checkpoint in {directory}: point --workdir at a training run '
        '(or pass an .npz).'
    )
  # Restored onto this process's first device, whatever mesh saved it (a
  # run trained on several devices is inspected or evaluated on one).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      manager.item_metadata(step)['state'],
  )
  state = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
  )['state']
  manager.close()
  params = state.get('ema_params') if ema else None
  if params is None:
    params = state['params']
  return step, jax.tree_util.tree_map(np.asarray, params)


class PreemptionWatcher:
  """Tells the training loop when to save and stop because of a signal.

  Single process: SIGTERM (a scheduler's or Cloud TPU's preemption notice)
  and SIGINT (Ctrl-C) set a flag, read at the next step boundary; a second
  SIGINT stops the process at once (exit 130). Several processes (after
  `jax.distributed.initialize`): JAX's preemption service receives the
  SIGTERM on any host, and `reached_preemption_sync_point` becomes true on
  every host at the same step. `reached(step)` must be called at every step,
  on every process.

  Use as a context manager; the previous handlers are restored on exit.
  """

  # Shown in the log line of the save, e.g. 'Preemption notice (SIGTERM)'.
  _REASONS = {
      signal.SIGTERM: 'Preemption notice (SIGTERM)',
      signal.SIGINT: 'Interrupted (Ctrl-C)',
  }

  def __init__(self):
    self._requested = threading.Event()
    self._previous = {}
    self._distributed = jax.distributed.is_initialized()
    self.reason = self._REASONS[signal.SIGTERM]

  def __enter__(self) -> 'PreemptionWatcher':
    # Signal handlers can only be set from the main thread; elsewhere (e.g. a
    # notebook's worker thread) the run simply is not preemption-aware.
    if threading.current_thread() is not threading.main_thread():
      return self
    # Several processes: JAX's preemption service owns SIGTERM, and a Ctrl-C
    # reaches one host only (it could not make the others stop at the same
    # step), so both keep their usual meaning there.
    for signum in ([] if self._distributed else list(self._REASONS)):
      self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _on_signal(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self._requested.is_set():
      os.write(2, b'\nSecond Ctrl-C: stopping now, without saving.\n')
      os._exit(130)  # pylint: disable=protected-access
    self.reason = self._REASONS[signum]
    self._requested.set()
    if signum == signal.SIGINT:
      os.write(
          2,
          b'\nCtrl-C: saving a checkpoint at the next step, then '
          b'stopping (Ctrl-C again stops at once).\n',
      )

  def reached(self, step: int) -> bool:
    """True when the run should save at `step` and stop."""
    if self._distributed:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service is off.
        return False
    return self._requested.is_set()
