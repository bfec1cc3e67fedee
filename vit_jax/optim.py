"""Optimizers and learning-rate schedules of the optimizer section (optax).

Fields of `OptimSection` (checked when the config is parsed):
`optimizer` ('adam' | 'sgd' | 'adafactor' | 'muon'), `base_lr`,
`total_steps`, `warmup_steps`, `decay_type` ('linear' | 'cosine' |
'constant'), `weight_decay` (of kernels only), `grad_clip_norm` (None or 0
disables), `beta1`, `beta2`, `momentum`, `mu_dtype` (dtype of the first
moment or momentum: 'bfloat16' halves that state), and the sub-sections
`adafactor.*` and `muon.*` of those two rules;
`param_groups` and `layer_decay` (below).

Parameter groups are data: `param_groups` is a tuple of `(pattern, options)`
pairs; `pattern` is a regular expression searched in a parameter's
'/'-joined path (`Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel`) and
`options` sets any of `lr_mult` (scales the group's updates, its decoupled
weight decay included, as a per-group learning rate does), `weight_decay`
(the group's own decay, of kernels) and `frozen` (no update and no optimizer
state). `layer_decay` scales block i of L by `layer_decay**(L - i)`, what
comes before the blocks by `layer_decay**(L + 1)` and the head by 1. Both
act through optax (`multi_transform` on the groups' labels, a stateless
scaling); `check_param_groups` checks them against a parameter tree.

Recipes (paper §4.1, Appendix B.1): pre-training uses Adam (β1 0.9, β2 0.999)
with high decoupled weight decay; fine-tuning uses SGD with momentum 0.9, no
weight decay, gradient clipping at global norm 1, cosine decay. ViT-G/14
("Scaling Vision Transformers", Zhai et al. 2021) was pre-trained with
big_vision's Adafactor ('adafactor': factored second moment whose decay is
capped at `beta2`, momentum `momentum` kept in `mu_dtype`). 'muon' is Muon
(optax.contrib) on the weight matrices of the blocks, AdamW on the rest
(`muon_dimension_numbers`).
"""

from collections.abc import Callable, Mapping
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

from vit_jax import config_errors
from vit_jax import sharding

OPTIMIZERS = ('adam', 'sgd', 'adafactor', 'muon')
DECAY_TYPES = ('linear', 'cosine', 'constant')
MU_DTYPES = ('float32', 'bfloat16', 'float16')
GROUP_OPTIONS = ('lr_mult', 'weight_decay', 'frozen')
# `param_groups` of the fine-tuning presets (configs/finetune.py's third
# argument) for classifiers: everything frozen but
PARAM_GROUP_PRESETS = {
    # the head, with its representation layer and MAP pooling if any;
    'head_only': ((r'^(?!(head|pre_logits|MAPHead_0)/)', {'frozen': True}),),
    # the final linear layer, on the frozen pre-logits.
    'linear_probe': ((r'^(?!head/)', {'frozen': True}),),
}


@dataclasses.dataclass(frozen=True)
class AdafactorSection:
  """`config.adafactor.*`: big_vision's Adafactor (optimizer='adafactor')."""

  decay_rate: float
  min_dim_size_to_factor: int
  clipping_threshold: float | None

  def __post_init__(self):
    config_errors.check_positive(
        **{
            'adafactor.decay_rate': self.decay_rate,
            'adafactor.min_dim_size_to_factor': self.min_dim_size_to_factor,
        }
    )
    if self.clipping_threshold is not None and self.clipping_threshold <= 0:
      raise ValueError(
          'config.adafactor.clipping_threshold='
          f'{self.clipping_threshold} must be positive, or None (no '
          'clipping of the update).'
      )


