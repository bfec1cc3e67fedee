"""Centred kernel alignment (CKA) between representations, in JAX.

Linear CKA (Kornblith et al., 2019) compares two representations of the same
examples, `x: [examples, p]` and `y: [examples, q]`, through their example
by example Gram matrices K = x xᵀ and L = y yᵀ:

  CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),

where HSIC measures how alike the two Gram matrices are after centring. It
is 1 for representations that differ by an orthogonal transform and an
isotropic scaling, and it does not need `p == q`.

`linear_cka` is the textbook full-batch value (all examples at once).
`MinibatchCKA` is the estimator of Nguyen, Raghu & Kornblith (2021, "Do wide
and deep networks learn the same things?") that scales to many examples: the
unbiased HSIC estimator (Song et al., 2012), HSIC_1, is averaged over
minibatches and the averages enter the ratio, so memory is one
batch x batch Gram per layer, never n x n for the whole dataset. Many layers
are compared at once: `hsic_sums` returns every pair's HSIC_1.

`make_hsic_fn` jits `hsic_sums` with the evaluators' shardings (batch split
over the mesh's data-like axes, replicated sums), so the accumulator runs on
one CPU or a pod slice alike.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import sharding

# HSIC_1 divides by n (n - 1) (n - 2) (n - 3): a batch needs 4 examples.
MIN_BATCH = 4


def _centred(x: jax.Array, mask: jax.Array) -> jax.Array:
  """`[n, ...] -> [n, features]` float32, real rows centred, padding zero.

  Centring does not change either HSIC (both are invariant to a shift of
  the features) but keeps the Gram entries small, which float32 needs when
  the features share a large mean (e.g. after a ReLU).
  """
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  weights = mask.astype(jnp.float32)[:, None]
  count = jnp.maximum(weights.sum(), 1.0)
  mean = (x * weights).sum(axis=0, keepdims=True) / count
  return (x - mean) * weights


def _offdiagonal_grams(xs: Sequence[jax.Array], mask: jax.Array) -> jax.Array:
  """`[layers, n, n]` Gram matrices with a zero diagonal (HSIC_1's K̃)."""
  grams = []
  for x in xs:
    x = _centred(x, mask)
    grams.append(x @ x.T)
  stacked = jnp.stack(grams)
  return stacked * (1.0 - jnp.eye(stacked.shape[-1], dtype=stacked.dtype))


def _hsic1(k: jax.Array, l: jax.Array, n: jax.Array, pairs: str) -> jax.Array:
  """Unbiased HSIC of stacked zero-diagonal Grams (Song et al. 2012, eq. 5).

  HSIC_1 = [tr(K̃L̃) + 1ᵀK̃1 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1]
           / (n (n-3)).

  Padding rows and columns are zero, so every sum runs over the real
  examples only and `n` (their count) is all the formula needs of the mask.

  Args:
    k: `[a, m, m]`.
    l: `[b, m, m]`.
    n: Real examples.
    pairs: 'all' for every (a, b) pair (`[a, b]`), 'diagonal' for a == b
      (`[a]`, k and l of the same length).

  Returns:
    HSIC_1 of each pair.
  """
  row_k, row_l = k.sum(-1), l.sum(-1)
  sum_k, sum_l = row_k.sum(-1), row_l.sum(-1)
  if pairs == 'all':
    trace = jnp.einsum('aij,bij->ab', k, l)
    cross = jnp.einsum('ai,bi->ab', row_k, row_l)
    product = sum_k[:, None] * sum_l[None, :]
  else:
    trace = jnp.einsum('aij,aij->a', k, l)
    cross = jnp.einsum('ai,ai->a', row_k, row_l)
    product = sum_k * sum_l
  # Clamped so that a too-small batch gives finite zeros, not NaNs; such a
  # batch is weighted 0 by `hsic_sums`.
  n = jnp.maximum(n, float(MIN_BATCH))
  return (trace + product / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (
      n * (n - 3)
  )


def hsic_sums(
    xs: Sequence[jax.Array],
    ys: Sequence[jax.Array] | None = None,
    mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """One minibatch's HSIC_1 of every pair of layers, for `MinibatchCKA`.

  Args:
    xs: Representations of model A, each `[batch, ...]` (flattened to
      `[batch, features]`; the batch is the leading axis of every entry).
    ys: Model B's; None compares `xs` with itself (one Gram per layer).
    mask: `[batch]`, 1 for real examples, 0 for padding; None: all real.

  Returns:
    {'xy': `[len(xs), len(ys)]` HSIC_1(K_i, L_j), 'xx': `[len(xs)]`
    HSIC_1(K_i, K_i), 'yy': `[len(ys)]`, 'batches': 1.0, or zeros when the
    batch has fewer than `MIN_BATCH` real examples (it is then ignored)}.
  """
  batch = xs[0].shape[0]
  for x in list(xs) + list(ys or []):
    if x.shape[0] != batch:
      raise ValueError(
          f'Every representation needs the same examples: got leading '
          f'dimensions {x.shape[0]} and {batch}.'
      )
  if mask is None:
    mask = jnp.ones((batch,), jnp.float32)
  n = mask.astype(jnp.float32).sum()
  k = _offdiagonal_grams(xs, mask)
  l = k if ys is None else _offdiagonal_grams(ys, mask)
  xx = _hsic1(k, k, n, 'diagonal')
  sums = {
      'xy': _hsic1(k, l, n, 'all'),
      'xx': xx,
      'yy': xx if ys is None else _hsic1(l, l, n, 'diagonal'),
  }
  used = (n >= MIN_BATCH).astype(jnp.float32)
  sums = {key: value * used for key, value in sums.items()}
  sums['batches'] = used
  return sums


def cka_from_sums(sums: dict[str, Any]) -> np.ndarray:
  """`[len(xs), len(ys)]` minibatch CKA from summed `hsic_sums`.

  The means over batches of Nguyen et al. (2021) are the sums divided by
  the batch count, which cancels in the ratio.

  Raises:
    ValueError: no batch had `MIN_BATCH` real examples.
  """
  sums = jax.device_get(sums)
  if float(sums['batches']) < 1:
    raise ValueError(
        f'Minibatch CKA needs batches of at least {MIN_BATCH} '
        'examples; none was added.'
    )
  xy = np.asarray(sums['xy'], np.float64)
  norm = np.sqrt(
      np.outer(
          np.asarray(sums['xx'], np.float64), np.asarray(sums['yy'], np.float64)
      )
  )
  # HSIC_1 of a Gram with itself can come out <= 0 only for a (near-)
  # constant representation, whose CKA with anything is undefined.
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(norm > 0, xy / norm, np.nan)


def make_hsic_fn(
    mesh: jax.sharding.Mesh,
) -> Callable[..., dict[str, jax.Array]]:
  """`hsic_sums` jitted like the evaluators: batch in, replicated sums out.

  Args:
    mesh: Device mesh; the batch axis of every input is split over its
      data-like axes (`sharding.batch_sharding`), and the compiler adds the
      collectives the Grams need, so the sums do not depend on the mesh.

  Returns:
    `fn(xs, ys, mask)` -> `hsic_sums` dict (`ys` may be None).
  """
  batch = sharding.batch_sharding(mesh)
  return jax.jit(
      hsic_sums,
      in_shardings=(batch, batch, batch),
      out_shardings=sharding.replicated(mesh),
  )


class MinibatchCKA:
  """Accumulates HSIC_1 over minibatches; `result()` is the CKA matrix.

  Example::

    acc = MinibatchCKA()
    for xs, ys in batches:  # Lists of [batch, ...] arrays, same examples.
      acc.update(xs, ys)
    matrix = acc.result()   # [len(xs), len(ys)]

  The totals stay on the devices until `result()` (one host sync). Batches
  are weighted equally, as in Nguyen et al. (2021); pad a short last batch
  and pass its `mask` rather than dropping it.

  Attributes:
    sums: The running totals (None before the first batch).
  """

  def __init__(
      self, hsic_fn: Callable[..., dict[str, jax.Array]] | None = None
  ):
    """An empty accumulator.

    Args:
      hsic_fn: `fn(xs, ys, mask)` -> one batch's sums (default: jitted
        `hsic_sums` on the default device; `make_hsic_fn(mesh)` shards the
        batch over a mesh).
    """
    self._fn = hsic_fn or jax.jit(hsic_sums)
    self.sums: dict[str, jax.Array] | None = None

  def add(self, sums: dict[str, jax.Array]) -> None:
    """Adds one batch's `hsic_sums` (computed elsewhere, e.g. with a model)."""
    self.sums = (
        sums
        if self.sums is None
        else jax.tree_util.tree_map(jnp.add, self.sums, sums)
    )

  def update(
      self, xs: Sequence[Any], ys: Sequence[Any] | None = None, mask: Any = None
  ) -> None:
    """Adds the batch `xs` (and `ys`: the same examples), see `hsic_sums`."""
    if mask is None:
      mask = np.ones((np.shape(xs[0])[0],), np.float32)
    self.add(self._fn(list(xs), None if ys is None else list(ys), mask))

  def result(self) -> np.ndarray:
    """The minibatch CKA matrix `[len(xs), len(ys)]`, float64."""
    if self.sums is None:
      raise ValueError('MinibatchCKA.result() before any update().')
    return cka_from_sums(self.sums)


def linear_cka(x: Any, y: Any, *, unbiased: bool = False) -> float:
  """Full-batch linear CKA of two representations of the same examples.

  Computed from the n x n Grams when there are no more examples than
  features, else from the feature cross-products (`[p, q]`), so that many
  examples of a narrow layer do not need an n x n matrix.

  Args:
    x: `[examples, p]`.
    y: `[examples, q]`.
    unbiased: Use HSIC_1 (as the minibatch estimator does) instead of the
      biased HSIC of the centred Grams (Kornblith et al. 2019).

  Returns:
    CKA in [0, 1] (the unbiased value may stray slightly outside).

  Raises:
    ValueError: the example counts differ, or an input is not 2-D.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.ndim != 2 or y.ndim != 2:
    raise ValueError(
        f'linear_cka takes [examples, features] arrays; got x '
        f'of shape {x.shape} and y of shape {y.shape}.'
    )
  if x.shape[0] != y.shape[0]:
    raise ValueError(
        f'linear_cka: x has {x.shape[0]} examples and y has {y.shape[0]}; '
        'both must be representations of the same examples.'
    )
  if unbiased and x.shape[0] < MIN_BATCH:
    raise ValueError(
        f'The unbiased linear_cka needs at least {MIN_BATCH} '
        f'examples; got {x.shape[0]}.'
    )
  xy, xx, yy = _full_batch_hsic(x, y, unbiased=unbiased)
  return float(xy / jnp.sqrt(xx * yy))


@functools.partial(jax.jit, static_argnames='unbiased')
def _full_batch_hsic(
    x: jax.Array, y: jax.Array, *, unbiased: bool
) -> tuple[jax.Array, ...]:
  """(HSIC(x, y), HSIC(x, x), HSIC(y, y)), up to a common factor."""
  n = x.shape[0]
  ones = jnp.ones((n,), jnp.float32)
  # Centred features give centred Grams (K_c = H x xᵀ H = x_c x_cᵀ); HSIC_1
  # does not change under the shift.
  x, y = _centred(x, ones), _centred(y, ones)
  if n <= max(x.shape[1], y.shape[1]):  # The Grams are the smaller route.
    if unbiased:
      sums = hsic_sums([x], [y])
      return sums['xy'][0, 0], sums['xx'][0], sums['yy'][0]
    k, l = x @ x.T, y @ y.T
    return (k * l).sum(), (k * k).sum(), (l * l).sum()

  # Feature route: tr(K L) = ||xᵀ y||², and for HSIC_1 the Grams' diagonals
  # |x_i|² come out (with centred features the row sums of the
  # zero-diagonal Gram are -|x_i|², its total -sum_i |x_i|²).
  def hsic(a, b):
    trace = jnp.sum((a.T @ b) ** 2)
    if not unbiased:
      return trace
    norms_a, norms_b = (a * a).sum(-1), (b * b).sum(-1)
    diagonal = (norms_a * norms_b).sum()
    return (
        (trace - diagonal)
        + norms_a.sum() * norms_b.sum() / ((n - 1) * (n - 2))
        - 2.0 * diagonal / (n - 2)
    ) / (n * (n - 3))

  return hsic(x, y), hsic(x, x), hsic(y, y)


__all__ = [
    'MIN_BATCH',
    'MinibatchCKA',
    'cka_from_sums',
    'hsic_sums',
    'linear_cka',
    'make_hsic_fn',
]
