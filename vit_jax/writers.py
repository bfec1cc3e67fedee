"""Metric writers of a run: `metrics.jsonl`, a notebook progress bar, and
the console's progress lines.

The first two are clu `MetricWriter`s, so `train_and_evaluate` hands them the
same scalars as the console and TensorBoard writers, at the same moments
(every `log_every` steps, at evaluations and from clu's progress report).
`ProgressLog` writes the lines a person watching a run reads: speed and the
time left.
"""

import json
import time
from typing import Any

from absl import logging
from clu import metric_writers
import tensorflow as tf

from vit_jax import fileio


class ScalarWriter(metric_writers.MetricWriter):
  """A writer that only records scalars; every other kind is ignored."""

  def write_scalars(self, step, scalars):
    raise NotImplementedError

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def _step_of(line: str, default: int) -> int:
  try:
    return int(json.loads(line).get('step', 0))
  except (ValueError, AttributeError):
    return default


class JsonlWriter(ScalarWriter):
  """Appends one JSON object per `write_scalars` to `metrics.jsonl`.

  Each line is `{"step": s, "<name>": value, ...}`. On resume from step k,
  lines of steps after k (written by the interrupted run after its last
  checkpoint) are dropped first, so the file reads as one uninterrupted run.
  Local files are appended to; remote ones (gs://, which cannot be appended
  to) are rewritten whole, atomically, at each write. A line cut short by a
  kill during the write is dropped on resume.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    self._remote = '://' in path
    self._lines = []
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        self._lines = [l for l in f.read().splitlines() if l.strip()]
      if resume_step is not None:
        self._lines = [
            l
            for l in self._lines
            if _step_of(l, default=resume_step + 1) <= resume_step
        ]
    self._rewrite()
    self._file = None if self._remote else open(path, 'a')

  def _rewrite(self):
    fileio.write_text_atomic(self.path, ''.join(l + '\n' for l in self._lines))

  def write_scalars(self, step, scalars):
    record = {'step': int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    line = json.dumps(record)
    if self._remote:
      self._lines.append(line)
      self._rewrite()
    else:
      assert self._file is not None  # Opened in __init__ when local.
      self._file.write(line + '\n')
      self._file.flush()

  def flush(self):
    if self._file:
      self._file.flush()

  def close(self):
    if self._file:
      self._file.close()


class ProgressBar(ScalarWriter):
  """A tqdm progress bar over the training steps (terminal or notebook).

  Pass it to `train.train_and_evaluate(..., extra_writers=[bar])`. The bar
  moves whenever the run writes metrics (set `config.log_every` for finer
  steps) and shows the latest training loss and evaluation accuracy. Nothing
  runs per step, so the training loop is not slowed down.

  Args:
    total_steps: The run's `config.total_steps`.
    keys: Metric names shown next to the bar, when written.
  """

  def __init__(
      self,
      total_steps: int,
      keys: tuple[str, ...] = ('train/loss', 'eval/accuracy'),
  ):
    from tqdm import auto  # pylint: disable=g-import-not-at-top

    self._bar = auto.tqdm(
        total=int(total_steps), unit='step', dynamic_ncols=True
    )
    self._keys = keys
    self._shown: dict[str, Any] = {}

  def write_scalars(self, step, scalars):
    # A resumed run starts at its checkpoint's step, not at 0.
    self._bar.update(max(int(step) - self._bar.n, 0))
    self._shown.update(
        {
            k.split('/')[-1]
            if k.startswith('train/')
            else k: f'{float(scalars[k]):.4g}'
            for k in self._keys
            if k in scalars
        }
    )
    if self._shown:
      self._bar.set_postfix(self._shown, refresh=False)
    self._bar.refresh()

  def close(self):
    self._bar.close()


def format_duration(seconds: float) -> str:
  """'42s', '3m07s', '2h05m' (a person's reading of a duration)."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


class ProgressLog:
  """Logs training speed and the time left, at most every `every_secs`.

  `update(step)` is called where the loop has fetched the step's metrics
  from the devices (the steps before it are then complete), so the speed is
  of finished steps, not of asynchronous dispatch.

  Args:
    start_step: The step the run starts (or resumes) from.
    total_steps: The run's last step.
    batch: Global batch size (images per step).
    every_secs: Seconds between lines.
    clock: Time source (tests pass a fake one).
  """

  def __init__(
      self,
      start_step: int,
      total_steps: int,
      batch: int,
      *,
      every_secs: float = 30.0,
      clock=time.monotonic,
  ):
    self._total = total_steps
    self._batch = batch
    self._every = every_secs
    self._clock = clock
    self._last_step = start_step
    self._last_time = clock()
    self._first_done = False

  def first_step(self, step: int, seconds: float) -> None:
    """Logs the first step's time (compilation included); restarts the
    speed measurement after it."""
    logging.info(
        'Step %d took %.1f s (compiling the train step included).',
        step,
        seconds,
    )
    self._first_done = True
    self._last_step, self._last_time = step, self._clock()

  def update(self, step: int) -> str | None:
    """Logs (and returns) a progress line if one is due."""
    now = self._clock()
    elapsed = now - self._last_time
    steps = step - self._last_step
    if steps <= 0 or (elapsed < self._every and step < self._total):
      return None
    per_step = elapsed / steps
    line = (
        f'step {step}/{self._total} ({100 * step / self._total:.0f}%): '
        f'{self._batch / per_step:,.1f} images/s, {per_step:.3f} s/step, '
        f'ETA {format_duration(per_step * (self._total - step))}'
    )
    logging.info('%s', line)
    self._last_step, self._last_time = step, now
    return line