@dataclasses.dataclass(frozen=True)
class MuonSection:
  """`config.muon.*`: Muon's matrices (optimizer='muon')."""

  consistent_rms: float | None

  def __post_init__(self):
    if self.consistent_rms is not None and self.consistent_rms <= 0:
      raise ValueError(
          f'config.muon.consistent_rms={self.consistent_rms} must be '
          "positive, or None (optax's width scaling)."
      )


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
  param_groups: tuple[tuple[str, Mapping[str, Any]], ...]
  layer_decay: float | None
  adafactor: AdafactorSection = dataclasses.field(
      metadata={'section': AdafactorSection}
  )
  muon: MuonSection = dataclasses.field(metadata={'section': MuonSection})

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
    if self.optimizer in ('adafactor', 'muon') and not 0 <= self.momentum < 1:
      raise ValueError(
          f'config.momentum={self.momentum} must be in [0, 1) for '
          f'optimizer={self.optimizer!r} (the decay of its momentum).'
      )
    if self.optimizer == 'adafactor' and not 0 < self.beta2 <= 1:
      raise ValueError(
          f'config.beta2={self.beta2} must be in (0, 1] for '
          "optimizer='adafactor' (the cap of its second-moment decay)."
      )
    for i, group in enumerate(self.param_groups):
      _check_group(i, group)
    if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
      raise ValueError(
          f'config.layer_decay={self.layer_decay} must be in (0, 1] (e.g. '
          '0.75), or None for one learning rate at every depth.'
      )


def _check_group(i: int, group: Any) -> None:
  """Raises unless `group` is a valid `(pattern, options)` pair."""
  name = f'config.param_groups[{i}]'
  if (
      not isinstance(group, (tuple, list))
      or len(group) != 2
      or not isinstance(group[0], str)
      or not isinstance(group[1], Mapping)
  ):
    raise ValueError(
        f'{name}={group!r}: each group is a (pattern, options) pair, e.g. '
        "('^head/', {'lr_mult': 10.0})."
    )
  pattern, options = group
  name = f'{name} ({pattern!r})'
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(
        f'{name} is not a regular expression ({e}): fix the pattern.'
    ) from None
  unknown = sorted(set(options) - set(GROUP_OPTIONS))
  if unknown:
    raise ValueError(
        f'{name}: unknown option(s) {unknown}; use {", ".join(GROUP_OPTIONS)}.'
    )
  if not options:
    raise ValueError(
        f'{name} sets no option: give it lr_mult, weight_decay or frozen, or '
        'remove it.'
    )
  frozen = options.get('frozen', False)
  if not isinstance(frozen, bool):
    raise ValueError(f'{name}: frozen={frozen!r} must be True or False.')
  if frozen and len(options) > 1:
    raise ValueError(
        f'{name} is frozen, so {sorted(set(options) - {"frozen"})} would '
        'do nothing: remove them (or the frozen option).'
    )
  lr_mult = options.get('lr_mult', 1.0)
  if isinstance(lr_mult, bool) or not isinstance(lr_mult, (int, float)):
    raise ValueError(f'{name}: lr_mult={lr_mult!r} must be a number > 0.')
  if lr_mult <= 0:
    raise ValueError(
        f'{name}: lr_mult={lr_mult} must be > 0; to stop the group training '
        "set {'frozen': True}."
    )
  decay = options.get('weight_decay', 0.0)
  if isinstance(decay, bool) or not isinstance(decay, (int, float)):
    raise ValueError(f'{name}: weight_decay={decay!r} must be a number >= 0.')
  if decay < 0:
    raise ValueError(f'{name}: weight_decay={decay} must be >= 0.')


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


# Muon's matrices inside the attention's DenseGeneral kernels: query, key and
# value are [embed, heads, head_dim] (the input dimension, then the heads'
# outputs), out is [heads, head_dim, embed]. Axes count from the end, so a
# leading layer axis of scanned blocks is a batch axis (one matrix a layer).
_ATTENTION = r'(.*/)?MultiHeadDotProductAttention_\d+/'
_MUON_ATTENTION = (
    (
        _ATTENTION + r'(query|key|value)/kernel',
        optax.contrib.MuonDimensionNumbers(
            reduction_axis=-3, output_axis=(-2, -1)
        ),
    ),
    (
        _ATTENTION + r'out/kernel',
        optax.contrib.MuonDimensionNumbers(
            reduction_axis=(-3, -2), output_axis=-1
        ),
    ),
)
# The output layers: the classifier and masked patch prediction's.
_OUTPUT_LAYER = r'(.*/)?(mpp_)?head/kernel'


