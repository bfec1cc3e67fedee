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

from vit_jax import config_lib
from vit_jax.objectives import classification
from vit_jax.objectives import mpp

NAMES = (classification.NAME, mpp.NAME)


def get(section: config_lib.ObjectiveSection
        ) -> classification.Classification | mpp.MaskedPatchPrediction:
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
      loss=section.loss, label_smoothing=float(section.label_smoothing),
      mixup_alpha=float(section.mixup_alpha))
