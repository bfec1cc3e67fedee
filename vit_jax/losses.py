"""Classification losses shared by training and evaluation."""

import jax
import jax.numpy as jnp
import optax

LOSSES = ('softmax_xent', 'sigmoid_xent')


def per_example_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    kind: str = 'softmax_xent',
    label_smoothing: float = 0.0,
) -> jax.Array:
  """Cross-entropy per example (float32), with optional label smoothing.

  Args:
    logits: `[batch, classes]`.
    labels: `[batch, classes]` one-hot (or multi-hot for sigmoid).
    kind: 'softmax_xent' or 'sigmoid_xent' (summed over classes, as in the
      paper's JFT pre-training).
    label_smoothing: Factor for `optax.smooth_labels`.

  Returns:
    `[batch]` losses.
  """
  logits = logits.astype(jnp.float32)
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  if kind == 'softmax_xent':
    return optax.softmax_cross_entropy(logits, labels)
  if kind == 'sigmoid_xent':
    return optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1)
  raise ValueError(f'config.loss={kind!r}; use one of {LOSSES}.')