def muon_dimension_numbers(
    path: str, shape: tuple[int, ...]
) -> optax.contrib.MuonDimensionNumbers | None:
  """How optimizer='muon' treats one parameter: its matrix, or None (AdamW).

  Muon orthogonalises the update of the weight matrices inside the network:
  the dense kernels of the blocks' MLPs (and of the pre-logits layer, the
  MAP head, Mixer's token and channel mixing) and the attention's query,
  key, value and out kernels, whose 3-D DenseGeneral kernels are read as
  [embed, heads * head_dim] and [heads * head_dim, embed] matrices. The
  usual split leaves the rest to AdamW: biases, norms, the position
  embedding and class token (not kernels), convolution kernels (the patch
  embedding, ResNet stems: 4-D) and the output layer (`head`, `mpp_head`).
  Scanned blocks stack their kernels on a leading layer axis, which is a
  batch axis here: one matrix per layer.

  Args:
    path: The parameter's path, e.g.
      'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'.
    shape: Its shape.

  Returns:
    Muon's dimension numbers (reduction and output axes) of the matrix, or
    None for a parameter AdamW updates.
  """
  if path.rpartition('/')[2] != 'kernel' or re.fullmatch(_OUTPUT_LAYER, path):
    return None
  for pattern, dims in _MUON_ATTENTION:
    if re.fullmatch(pattern, path):
      return dims
  # Dense kernels: [in, out], or [layers, in, out] in scanned blocks.
  if len(shape) in (2, 3):
    return optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
  return None


def _muon_dimension_tree(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: muon_dimension_numbers(sharding.path_str(path), x.shape),
      params,
  )


def _adamw(
    section: OptimSection, schedule: optax.Schedule, weight_decay: float
) -> optax.GradientTransformation:
  mu_dtype = jnp.dtype(section.mu_dtype) if section.mu_dtype else None
  return optax.adamw(
      schedule,
      b1=float(section.beta1),
      b2=float(section.beta2),
      weight_decay=weight_decay,
      mask=_decay_mask,
      mu_dtype=mu_dtype,
  )


def adafactor_factored(
    shape: tuple[int, ...], min_dim_size_to_factor: int, *, stacked: bool
) -> bool:
  """Whether optimizer='adafactor' factors a parameter's second moment.

  Adafactor keeps, for a parameter whose two largest dimensions both have
  at least `min_dim_size_to_factor` entries, the means of the squared
  gradient over each of them (a row and a column statistic) instead of
  the whole second moment. Scanned blocks stack each parameter on a leading
  layer axis, which is never factored: a stack whose layer axis is one of
  its two largest keeps its whole second moment. So a stack is factored as
  its layers would be unstacked (a stacked bias stays whole, a stacked
  kernel keeps a row and a column statistic per layer), except a stack of
  more layers than one of the layer's own two largest dimensions, which
  stays whole.

  Args:
    shape: The parameter's shape.
    min_dim_size_to_factor: `config.adafactor.min_dim_size_to_factor`.
    stacked: Whether dimension 0 stacks layers (`sharding.stacked_paths`).

  Returns:
    True for a factored second moment, False for a whole one.
  """
  # optax's rule: the two largest dimensions (in its order of ties).
  largest = np.argsort(shape)[-2:]
  if len(shape) < 2 or shape[largest[0]] < min_dim_size_to_factor:
    return False
  return not (stacked and 0 in largest)


def _second_moment_kinds(params, min_dim_size_to_factor):
  stacked = sharding.stacked_paths(params)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: 'factored'
      if adafactor_factored(
          x.shape,
          min_dim_size_to_factor,
          stacked=sharding.path_str(path) in stacked,
      )
      else 'full',
      params,
  )


