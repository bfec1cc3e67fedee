"""Inspecting a trained ViT: attention maps, rollout, attention distance,
position-embedding similarity and embedding filters (paper §4.5, Figure 7);
centred kernel alignment between layers, within a model and across models
(Raghu et al. 2021, "Do Vision Transformers see like convolutional neural
networks?").

`inspect` and `cka` / `representations` compute the arrays, `plots` draws
them, `analyze` and `analyze_cka` do both for one model (or two) and a batch
of images; `python -m vit_jax.analysis [cka]` is the CLI.
"""

import json
import os
from typing import Any

import numpy as np

from vit_jax import fileio
from vit_jax.analysis import cka
from vit_jax.analysis import inspect
from vit_jax.analysis import representations
from vit_jax.analysis.cka import linear_cka
from vit_jax.analysis.cka import MinibatchCKA
from vit_jax.analysis.inspect import attention_rollout
from vit_jax.analysis.inspect import attention_weights
from vit_jax.analysis.inspect import class_token_map
from vit_jax.analysis.inspect import embedding_filters
from vit_jax.analysis.inspect import grid_of
from vit_jax.analysis.inspect import mean_attention_distance
from vit_jax.analysis.inspect import position_embedding_similarity
from vit_jax.analysis.representations import minibatch_cka

FIGURES = (
    'filters.png',
    'position_similarity.png',
    'attention_distance.png',
    'rollout.png',
)
RESULTS_FILE = 'analysis.json'
# `analyze_cka`'s files; the `_b` and `between` figures need a second model.
CKA_FIGURES = (
    'cka_within_a.png',
    'cka_within_b.png',
    'cka_between.png',
    'cka_sheet.png',
)
CKA_RESULTS_FILE = 'cka.json'


def analyze(
    model: Any,
    params: Any,
    images: np.ndarray,
    out_dir: str,
    *,
    titles: list[str] | None = None,
    num_rollout_images: int = 8,
) -> dict[str, Any]:
  """Computes every inspection of `model` and writes the figures.

  Args:
    model: A `VisionTransformer` (plain or hybrid).
    params: Its parameters.
    images: `[n, height, width, 3]` in [-1, 1] (the paper averages the
      attention distance over 128 images); another size than the
      parameters were made for with a `dynamic_image_size` model.
    out_dir: Where `FIGURES` and `analysis.json` go.
    titles: One caption per image for the rollout figure (e.g. labels).
    num_rollout_images: Images shown in the rollout figure.

  Returns:
    The numbers written to `analysis.json`.
  """
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.analysis import plots  # pylint: disable=g-import-not-at-top

  flat = checkpoint.flatten(params)
  grid = inspect.grid_of(model, images.shape[1:3])
  has_cls = model.has_class_token
  weights = attention_weights(model, params, images)
  distance = mean_attention_distance(
      weights, grid, model.total_stride, num_prefix_tokens=1 if has_cls else 0
  )
  rollout = attention_rollout(weights)
  maps = class_token_map(rollout, grid, has_class_token=has_cls)
  posemb = flat['Transformer/posembed_input/pos_embedding']
  # The learned table on the grid it was made for (another than the images'
  # with `dynamic_image_size`).
  posemb_grid: tuple[int, int] = grid
  # Without `posemb_class_token` the table has no class-token entry.
  table_has_cls = has_cls and model.posemb_class_token
  stored = posemb.shape[1] - (1 if table_has_cls else 0)
  if stored != grid[0] * grid[1]:
    made_for = getattr(model, 'posemb_grid_size', None) or (
        checkpoint.square_image_grid(stored, model.total_stride, 'stored')
    )
    posemb_grid = (int(made_for[0]), int(made_for[1]))
  similarity = position_embedding_similarity(
      posemb, posemb_grid, has_class_token=table_has_cls
  )
  components, ratios = embedding_filters(flat['embedding/kernel'])

  os.makedirs(out_dir, exist_ok=True)
  n = min(num_rollout_images, len(images))
  paths = [
      plots.plot_filters(components, ratios, os.path.join(out_dir, FIGURES[0])),
      plots.plot_position_similarity(
          similarity, os.path.join(out_dir, FIGURES[1])
      ),
      plots.plot_attention_distance(
          distance, os.path.join(out_dir, FIGURES[2])
      ),
      plots.plot_rollout(
          images[:n],
          maps[:n],
          os.path.join(out_dir, FIGURES[3]),
          titles[:n] if titles else None,
      ),
  ]
  # Neighbouring patches' embeddings are more alike than distant ones' when
  # the model learned the 2-D layout (Figure 7 centre).
  rows, cols = posemb_grid
  pairs = inspect.patch_distances(posemb_grid, (1, 1))
  flat_sim = similarity.reshape(rows * cols, rows * cols)
  neighbours = np.isclose(pairs, 1.0)
  others = (pairs > 1.0) & ~neighbours

  def mean_or_none(mask):
    return float(flat_sim[mask].mean()) if mask.any() else None

  results = {
      'num_images': int(len(images)),
      'grid': [int(n) for n in grid],
      'position_similarity_grid': [int(rows), int(cols)],
      'mean_attention_distance_px': np.round(
          distance.astype(float), 3
      ).tolist(),
      'position_similarity_neighbours': mean_or_none(neighbours),
      'position_similarity_others': mean_or_none(others),
      'filter_variance_ratios': np.round(ratios.astype(float), 4).tolist(),
      'figures': [os.path.basename(p) for p in paths],
  }
  fileio.write_text_atomic(
      os.path.join(out_dir, RESULTS_FILE), json.dumps(results, indent=1)
  )
  return results


