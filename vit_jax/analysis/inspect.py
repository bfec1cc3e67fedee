"""What a trained ViT learned (paper §4.5, Figure 7, Appendix D.7/D.8).

Every function returns numpy arrays; `vit_jax.analysis.plots` draws them.

* `attention_weights`: the softmax attention of every layer and head, from
  the `attention_weights` intermediates the model sows.
* `attention_rollout`: Abnar & Zuidema (2020): average the heads, add the
  identity for the residual connection, renormalise the rows, and multiply
  the layers' matrices; `class_token_map` puts the class token's row on the
  patch grid.
* `mean_attention_distance`: per layer and head, the image-space distance
  between a query patch and the patches it attends to, weighted by the
  attention (the "receptive field size" of Figure 7, right).
* `position_embedding_similarity`: cosine similarity of every position
  embedding with every other one (Figure 7, centre).
* `embedding_filters`: principal components of the patch-embedding filters
  (Figure 7, left).
"""

from collections.abc import Sequence
from typing import Any

import flax
import jax
import numpy as np

_ATTENTION = 'MultiHeadDotProductAttention_0'


def _unfreeze(tree: Any) -> Any:
  return (
      flax.core.unfreeze(tree)
      if isinstance(tree, flax.core.FrozenDict)
      else tree
  )


def attention_weights(
    model: flax.linen.Module, params: Any, images: np.ndarray
) -> np.ndarray:
  """Attention weights of every encoder block.

  Args:
    model: A `VisionTransformer` (plain or hybrid; loop or scan layout).
    params: Its parameters.
    images: `[batch, height, width, 3]` in [-1, 1].

  Returns:
    float32 `[layers, batch, heads, tokens, tokens]`; each row sums to 1.

  Raises:
    ValueError: the model has no attention (e.g. MLP-Mixer).
  """

  @jax.jit
  def run(params, images):
    _, state = model.apply(
        {'params': params}, images, train=False, mutable=['intermediates']
    )
    return state['intermediates']

  inter = _unfreeze(jax.device_get(run(params, images)))
  encoder = inter.get('Transformer', {})
  if 'encoderblock' in encoder:  # Scan layout: layers already stacked.
    stacked = encoder['encoderblock'][_ATTENTION]['attention_weights'][0]
    return np.asarray(stacked, np.float32)
  blocks = sorted(
      (k for k in encoder if k.startswith('encoderblock_')),
      key=lambda k: int(k.rsplit('_', 1)[1]),
  )
  if not blocks:
    raise ValueError(
        f'{type(model).__name__} sows no attention weights: attention maps '
        'exist only for ViT and hybrid models (not MLP-Mixer).'
    )
  return np.stack(
      [
          np.asarray(encoder[b][_ATTENTION]['attention_weights'][0], np.float32)
          for b in blocks
      ]
  )


def attention_rollout(
    weights: np.ndarray, *, add_residual: bool = True
) -> np.ndarray:
  """Attention rollout through all layers.

  Args:
    weights: `[layers, batch, heads, tokens, tokens]` (`attention_weights`).
    add_residual: Add the identity (the residual path) before renormalising.

  Returns:
    `[batch, tokens, tokens]`: how much each output token draws on each
    input token; rows sum to 1.
  """
  weights = np.asarray(weights, np.float64)
  mean = weights.mean(axis=2)  # Average the heads: [layers, batch, T, T].
  if add_residual:
    mean = mean + np.eye(mean.shape[-1])
    mean = mean / mean.sum(axis=-1, keepdims=True)
  joint = mean[0]
  for layer in mean[1:]:
    joint = layer @ joint
  return joint.astype(np.float32)


def class_token_map(
    rollout: np.ndarray, grid: tuple[int, int], *, has_class_token: bool = True
) -> np.ndarray:
  """The rollout of the output token onto the patch grid, scaled to max 1.

  Args:
    rollout: `[batch, tokens, tokens]` from `attention_rollout`.
    grid: Patch grid `(rows, cols)`.
    has_class_token: The first token is the class token. Without one (GAP
      models) the rows of all patches are averaged instead.

  Returns:
    `[batch, rows, cols]`.
  """
  if has_class_token:
    row = rollout[:, 0, 1:]
  else:
    row = rollout.mean(axis=1)
  maps = row.reshape((row.shape[0],) + tuple(grid))
  return maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)