def _adafactor(
    section: OptimSection, schedule: optax.Schedule, weight_decay: float
) -> optax.GradientTransformation:
  """big_vision's Adafactor (Zhai et al. 2021), from optax's parts.

  optax.adafactor differs in what matters here: its second-moment decay is
  not capped, its momentum and weight decay come after the learning rate,
  and it scales updates by the parameters' norm.
  """
  mu_dtype = jnp.dtype(section.mu_dtype) if section.mu_dtype else None
  beta2_cap = float(section.beta2)
  momentum = float(section.momentum)
  clip = section.adafactor.clipping_threshold

  def second_moment_decay(step, exponent):
    # Adafactor's 1 - t^-c tends to 1, which freezes the second moment on
    # long runs; big_vision caps it at beta2.
    t = jnp.asarray(step, jnp.float32) + 1.0
    return jnp.minimum(beta2_cap, 1.0 - t ** (-exponent))

  min_dim = int(section.adafactor.min_dim_size_to_factor)

  def second_moment(factored):
    return optax.scale_by_factored_rms(
        factored=factored,
        decay_rate=float(section.adafactor.decay_rate),
        min_dim_size_to_factor=min_dim,
        decay_rate_fn=second_moment_decay,
    )

  return optax.chain(
      optax.partition(
          {'factored': second_moment(True), 'full': second_moment(False)},
          lambda params: _second_moment_kinds(params, min_dim),
      ),
      optax.clip_by_block_rms(float(clip)) if clip else optax.identity(),
      # Momentum of the normalised update, without bias correction.
      optax.ema(momentum, debias=False, accumulator_dtype=mu_dtype)
      if momentum
      else optax.identity(),
      optax.add_decayed_weights(weight_decay, mask=_decay_mask)
      if weight_decay
      else optax.identity(),
      optax.scale_by_learning_rate(schedule),
  )


def _muon(
    section: OptimSection, schedule: optax.Schedule, weight_decay: float
) -> optax.GradientTransformation:
  """Muon on `muon_dimension_numbers`'s matrices, AdamW on the rest.

  optax.contrib.muon keeps its own AdamW for the leaves it does not
  orthogonalise, decaying all of them (norms and biases too); here those
  leaves get the AdamW of optimizer='adam', which decays kernels only, and
  Muon sees only its matrices (every one a kernel: all decayed).
  """
  mu_dtype = jnp.dtype(section.mu_dtype) if section.mu_dtype else None
  consistent_rms = section.muon.consistent_rms
  muon = optax.contrib.muon(
      schedule,
      beta=float(section.momentum),
      weight_decay=weight_decay,
      mu_dtype=mu_dtype,
      muon_weight_dimension_numbers=_muon_dimension_tree,
      consistent_rms=None if consistent_rms is None else float(consistent_rms),
  )

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 'adam'
        if muon_dimension_numbers(sharding.path_str(path), x.shape) is None
        else 'muon',
        params,
    )

  return optax.partition(
      {'muon': muon, 'adam': _adamw(section, schedule, weight_decay)}, labels
  )


def base_transform(
    section: OptimSection,
    schedule: optax.Schedule,
    weight_decay: float,
) -> optax.GradientTransformation:
  """The update rule of `section.optimizer` at `schedule`, without clipping.

  Args:
    section: The run's optimizer section (its rule, betas, momentum,
      mu_dtype, the adafactor and muon sub-sections).
    schedule: The learning-rate schedule.
    weight_decay: Decoupled weight decay of kernels (a parameter group may
      set its own): every rule subtracts `lr * weight_decay * kernel`.

  Returns:
    Adam with decoupled weight decay; SGD with momentum after weight decay;
    big_vision's Adafactor; or Muon for the blocks' matrices with AdamW for
    the rest.
  """
  if section.optimizer == 'adam':
    return _adamw(section, schedule, weight_decay)
  if section.optimizer == 'adafactor':
    return _adafactor(section, schedule, weight_decay)
  if section.optimizer == 'muon':
    return _muon(section, schedule, weight_decay)
  mu_dtype = jnp.dtype(section.mu_dtype) if section.mu_dtype else None
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


def _group_index(section: OptimSection, path: str) -> int | None:
  # Groups are disjoint (`check_param_groups`): the first match is the one.
  for i, (pattern, _) in enumerate(section.param_groups):
    if re.search(pattern, path):
      return i
  return None


