"""Inspecting a trained ViT: attention maps, rollout, attention distance,
position-embedding similarity and embedding filters (paper §4.5, Figure 7).

`inspect` computes the arrays, `plots` draws them, `analyze` does both for
one model and a batch of images; `python -m vit_jax.analysis` is the CLI.
"""

import json
import os
from typing import Any

import numpy as np

from vit_jax import fileio
from vit_jax.analysis import inspect
from vit_jax.analysis.inspect import attention_rollout
from vit_jax.analysis.inspect import attention_weights
from vit_jax.analysis.inspect import class_token_map
from vit_jax.analysis.inspect import embedding_filters
from vit_jax.analysis.inspect import grid_of
from vit_jax.analysis.inspect import mean_attention_distance
from vit_jax.analysis.inspect import position_embedding_similarity

FIGURES = ('filters.png', 'position_similarity.png', 'attention_distance.png',
           'rollout.png')
RESULTS_FILE = 'analysis.json'


def analyze(model: Any, params: Any, images: np.ndarray, out_dir: str, *,
            titles: list[str] | None = None,
            num_rollout_images: int = 8) -> dict[str, Any]:
  """Computes every inspection of `model` and writes the figures.

  Args:
    model: A `VisionTransformer` (plain or hybrid).
    params: Its parameters.
    images: `[n, size, size, 3]` in [-1, 1] (the paper averages the
      attention distance over 128 images).
    out_dir: Where `FIGURES` and `analysis.json` go.
    titles: One caption per image for the rollout figure (e.g. labels).
    num_rollout_images: Images shown in the rollout figure.

  Returns:
    The numbers written to `analysis.json`.
  """
  from vit_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  flat = checkpoint.flatten(params)
  grid = inspect.grid_of(model, images.shape[1])
  has_cls = model.classifier in ('token', 'token_unpooled')
  weights = attention_weights(model, params, images)
  distance = mean_attention_distance(
      weights, grid, model.total_stride,
      num_prefix_tokens=1 if has_cls else 0)
  rollout = attention_rollout(weights)
  maps = class_token_map(rollout, grid, has_class_token=has_cls)
  posemb = flat['Transformer/posembed_input/pos_embedding']
  similarity = position_embedding_similarity(posemb, grid,
                                             has_class_token=has_cls)
  components, ratios = embedding_filters(flat['embedding/kernel'])

  os.makedirs(out_dir, exist_ok=True)
  n = min(num_rollout_images, len(images))
  paths = [
      plots.plot_filters(components, ratios,
                         os.path.join(out_dir, FIGURES[0])),
      plots.plot_position_similarity(similarity,
                                     os.path.join(out_dir, FIGURES[1])),
      plots.plot_attention_distance(distance,
                                    os.path.join(out_dir, FIGURES[2])),
      plots.plot_rollout(images[:n], maps[:n],
                         os.path.join(out_dir, FIGURES[3]),
                         titles[:n] if titles else None),
  ]
  # Neighbouring patches' embeddings are more alike than distant ones' when
  # the model learned the 2-D layout (Figure 7 centre).
  rows, cols = grid
  pairs = inspect.patch_distances(grid, (1, 1))
  flat_sim = similarity.reshape(rows * cols, rows * cols)
  neighbours = np.isclose(pairs, 1.0)
  others = (pairs > 1.0) & ~neighbours

  def mean_or_none(mask):
    return float(flat_sim[mask].mean()) if mask.any() else None

  results = {
      'num_images': int(len(images)),
      'grid': [int(rows), int(cols)],
      'mean_attention_distance_px': np.round(
          distance.astype(float), 3).tolist(),
      'position_similarity_neighbours': mean_or_none(neighbours),
      'position_similarity_others': mean_or_none(others),
      'filter_variance_ratios': np.round(ratios.astype(float), 4).tolist(),
      'figures': [os.path.basename(p) for p in paths],
  }
  fileio.write_text_atomic(os.path.join(out_dir, RESULTS_FILE),
                           json.dumps(results, indent=1))
  return results


__all__ = [
    'FIGURES', 'RESULTS_FILE', 'analyze', 'attention_rollout',
    'attention_weights', 'class_token_map', 'embedding_filters',
    'mean_attention_distance', 'position_embedding_similarity',
]
