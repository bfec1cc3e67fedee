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
        'pip install matplotlib).'
    ) from e
  matplotlib.use('Agg')  # Files only; no display needed.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110, bbox_inches='tight')
  os.replace(tmp, path)
  return path


def plot_filters(components: np.ndarray, ratios: np.ndarray, path: str) -> str:
  """Principal components of the embedding filters as RGB tiles."""
  plt = _pyplot()
  n = len(components)
  cols = min(7, n)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(
      rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False
  )
  for ax in axes.ravel():
    ax.axis('off')
  for i, (comp, ratio) in enumerate(zip(components, ratios)):
    low, high = comp.min(), comp.max()
    axes.ravel()[i].imshow(
        (comp - low) / max(high - low, 1e-12), interpolation='nearest'
    )
    axes.ravel()[i].set_title(f'{100 * ratio:.1f}%', fontsize=7)
  fig.suptitle('RGB embedding filters (first principal components)')
  return _save(fig, path)


def plot_position_similarity(similarity: np.ndarray, path: str) -> str:
  """Figure 7 centre: one tile per patch position, similarity to all."""
  plt = _pyplot()
  rows, cols = similarity.shape[:2]
  fig, axes = plt.subplots(
      rows, cols, figsize=(0.5 * cols + 1, 0.5 * rows), squeeze=False
  )
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
    ax.scatter(
        np.arange(layers) + 1, distance[:, h], s=12, label=f'head {h + 1}'
    )
  ax.set_xlabel('network depth (layer)')
  ax.set_ylabel('mean attention distance (pixels)')
  ax.set_xticks(np.arange(layers) + 1)
  if heads <= 16:
    ax.legend(fontsize=6, ncol=2)
  return _save(fig, path)


def plot_rollout(
    images: np.ndarray,
    maps: np.ndarray,
    path: str,
    titles: list[str] | None = None,
) -> str:
  """Each image next to its rollout map overlaid on it."""
  plt = _pyplot()
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.3), squeeze=False)
  for i in range(n):
    image = np.clip((np.asarray(images[i]) + 1) / 2, 0, 1)
    height, width = image.shape[:2]
    mask = np.kron(
        maps[i], np.ones((height // maps.shape[1], width // maps.shape[2]))
    )
    axes[0, i].imshow(image, interpolation='nearest')
    axes[1, i].imshow(image * mask[..., None], interpolation='nearest')
    if titles:
      axes[0, i].set_title(titles[i], fontsize=7)
    for ax in axes[:, i]:
      ax.axis('off')
  fig.suptitle('Attention rollout (bottom: image x class-token map)')
  return _save(fig, path)


def _cka_heatmap(
    ax,
    matrix: np.ndarray,
    row_labels: list[str],
    col_labels: list[str],
    title: str,
    ylabel: str,
    xlabel: str,
):
  """Draws one CKA matrix on `ax`: rows bottom-up (depth grows upwards)."""
  image = ax.imshow(
      matrix,
      origin='lower',
      vmin=0,
      vmax=1,
      cmap='magma',
      interpolation='nearest',
      aspect='auto',
  )
  # Every label while they fit; every k-th for deep models.
  rows = max(1, len(row_labels) // 16)
  cols = max(1, len(col_labels) // 16)
  ax.set_yticks(
      np.arange(0, len(row_labels), rows), row_labels[::rows], fontsize=6
  )
  ax.set_xticks(
      np.arange(0, len(col_labels), cols),
      col_labels[::cols],
      fontsize=6,
      rotation=90,
  )
  ax.set_title(title, fontsize=8)
  ax.set_ylabel(ylabel, fontsize=7)
  ax.set_xlabel(xlabel, fontsize=7)
  return image


def plot_cka(
    matrix: np.ndarray,
    path: str,
    row_labels: list[str],
    col_labels: list[str],
    *,
    title: str,
    ylabel: str = 'layer',
    xlabel: str = 'layer',
) -> str:
  """A layer-by-layer CKA heatmap (Raghu et al. 2021, Figure 1 style)."""
  plt = _pyplot()
  rows, cols = matrix.shape
  fig, ax = plt.subplots(figsize=(1.5 + 0.22 * cols, 1.2 + 0.22 * rows))
  image = _cka_heatmap(
      ax, matrix, row_labels, col_labels, title, ylabel, xlabel
  )
  fig.colorbar(image, ax=ax, shrink=0.8, label='CKA')
  return _save(fig, path)


def plot_cka_sheet(
    heatmaps: list[dict],
    with_input: list[dict],
    distances: list[dict],
    path: str,
) -> str:
  """One sheet: CKA heatmaps, each block's CKA with its input, and the mean
  attention distance of each head by depth.

  Args:
    heatmaps: [{'matrix', 'rows', 'cols' (tick labels), 'title', 'ylabel',
      'xlabel'}], one panel each (within A, within B, A vs B).
    with_input: [{'name', 'values'}]: per model, its blocks' CKA
      with their inputs (one line each).
    distances: [{'name', 'distance' ([layers, heads] pixels)}] for the
      models with attention (may be empty).
    path: The PNG.

  Returns:
    `path`.
  """
  plt = _pyplot()
  top = max(len(heatmaps), 1)
  bottom = 1 + len(distances)
  cols = max(top, bottom)
  fig = plt.figure(figsize=(3.4 * cols, 6.4))
  grid = fig.add_gridspec(
      2, cols, height_ratios=(1.15, 1), hspace=0.55, wspace=0.45
  )
  image = None
  for i, panel in enumerate(heatmaps):
    image = _cka_heatmap(
        fig.add_subplot(grid[0, i]),
        panel['matrix'],
        panel['rows'],
        panel['cols'],
        panel['title'],
        panel['ylabel'],
        panel['xlabel'],
    )
  if image is not None:
    fig.colorbar(image, ax=fig.axes[: len(heatmaps)], shrink=0.8, label='CKA')
  ax = fig.add_subplot(grid[1, 0])
  for line in with_input:
    ax.plot(
        np.arange(len(line['values'])) + 1,
        line['values'],
        'o-',
        markersize=3,
        label=line['name'],
    )
  ax.set_ylim(0, 1.05)
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.set_xlabel('block (in depth order)', fontsize=7)
  ax.set_ylabel('CKA(block output, block input)', fontsize=7)
  ax.set_title('How much of its input a block keeps', fontsize=8)
  ax.tick_params(labelsize=6)
  if with_input:
    ax.legend(fontsize=6)
  for i, panel in enumerate(distances):
    ax = fig.add_subplot(grid[1, 1 + i])
    layers, heads = panel['distance'].shape
    for h in range(heads):
      ax.scatter(
          np.arange(layers) + 1,
          panel['distance'][:, h],
          s=10,
          label=f'head {h + 1}',
      )
    ax.set_xticks(np.arange(layers) + 1)
    ax.set_xlabel('encoder block', fontsize=7)
    ax.set_ylabel('mean attention distance (px)', fontsize=7)
    ax.set_title(f'{panel["name"]}: attention distance', fontsize=8)
    ax.tick_params(labelsize=6)
    if heads <= 8:
      ax.legend(fontsize=5)
  return _save(fig, path)