def _options(section: OptimSection, path: str) -> Mapping[str, Any]:
  i = _group_index(section, path)
  return {} if i is None else section.param_groups[i][1]


def frozen_mask(section: OptimSection) -> Callable[[Any], Any] | None:
  """`tree -> {leaf: frozen?}` of the section's groups; None if none frozen.

  Args:
    section: The run's optimizer section.

  Returns:
    A function mapping a parameter tree (or one of its shape) to a tree of
    Python bools, True for the leaves of frozen groups; None when no group
    is frozen.
  """
  if not any(o.get('frozen') for _, o in section.param_groups):
    return None
  return lambda tree: jax.tree_util.tree_map_with_path(
      lambda p, _: bool(_options(section, sharding.path_str(p)).get('frozen')),
      tree,
  )


# Blocks: `Transformer/encoderblock_{i}` (ViT, or `Transformer/encoderblock`
# stacked along axis 0 with scan) and `MixerBlock_{i}` (Mixer).
_BLOCK = re.compile(r'^(?:Transformer/encoderblock|MixerBlock)(?:_(\d+))?/')
# After the blocks: full learning rate. Everything else (patch embedding and
# its norm, class token, registers, position embeddings, the pre-blocks norm,
# a hybrid's ResNet stem, the Mixer stem, masked patch prediction's mask
# token) comes before them.
_AFTER_BLOCKS = re.compile(
    r'^(?:head|pre_logits|MAPHead_0|Transformer/encoder_norm|fc_norm|'
    r'pre_head_layer_norm|mpp_head)/'
)


def _num_blocks(tree: Any) -> int:
  """Blocks of a parameter tree: numbered ones, or a scanned stack's length."""
  count = 0
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    match = _BLOCK.match(sharding.path_str(key_path))
    if match:
      index = match.group(1)
      count = max(count, int(index) + 1 if index else leaf.shape[0])
  return count


def _layer_scale(path: str, leaf: Any, decay: float, blocks: int) -> Any:
  """`decay` to the power of the leaf's distance from the head."""
  match = _BLOCK.match(path)
  if match and match.group(1):
    return decay ** (blocks - int(match.group(1)))
  if match:  # Scanned: one scale per slice of the stacked axis.
    powers = blocks - np.arange(blocks).reshape((-1,) + (1,) * (leaf.ndim - 1))
    return np.power(decay, powers, dtype=np.float64)
  return 1.0 if _AFTER_BLOCKS.match(path) else decay ** (blocks + 1)


def _scale_updates(section: OptimSection) -> optax.GradientTransformation:
  """Multiplies each update by its group's lr_mult times its layer decay."""
  decay = section.layer_decay

  def scaled(updates):
    blocks = _num_blocks(updates) if decay is not None else 0

    def scale(key_path, u):
      path = sharding.path_str(key_path)
      factor = _options(section, path).get('lr_mult', 1.0)
      if decay is not None:
        factor = factor * _layer_scale(path, u, decay, blocks)
      return u * jnp.asarray(factor, u.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates)

  return optax.stateless(lambda updates, _: scaled(updates))


_FROZEN, _DEFAULT = 'frozen', 'default'


def _label(section: OptimSection, path: str) -> str:
  # A group with its own weight decay has its own update rule; the others
  # share the run's (lr_mult acts after it, in `_scale_updates`).
  i = _group_index(section, path)
  options = {} if i is None else section.param_groups[i][1]
  if options.get('frozen'):
    return _FROZEN
  return _DEFAULT if 'weight_decay' not in options else f'group_{i}'


