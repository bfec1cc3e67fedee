"""Top-1 / top-5 accuracy and loss on a padded, masked evaluation split."""

from collections.abc import Callable, Mapping
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp

from vit_jax import input_pipeline
from vit_jax import losses
from vit_jax import sharding


def eval_step(params: Any, batch: Mapping[str, jax.Array], *,
              model: flax.linen.Module,
              loss: str = 'softmax_xent') -> dict[str, jax.Array]:
  """Masked sums of loss, top-1 / top-5 hits and examples over a batch."""
  logits = model.apply({'params': params}, batch['image'], train=False)
  mask = batch['mask']
  per_example = losses.per_example_loss(logits, batch['labels'], kind=loss)
  # A prediction is a hit when it is (one of) the labels.
  top1 = jnp.take_along_axis(batch['labels'], logits.argmax(-1)[:, None],
                             axis=-1)[:, 0] > 0
  k = min(5, logits.shape[-1])
  _, top_k = jax.lax.top_k(logits, k)
  top5 = jnp.take_along_axis(batch['labels'], top_k, axis=-1).max(-1) > 0
  return {'loss': (per_example * mask).sum(), 'correct': (top1 * mask).sum(),
          'correct_top5': (top5 * mask).sum(), 'count': mask.sum()}


def make_eval_fn(model: flax.linen.Module, mesh: jax.sharding.Mesh,
                 param_shardings: Any, loss: str = 'softmax_xent'
                 ) -> Callable[[Any, Any], dict[str, jax.Array]]:
  """`eval_step` jitted with the training shardings (replicated sums)."""
  return jax.jit(functools.partial(eval_step, model=model, loss=loss),
                 in_shardings=(param_shardings,
                               sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def sum_over_dataset(params: Any, eval_fn: Callable[..., Any], dataset: Any,
                     batch_sharding: Any) -> dict[str, float]:
  """Adds up `eval_fn(params, batch)` (dicts of sums) over a dataset.

  The sums stay on the devices until the end: one host sync per dataset.
  """
  totals = None
  for batch in input_pipeline.prefetch_to_device(
      dataset.as_numpy_iterator(), batch_sharding):
    sums = eval_fn(params, batch)
    totals = sums if totals is None else jax.tree_util.tree_map(
        jnp.add, totals, sums)
  return {k: float(v) for k, v in jax.device_get(totals).items()}


def evaluate(params: Any, eval_fn: Callable[..., Any], dataset: Any,
             batch_sharding: Any) -> dict[str, float]:
  """Loss, top-1 and top-5 accuracy over a padded eval dataset.

  Keys: `eval/loss`, `eval/accuracy` (top-1), `eval/top5`, `eval/examples`.
  """
  totals = sum_over_dataset(params, eval_fn, dataset, batch_sharding)
  count = max(totals['count'], 1.0)
  return {'eval/loss': float(totals['loss']) / count,
          'eval/accuracy': float(totals['correct']) / count,
          'eval/top5': float(totals['correct_top5']) / count,
          'eval/examples': float(totals['count'])}
