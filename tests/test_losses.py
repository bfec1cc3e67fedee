"""Known-answer tests of the classification losses and the masked evaluation.

`vit_jax.losses.per_example_loss` is compared with hand-derived values and a
numpy log-softmax / log-sigmoid; the evaluator
(`vit_jax.evaluators.classification`) with numpy on the model's logits, on
padded and unpadded batches.
"""

import math

import jax
import numpy as np
import pytest
import tensorflow as tf

from helpers import init_params
from helpers import random_images
from helpers import randomize
from helpers import tiny_model
from vit_jax import losses
from vit_jax import sharding
from vit_jax.evaluators import classification

LOG2 = math.log(2.0)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_log_sigmoid(x):
  # log σ(x) = -log(1 + e^{-x}), stable for large |x|.
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _np_softmax_xent(logits, labels):
  return -(np.asarray(labels, np.float64) * _np_log_softmax(logits)).sum(-1)


def _np_sigmoid_xent(logits, labels):
  y = np.asarray(labels, np.float64)
  # log(1 - σ(x)) = log σ(-x).
  return -(
      y * _np_log_sigmoid(logits)
      + (1 - y) * _np_log_sigmoid(-np.asarray(logits))
  ).sum(-1)


def _smooth(labels, alpha):
  labels = np.asarray(labels, np.float64)
  return (1 - alpha) * labels + alpha / labels.shape[-1]


def _loss(logits, labels, **kwargs):
  return np.asarray(
      losses.per_example_loss(
          np.asarray(logits, np.float32),
          np.asarray(labels, np.float32),
          **kwargs,
      )
  )


# ----------------------------------------------------------------------------
# Softmax cross-entropy.
# ----------------------------------------------------------------------------


def test_softmax_xent_hand_values():
  """p = softmax(log [1, 2, 1]) = [1/4, 1/2, 1/4]; label 1 costs log 2.

  With smoothing a the targets are [a/3, 1 - 2a/3, a/3] and the loss is
  (1 - 2a/3) log 2 + (2a/3) log 4 = (1 + 2a/3) log 2.
  """
  logits = np.log([[1.0, 2.0, 1.0]])
  labels = [[0.0, 1.0, 0.0]]
  np.testing.assert_allclose(_loss(logits, labels), [LOG2], rtol=1e-6)
  np.testing.assert_allclose(
      _loss(logits, labels, label_smoothing=0.1),
      [(1 + 0.2 / 3) * LOG2],
      rtol=1e-6,
  )
  # Uniform logits cost log 3 whatever the (smoothed) target.
  np.testing.assert_allclose(
      _loss(np.zeros((1, 3)), labels, label_smoothing=0.3),
      [math.log(3)],
      rtol=1e-6,
  )


def test_softmax_xent_matches_numpy_and_smoothing_shifts_it_exactly():
  """Smoothing a moves the loss by a * (mean_k(-log p_k) - (-log p_y))."""
  logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0], [30.0, -30.0, 0.0]])
  labels = np.eye(3)[[2, 0, 1]]
  plain = _loss(logits, labels)
  assert plain.dtype == np.float32 and plain.shape == (3,)
  np.testing.assert_allclose(plain, _np_softmax_xent(logits, labels), rtol=1e-5)
  alpha = 0.1
  smoothed = _loss(logits, labels, label_smoothing=alpha)
  np.testing.assert_allclose(
      smoothed, _np_softmax_xent(logits, _smooth(labels, alpha)), rtol=1e-5
  )
  nll = -_np_log_softmax(logits)
  shift = alpha * (nll.mean(-1) - (labels * nll).sum(-1))
  np.testing.assert_allclose(smoothed - plain, shift, rtol=1e-4, atol=1e-5)


def test_loss_is_float32_for_bfloat16_logits():
  """Low-precision logits are upcast before the log-softmax."""
  logits = np.array([[2.0, -1.0, 0.5]], np.float32)
  labels = np.array([[0.0, 0.0, 1.0]], np.float32)
  out = losses.per_example_loss(logits.astype(jax.numpy.bfloat16), labels)
  assert out.dtype == np.float32
  # The bf16 rounding of these logits is exact, so the float32 value holds.
  np.testing.assert_allclose(
      np.asarray(out), _np_softmax_xent(logits, labels), rtol=1e-6
  )


# ----------------------------------------------------------------------------
# Sigmoid cross-entropy.
# ----------------------------------------------------------------------------


def test_sigmoid_xent_is_summed_over_classes_hand_values():
  """σ(0) = 1/2, σ(log 3) = 3/4, σ(-log 3) = 1/4; labels [1, 0, 1].

  Loss = -log(1/2) - log(1 - 3/4) - log(1/4) = 5 log 2 (the class mean would
  be 5/3 log 2). Smoothing 0.3 over 3 classes gives targets
  [0.8, 0.1, 0.8]: -(0.8 + 0.2) log(1/2) - 0.1 log(3/4) - 0.9 log(1/4)
  - 0.8 log(1/4) - 0.2 log(3/4) = log 2 + 3.4 log 2 - 0.3 log(3/4).
  """
  logits = [[0.0, math.log(3), -math.log(3)]]
  labels = [[1.0, 0.0, 1.0]]
  np.testing.assert_allclose(
      _loss(logits, labels, kind='sigmoid_xent'), [5 * LOG2], rtol=1e-6
  )
  np.testing.assert_allclose(
      _loss(logits, labels, kind='sigmoid_xent', label_smoothing=0.3),
      [4.4 * LOG2 - 0.3 * math.log(0.75)],
      rtol=1e-6,
  )