def _attention_distance(
    model: Any, params: Any, images: np.ndarray
) -> np.ndarray | None:
  """`[layers, heads]` mean attention distance, None without attention."""
  try:
    weights = attention_weights(model, params, images)
  except ValueError:  # A BiT ResNet classifier or a Mixer.
    return None
  registers = getattr(model, 'num_registers', 0)
  if registers:  # They follow the patches and have no position.
    weights = weights[..., :-registers, :-registers]
  has_cls = model.has_class_token
  return mean_attention_distance(
      weights,
      inspect.grid_of(model, images.shape[1:3]),
      model.total_stride,
      num_prefix_tokens=1 if has_cls else 0,
  )


def analyze_cka(
    model_a: Any,
    params_a: Any,
    images_a: np.ndarray,
    out_dir: str,
    *,
    name_a: str = 'A',
    model_b: Any = None,
    params_b: Any = None,
    images_b: np.ndarray | None = None,
    name_b: str = 'B',
    layers_a: list[str] | None = None,
    layers_b: list[str] | None = None,
    pooling: str = 'flatten',
    batch_size: int = 64,
    mesh: Any = None,
    num_distance_images: int = 128,
) -> dict[str, Any]:
  """Minibatch CKA between the layers of one model (or two), and figures.

  Writes `CKA_FIGURES` (the `_b` and `between` heatmaps with a second model
  only): layer-by-layer CKA heatmaps, and a sheet with them, each block's
  CKA with its input and the mean attention distance of each head by depth
  (models with attention). The numbers go to `cka.json`.

  Args:
    model_a: A ViT, hybrid, BiT ResNet classifier or Mixer.
    params_a: Its parameters.
    images_a: `[n, height, width, 3]` in [-1, 1], model A's resolution.
    out_dir: Output folder.
    name_a: Model A's name in titles.
    model_b: Optional second model, compared on the same images.
    params_b: Its parameters.
    images_b: The same images at model B's resolution (default `images_a`).
    name_b: Its name in titles.
    layers_a: Layer names (default: the first block's input and every
      block's output, `representations.depth_layers`).
    layers_b: Model B's.
    pooling: 'flatten' (every token / position) or 'mean' (averaged).
    batch_size: Minibatch size of the CKA estimator.
    mesh: Devices the batches are split over (default: all).
    num_distance_images: Images the attention distance averages over.

  Returns:
    The numbers written to `cka.json`.
  """
  from vit_jax.analysis import plots  # pylint: disable=g-import-not-at-top

  result = minibatch_cka(
      model_a,
      params_a,
      images_a,
      model_b=model_b,
      params_b=params_b,
      images_b=images_b,
      layers_a=layers_a,
      layers_b=layers_b,
      pooling=pooling,
      batch_size=batch_size,
      mesh=mesh,
  )
  models = [
      (
          'a',
          name_a,
          model_a,
          params_a,
          images_a,
          result['layers_a'],
          result['within_a'],
      )
  ]
  if model_b is not None:
    images_b = images_a if images_b is None else images_b
    models.append(
        (
            'b',
            name_b,
            model_b,
            params_b,
            images_b,
            result['layers_b'],
            result['within_b'],
        )
    )
  os.makedirs(out_dir, exist_ok=True)
  rounded = lambda m: np.round(np.asarray(m, float), 4).tolist()
  saved = {
      'pooling': pooling,
      'num_images': result['num_images'],
      'batch_size': result['batch_size'],
      'models': {},
      'figures': [],
  }
  heatmaps, with_input, distances = [], [], []
  for key, name, model, params, images, layers, within in models:
    labels = [representations.short_label(l) for l in layers]
    previous = representations.cka_with_previous(within, layers)
    distance = _attention_distance(model, params, images[:num_distance_images])
    saved['models'][key] = {
        'name': name,
        'layers': layers,
        'labels': labels,
        'within': rounded(within),
        'with_input': [dict(r, cka=round(r['cka'], 4)) for r in previous],
        'mean_attention_distance_px': (
            None if distance is None else rounded(distance)
        ),
    }
    heatmap = {
        'matrix': within,
        'rows': labels,
        'cols': labels,
        'title': f'{name}: CKA between its layers',
        'ylabel': name,
        'xlabel': name,
    }
    heatmaps.append(heatmap)
    path = os.path.join(out_dir, CKA_FIGURES[0 if key == 'a' else 1])
    saved['figures'].append(
        os.path.basename(
            plots.plot_cka(
                within,
                path,
                labels,
                labels,
                title=heatmap['title'],
                ylabel=name,
                xlabel=name,
            )
        )
    )
    with_input.append({'name': name, 'values': [r['cka'] for r in previous]})
    if distance is not None:
      distances.append({'name': name, 'distance': distance})
  if model_b is not None:
    rows = saved['models']['a']['labels']
    cols = saved['models']['b']['labels']
    title = f'CKA: {name_a} (rows) vs {name_b} (columns)'
    saved['between'] = rounded(result['matrix'])
    heatmaps.append(
        {
            'matrix': result['matrix'],
            'rows': rows,
            'cols': cols,
            'title': title,
            'ylabel': name_a,
            'xlabel': name_b,
        }
    )
    saved['figures'].append(
        os.path.basename(
            plots.plot_cka(
                result['matrix'],
                os.path.join(out_dir, CKA_FIGURES[2]),
                rows,
                cols,
                title=title,
                ylabel=name_a,
                xlabel=name_b,
            )
        )
    )
  saved['figures'].append(
      os.path.basename(
          plots.plot_cka_sheet(
              heatmaps,
              with_input,
              distances,
              os.path.join(out_dir, CKA_FIGURES[3]),
          )
      )
  )
  fileio.write_text_atomic(
      os.path.join(out_dir, CKA_RESULTS_FILE), json.dumps(saved, indent=1)
  )
  return saved


__all__ = [
    'CKA_FIGURES',
    'CKA_RESULTS_FILE',
    'FIGURES',
    'MinibatchCKA',
    'RESULTS_FILE',
    'analyze',
    'analyze_cka',
    'attention_rollout',
    'attention_weights',
    'class_token_map',
    'cka',
    'embedding_filters',
    'grid_of',
    'linear_cka',
    'mean_attention_distance',
    'minibatch_cka',
    'position_embedding_similarity',
    'representations',
]
