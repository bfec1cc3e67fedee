"""Mixup: known answers for the mixing, lambda's law and seed, and the
train step's use of it (checked against NumPy)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import config_lib
from vit_jax import train
from vit_jax.objectives import classification


def _batch(seed=0, n=6, classes=4):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, 3, 3, 2)).astype(np.float32)
  labels = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]
  return images, labels


def test_mixed_labels_sum_to_one_and_each_example_mixes_its_neighbour():
  images, labels = _batch()
  mixed_images, mixed_labels, lam = classification.mixup(
      jax.random.key(3), images, labels, alpha=0.4
  )
  lam = float(lam)
  assert 0.5 <= lam <= 1.0
  np.testing.assert_allclose(
      np.asarray(mixed_labels).sum(axis=1), 1.0, rtol=1e-6
  )
  previous = np.concatenate([images[-1:], images[:-1]])  # Rolled by one.
  np.testing.assert_allclose(
      mixed_images, lam * images + (1 - lam) * previous, rtol=1e-6, atol=1e-6
  )
  previous = np.concatenate([labels[-1:], labels[:-1]])
  np.testing.assert_allclose(
      mixed_labels, lam * labels + (1 - lam) * previous, rtol=1e-6
  )


@pytest.mark.slow
def test_lambda_is_a_function_of_the_key_with_the_folded_beta_law():
  images, labels = _batch()
  draw = lambda key, alpha=1.0: float(
      classification.mixup(  # pylint: disable=g-long-lambda
          key, images, labels, alpha
      )[2]
  )
  assert draw(jax.random.key(5)) == draw(jax.random.key(5))
  assert draw(jax.random.key(5)) != draw(jax.random.key(6))
  # alpha = 1: lambda = max(U, 1 - U) for U uniform, mean 3/4, sd
  # sqrt(1/48) = 0.144; 2,000 draws: standard error 0.0032.
  lams = jax.vmap(lambda k: classification.mixup(k, images, labels, 1.0)[2])(
      jax.random.split(jax.random.key(0), 2000)
  )
  assert abs(float(jnp.mean(lams)) - 0.75) < 0.015
  assert float(jnp.min(lams)) >= 0.5
  # Small alpha piles Beta's mass at 0 and 1: lambda near 1 (mild mixing).
  lams = jax.vmap(lambda k: classification.mixup(k, images, labels, 0.1)[2])(
      jax.random.split(jax.random.key(1), 2000)
  )
  assert float(jnp.mean(lams)) > 0.9


class _Linear(nn.Module):

  @nn.compact
  def __call__(self, x, *, train):  # pylint: disable=redefined-outer-name
    del train
    return nn.Dense(4, kernel_init=nn.initializers.normal(0.5))(
        x.reshape(x.shape[0], -1)
    )


@pytest.mark.slow
def test_train_step_mixes_with_a_key_of_the_run_and_the_step():
  model = _Linear()
  images, labels = _batch(seed=1)
  params = model.init(jax.random.key(0), images, train=False)['params']
  tx = optax.sgd(0.1)
  state = train.TrainState(
      step=jnp.asarray(3, jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=None,
  )
  rng = jax.random.key(11)
  loss_fn = classification.loss_fn(model, mixup_alpha=0.3)
  step = jax.jit(
      lambda s, b, r: train.train_step(
          s, b, r, model=model, tx=tx, loss_fn=loss_fn
      )
  )
  batch = {'image': images, 'labels': labels}
  _, metrics = step(state, batch, rng)
  # The key: the run's, folded with the step, then with mixup's salt.
  key = jax.random.fold_in(jax.random.fold_in(rng, 3), 0x6D6978)
  beta = float(jax.random.beta(key, 0.3, 0.3))
  lam = max(beta, 1 - beta)
  assert float(metrics['mixup_lambda']) == pytest.approx(lam, rel=1e-6)
  # The loss of the mixed batch, in NumPy.
  mixed_x = lam * images + (1 - lam) * np.roll(images, 1, axis=0)
  mixed_y = lam * labels + (1 - lam) * np.roll(labels, 1, axis=0)
  kernel = np.asarray(params['Dense_0']['kernel'], np.float64)
  logits = mixed_x.reshape(6, -1) @ kernel + np.asarray(
      params['Dense_0']['bias']
  )
  logits -= logits.max(axis=1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  assert float(metrics['loss']) == pytest.approx(
      -(mixed_y * log_p).sum(axis=1).mean(), rel=1e-5
  )
  # Another step, another lambda; the same step again, the same one.
  _, again = step(state, batch, rng)
  assert float(again['mixup_lambda']) == float(metrics['mixup_lambda'])
  _, later = step(state.replace(step=state.step + 1), batch, rng)
  assert float(later['mixup_lambda']) != float(metrics['mixup_lambda'])


def test_mixup_alpha_is_checked_when_the_config_is_read():
  config = config_lib.get_base()
  config.mixup_alpha = -0.1
  with pytest.raises(ValueError, match='config.mixup_alpha=-0.1'):
    config_lib.parse(config)
  config.mixup_alpha = 0.2
  config.objective = 'mpp'
  with pytest.raises(ValueError, match="needs objective='classification'"):
    config_lib.parse(config)
