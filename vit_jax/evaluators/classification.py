"""Top-1 / top-5 accuracy and loss on a padded, masked evaluation split."""

from collections.abc import Callable, Mapping, Sequence
import functools
import time
from typing import Any, cast

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import losses
from vit_jax import sharding


def eval_step(
    params: Any,
    batch: Mapping[str, jax.Array],
    *,
    model: flax.linen.Module,
    loss: str = 'softmax_xent',
    class_subset: Sequence[int] | None = None,
) -> dict[str, jax.Array]:
  """Masked sums of loss, top-1 / top-5 hits and examples over a batch.

  `batch['labels']` is one-hot, or k-hot for images with several correct
  classes: a prediction is a hit when it is one of them. An image without
  any label (ImageNet-ReaL has some) is not counted.

  Args:
    params: The model's parameters.
    batch: {'image', 'labels' [batch, classes], 'mask' [batch]}.
    model: The classifier.
    loss: Loss of `vit_jax.losses` summed as 'loss'.
    class_subset: Classes of the head to predict among (ImageNet-A / -R: 200
      of the 1000): the other outputs are dropped, from the logits and the
      labels alike, before anything is counted. None: all of them.

  Returns:
    {'loss', 'correct', 'correct_top5', 'count'}: sums over the counted
    images.
  """
  logits = cast(
      jax.Array, model.apply({'params': params}, batch['image'], train=False)
  )
  labels = batch['labels']
  if class_subset is not None:
    subset = np.asarray(class_subset)
    logits, labels = logits[:, subset], labels[:, subset]
  mask = batch['mask'] * (labels.max(-1) > 0)
  per_example = losses.per_example_loss(logits, labels, kind=loss)
  top1 = (
      jnp.take_along_axis(labels, logits.argmax(-1)[:, None], axis=-1)[:, 0] > 0
  )
  k = min(5, logits.shape[-1])
  _, top_k = jax.lax.top_k(logits, k)
  top5 = jnp.take_along_axis(labels, top_k, axis=-1).max(-1) > 0
  return {
      'loss': (per_example * mask).sum(),
      'correct': (top1 * mask).sum(),
      'correct_top5': (top5 * mask).sum(),
      'count': mask.sum(),
  }


def make_eval_fn(
    model: flax.linen.Module,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
    loss: str = 'softmax_xent',
    class_subset: Sequence[int] | None = None,
) -> Callable[[Any, Any], dict[str, jax.Array]]:
  """`eval_step` jitted with the training shardings (replicated sums)."""
  return jax.jit(
      sharding.on_mesh(
          functools.partial(
              eval_step, model=model, loss=loss, class_subset=class_subset
          ),
          mesh,
      ),
      in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
  )


class Progress:
  """Logs `<what>: 12/40 batches (2.1 s)` as batches go by (process 0).

  A line every tenth of the batches (or every `every_s` seconds when the
  total is unknown or a tenth takes longer), never two within `quiet_s`
  seconds, so a short evaluation logs only its final line.
  """

  def __init__(
      self,
      what: str,
      total: int | None,
      *,
      every_s: float = 30.0,
      quiet_s: float = 2.0,
  ):
    self.what = what
    self.total = total if total and total > 0 else None
    self.every_s, self.quiet_s = every_s, quiet_s
    self.done = 0
    self.start = self._last = time.perf_counter()
    self._last_done = 0
    self._log = jax.process_index() == 0

  def step(self, batches: int = 1) -> None:
    """Counts `batches` more (and logs when it is time)."""
    self.done += batches
    if not self._log:
      return
    now = time.perf_counter()
    since = now - self._last
    tenth = self.total and (self.done - self._last_done) * 10 >= self.total
    if since >= self.quiet_s and (tenth or since >= self.every_s):
      of = f'/{self.total}' if self.total else ''
      logging.info(
          '%s: %d%s batches (%.1f s)',
          self.what,
          self.done,
          of,
          now - self.start,
      )
      self._last, self._last_done = now, self.done

  def elapsed(self) -> float:
    """Seconds since the start."""
    return time.perf_counter() - self.start


def sum_over_dataset(
    params: Any,
    eval_fn: Callable[..., Any],
    dataset: Any,
    batch_sharding: Any,
    *,
    num_batches: int | None = None,
    what: str = 'eval',
) -> dict[str, float]:
  """Adds up `eval_fn(params, batch)` (dicts of sums) over a dataset.

  The sums stay on the devices until the end: one host sync per dataset.
  Progress is logged (`Progress`) and, at the end, `<what>: 40 batches,
  4,000 images in 8.3 s` (images: the sums' `count`).

  Args:
    params: Parameters (placed as `eval_fn` expects).
    eval_fn: `(params, batch) -> {name: sum}`, with a `count` of examples.
    dataset: Padded evaluation batches (`input_pipeline.eval_dataset`).
    batch_sharding: Sharding of a batch.
    num_batches: Batches in `dataset` (for the progress lines); default:
      the dataset's cardinality when it is known.
    what: Names the evaluation in the log lines.

  Returns:
    {name: total} of the sums over all batches.
  """
  if num_batches is None and hasattr(dataset, 'cardinality'):
    cardinality = int(dataset.cardinality())  # < 0: unknown or infinite.
    num_batches = cardinality if cardinality > 0 else None
  # Batches are counted as they are dispatched (no extra host sync); the
  # final line comes after the one sync, so its time is the whole
  # evaluation's.
  progress = Progress(what, num_batches)
  totals = None
  for batch in sharding.prefetch_to_device(
      dataset.as_numpy_iterator(), batch_sharding
  ):
    sums = eval_fn(params, batch)
    totals = (
        sums
        if totals is None
        else jax.tree_util.tree_map(jnp.add, totals, sums)
    )
    progress.step()
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  if jax.process_index() == 0:
    logging.info(
        '%s: %d batches, %s images in %.1f s',
        what,
        progress.done,
        f'{int(totals.get("count", 0)):,}',
        progress.elapsed(),
    )
  return totals


def evaluate(
    params: Any,
    eval_fn: Callable[..., Any],
    dataset: Any,
    batch_sharding: Any,
    *,
    num_batches: int | None = None,
) -> dict[str, float]:
  """Loss, top-1 and top-5 accuracy over a padded eval dataset.

  Keys: `eval/loss`, `eval/accuracy` (top-1), `eval/top5`, `eval/examples`.
  Progress is logged as `eval: 12/40 batches (2.1 s)`, then `eval: 40
  batches, 4,000 images in 8.3 s` (`sum_over_dataset`).
  """
  totals = sum_over_dataset(
      params, eval_fn, dataset, batch_sharding, num_batches=num_batches
  )
  count = max(totals['count'], 1.0)
  return {
      'eval/loss': float(totals['loss']) / count,
      'eval/accuracy': float(totals['correct']) / count,
      'eval/top5': float(totals['correct_top5']) / count,
      'eval/examples': float(totals['count']),
  }