def _grouped(
    section: OptimSection, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """The update rule per group: frozen, own weight decay, or the run's."""
  transforms = {
      _DEFAULT: base_transform(section, schedule, float(section.weight_decay))
  }
  for i, (_, options) in enumerate(section.param_groups):
    if options.get('frozen'):
      transforms[_FROZEN] = optax.set_to_zero()  # Holds no state.
    elif 'weight_decay' in options:
      transforms[f'group_{i}'] = base_transform(
          section, schedule, float(options['weight_decay'])
      )
  return optax.multi_transform(
      transforms,
      lambda tree: jax.tree_util.tree_map_with_path(
          lambda p, _: _label(section, sharding.path_str(p)), tree
      ),
  )


def check_param_groups(section: OptimSection, params: Any) -> None:
  """Raises unless the groups and layer decay fit a parameter tree.

  Run before step 1 (`train.train_and_evaluate`, `vit_jax.aot`), on the
  parameters' shapes.

  Args:
    section: The run's optimizer section.
    params: The parameter tree (arrays or shapes).

  Raises:
    ValueError: in one line, naming the field: a pattern that matches no
      parameter (with some real paths), two patterns that match one
      parameter, groups that freeze every parameter, or `layer_decay` for a
      model without blocks.
  """
  paths = [
      sharding.path_str(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  groups = section.param_groups
  for pattern, _ in groups:
    if not any(re.search(pattern, path) for path in paths):
      tops = list(dict.fromkeys('/'.join(p.split('/')[:2]) for p in paths))
      raise ValueError(
          f'config.param_groups: pattern {pattern!r} matches no parameter of '
          f'this model; its paths start with {", ".join(tops[:8])}.'
      )
  for path in paths:
    matching = [p for p, _ in groups if re.search(p, path)]
    if len(matching) > 1:
      raise ValueError(
          f'config.param_groups: patterns {matching[0]!r} and '
          f'{matching[1]!r} both match {path!r}: make them disjoint (each '
          'parameter belongs to at most one group).'
      )
  if groups and all(_options(section, p).get('frozen') for p in paths):
    raise ValueError(
        'config.param_groups freezes every parameter, so nothing would '
        'train: leave at least one parameter out of the frozen groups.'
    )
  if section.layer_decay is not None and not _num_blocks(params):
    raise ValueError(
        f'config.layer_decay={section.layer_decay} needs a model with '
        'transformer or mixer blocks; this one has none: set '
        'config.layer_decay=None.'
    )


def describe_groups(section: OptimSection, params: Any) -> str:
  """One line: how many parameters each group holds, and the rest's count.

  Args:
    section: The run's optimizer section.
    params: The parameter tree (arrays or shapes).

  Returns:
    E.g. "param_groups: '^(?!head/)' {'frozen': True} 5,524,800 parameters;
    the rest 1,930".
  """
  counts = [0] * (len(section.param_groups) + 1)
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    i = _group_index(section, sharding.path_str(key_path))
    counts[-1 if i is None else i] += int(np.prod(leaf.shape))
  parts = [
      f'{pattern!r} {dict(options)} {n:,} parameters'
      for (pattern, options), n in zip(section.param_groups, counts)
  ]
  return 'param_groups: ' + '; '.join(parts + [f'the rest {counts[-1]:,}'])


def make_optimizer(
    section: OptimSection,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optax transformation, schedule) of the optimizer section.

  Without parameter groups or layer decay the transformation is clipping
  then `base_transform`. Groups make it a `multi_transform` over the groups'
  labels (frozen ones: `set_to_zero`, no state); `lr_mult` and
  `layer_decay` multiply the updates by a fixed factor per parameter (an
  array along the stacked axis of scanned blocks). Clipping sees the
  gradients of every parameter (those of frozen ones are zeros).

  Args:
    section: The run's optimizer section (`config_lib.parse(config).optim`).

  Returns:
    The transformation and its learning-rate schedule.
  """
  schedule = make_schedule(section)
  if section.param_groups:
    tx = _grouped(section, schedule)
  else:
    tx = base_transform(section, schedule, float(section.weight_decay))
  scaled = section.layer_decay is not None or any(
      'lr_mult' in o for _, o in section.param_groups
  )
  if scaled:
    tx = optax.chain(tx, _scale_updates(section))
  if section.grad_clip_norm:
    tx = optax.chain(
        optax.clip_by_global_norm(float(section.grad_clip_norm)), tx
    )
  return tx, schedule
