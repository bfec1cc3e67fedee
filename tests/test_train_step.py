"""Known answers for the train step: loss, gradients, update, accumulation,
dropout keys per micro-batch, and the EMA of the parameters.

Each expected value comes from outside the step: numpy on a linear softmax
model, finite differences of the loss on a tiny ViT, or a recurrence written
out here.
"""

import collections
import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax import optim
from vit_jax import run_checkpoints
from vit_jax import train
import vit_jax.models

# The slow tier: train steps compiled per case.
pytestmark = pytest.mark.slow


class Linear(nn.Module):
  """Flattened pixels -> logits: a model whose gradient numpy can write."""

  num_classes: int

  @nn.compact
  def __call__(self, images, *, train=False):
    del train
    return nn.Dense(self.num_classes, name='head')(
        images.reshape((images.shape[0], -1))
    )


def optim_section(config):
  return config_lib.section(config, 'optim')


def optimizer_config(**fields):
  c = config_lib.get_base()
  c.total_steps = 10
  c.warmup_steps = 0
  c.decay_type = 'constant'
  for name, value in fields.items():
    c[name] = value
  return c


def plain_sgd(lr=1.0):
  """SGD without momentum, clipping or decay: update = -lr * gradient."""
  return optim.make_optimizer(
      optim_section(
          optimizer_config(
              optimizer='sgd',
              momentum=0.0,
              grad_clip_norm=0.0,
              weight_decay=0.0,
              base_lr=lr,
          )
      )
  )[0]


def initial_state(params, tx, ema=False):
  return train.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=params if ema else None,
  )


def jitted_step(model, tx, **kwargs):
  return jax.jit(
      functools.partial(train.train_step, model=model, tx=tx, **kwargs)
  )


def host(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), tree)


def numpy_xent(logits, labels, smoothing=0.0):
  """Mean softmax cross-entropy with smoothed targets, in float64."""
  logits = np.asarray(logits, np.float64)
  targets = (1 - smoothing) * labels + smoothing / labels.shape[-1]
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return float(np.mean(-(targets * log_p).sum(-1)))


def linear_problem(seed=0, batch=6, classes=3):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, 2, 2, 3)).astype(np.float32)
  labels = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch)]
  params = {
      'head': {
          'kernel': rng.normal(size=(12, classes)).astype(np.float32),
          'bias': rng.normal(size=(classes,)).astype(np.float32),
      }
  }
  return Linear(classes), params, {'image': images, 'labels': labels}


def test_one_step_of_a_linear_softmax_model_matches_numpy():
  """Loss, gradient norm and the update of clipped, decayed SGD+momentum."""
  model, params, batch = linear_problem()
  lr, wd, clip, smoothing = 0.5, 0.1, 0.3, 0.1
  tx, _ = optim.make_optimizer(
      optim_section(
          optimizer_config(
              optimizer='sgd',
              momentum=0.9,
              base_lr=lr,
              weight_decay=wd,
              grad_clip_norm=clip,
          )
      )
  )
  new, metrics = jitted_step(model, tx, label_smoothing=smoothing)(
      initial_state(params, tx), batch, jax.random.key(0)
  )

  x = batch['image'].reshape(6, -1).astype(np.float64)
  y = batch['labels'].astype(np.float64)
  w, b = host(params['head'])['kernel'], host(params['head'])['bias']
  logits = x @ w + b
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  d_logits = (p - (0.9 * y + 0.1 / 3)) / len(x)
  g_w, g_b = x.T @ d_logits, d_logits.sum(0)
  norm = np.sqrt((g_w**2).sum() + (g_b**2).sum())
  assert norm > clip  # The clipping is exercised.
  scale = clip / norm
  # First step of momentum: the trace is the (clipped, decayed) gradient.
  # Decay applies to the kernel only.
  expected_w = w - lr * (scale * g_w + wd * w)
  expected_b = b - lr * scale * g_b

  np.testing.assert_allclose(
      metrics['loss'], numpy_xent(logits, y, 0.1), rtol=1e-6
  )
  np.testing.assert_allclose(metrics['grad_norm'], norm, rtol=1e-5)
  np.testing.assert_allclose(
      new.params['head']['kernel'], expected_w, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
      new.params['head']['bias'], expected_b, rtol=1e-5, atol=1e-6
  )
  assert int(new.step) == 1


