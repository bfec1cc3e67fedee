"""Optimizers and learning-rate schedules of the optimizer section (optax).

Fields of `config_lib.OptimSection` (checked when the config is parsed):
`optimizer` ('adam' | 'sgd'), `base_lr`, `total_steps`,
`warmup_steps`, `decay_type` ('linear' | 'cosine' | 'constant'),
`weight_decay` (of kernels only), `grad_clip_norm` (None or 0 disables),
`beta1`, `beta2`, `momentum`, `mu_dtype` (dtype of Adam's first moment or
SGD's momentum: 'bfloat16' halves that state).

Recipes (paper §4.1, Appendix B.1): pre-training uses Adam (β1 0.9, β2 0.999)
with high decoupled weight decay; fine-tuning uses SGD with momentum 0.9, no
weight decay, gradient clipping at global norm 1, cosine decay.
"""

import jax
import jax.numpy as jnp
import optax

from vit_jax import config_lib

OPTIMIZERS = ('adam', 'sgd')
DECAY_TYPES = ('linear', 'cosine', 'constant')
MU_DTYPES = ('float32', 'bfloat16', 'float16')


def make_schedule(section: config_lib.OptimSection) -> optax.Schedule:
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
        init_value=0.0, peak_value=base_lr, warmup_steps=warmup,
        decay_steps=total, end_value=0.0)
  after = (optax.linear_schedule(base_lr, 0.0, total - warmup)
           if section.decay_type == 'linear'
           else optax.constant_schedule(base_lr))
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


def make_optimizer(section: config_lib.OptimSection
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optax transformation, schedule) of the optimizer section.

  Args:
    section: The run's optimizer section (`config_lib.parse(config).optim`).

  Returns:
    The transformation (clipping, then Adam with decoupled weight decay or
    SGD with momentum) and its learning-rate schedule.
  """
  schedule = make_schedule(section)
  weight_decay = float(section.weight_decay)
  mu_dtype = jnp.dtype(section.mu_dtype) if section.mu_dtype else None
  if section.optimizer == 'adam':
    tx = optax.adamw(schedule, b1=float(section.beta1),
                     b2=float(section.beta2), weight_decay=weight_decay,
                     mask=_decay_mask, mu_dtype=mu_dtype)
  else:
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_decay_mask)
        if weight_decay else optax.identity(),
        optax.sgd(schedule, momentum=float(section.momentum),
                  accumulator_dtype=mu_dtype))
  if section.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(float(section.grad_clip_norm)),
                     tx)
  return tx, schedule
