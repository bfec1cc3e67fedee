"""Optimizers and learning-rate schedules of the optimizer section (optax).

Fields of `OptimSection` (checked when the config is parsed):
`optimizer` ('adam' | 'sgd'), `base_lr`, `total_steps`,
`warmup_steps`, `decay_type` ('linear' | 'cosine' | 'constant'),
`weight_decay` (of kernels only), `grad_clip_norm` (None or 0 disables),
`beta1`, `beta2`, `momentum`, `mu_dtype` (dtype of Adam's first moment or
SGD's momentum: 'bfloat16' halves that state).

Recipes (paper §4.1, Appendix B.1): pre-training uses Adam (β1 0.9, β2 0.999)
with high decoupled weight decay; fine-tuning uses SGD with momentum 0.9, no
weight decay, gradient clipping at global norm 1, cosine decay.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from vit_jax import config_errors

OPTIMIZERS = ('adam', 'sgd')
DECAY_TYPES = ('linear', 'cosine', 'constant')
MU_DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class OptimSection:
  """The optimizer and its learning-rate schedule (checked when parsed)."""

  optimizer: str
  base_lr: float
  total_steps: int
  warmup_steps: int
  decay_type: str
  weight_decay: float
  momentum: float
  beta1: float
  beta2: float
  grad_clip_norm: float
  mu_dtype: str | None

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(
          f'config.optimizer={self.optimizer!r}; use one of ' f'{OPTIMIZERS}.'
      )
    config_errors.check_positive(
        base_lr=self.base_lr, total_steps=self.total_steps
    )
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ValueError(
          f'config.warmup_steps={self.warmup_steps} must be in '
          f'[0, total_steps={self.total_steps}).'
      )
    if self.decay_type not in DECAY_TYPES:
      raise ValueError(
          f'config.decay_type={self.decay_type!r}; use one of '
          f'{DECAY_TYPES}.'
      )
    if self.weight_decay < 0:
      raise ValueError(
          f'config.weight_decay={self.weight_decay} must be ' '>= 0.'
      )
    if self.mu_dtype is not None and self.mu_dtype not in MU_DTYPES:
      raise ValueError(
          f'config.mu_dtype={self.mu_dtype!r}; use one of '
          f"{MU_DTYPES} or None (the parameters' dtype)."
      )
    if self.grad_clip_norm is not None and self.grad_clip_norm < 0:
      raise ValueError(
          f'config.grad_clip_norm={self.grad_clip_norm} must be '
          '>= 0 (0 disables clipping).'
      )


def make_schedule(section: OptimSection) -> optax.Schedule:
  """Linear warm-up from 0 to `base_lr`, then `decay_type` decay to 0.

  Args:
    section: The run's optimizer section (`config_lib.parse(config).optim`;
      its values were checked there): `base_lr`, `total_steps`,
      `warmup_steps`, `decay_type`.

  Returns:
    An optax schedule: step -> learning rate.
  """
  base_lr = float(section.base_lr)
  total = int(section.total_steps)
  warmup = int(section.warmup_steps)
  if section.decay_type == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=base_lr,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=0.0,
    )
  after = (
      optax.linear_schedule(base_lr, 0.0, total - warmup)
      if section.decay_type == 'linear'
      else optax.constant_schedule(base_lr)
  )
  if not warmup:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base_lr, warmup), after], [warmup]
  )


def _decay_mask(params):
  # Decay weight matrices (every `kernel`: dense, attention, convolutions,
  # head), not biases, norms or embeddings. By name, not by rank: scanned
  # layouts stack norms into matrices and attention biases are 2-D.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params
  )


def base_transform(
    section: OptimSection,
    schedule: optax.Schedule,
    weight_decay: float,
) -> optax.GradientTransformation:
  """The update rule of `section.optimizer` at `schedule`, without clipping.

  Args:
    section: The run's optimizer section (its rule, betas, momentum,
      mu_dtype).
    schedule: The learning-rate schedule.
    weight_decay: Decoupled weight decay of kernels (a parameter group may
      set its own).

  Returns:
    Adam with decoupled weight decay, or SGD with momentum after weight
    decay.
  """
  mu_dtype = jnp.dtype(section.mu_dtype) if section.mu_dtype else None
  if section.optimizer == 'adam':
    return optax.adamw(
        schedule,
        b1=float(section.beta1),
        b2=float(section.beta2),
        weight_decay=weight_decay,
        mask=_decay_mask,
        mu_dtype=mu_dtype,
    )
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_decay_mask)
      if weight_decay
      else optax.identity(),
      optax.sgd(
          schedule,
          momentum=float(section.momentum),
          accumulator_dtype=mu_dtype,
      ),
  )


def make_optimizer(
    section: OptimSection,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optax transformation, schedule) of the optimizer section.

  Args:
    section: The run's optimizer section (`config_lib.parse(config).optim`).

  Returns:
    The transformation (clipping, then `base_transform`) and its
    learning-rate schedule.
  """
  schedule = make_schedule(section)
  tx = base_transform(section, schedule, float(section.weight_decay))
  if section.grad_clip_norm:
    tx = optax.chain(
        optax.clip_by_global_norm(float(section.grad_clip_norm)), tx
    )
  return tx, schedule
