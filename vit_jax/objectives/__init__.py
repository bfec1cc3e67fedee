"""Training objectives: what the training loop needs from each.

An objective says how many classes the backbone's head has
(`num_classes`), which module is trained around the backbone (`wrap`), how
its parameters are initialised (`init`), the loss and its extra metrics
(`loss_fn(model) -> (params, batch, rng) -> (loss, {name: scalar})`), the
evaluation (`make_eval_fn`, `evaluate`) and what it adds to the run's
description (`run_meta`): the `typing.Protocol` `protocol.Objective`.
`train.py` picks one by `config.objective`, once (`get`).

  classification  supervised cross-entropy (`config.loss`,
                  `config.label_smoothing`, `config.mixup_alpha`); top-1 /
                  top-5 evaluation.
  mpp             masked patch prediction (paper §4.6; `config.mpp`).
"""

import dataclasses

from vit_jax import losses
from vit_jax.objectives import classification
from vit_jax.objectives import mpp
from vit_jax.objectives import protocol

NAMES = (classification.NAME, mpp.NAME)


@dataclasses.dataclass(frozen=True)
class ObjectiveSection:
  """What the model learns (`get`).

  Attributes:
    objective: 'classification' or 'mpp'.
    loss: Classification loss, 'softmax_xent' or 'sigmoid_xent'.
    label_smoothing: Label-smoothing factor of the classification loss.
    mixup_alpha: Mixup's Beta(alpha, alpha) parameter; 0 for none.
    mpp: Masked patch prediction settings
      (`vit_jax.objectives.mpp.MppConfig`).
  """

  objective: str
  loss: str
  label_smoothing: float
  mixup_alpha: float
  # Read from the `mpp.*` fields by the objective's own type. (A string:
  # in the class body the name `mpp` is this field once it is assigned.)
  mpp: 'mpp.MppConfig' = dataclasses.field(
      metadata={'parse': mpp.MppConfig.from_dict}
  )

  def __post_init__(self):
    if self.objective not in NAMES:
      raise ValueError(
          f'config.objective={self.objective!r}; use one of ' f'{NAMES}.'
      )
    if self.loss not in losses.LOSSES:
      raise ValueError(
          f'config.loss={self.loss!r}; use one of ' f'{losses.LOSSES}.'
      )
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(
          f'config.label_smoothing={self.label_smoothing} must ' 'be in [0, 1).'
      )
    if self.mixup_alpha < 0:
      raise ValueError(
          f'config.mixup_alpha={self.mixup_alpha} must be >= 0 '
          '(0 turns mixup off).'
      )
    if self.mixup_alpha and self.objective != 'classification':
      raise ValueError(
          f'config.mixup_alpha={self.mixup_alpha} mixes class labels: it '
          f"needs objective='classification', not {self.objective!r}."
      )


def get(section: ObjectiveSection) -> protocol.Objective:
  """The objective `section.objective` names, with its settings.

  Args:
    section: The run's objective section (`config_lib.parse(config)
      .objective`), already checked.

  Returns:
    The objective.
  """
  if section.objective == mpp.NAME:
    return mpp.MaskedPatchPrediction(section.mpp)
  return classification.Classification(
      loss=section.loss,
      label_smoothing=float(section.label_smoothing),
      mixup_alpha=float(section.mixup_alpha),
  )