def patch_distances(
    grid: tuple[int, int], patch_size: tuple[int, int]
) -> np.ndarray:
  """Pixel distance between the centres of every pair of patches.

  Returns:
    `[rows * cols, rows * cols]`, patches in row-major order.
  """
  rows, cols = np.meshgrid(
      np.arange(grid[0]), np.arange(grid[1]), indexing='ij'
  )
  centres = np.stack(
      [rows.ravel() * patch_size[0], cols.ravel() * patch_size[1]], axis=-1
  ).astype(np.float64)
  return np.linalg.norm(centres[:, None] - centres[None], axis=-1)


def mean_attention_distance(
    weights: np.ndarray,
    grid: tuple[int, int],
    patch_size: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
) -> np.ndarray:
  """Mean attention distance in pixels, per layer and head (Figure 7 right).

  For each query patch, the distances to the key patches are weighted by the
  attention; the weights over patches are renormalised to sum to 1 (the
  class token has no position), then averaged over query patches and images.

  Args:
    weights: `[layers, batch, heads, tokens, tokens]`.
    grid: Patch grid `(rows, cols)`.
    patch_size: Pixels per patch `(height, width)` (for hybrids: the total
      stride of a patch on the image).
    num_prefix_tokens: Tokens before the patches (1 for the class token).

  Returns:
    `[layers, heads]` mean distances in pixels.
  """
  weights = np.asarray(weights, np.float64)
  patches = weights[..., num_prefix_tokens:, num_prefix_tokens:]
  patches = patches / np.maximum(patches.sum(-1, keepdims=True), 1e-12)
  distance = patch_distances(grid, patch_size)
  per_query = (patches * distance).sum(-1)  # [layers, batch, heads, queries]
  return per_query.mean(axis=(1, 3)).astype(np.float32)


def position_embedding_similarity(
    posemb: np.ndarray, grid: tuple[int, int], *, has_class_token: bool = True
) -> np.ndarray:
  """Cosine similarity between position embeddings (Figure 7 centre).

  Args:
    posemb: `[1, tokens, hidden]` (`Transformer/posembed_input/pos_embedding`).
    grid: Patch grid `(rows, cols)`.
    has_class_token: Drop the class token's embedding first.

  Returns:
    `[rows, cols, rows, cols]`: entry `[i, j]` is the similarity map of the
    patch at row i, column j with every patch.
  """
  emb = np.asarray(posemb, np.float64)[0]
  if has_class_token:
    emb = emb[1:]
  if emb.shape[0] != grid[0] * grid[1]:
    raise ValueError(
        f'{emb.shape[0]} position embeddings do not fill a '
        f'{grid[0]}x{grid[1]} grid.'
    )
  unit = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  sim = unit @ unit.T
  return sim.reshape(grid + grid).astype(np.float32)


def embedding_filters(
    kernel: np.ndarray, num_components: int = 28
) -> tuple[np.ndarray, np.ndarray]:
  """Principal components of the patch-embedding filters (Figure 7 left).

  Args:
    kernel: `embedding/kernel`, `[ph, pw, 3, hidden]`: one RGB filter per
      hidden unit.
    num_components: How many components to return.

  Returns:
    (`[n, ph, pw, 3]` components, `[n]` explained-variance ratios), the
    strongest first.
  """
  kernel = np.asarray(kernel, np.float64)
  ph, pw, channels, hidden = kernel.shape
  filters = kernel.reshape(ph * pw * channels, hidden).T  # [hidden, pixels]
  filters = filters - filters.mean(axis=0, keepdims=True)
  _, singular, components = np.linalg.svd(filters, full_matrices=False)
  variance = singular**2
  ratio = variance / max(variance.sum(), 1e-12)
  n = min(num_components, components.shape[0])
  return (
      components[:n].reshape(n, ph, pw, channels).astype(np.float32),
      ratio[:n].astype(np.float32),
  )


def grid_of(
    model: flax.linen.Module, image_size: int | Sequence[int]
) -> tuple[int, int]:
  """Patch grid (rows, cols) of a `VisionTransformer` at `image_size`.

  Args:
    model: The model (its `total_stride`).
    image_size: Side of a square image, or (height, width).
  """
  sh, sw = model.total_stride
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  return h // sh, w // sw