def tiny_vit(dropout=0.0):
  model, size = helpers.tiny_model(
      'vit',
      num_classes=5,
      transformer={
          'num_layers': 2,
          'dropout_rate': dropout,
          'attention_dropout_rate': dropout,
      },
  )
  images = helpers.random_images((8, size, size, 3), seed=1)
  params = helpers.randomize(helpers.init_params(model, images[:1]), seed=2)
  labels = np.eye(5, dtype=np.float32)[np.arange(8) % 5]
  return model, params, {'image': images, 'labels': labels}


def test_tiny_vit_gradient_matches_finite_differences_in_every_layer():
  """The step's gradient, read off a plain-SGD update, against central
  differences of the loss along a random direction in each layer."""
  model, params, batch = tiny_vit()
  tx = plain_sgd(lr=1.0)
  new, metrics = jitted_step(model, tx, label_smoothing=0.1)(
      initial_state(params, tx), batch, jax.random.key(0)
  )
  grads = jax.tree_util.tree_map(
      lambda a, b: np.float64(a) - np.float64(b), host(params), host(new.params)
  )
  labels = batch['labels'].astype(np.float64)
  apply = jax.jit(
      lambda p: model.apply({'params': p}, batch['image'], train=False)
  )

  def loss(p):
    return numpy_xent(apply(p), labels, 0.1)

  np.testing.assert_allclose(metrics['loss'], loss(params), rtol=1e-5)
  rng = np.random.default_rng(3)
  eps = 1e-2
  assert sorted(params) == ['Transformer', 'cls', 'embedding', 'head']
  layers = [
      ('embedding',),
      ('cls',),
      ('head',),
      ('Transformer', 'posembed_input'),
      ('Transformer', 'encoderblock_0'),
      ('Transformer', 'encoderblock_1'),
      ('Transformer', 'encoder_norm'),
  ]
  for layer in layers:

    def pick(tree, layer=layer):
      for key in layer:
        tree = tree[key]
      return tree

    direction = jax.tree_util.tree_map(
        lambda x: rng.normal(size=x.shape), pick(params)
    )
    norm = np.sqrt(
        sum((d**2).sum() for d in jax.tree_util.tree_leaves(direction))
    )
    direction = jax.tree_util.tree_map(lambda d, n=norm: d / n, direction)

    def moved(sign, layer=layer, direction=direction):
      flat = checkpoint.flatten(params)
      prefix = '/'.join(layer)
      for key, d in checkpoint.flatten({prefix: direction}).items():
        flat[key] = (np.float64(flat[key]) + sign * eps * d).astype(np.float32)
      return checkpoint.unflatten(flat)

    numeric = (loss(moved(1)) - loss(moved(-1))) / (2 * eps)
    analytic = sum(
        float((g * d).sum())
        for g, d in zip(
            jax.tree_util.tree_leaves(pick(grads)),
            jax.tree_util.tree_leaves(direction),
        )
    )
    assert abs(analytic) > 1e-4, (layer, analytic)  # A real gradient.
    np.testing.assert_allclose(
        analytic, numeric, rtol=3e-2, atol=2e-5, err_msg=str(layer)
    )


