"""Training objectives: what the training loop needs from each.

An objective says how many classes the backbone's head has
(`num_classes`), which module is trained around the backbone (`wrap`), how
its parameters are initialised (`init`), the loss and its extra metrics
(`loss_fn(model) -> (params, batch, rng) -> (loss, {name: scalar})`), the
evaluation (`make_eval_fn`, `evaluate`) and what it adds to the run's
description (`run_meta`). `train.py` picks one by `config.objective`, once.

  classification  supervised cross-entropy (`config.loss`,
                  `config.label_smoothing`); top-1 / top-5 evaluation.
  mpp             masked patch prediction (paper §4.6; `config.mpp`).
"""

from typing import Any

from vit_jax import config_lib
from vit_jax.objectives import classification
from vit_jax.objectives import mpp

NAMES = (classification.NAME, mpp.NAME)


def from_config(config: Any) -> classification.Classification | (
    mpp.MaskedPatchPrediction):
  """The objective named by `config.objective`, with its typed settings.

  Raises:
    ValueError: an unknown objective, loss or `config.mpp` field, naming
      the field.
  """
  name = config_lib.get(config, 'objective')
  if name == classification.NAME:
    from vit_jax import losses  # pylint: disable=g-import-not-at-top
    loss = config_lib.get(config, 'loss')
    if loss not in losses.LOSSES:
      raise ValueError(f'config.loss={loss!r}; use one of {losses.LOSSES}.')
    return classification.Classification(
        loss=loss,
        label_smoothing=float(config_lib.get(config, 'label_smoothing')))
  if name == mpp.NAME:
    return mpp.MaskedPatchPrediction(mpp.MppConfig.from_config(config))
  raise ValueError(f'config.objective={name!r}; use one of {NAMES}.')
