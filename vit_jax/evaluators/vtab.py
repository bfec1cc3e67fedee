"""VTAB-1k results: each task's accuracy and the means of the three groups.

The 19 tasks are fine-tuned one run each (`configs/vtab.py`, a workdir per
task); `summarize(root)` reads every run under `root` (its `config.json`
says which task it is, its `metrics.jsonl` the accuracy of its final
evaluation) and `format_summary` lays out the table: the tasks group by
group, each group's mean and the mean of all 19, the benchmark's score.

A mean covers a group only when every task of it has a finished run; a task
without one is marked `missing` (no run) or `unfinished` (a run that has
not finished training and its final evaluation; its latest accuracy is
shown, not averaged), and the means it belongs to are left out.
"""

import dataclasses
import os
from typing import Any

import tensorflow as tf

from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax import workdir as workdir_lib
from vit_jax.datasets import vtab

ACCURACY_KEY = 'eval/accuracy'  # The top-1 accuracy in metrics.jsonl.
DONE, UNFINISHED, MISSING = 'done', 'unfinished', 'missing'


@dataclasses.dataclass(frozen=True)
class TaskResult:
  """One task's run.

  Attributes:
    task: The task (`datasets.vtab.Task`).
    status: DONE, UNFINISHED or MISSING.
    accuracy: Top-1 accuracy (0..1) of the run's latest evaluation, or None.
    step: The step of that evaluation, or None.
    workdir: The run's directory, or None.
  """

  task: vtab.Task
  status: str
  accuracy: float | None = None
  step: int | None = None
  workdir: str | None = None


@dataclasses.dataclass(frozen=True)
class Summary:
  """The results of the 19 tasks, in the benchmark's order.

  Attributes:
    results: One per task.
    split: The split the accuracies are of (`test`, or `val200` for runs
      that chose hyper-parameters with `eval_split='holdout'`).
  """

  results: tuple[TaskResult, ...]
  split: str

  def mean(self, group: str | None = None) -> float | None:
    """Mean accuracy of `group`'s tasks (None: all 19); None unless all done."""
    results = [r for r in self.results if group in (None, r.task.group)]
    accuracies = [r.accuracy for r in results if r.status == DONE]
    if len(accuracies) < len(results):
      return None
    return sum(a for a in accuracies if a is not None) / len(accuracies)

  @property
  def not_done(self) -> tuple[str, ...]:
    """The tasks without a finished run."""
    return tuple(r.task.name for r in self.results if r.status != DONE)


def _finished(contents: workdir_lib.Contents, total_steps: int) -> bool:
  # As a rerun of the command sees it: trained to the end, final parameters
  # written and evaluated after the last checkpoint.
  last_eval = contents.last_eval_step
  return (
      contents.final_params
      and last_eval is not None
      and last_eval >= total_steps
      and last_eval >= max(contents.steps, default=0)
  )


def _runs(root: str) -> list[workdir_lib.Contents]:
  """What the VTAB runs in `root`'s sub-folders hold."""
  if not root or not tf.io.gfile.isdir(root):
    raise FileNotFoundError(
        f'{root!r} is not a directory: give the folder that holds one '
        'workdir per VTAB task (--workdirs).'
    )
  runs = []
  for name in sorted(n.rstrip('/') for n in tf.io.gfile.listdir(root)):
    path = os.path.join(root, name)
    if not tf.io.gfile.exists(os.path.join(path, config_lib.CONFIG_FILE)):
      continue
    contents = workdir_lib.read(path)
    assert contents.config is not None  # config.json exists.
    if vtab.is_task(str(contents.config['dataset'])):
      runs.append(contents)
  return runs


def summarize(root: str) -> Summary:
  """Reads the VTAB runs in `root` (one workdir per task, any names).

  Args:
    root: A folder whose sub-folders are workdirs of `configs/vtab.py` runs
      (local or gs://).

  Returns:
    The summary; tasks without a run are MISSING.

  Raises:
    ValueError: two runs of one task, or runs evaluated on different splits
      (test and val200 mixed), named in one line.
  """
  by_task: dict[str, str] = {}
  splits: dict[str, str] = {}
  results: dict[str, TaskResult] = {}
  for contents in _runs(root):
    path, fields = contents.path, contents.config
    assert fields is not None  # _runs keeps runs with a config.
    task = vtab.get_task(fields['dataset'])
    if task.name in by_task:
      raise ValueError(
          f'Two runs of the VTAB task {task.name}: {by_task[task.name]} and '
          f'{path}; keep one of them under {root}.'
      )
    by_task[task.name] = path
    _, split = input_pipeline.resolve_splits(
        fields['dataset'], fields['train_split'], fields['eval_split']
    )
    splits[path] = split
    evaluated = contents.last_eval_step is not None
    accuracy = (
        workdir_lib.last_evaluation(path).get(ACCURACY_KEY)
        if evaluated
        else None
    )
    done = accuracy is not None and _finished(contents, fields['total_steps'])
    results[task.name] = TaskResult(
        task,
        DONE if done else UNFINISHED,
        accuracy,
        contents.last_eval_step,
        path,
    )
  if len(set(splits.values())) > 1:
    listed = ', '.join(f'{p}: {s}' for p, s in sorted(splits.items()))
    raise ValueError(
        f'The runs under {root} were evaluated on different splits '
        f'({listed}); summarize the test runs and the val200 runs apart.'
    )
  split = next(iter(splits.values()), vtab.TEST_SPLIT)
  return Summary(
      tuple(
          results.get(t.name, TaskResult(t, MISSING))
          for t in vtab.TASKS.values()
      ),
      split,
  )


def _percent(value: float | None) -> str:
  return '-' if value is None else f'{100 * value:.1f}'


def format_summary(summary: Summary) -> str:
  """The summary as a text table (accuracies in percent).

  One line per task (its group, accuracy and status), then one per group
  mean and the mean of all 19; a mean that lacks a task reads `-`, and the
  last line names the tasks without a finished run.
  """
  lines = [
      f'VTAB-1k top-1 accuracy (%) on {summary.split}',
      f'{"group":<12} {"task":<22} {"accuracy":>8}  status',
  ]
  for r in summary.results:
    status = '' if r.status == DONE else r.status
    if r.status == UNFINISHED and r.step is not None:
      status += f' (step {r.step})'
    lines.append(
        f'{r.task.group:<12} {r.task.name:<22} {_percent(r.accuracy):>8}  '
        f'{status}'.rstrip()
    )
  lines.append('')
  for group in vtab.GROUPS:
    count = len(vtab.tasks_of(group))
    lines.append(
        f'{"mean":<12} {f"{group} ({count})":<22} '
        f'{_percent(summary.mean(group)):>8}'
    )
  lines.append(
      f'{"mean":<12} {f"all ({len(summary.results)})":<22} '
      f'{_percent(summary.mean()):>8}'
  )
  if summary.not_done:
    lines.append(
        f'Without a finished run ({len(summary.not_done)}): '
        f'{", ".join(summary.not_done)}; their means are left out.'
    )
  return '\n'.join(lines)


def to_json(summary: Summary) -> dict[str, Any]:
  """The summary as JSON-ready values (accuracies as fractions)."""
  return {
      'split': summary.split,
      'tasks': {
          r.task.name: {
              'group': r.task.group,
              'status': r.status,
              'accuracy': r.accuracy,
              'step': r.step,
              'workdir': r.workdir,
          }
          for r in summary.results
      },
      'means': {
          **{group: summary.mean(group) for group in vtab.GROUPS},
          'all': summary.mean(),
      },
  }