@pytest.mark.parametrize('alpha', [0.0, 0.2])
def test_sigmoid_xent_matches_numpy(alpha):
  """Multi-hot labels, large logits (stable log-sigmoid), with smoothing."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 5)) * 3
  logits[0, :2] = [40.0, -40.0]  # Stable: no log(0) = inf.
  labels = (rng.random((4, 5)) < 0.4).astype(np.float64)
  labels[0, :2] = [0.0, 1.0]  # Confidently wrong: two terms of ~40 each.
  got = _loss(logits, labels, kind='sigmoid_xent', label_smoothing=alpha)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(
      got, _np_sigmoid_xent(logits, _smooth(labels, alpha)), rtol=1e-5
  )
  assert got[0] > 70


def test_unknown_loss_is_rejected():
  with pytest.raises(ValueError, match="loss='hinge'"):
    losses.per_example_loss(np.zeros((1, 3)), np.eye(3)[:1], kind='hinge')


# ----------------------------------------------------------------------------
# Evaluation ignores padded examples.
# ----------------------------------------------------------------------------

NUM_CLASSES = 7
NUM_REAL = 8
# Where the real examples sit among 16 (two batches of 8: 5 + 3 real).
REAL_POSITIONS = np.array([0, 2, 3, 5, 7, 9, 12, 14])
# Per real example, the ranks (0 = highest logit) of its positive classes:
# 4 of 8 have the top class (top-1 accuracy 1/2), 6 of 8 one of the top five
# (top-5 accuracy 3/4; ranks 4 and 5 are either side of the cut). Sigmoid
# examples get a second positive class.
SOFTMAX_RANKS = (0, 4, 0, 6, 0, 1, 0, 5)
SIGMOID_RANKS = ((0, 6), (4, 6), (0, 6), (6, 5), (0, 6), (1, 6), (0, 6), (5, 6))


def _real_labels(logits, kind):
  """Labels whose classes sit at the given ranks of each example's logits."""
  order = np.argsort(-logits, axis=-1)
  labels = np.zeros((NUM_REAL, NUM_CLASSES), np.float32)
  ranks = SOFTMAX_RANKS if kind == 'softmax_xent' else SIGMOID_RANKS
  for i, rank in enumerate(ranks):
    labels[i, order[i, list(np.atleast_1d(rank))]] = 1.0
  return labels


def _dataset(images, labels, mask):
  return tf.data.Dataset.from_tensor_slices(
      {'image': images, 'labels': labels, 'mask': mask.astype(np.float32)}
  ).batch(8, drop_remainder=True)


@pytest.fixture(scope='module')
def tiny_vit():
  model, size = tiny_model('vit', num_classes=NUM_CLASSES)
  images = random_images((NUM_REAL, size, size, 3), seed=3)
  params = randomize(init_params(model, images[:1]), seed=4)
  logits = np.asarray(
      jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
          params, images
      ),
      np.float64,
  )
  return model, params, images, logits


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['softmax_xent', 'sigmoid_xent'])
def test_evaluation_ignores_padded_examples(tiny_vit, kind):
  """Padding (mask 0, garbage images, all-ones labels) changes nothing.

  The garbage would add large losses and count as hits (every class is a
  label) if the mask were ignored. Both runs must equal numpy on the real
  examples' logits: the mean loss, top-1 1/2 and top-5 3/4 (by construction
  of the labels, and recounted from the logits).
  """
  model, params, images, logits = tiny_vit
  labels = _real_labels(logits, kind)
  mesh = sharding.make_mesh()
  shardings = jax.tree_util.tree_map(
      lambda _: sharding.replicated(mesh), params
  )
  eval_fn = classification.make_eval_fn(model, mesh, shardings, loss=kind)
  batch_sharding = sharding.batch_sharding(mesh)

  unpadded = classification.evaluate(
      params,
      eval_fn,
      _dataset(images, labels, np.ones(NUM_REAL)),
      batch_sharding,
  )

  rng = np.random.default_rng(5)
  padded_images = rng.uniform(-50, 50, size=(16,) + images.shape[1:]).astype(
      np.float32
  )
  padded_labels = np.ones((16, NUM_CLASSES), np.float32)
  mask = np.zeros(16)
  padded_images[REAL_POSITIONS] = images
  padded_labels[REAL_POSITIONS] = labels
  mask[REAL_POSITIONS] = 1.0
  padded = classification.evaluate(
      params,
      eval_fn,
      _dataset(padded_images, padded_labels, mask),
      batch_sharding,
  )

  # Numpy on the real examples.
  per_example = (
      _np_softmax_xent(logits, labels)
      if kind == 'softmax_xent'
      else _np_sigmoid_xent(logits, labels)
  )
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  top5_hits = np.take_along_axis(labels, top5, axis=-1).max(-1) > 0
  top1_hits = labels[np.arange(NUM_REAL), logits.argmax(-1)] > 0
  assert top1_hits.mean() == 0.5 and top5_hits.mean() == 0.75
  want = {
      'eval/loss': per_example.mean(),
      'eval/accuracy': 0.5,
      'eval/top5': 0.75,
      'eval/examples': float(NUM_REAL),
  }
  for metrics in (unpadded, padded):
    assert set(metrics) == set(want)
    for key, value in want.items():
      np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)