def test_accumulation_equals_the_big_batch_in_every_layer():
  """4 micro-batches give the update of one batch of 4x the size, with
  random (non-zero) weights so that every layer has a gradient."""
  model, params, batch = tiny_vit()
  # A large rate makes even the smallest gradients (1e-6) stand well above
  # the float32 rounding of the parameters in `new - old`.
  tx = plain_sgd(lr=1e4)
  results = {}
  for accum in (1, 4):
    new, metrics = jitted_step(model, tx, accum_steps=accum)(
        initial_state(params, tx), batch, jax.random.key(0)
    )
    results[accum] = (checkpoint.flatten(host(new.params)), metrics)
  before = checkpoint.flatten(host(params))
  (one, m_one), (four, m_four) = results[1], results[4]
  np.testing.assert_allclose(m_four['loss'], m_one['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_four['grad_norm'], m_one['grad_norm'], rtol=1e-5)
  for key, start in before.items():
    update_one, update_four = one[key] - start, four[key] - start
    largest = np.abs(update_one).max()
    if key.endswith('/key/bias'):
      # Adding a vector to every key shifts all of a query's scores by the
      # same amount, which the softmax ignores: its gradient is exactly 0.
      assert largest < 1e-3 and np.abs(update_four).max() < 1e-3, key
      continue
    assert largest > 1e-2, key  # Every other parameter tensor moves.
    np.testing.assert_allclose(
        update_four, update_one, rtol=1e-4, atol=1e-4 * largest, err_msg=key
    )


@pytest.mark.parametrize('accum', [1, 4])
def test_accumulate_gradients_means_strided_micro_batches_with_a_key_each(
    accum,
):
  """Micro-batch k holds examples k, k + accum, ... and the key
  fold_in(rng, k); the loss, metrics and gradients are their means."""
  x = np.arange(16, dtype=np.float32)
  rng = jax.random.key(3)

  def loss_fn(w, batch, key):
    return w * batch['x'].mean(), {
        'micro_batch': batch['x'],
        'noise': jax.random.uniform(key),
    }

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, extra), grad = jax.jit(
      functools.partial(train.accumulate_gradients, grad_fn, accum_steps=accum)
  )(jnp.float32(2.0), {'x': x}, rng)
  micro_batches = [x[k::accum] for k in range(accum)]
  keys = (
      [rng]
      if accum == 1
      else [jax.random.fold_in(rng, k) for k in range(accum)]
  )
  np.testing.assert_allclose(
      extra['micro_batch'], np.mean(micro_batches, axis=0)
  )
  np.testing.assert_allclose(
      extra['noise'], np.mean([jax.random.uniform(k) for k in keys]), rtol=1e-6
  )
  np.testing.assert_allclose(loss, 2.0 * x.mean(), rtol=1e-6)
  np.testing.assert_allclose(grad, x.mean(), rtol=1e-6)


def test_each_micro_batch_draws_its_own_dropout():
  """Identical micro-batches: with one key for all of them, 2 and 4
  micro-batches would give the same loss; with a key each they average 2 and
  4 different dropout draws. Without dropout the two losses agree."""

  def losses(dropout):
    model, params, batch = tiny_vit(dropout)
    tx = plain_sgd()
    out = []
    for accum in (2, 4):
      # Micro-batch k holds examples k, k + accum, ...: repeating each
      # example `accum` times makes every micro-batch the same 8 examples.
      same = {k: np.repeat(v, accum, axis=0) for k, v in batch.items()}
      _, metrics = jitted_step(model, tx, accum_steps=accum)(
          initial_state(params, tx), same, jax.random.key(0)
      )
      out.append(float(metrics['loss']))
    return out

  without = losses(0.0)
  np.testing.assert_allclose(without[0], without[1], rtol=1e-6)
  with_dropout = losses(0.3)
  assert abs(with_dropout[0] - with_dropout[1]) > 1e-3, with_dropout


# ----------------------------------------------------------------------------
# EMA.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('decay', [0.5, 0.9, 0.0])
def test_ema_follows_the_recurrence_of_post_update_parameters(decay):
  """ema_0 = initial params; ema_t = d * ema_{t-1} + (1 - d) * params_t."""
  model, params, batch = linear_problem(seed=1)
  tx = plain_sgd(lr=0.3)
  step = jitted_step(model, tx, ema_decay=decay)
  state = initial_state(params, tx, ema=True)
  expected = host(params)
  for _ in range(4):
    state, _ = step(state, batch, jax.random.key(0))
    expected = jax.tree_util.tree_map(
        lambda e, p: decay * e + (1 - decay) * p, expected, host(state.params)
    )
  for key, value in checkpoint.flatten(expected).items():
    np.testing.assert_allclose(
        checkpoint.flatten(state.ema_params)[key],
        value,
        rtol=1e-6,
        atol=1e-7,
        err_msg=key,
    )
  moved = (
      checkpoint.flatten(host(state.params))['head/kernel']
      - checkpoint.flatten(host(params))['head/kernel']
  )
  assert np.abs(moved).max() > 1e-3  # The parameters did change.


def tiny_run_config(tfds_dir, ema_decay):
  from configs import digits  # pylint: disable=g-import-not-at-top

  config = digits.get_config('runlocal')
  config.model_name = 'testing'
  config.tfds_data_dir = tfds_dir
  config.evals.fewshot.every = 0
  config.base_lr = 0.1  # Large steps: EMA and raw parameters differ.
  config.ema_decay = ema_decay
  return config


@pytest.mark.parametrize('ema_decay', [0.5, None])
def test_evaluation_and_final_params_use_ema_only_when_it_is_on(
    tmp_path, ema_decay
):
  tfds_dir = str(tmp_path / 'tfds')
  config = tiny_run_config(tfds_dir, ema_decay)
  workdir = str(tmp_path / 'run')
  metrics = train.train_and_evaluate(config, workdir)
  final = checkpoint.flatten(
      checkpoint.load(os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE))
  )
  _, raw = run_checkpoints.load_params(workdir, ema=False)
  raw = checkpoint.flatten(raw)
  if ema_decay is None:
    expected = raw
  else:
    _, ema = run_checkpoints.load_params(workdir, ema=True)
    expected = checkpoint.flatten(ema)
    assert any(not np.allclose(raw[k], expected[k]) for k in raw)
  assert sorted(final) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(final[key], expected[key], err_msg=key)
  # The run's evaluation is that of the parameters it exported: its loss
  # equals numpy's cross-entropy of their logits over the test split.
  exported = eval_loss(config, checkpoint.unflatten(final))
  np.testing.assert_allclose(metrics['eval/loss'], exported, rtol=1e-5)
  if ema_decay is not None:
    assert (
        abs(eval_loss(config, checkpoint.unflatten(raw)) - metrics['eval/loss'])
        > 1e-4
    )


