"""PNG figures of the inspection arrays (needs matplotlib: `.[plot]`).

Each function takes the arrays from `vit_jax.analysis.inspect`, writes one
PNG and returns its path.
"""

import os

import numpy as np


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'The figures need matplotlib: pip install -e ".[plot]" (or '
        'pip install matplotlib).') from e
  matplotlib.use('Agg')  # Files only; no display needed.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110, bbox_inches='tight')
  os.replace(tmp, path)
  return path


def plot_filters(components: np.ndarray, ratios: np.ndarray,
                 path: str) -> str:
  """Principal components of the embedding filters as RGB tiles."""
  plt = _pyplot()
  n = len(components)
  cols = min(7, n)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows),
                           squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for i, (comp, ratio) in enumerate(zip(components, ratios)):
    low, high = comp.min(), comp.max()
    axes.ravel()[i].imshow((comp - low) / max(high - low, 1e-12),
                           interpolation='nearest')
    axes.ravel()[i].set_title(f'{100 * ratio:.1f}%', fontsize=7)
  fig.suptitle('RGB embedding filters (first principal components)')
  return _save(fig, path)


def plot_position_similarity(similarity: np.ndarray, path: str) -> str:
  """Figure 7 centre: one tile per patch position, similarity to all."""
  plt = _pyplot()
  rows, cols = similarity.shape[:2]
  fig, axes = plt.subplots(rows, cols, figsize=(0.5 * cols + 1, 0.5 * rows),
                           squeeze=False)
  for i in range(rows):
    for j in range(cols):
      ax = axes[i, j]
      image = ax.imshow(similarity[i, j], vmin=-1, vmax=1, cmap='viridis')
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(str(i + 1), fontsize=6)
      if i == rows - 1:
        ax.set_xlabel(str(j + 1), fontsize=6)
  fig.colorbar(image, ax=axes, shrink=0.6, label='cosine similarity')
  fig.suptitle('Position embedding similarity')
  return _save(fig, path)


def plot_attention_distance(distance: np.ndarray, path: str) -> str:
  """Figure 7 right: mean attention distance of each head vs. depth."""
  plt = _pyplot()
  layers, heads = distance.shape
  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  for h in range(heads):
    ax.scatter(np.arange(layers) + 1, distance[:, h], s=12,
               label=f'head {h + 1}')
  ax.set_xlabel('network depth (layer)')
  ax.set_ylabel('mean attention distance (pixels)')
  ax.set_xticks(np.arange(layers) + 1)
  if heads <= 16:
    ax.legend(fontsize=6, ncol=2)
  return _save(fig, path)


def plot_rollout(images: np.ndarray, maps: np.ndarray, path: str,
                 titles: list[str] | None = None) -> str:
  """Each image next to its rollout map overlaid on it."""
  plt = _pyplot()
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.3), squeeze=False)
  for i in range(n):
    image = np.clip((np.asarray(images[i]) + 1) / 2, 0, 1)
    height, width = image.shape[:2]
    mask = np.kron(maps[i], np.ones((height // maps.shape[1],
                                     width // maps.shape[2])))
    axes[0, i].imshow(image, interpolation='nearest')
    axes[1, i].imshow(image * mask[..., None], interpolation='nearest')
    if titles:
      axes[0, i].set_title(titles[i], fontsize=7)
    for ax in axes[:, i]:
      ax.axis('off')
  fig.suptitle('Attention rollout (bottom: image x class-token map)')
  return _save(fig, path)
