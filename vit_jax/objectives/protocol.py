"""`Objective`: what the training loop needs from an objective.

`vit_jax.train` reads an objective through these methods only, so a new
objective is a class with these methods (no base class to inherit from),
registered in `vit_jax.objectives.get`.
"""

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax

# `(params, batch, rng) -> (mean loss, {name: scalar})`: differentiated by
# `train.train_step` (with respect to `params`), the extras logged as
# `train/<name>`.
LossFn = Callable[
    [Any, Mapping[str, jax.Array], jax.Array],
    tuple[jax.Array, dict[str, jax.Array]],
]


@runtime_checkable
class Objective(Protocol):
  """The interface of an objective, as `vit_jax.train` uses it.

  `vit_jax.objectives.classification.Classification` and
  `vit_jax.objectives.mpp.MaskedPatchPrediction` implement it.
  """

  def num_classes(self, dataset_classes: int) -> int | None:
    """Outputs of the backbone's classification head.

    Args:
      dataset_classes: Classes of the dataset.

    Returns:
      The head's width, or None for a backbone without a head.
    """

  def wrap(self, backbone: nn.Module) -> nn.Module:
    """The module trained: the backbone with the objective's parts."""

  def backbone(self, model: nn.Module) -> nn.Module:
    """The backbone inside `wrap`'s module (for feature evaluators)."""

  def init(self, model: nn.Module, rng: jax.Array, images: jax.Array) -> Any:
    """Initial parameters of `model` (`wrap`'s module).

    Args:
      model: The module trained.
      rng: Initialisation key.
      images: `[batch, height, width, 3]` zeros of the run's image size.

    Returns:
      The parameters (a pytree), the objective's own included.
    """

  def loss_fn(self, model: nn.Module) -> LossFn:
    """The training loss of `model`, for `train.train_step`."""

  def make_eval_fn(
      self, model: nn.Module, mesh: jax.sharding.Mesh, param_shardings: Any
  ) -> Callable[..., Any]:
    """The jitted evaluation step `evaluate` runs on each eval batch.

    Args:
      model: The module trained.
      mesh: Device mesh.
      param_shardings: Shardings of the parameters.
    """

  def evaluate(
      self,
      params: Any,
      eval_fn: Callable[..., Any],
      dataset: Any,
      batch_sharding: Any,
  ) -> dict[str, float]:
    """Metrics (`eval/<name>`) of `params` over an evaluation split.

    Args:
      params: Parameters to evaluate.
      eval_fn: `make_eval_fn`'s step.
      dataset: The evaluation split (`input_pipeline.eval_dataset`).
      batch_sharding: Sharding of a global batch.
    """

  def run_meta(self) -> dict[str, Any]:
    """What the objective adds to the run's description (checkpoints)."""
