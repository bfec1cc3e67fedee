"""Saving and resuming training runs with an orbax `CheckpointManager`.

A step directory `<workdir>/checkpoints/<step>/` holds three items:
  state: the `TrainState` (params, optimizer state, EMA params, step), saved
         asynchronously and restored straight into its shardings;
  data:  the training iterator's state (`{'position': ...}`), JSON;
  meta:  what the run is (model name, classes, image size, layout), JSON,
         checked on resume so that a workdir of another model is reported
         instead of failing deep inside orbax.
orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous steps intact.
"""

from collections.abc import Mapping
import json
import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different run configuration."""


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
    # Compared with what JSON gives back (tuples come back as lists).
    self.meta = json.loads(json.dumps(dict(meta)))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            create=True),
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
    different = {k: (saved.get(k), v) for k, v in self.meta.items()
                 if saved.get(k) != v}
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

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
