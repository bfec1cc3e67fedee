"""Supervised classification: cross-entropy on the labels (the paper's main
objective), with top-1 / top-5 evaluation."""

from collections.abc import Callable
import dataclasses
from typing import Any

import flax.linen as nn
import jax

from vit_jax import losses
from vit_jax.evaluators import classification as evaluator

NAME = 'classification'


def loss_fn(model: nn.Module, *, loss: str = 'softmax_xent',
            label_smoothing: float = 0.0) -> Callable[..., Any]:
  """`(params, batch, rng) -> (mean loss, {})` for `train_step`.

  Args:
    model: The classifier.
    loss: 'softmax_xent' or 'sigmoid_xent' (`vit_jax.losses`).
    label_smoothing: Label-smoothing factor.

  Returns:
    The loss function; `rng` drives dropout.
  """
  def fn(params, batch, rng):
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': rng})
    return losses.per_example_loss(
        logits, batch['labels'], kind=loss,
        label_smoothing=label_smoothing).mean(), {}

  return fn


@dataclasses.dataclass(frozen=True)
class Classification:
  """The objective as the training loop uses it (see `vit_jax.objectives`).

  Attributes:
    loss: 'softmax_xent' or 'sigmoid_xent'.
    label_smoothing: Label-smoothing factor of the training loss.
  """
  loss: str = 'softmax_xent'
  label_smoothing: float = 0.0
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

  def loss_fn(self, model: nn.Module) -> Callable[..., Any]:
    return loss_fn(model, loss=self.loss,
                   label_smoothing=self.label_smoothing)

  def make_eval_fn(self, model: nn.Module, mesh: jax.sharding.Mesh,
                   param_shardings: Any) -> Callable[..., Any]:
    return evaluator.make_eval_fn(model, mesh, param_shardings, self.loss)

  def evaluate(self, params: Any, eval_fn: Callable[..., Any], dataset: Any,
               batch_sharding: Any) -> dict[str, float]:
    return evaluator.evaluate(params, eval_fn, dataset, batch_sharding)

  def run_meta(self) -> dict[str, Any]:
    return {}
