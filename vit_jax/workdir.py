"""The workdir is the run's identity: what it holds, and what may continue it.

`train.train_and_evaluate` calls `read` and then `decide` before it does any
work or writes anything. A workdir that holds a run (checkpoints,
`final_params.npz`, `metrics.jsonl`) is continued only by a command that
trains the same thing: every field of `config.json` that changes what is
trained (model, image size, optimizer and its state, objective, data) must
be the same, and the class names of the data too. Fields that change only how
the run is watched or laid out (`config_lib.RUN_WATCH_FIELDS`) and
`total_steps` may differ; the differences are logged and appended to
`config_changes.jsonl`, never written over `config.json`. A finished run
run again does nothing (and writes nothing). `--overwrite` (`overwrite=True`)
is the one way to start from scratch in a workdir that holds a run: it
deletes the files an earlier run wrote there (`clear`), nothing else.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import tensorflow as tf

from vit_jax import config_lib
from vit_jax import fileio
from vit_jax import input_pipeline
from vit_jax import run_checkpoints
from vit_jax.evaluators import imagenet_variants

METRICS_FILE = 'metrics.jsonl'
CONFIG_CHANGES_FILE = 'config_changes.jsonl'
# Everything a run writes into its workdir, deleted by `clear`.
RUN_OUTPUTS = (
    run_checkpoints.CHECKPOINT_DIR,
    run_checkpoints.CORRUPT_DIR,
    run_checkpoints.FINAL_PARAMS_FILE,
    METRICS_FILE,
    config_lib.CONFIG_FILE,
    CONFIG_CHANGES_FILE,
    input_pipeline.CLASS_NAMES_FILE,
)
_SUMMARY_PREFIX = 'events.out.tfevents.'


class WorkdirError(ValueError):
  """The workdir holds a run that this command must not continue."""


@dataclasses.dataclass(frozen=True)
class Contents:
  """What a workdir holds of a run (read without changing anything).

  Attributes:
    path: The workdir.
    config: The run's `config.json` fields, or None.
    steps: Complete checkpoint steps, oldest first.
    final_params: Whether `final_params.npz` exists.
    last_metrics_step: Highest step in `metrics.jsonl`, or None.
    last_eval_step: Highest step with evaluation metrics there, or None.
    class_names: The run's `class_names.json`, or None.
    outputs: Names of the run outputs present (`RUN_OUTPUTS` and summaries).
  """

  path: str
  config: dict[str, Any] | None
  steps: tuple[int, ...]
  final_params: bool
  last_metrics_step: int | None
  last_eval_step: int | None
  class_names: tuple[str, ...] | None
  outputs: tuple[str, ...]

  @property
  def holds_run(self) -> bool:
    """Whether anything a run must not lose is here."""
    return bool(
        self.steps or self.final_params or self.last_metrics_step is not None
    )


def _read_json(path: str) -> Any:
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except (ValueError, tf.errors.OpError, OSError) as e:
    raise WorkdirError(
        f"{path} cannot be read ({e}); a run's files must not "
        'be edited by hand. Use a new --workdir.'
    ) from None


def _metrics_steps(path: str) -> tuple[int | None, int | None]:
  """(highest step, highest step with evaluation metrics) of metrics.jsonl."""
  last = last_eval = None
  with tf.io.gfile.GFile(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        step = int(record['step'])
      except (ValueError, KeyError, TypeError):
        continue  # A line cut short by a kill: the writer drops it.
      last = step if last is None else max(last, step)
      if any(k.startswith('eval/') for k in record):
        last_eval = step if last_eval is None else max(last_eval, step)
  return last, last_eval


def read(workdir: str) -> Contents:
  """Reads what `workdir` holds of a run; an absent workdir holds nothing."""
  names = tf.io.gfile.listdir(workdir) if tf.io.gfile.isdir(workdir) else []
  names = [n.rstrip('/') for n in names]
  join = lambda name: os.path.join(workdir, name)
  steps: tuple[int, ...] = ()
  if run_checkpoints.CHECKPOINT_DIR in names:
    steps = tuple(
        sorted(
            int(n.rstrip('/'))
            for n in tf.io.gfile.listdir(join(run_checkpoints.CHECKPOINT_DIR))
            if n.rstrip('/').isdigit()
        )
    )
  config = (
      _read_json(join(config_lib.CONFIG_FILE))
      if config_lib.CONFIG_FILE in names
      else None
  )
  class_names = None
  if input_pipeline.CLASS_NAMES_FILE in names:
    class_names = tuple(
        _read_json(join(input_pipeline.CLASS_NAMES_FILE)).get('class_names', ())
    )
  metrics, evaluated = (
      _metrics_steps(join(METRICS_FILE))
      if METRICS_FILE in names
      else (None, None)
  )
  outputs = tuple(
      n for n in names if n in RUN_OUTPUTS or n.startswith(_SUMMARY_PREFIX)
  )
  return Contents(
      workdir,
      config,
      steps,
      run_checkpoints.FINAL_PARAMS_FILE in names,
      metrics,
      evaluated,
      class_names,
      outputs,
  )


@dataclasses.dataclass(frozen=True)
class Decision:
  """What a command does with a workdir.

  Attributes:
    resume_step: The newest checkpoint to resume from, or None to start at
      step 0.
    finished: The run is complete: nothing to train, nothing to write.
    changes: Allowed differences {field: (run's value, command's value)}.
  """

  resume_step: int | None
  finished: bool
  changes: dict[str, tuple[Any, Any]]


def _values(differences: Mapping[str, tuple[Any, Any]]) -> str:
  return '; '.join(
      f'{name}: run {old!r}, command {new!r}'
      for name, (old, new) in differences.items()
  )


def _fix(where: str) -> str:
  return (
      f'Use a new --workdir for this command (or --overwrite to delete '
      f'the run in {where} and start over).'
  )


def check_classes(
    contents: Contents, class_names: Sequence[str], *, overwrite: bool
) -> None:
  """Refuses data whose classes differ from those the run was trained on.

  Raises:
    WorkdirError: naming both lists (the first few names) and the counts.
  """
  if (
      overwrite
      or not contents.holds_run
      or contents.class_names is None
      or tuple(contents.class_names) == tuple(class_names)
  ):
    return
  raise WorkdirError(
      f'{contents.path} holds a run on classes '
      f'{list(contents.class_names)[:8]}; the data now has '
      f'{list(class_names)[:8]} ({len(contents.class_names)} vs '
      f'{len(class_names)} classes). {_fix(contents.path)}'
  )


def decide(
    contents: Contents,
    config: Any,
    *,
    total_steps: int,
    checkpoint_every: int,
    overwrite: bool,
) -> Decision:
  """Whether a command may continue the run `contents` describes.

  Reads only the config: call it before the data is opened, then
  `check_classes` once the data's classes are known.

  Args:
    contents: `read(workdir)`.
    config: The command's experiment config.
    total_steps: The command's `total_steps`.
    checkpoint_every: The command's `checkpoint_every`.
    overwrite: The command asks to start from scratch (`--overwrite`).

  Returns:
    The decision.

  Raises:
    WorkdirError: one line naming each field that differs (both values) or
      what the workdir holds, and what to do.
  """
  where = contents.path
  fix = _fix(where)
  if overwrite or not contents.holds_run:
    return Decision(None, False, {})
  if contents.config is None:
    raise WorkdirError(
        f'{where} holds run files ({", ".join(contents.outputs)}) but no '
        f'{config_lib.CONFIG_FILE} saying what they are. {fix}'
    )
  identity, allowed = config_lib.run_differences(contents.config, config)
  if identity:
    raise WorkdirError(
        f'{where} holds a run of another config ({_values(identity)}). '
        f'{fix} To resume the run, repeat its own command.'
    )
  latest = contents.steps[-1] if contents.steps else None
  if latest is None:
    if contents.final_params:
      raise WorkdirError(
          f'{where} holds {run_checkpoints.FINAL_PARAMS_FILE} of a finished '
          f'run but no checkpoint to continue from. {fix}'
      )
    # Killed before a checkpoint completed: at most one save is in flight,
    # so nothing beyond the second checkpoint's step can have been logged.
    # Restarting recomputes exactly the steps metrics.jsonl holds.
    # (holds_run without steps or final params: metrics.jsonl has steps.)
    assert contents.last_metrics_step is not None
    if contents.last_metrics_step > 2 * checkpoint_every:
      raise WorkdirError(
          f'{where}/{METRICS_FILE} records {contents.last_metrics_step} steps '
          f'but no checkpoint is left to resume from. {fix}'
      )
  # Finished: trained, final parameters written, and evaluated at the end
  # (else the same command evaluates again; nothing is retrained).
  if (
      latest is not None
      and latest >= total_steps
      and contents.final_params
      and (contents.last_eval_step or -1) >= latest
  ):
    return Decision(latest, True, allowed)
  return Decision(latest, False, allowed)


def record_changes(
    workdir: str, step: int, changes: Mapping[str, tuple[Any, Any]]
) -> None:
  """Logs allowed differences and appends them to `config_changes.jsonl`."""
  if not changes:
    return
  logging.info(
      'Continuing the run in %s from step %d with changed fields '
      '(how it is watched, or total_steps): %s; recorded in %s.',
      workdir,
      step,
      _values(changes),
      CONFIG_CHANGES_FILE,
  )
  path = os.path.join(workdir, CONFIG_CHANGES_FILE)
  old = ''
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      old = f.read()
  record = {
      'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      'step': step,
      'changes': {k: list(v) for k, v in changes.items()},
  }
  fileio.write_text_atomic(path, old + json.dumps(record) + '\n')


def clear(contents: Contents) -> None:
  """Deletes the run outputs `contents` lists (`--overwrite`), nothing else.

  Process 0 deletes; every process waits until it has.
  """
  if not contents.outputs:
    return
  if jax.process_index() == 0:
    logging.warning(
        '--overwrite: deleting the earlier run in %s (%s).',
        contents.path,
        ', '.join(contents.outputs),
    )
    for name in contents.outputs:
      path = os.path.join(contents.path, name)
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('vit_jax:workdir:clear')


# What an evaluation writes to `metrics.jsonl`: the objective's, the few-shot
# probe's and the ImageNet variants' metrics.
_EVALUATION_PREFIXES = ('eval/', 'fewshot/') + tuple(
    f'{name}/' for name in imagenet_variants.VARIANTS
)


def last_evaluation(workdir: str) -> dict[str, float]:
  """The newest evaluation metrics `metrics.jsonl` holds ({} if none)."""
  path = os.path.join(workdir, METRICS_FILE)
  found: dict[str, Any] = {}
  with tf.io.gfile.GFile(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      evaluated = {
          k: v for k, v in record.items() if k.startswith(_EVALUATION_PREFIXES)
      }
      if evaluated:
        if found and record['step'] != found.get('step'):
          found = {}
        found.update(step=record['step'], **evaluated)
  return found
