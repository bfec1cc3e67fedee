"""Known-answer tests of the optimizers and schedules in `vit_jax.optim`.

Every expected number is derived independently of the code under test: closed
forms of the schedules, hand-derived clipping and weight-decay arithmetic, and
numpy re-implementations of SGD-with-momentum and Adam (optax's conventions:
`trace` momentum v = g + m v; bias-corrected Adam with eps outside the square
root, eps = 1e-8, eps_root = 0).

Step convention (train.py): the k-th update (k = 1..total_steps) is made with
the optimizer's count k - 1, i.e. with `schedule(k - 1)`. So the first update
of a warmed-up run has learning rate 0 and the last one `schedule(total - 1)`,
which is not yet 0; `schedule(total)` is 0.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import randomize
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import optim
import vit_jax.models

BASE_LR = 0.5
TOTAL = 20
WARMUP = 4


def optim_section(config):
  return config_lib.section(config, 'optim')


def _config(**overrides):
  config = config_lib.get_base()
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _schedule_config(decay, warmup=WARMUP):
  return _config(
      base_lr=BASE_LR, total_steps=TOTAL, warmup_steps=warmup, decay_type=decay
  )


def _closed_form_lr(step, decay, warmup=WARMUP):
  """Linear warm-up 0 -> BASE_LR over `warmup` steps, then decay to 0.

  The decay phase has T - w = TOTAL - warmup steps (optax's
  warmup_cosine_decay_schedule with decay_steps=TOTAL counts the warm-up in
  it); after TOTAL the rate stays at its end value 0.
  """
  if step < warmup:
    return BASE_LR * step / warmup
  if decay == 'constant':
    return BASE_LR
  frac = min(step - warmup, TOTAL - warmup) / (TOTAL - warmup)
  if decay == 'linear':
    return BASE_LR * (1.0 - frac)
  return BASE_LR * 0.5 * (1.0 + math.cos(math.pi * frac))


# ----------------------------------------------------------------------------
# Learning-rate schedules.
# ----------------------------------------------------------------------------

# (step, linear, cosine, constant), derived by hand for base_lr 0.5, 20 steps,
# 4 of warm-up: step 2 is mid-warm-up, 4 the end of warm-up, 8 a quarter and
# 12 half of the 16 decay steps, 19 the last applied step, 20 the end, 25 past
# it (the rate must neither go negative nor come back up).
SCHEDULE_POINTS = (
    (0, 0.0, 0.0, 0.0),
    (2, 0.25, 0.25, 0.25),
    (4, 0.5, 0.5, 0.5),
    (8, 0.375, 0.25 * (1 + math.cos(math.pi / 4)), 0.5),
    (12, 0.25, 0.25, 0.5),
    (19, 0.5 / 16, 0.25 * (1 + math.cos(math.pi * 15 / 16)), 0.5),
    (20, 0.0, 0.0, 0.5),
    (25, 0.0, 0.0, 0.5),
)


@pytest.mark.parametrize('decay', ['linear', 'cosine', 'constant'])
def test_schedule_known_points(decay):
  """Pins warm-up length, decay length (T - w) and the end value, per type."""
  schedule = optim.make_schedule(optim_section(_schedule_config(decay)))
  column = {'linear': 1, 'cosine': 2, 'constant': 3}[decay]
  for point in SCHEDULE_POINTS:
    step, expected = point[0], point[column]
    np.testing.assert_allclose(
        float(schedule(step)),
        expected,
        rtol=1e-6,
        atol=1e-7,
        err_msg=f'{decay} step {step}',
    )


@pytest.mark.parametrize('warmup', [0, WARMUP])
@pytest.mark.parametrize('decay', ['linear', 'cosine', 'constant'])
def test_schedule_matches_closed_form_at_every_step(decay, warmup):
  """The whole curve, also without warm-up (step 0 is then at base_lr)."""
  schedule = optim.make_schedule(optim_section(_schedule_config(decay, warmup)))
  steps = np.arange(TOTAL + 3)
  expected = [_closed_form_lr(s, decay, warmup) for s in steps]
  np.testing.assert_allclose(
      np.asarray(schedule(jnp.asarray(steps))), expected, rtol=1e-6, atol=1e-7
  )
  if warmup == 0:
    assert float(schedule(0)) == pytest.approx(BASE_LR)


@pytest.mark.parametrize('decay', ['linear', 'cosine'])
def test_updates_follow_the_schedule(decay):
  """The k-th update uses schedule(k - 1): SGD (no momentum) on gradient 1.

  So the update is -lr exactly: 0 for the first update, the closed form of
  step TOTAL - 1 for the last one.
  """
  config = _schedule_config(decay)
  config.optimizer, config.momentum, config.grad_clip_norm = 'sgd', 0.0, 0.0
  tx, _ = optim.make_optimizer(optim_section(config))
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  grads = {'w': jnp.ones(())}
  for k in range(1, TOTAL + 1):
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(
        float(updates['w']),
        -_closed_form_lr(k - 1, decay),
        rtol=1e-6,
        atol=1e-7,
        err_msg=f'update {k}',
    )


# ----------------------------------------------------------------------------
# Gradient clipping.
# ----------------------------------------------------------------------------

# Two leaves with global norm 5 (3-4-5), and a tenth of them (norm 0.5).
BIG = {
    'a': np.array([3.0, 0.0], np.float32),
    'b': np.array([[0.0, 4.0]], np.float32),
}
SMALL = jax.tree_util.tree_map(lambda g: g / 10, BIG)


@pytest.mark.parametrize(
    'grads,clip,factor',
    [
        (BIG, 1.0, 1 / 5),  # Global norm 5 > 1: rescaled to norm 1.
        (BIG, 2.5, 2.5 / 5),  # Rescaled to norm 2.5.
        (SMALL, 1.0, 1.0),  # Norm 0.5 < 1: untouched.
        (BIG, 0.0, 1.0),  # 0 disables clipping.
        (BIG, None, 1.0),  # So does None.
    ],
)
def test_gradient_clipping_by_global_norm(grads, clip, factor):
  """update = -lr * g * min(1, clip / ||g||), ||.|| over all leaves together.

  Per-leaf clipping would give a = [1, 0], b = [[0, 1]] for clip 1, and
  element-wise clipping would give [1, 0], [[0, 1]] as well: neither matches.
  """
  lr = 0.1
  config = _config(
      optimizer='sgd',
      momentum=0.0,
      base_lr=lr,
      warmup_steps=0,
      decay_type='constant',
      weight_decay=0.0,
      grad_clip_norm=clip,
  )
  tx, _ = optim.make_optimizer(optim_section(config))
  params = jax.tree_util.tree_map(np.zeros_like, grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name in grads:
    np.testing.assert_allclose(
        np.asarray(updates[name]), -lr * factor * grads[name], rtol=1e-6
    )


def test_clipping_acts_on_gradients_before_weight_decay():
  """Clip the raw gradient, then add wd * p: -lr * (clip(g) + wd * p).

  g = [3, 4] (norm 5) clips to [0.6, 0.8]; with p = [1, 2] and wd = 0.5 the
  SGD update is -0.1 * [1.1, 1.8]. Clipping after the decay would clip
  g + wd p = [3.5, 5] instead.
  """
  config = _config(
      optimizer='sgd',
      momentum=0.0,
      base_lr=0.1,
      warmup_steps=0,
      decay_type='constant',
      weight_decay=0.5,
      grad_clip_norm=1.0,
  )
  tx, _ = optim.make_optimizer(optim_section(config))
  params = {'kernel': np.array([1.0, 2.0], np.float32)}
  grads = {'kernel': np.array([3.0, 4.0], np.float32)}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(
      np.asarray(updates['kernel']), [-0.11, -0.18], rtol=1e-6
  )


# ----------------------------------------------------------------------------
# Weight decay: kernels only, exact values, both optimizers and layouts.
# ----------------------------------------------------------------------------

# The kernels of the 'testing' ViT, listed by hand: the patch embedding, the
# head, and in every encoder block the four attention projections and the two
# MLP layers. Everything else (biases, LayerNorm scales and biases, the
# position embedding, the class token) must not be decayed.
BLOCK_KERNELS = (
    'MlpBlock_0/Dense_0/kernel',
    'MlpBlock_0/Dense_1/kernel',
    'MultiHeadDotProductAttention_0/query/kernel',
    'MultiHeadDotProductAttention_0/key/kernel',
    'MultiHeadDotProductAttention_0/value/kernel',
    'MultiHeadDotProductAttention_0/out/kernel',
)
NOT_DECAYED_EXAMPLES = (
    'cls',
    'Transformer/posembed_input/pos_embedding',
    'Transformer/encoder_norm/scale',
    'Transformer/encoder_norm/bias',
    'embedding/bias',
    'head/bias',
)


def _tiny_vit_params(scan):
  """Random parameters of a 2-layer 'testing' ViT (shapes via eval_shape)."""
  model = vit_jax.models.get_model(
      'testing',
      num_classes=3,
      patches={'size': (4, 4)},
      transformer={'num_layers': 2},
      scan=scan,
  )
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False
      )
  )['params']
  # Random values: the head is zero-initialised, and decay of 0 is invisible.
  return randomize(shapes, seed=1)


def _expected_kernels(scan):
  blocks = (
      ['Transformer/encoderblock']
      if scan
      else ['Transformer/encoderblock_0', 'Transformer/encoderblock_1']
  )
  return {'embedding/kernel', 'head/kernel'} | {
      f'{block}/{name}' for block in blocks for name in BLOCK_KERNELS
  }


@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('name', ['adam', 'sgd'])
def test_weight_decay_exact_on_kernels_only(name, scan):
  """Two updates with zero gradients: any change comes from the decay.

  adamw: Adam's update of a zero gradient is 0, so p_t = p_{t-1} - lr wd
  p_{t-1}. SGD (add_decayed_weights, then momentum m): v_1 = wd p_0,
  p_1 = p_0 - lr wd p_0; v_2 = wd p_1 + m v_1, p_2 = p_1 - lr v_2.
  Non-kernels stay bit-identical in both steps.
  """
  lr, wd, m = 0.1, 0.3, 0.5
  config = _config(
      optimizer=name,
      base_lr=lr,
      warmup_steps=0,
      decay_type='constant',
      weight_decay=wd,
      momentum=m,
  )
  tx, _ = optim.make_optimizer(optim_section(config))
  params = _tiny_vit_params(scan)
  p0 = {
      k: np.asarray(v, np.float64)
      for k, v in checkpoint.flatten(params).items()
  }
  kernels = _expected_kernels(scan)
  assert kernels <= set(p0)
  assert set(NOT_DECAYED_EXAMPLES) <= set(p0) - kernels

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

  @jax.jit  # One compilation instead of op-by-op dispatch over 40 leaves.
  def step(params, state):
    updates, state = tx.update(zeros, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  history = [params]
  for _ in range(2):
    new_params, state = step(history[-1], state)
    history.append(new_params)
  p1, p2 = (checkpoint.flatten(p) for p in history[1:])

  for key, value in p0.items():
    if key not in kernels:
      np.testing.assert_array_equal(np.asarray(p1[key]), value, err_msg=key)
      np.testing.assert_array_equal(np.asarray(p2[key]), value, err_msg=key)
      continue
    want1 = value - lr * wd * value
    if name == 'adam':
      want2 = want1 - lr * wd * want1
    else:
      want2 = want1 - lr * (wd * want1 + m * wd * value)
    np.testing.assert_allclose(
        np.asarray(p1[key]), want1, rtol=1e-6, err_msg=key
    )
    np.testing.assert_allclose(
        np.asarray(p2[key]), want2, rtol=1e-6, err_msg=key
    )
    assert not np.allclose(want1, value)  # The decay is visible.


# ----------------------------------------------------------------------------
# Momentum and Adam's betas reach the update.
# ----------------------------------------------------------------------------

LR = 0.1
P0 = np.array([1.0, -2.0, 0.5])
# The third coordinate's gradients are of the order of Adam's eps (1e-8), so
# its updates depend on eps; the first two are far above it.
GRADS = (np.array([0.3, -1.0, 1e-8]), np.array([-0.2, 0.5, 3e-8]))


def _numpy_sgd(grads, m, wd=0.0):
  """optax.trace: v = g + m v; p -= lr v (decay added to g first)."""
  p, v, out = P0.copy(), np.zeros_like(P0), []
  for g in grads:
    v = (g + wd * p) + m * v
    p = p - LR * v
    out.append(p)
  return out


def _numpy_adam(grads, b1, b2, wd=0.0, eps=1e-8):
  """Bias-corrected Adam, eps outside the sqrt; decoupled decay (adamw)."""
  p, mu, nu, out = P0.copy(), np.zeros_like(P0), np.zeros_like(P0), []
  for t, g in enumerate(grads, start=1):
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    mu_hat, nu_hat = mu / (1 - b1**t), nu / (1 - b2**t)
    p = p - LR * (mu_hat / (np.sqrt(nu_hat) + eps) + wd * p)
    out.append(p)
  return out


def _run_two_steps(config, leaf):
  tx, _ = optim.make_optimizer(optim_section(config))
  params = {leaf: jnp.asarray(P0, jnp.float32)}
  state = tx.init(params)
  out = []
  for g in GRADS:
    updates, state = tx.update(
        {leaf: jnp.asarray(g, jnp.float32)}, state, params
    )
    params = optax.apply_updates(params, updates)
    out.append(np.asarray(params[leaf]))
  return out


# 'w' is not a kernel (never decayed); 'kernel' is decayed when wd > 0.
@pytest.mark.parametrize('leaf,wd', [('w', 0.0), ('kernel', 0.2)])
def test_sgd_momentum_two_steps(leaf, wd):
  """Momentum 0.5 (not the default 0.9), decay coupled through momentum."""
  config = _config(
      optimizer='sgd',
      momentum=0.5,
      base_lr=LR,
      warmup_steps=0,
      decay_type='constant',
      grad_clip_norm=0.0,
      weight_decay=wd,
  )
  got = _run_two_steps(config, leaf)
  want = _numpy_sgd(GRADS, 0.5, wd)
  # Without momentum step 2 would differ; check the test can tell.
  assert not np.allclose(want[1], _numpy_sgd(GRADS, 0.9, wd)[1])
  for step, (g, w) in enumerate(zip(got, want), start=1):
    np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=f'step {step}')


@pytest.mark.parametrize('leaf,wd', [('w', 0.0), ('kernel', 0.2)])
def test_adam_betas_and_eps_two_steps(leaf, wd):
  """β1 0.7, β2 0.8 (not 0.9 / 0.999), eps 1e-8, decoupled weight decay.

  Step 1 of Adam is sign(g) whatever the betas, so step 2 pins them; the
  third coordinate (|g| ~ eps) pins eps.
  """
  config = _config(
      optimizer='adam',
      beta1=0.7,
      beta2=0.8,
      base_lr=LR,
      warmup_steps=0,
      decay_type='constant',
      grad_clip_norm=0.0,
      weight_decay=wd,
  )
  got = _run_two_steps(config, leaf)
  want = _numpy_adam(GRADS, 0.7, 0.8, wd)
  # The test can tell default betas and another eps apart.
  assert not np.allclose(
      want[1], _numpy_adam(GRADS, 0.9, 0.8, wd)[1], rtol=1e-4
  )
  assert not np.allclose(
      want[1], _numpy_adam(GRADS, 0.7, 0.999, wd)[1], rtol=1e-4
  )
  assert not np.allclose(
      want[0], _numpy_adam(GRADS, 0.7, 0.8, wd, 1e-6)[0], rtol=1e-4
  )
  for step, (g, w) in enumerate(zip(got, want), start=1):
    np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=f'step {step}')


@pytest.mark.parametrize('optimizer', ['adam', 'sgd'])
def test_first_moment_in_bfloat16(optimizer):
  """`mu_dtype='bfloat16'` stores Adam's mu / SGD's momentum in bfloat16
  (half its memory), Adam's nu stays float32, and the updates stay those of
  the numpy references to bfloat16 precision."""
  config = _config(
      optimizer=optimizer,
      beta1=0.7,
      beta2=0.8,
      momentum=0.5,
      base_lr=LR,
      warmup_steps=0,
      decay_type='constant',
      grad_clip_norm=0.0,
      weight_decay=0.0,
      mu_dtype='bfloat16',
  )
  tx, _ = optim.make_optimizer(optim_section(config))
  state = tx.init({'w': jnp.asarray(P0, jnp.float32)})
  dtypes = sorted(
      str(x.dtype) for x in jax.tree_util.tree_leaves(state) if x.ndim
  )
  assert dtypes == (
      ['bfloat16', 'float32'] if optimizer == 'adam' else ['bfloat16']
  )
  got = _run_two_steps(config, 'w')
  want = (
      _numpy_adam(GRADS, 0.7, 0.8)
      if optimizer == 'adam'
      else _numpy_sgd(GRADS, 0.5, 0.0)
  )
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-2, atol=1e-3 * LR)
