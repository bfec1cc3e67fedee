"""Supervised classification: cross-entropy on the labels (the paper's main
objective), with top-1 / top-5 evaluation."""

from collections.abc import Callable
import dataclasses
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import losses
from vit_jax.evaluators import classification as evaluator
from vit_jax.objectives import protocol

NAME = 'classification'
# Folded into a micro-batch's key for mixup, so that the dropout keys (the
# key itself) are those of a run without mixup.
_MIXUP_SALT = 0x6D6978


def mixup(
    rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixup (Zhang et al., 2018) of a batch, as big_vision does it.

  One lambda ~ Beta(alpha, alpha) per batch, taken as max(lambda,
  1 - lambda) so that each example stays the larger part of its mix; every
  example is mixed with its neighbour (the batch rolled by one), images and
  one-hot labels alike, so mixed labels still sum to 1.

  Args:
    rng: Key; the same key gives the same lambda.
    images: [B, ...].
    labels: [B, K].
    alpha: Beta parameter, > 0.

  Returns:
    (mixed images, mixed labels, lambda).
  """
  lam = jax.random.beta(rng, alpha, alpha)
  lam = jnp.maximum(lam, 1.0 - lam)
  mix = lambda x: (
      lam.astype(x.dtype) * x  # pylint: disable=g-long-lambda
      + (1 - lam).astype(x.dtype) * jnp.roll(x, 1, axis=0)
  )
  return mix(images), mix(labels), lam


def loss_fn(
    model: nn.Module,
    *,
    loss: str = 'softmax_xent',
    label_smoothing: float = 0.0,
    mixup_alpha: float = 0.0,
) -> Callable[..., Any]:
  """`(params, batch, rng) -> (mean loss, extras)` for `train_step`.

  Args:
    model: The classifier.
    loss: 'softmax_xent' or 'sigmoid_xent' (`vit_jax.losses`).
    label_smoothing: Label-smoothing factor.
    mixup_alpha: Mixup's Beta parameter; 0 for none. The batch (each
      micro-batch, with accumulation) is mixed with a key derived from
      `rng`, so the mixing is a function of the run seed and the step, and
      a resumed run mixes exactly as an uninterrupted one.

  Returns:
    The loss function; `rng` drives dropout (and mixup). Extras:
    {'mixup_lambda'} with mixup, else {}.
  """

  def fn(params, batch, rng):
    images, labels, extras = batch['image'], batch['labels'], {}
    if mixup_alpha:
      images, labels, lam = mixup(
          jax.random.fold_in(rng, _MIXUP_SALT), images, labels, mixup_alpha
      )
      extras['mixup_lambda'] = lam
    logits = cast(
        jax.Array,
        model.apply(
            {'params': params}, images, train=True, rngs={'dropout': rng}
        ),
    )
    return (
        losses.per_example_loss(
            logits, labels, kind=loss, label_smoothing=label_smoothing
        ).mean(),
        extras,
    )

  return fn


@dataclasses.dataclass(frozen=True)
class Classification:
  """The objective as the training loop uses it (see `vit_jax.objectives`).

  Attributes:
    loss: 'softmax_xent' or 'sigmoid_xent'.
    label_smoothing: Label-smoothing factor of the training loss.
    mixup_alpha: Mixup's Beta parameter (0: none).
  """

  loss: str = 'softmax_xent'
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  name: str = NAME

  def num_classes(self, dataset_classes: int) -> int:
    """The head has one output per class of the dataset."""
    return dataset_classes

  def wrap(self, backbone: nn.Module) -> nn.Module:
    return backbone

  def backbone(self, model: nn.Module) -> nn.Module:
    """The model without the objective's parts (for feature evaluators)."""
    return model

  def init(self, model: nn.Module, rng: jax.Array, images: jax.Array) -> Any:
    return model.init(rng, images, train=False)['params']

  def loss_fn(self, model: nn.Module) -> protocol.LossFn:
    return loss_fn(
        model,
        loss=self.loss,
        label_smoothing=self.label_smoothing,
        mixup_alpha=self.mixup_alpha,
    )

  def make_eval_fn(
      self, model: nn.Module, mesh: jax.sharding.Mesh, param_shardings: Any
  ) -> Callable[..., Any]:
    return evaluator.make_eval_fn(model, mesh, param_shardings, self.loss)

  def evaluate(
      self,
      params: Any,
      eval_fn: Callable[..., Any],
      dataset: Any,
      batch_sharding: Any,
  ) -> dict[str, float]:
    return evaluator.evaluate(params, eval_fn, dataset, batch_sharding)

  def run_meta(self) -> dict[str, Any]:
    return {}
