"""Optimizers and learning-rate schedules from config (optax).

Config fields: `optimizer` ('adam' | 'sgd'), `base_lr`, `total_steps`,
`warmup_steps`, `decay_type` ('linear' | 'cosine' | 'constant'),
`weight_decay` (of kernels only), `grad_clip_norm` (None or 0 disables),
`beta1`, `beta2`, `momentum`.

Recipes (paper §4.1, Appendix B.1): pre-training uses Adam (β1 0.9, β2 0.999)
with high decoupled weight decay; fine-tuning uses SGD with momentum 0.9, no
weight decay, gradient clipping at global norm 1, cosine decay.
"""

from typing import Any

import jax
import optax

from vit_jax import config_lib

OPTIMIZERS = ('adam', 'sgd')
DECAY_TYPES = ('linear', 'cosine', 'constant')


def make_schedule(config: Any) -> optax.Schedule:
  """Linear warm-up from 0 to `base_lr`, then `decay_type` decay to 0.

  Args:
    config: Provides `base_lr`, `total_steps`, `warmup_steps`, `decay_type`.

  Returns:
    An optax schedule: step -> learning rate.

  Raises:
    ValueError: non-positive learning rate or steps, warm-up longer than the
      run, or an unknown decay type.
  """
  base_lr = float(config.base_lr)
  total = int(config.total_steps)
  warmup = int(config_lib.get(config, 'warmup_steps'))
  decay = config_lib.get(config, 'decay_type')
  if base_lr <= 0:
    raise ValueError(f'config.base_lr={base_lr} must be positive.')
  if total <= 0:
    raise ValueError(f'config.total_steps={total} must be positive.')
  if not 0 <= warmup < total:
    raise ValueError(f'config.warmup_steps={warmup} must be in [0, '
                     f'total_steps={total}).')
  if decay not in DECAY_TYPES:
    raise ValueError(f'config.decay_type={decay!r}; use one of '
                     f'{DECAY_TYPES}.')
  if decay == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base_lr, warmup_steps=warmup,
        decay_steps=total, end_value=0.0)
  after = (optax.linear_schedule(base_lr, 0.0, total - warmup)
           if decay == 'linear' else optax.constant_schedule(base_lr))
  if not warmup:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base_lr, warmup), after], [warmup])


def _decay_mask(params):
  # Decay weight matrices (every `kernel`: dense, attention, convolutions,
  # head), not biases, norms or embeddings. By name, not by rank: scanned
  # layouts stack norms into matrices and attention biases are 2-D.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(config: Any) -> tuple[optax.GradientTransformation,
                                         optax.Schedule]:
  """Returns (optax transformation, schedule) for the config.

  Args:
    config: Experiment config (see the module docstring).

  Returns:
    The transformation (clipping, then Adam with decoupled weight decay or
    SGD with momentum) and its learning-rate schedule.
  """
  schedule = make_schedule(config)
  name = config_lib.get(config, 'optimizer')
  weight_decay = float(config_lib.get(config, 'weight_decay'))
  if weight_decay < 0:
    raise ValueError(f'config.weight_decay={weight_decay} must be >= 0.')
  if name == 'adam':
    tx = optax.adamw(
        schedule, b1=float(config_lib.get(config, 'beta1')),
        b2=float(config_lib.get(config, 'beta2')),
        weight_decay=weight_decay, mask=_decay_mask)
  elif name == 'sgd':
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_decay_mask)
        if weight_decay else optax.identity(),
        optax.sgd(schedule,
                  momentum=float(config_lib.get(config, 'momentum'))))
  else:
    raise ValueError(f'config.optimizer={name!r}; use one of {OPTIMIZERS}.')
  clip = config_lib.get(config, 'grad_clip_norm')
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
  return tx, schedule