def eval_loss(config, params):
  """Mean cross-entropy of `params` on the config's test split (numpy)."""
  run = config_lib.parse(config)
  model = vit_jax.models.get_model(num_classes=10, **run.model.model_args())
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  dataset, _ = input_pipeline.eval_dataset(
      run.data, process_index=0, process_count=1
  )
  total, count = 0.0, 0
  for batch in dataset.as_numpy_iterator():
    real = batch['mask'] > 0
    logits = np.asarray(apply(params, batch['image']))[real]
    total += numpy_xent(logits, batch['labels'][real]) * real.sum()
    count += real.sum()
  assert count == 299  # digits' test split.
  return total / count


def _compiled_scan_step(num_layers):
  """The optimised HLO text of a scanned ViT's train step (dropout on)."""
  model = vit_jax.models.get_model(
      'testing',
      num_classes=5,
      scan=True,
      transformer={'num_layers': num_layers, 'dropout_rate': 0.1},
  )
  tx = optax.sgd(0.1, momentum=0.9)
  images = jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32)
  params = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False)['params'], images
  )
  state = jax.eval_shape(lambda p: initial_state(p, tx), params)
  batch = {'image': images, 'labels': jax.ShapeDtypeStruct((4, 5), jnp.float32)}
  key = jax.eval_shape(lambda: jax.random.key(1))
  return jitted_step(model, tx).lower(state, batch, key).compile().as_text()


def _opcode_counts(hlo_text):
  """Instructions per opcode of an HLO module's text."""
  counts = collections.Counter()
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(ROOT )?%\S+ = .*?\b([a-z][\w-]*)\(', line)
    if match:
      counts[match.group(2)] += 1
  return counts


def test_scanned_train_step_compiles_to_the_same_program_at_any_depth():
  # Issue 17, item 6: with scan, depth is only the trip count of the
  # forward and backward loops (the other while loops are XLA's threefry
  # for the dropout bits), so compile time cannot grow with it. An unrolled
  # layer or anything done once per layer outside the loops would add
  # instructions to the deeper program.
  shallow = _opcode_counts(_compiled_scan_step(3))
  deep = _opcode_counts(_compiled_scan_step(7))
  assert sum(shallow.values()) > 1000 and shallow['while'] >= 2
  assert shallow == deep
