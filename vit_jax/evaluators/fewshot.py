"""Few-shot linear evaluation (paper §4.1): a closed-form probe on frozen
features.

From k training images per class, a regularised least-squares regression maps
the frozen features (pre-logits by default) to {-1, 1}^K targets; top-1
accuracy of its argmax is measured on the test split. The L2 regulariser is
chosen from a small grid by leave-one-shot-out validation on the few-shot
set itself (k >= 2; with one shot there is nothing to hold out and
`default_l2` is used). Each k is repeated for several random draws of the
shots (seeds) and averaged.
"""

from collections.abc import Callable, Iterable, Sequence
import dataclasses
import math
import time
from typing import Any

from absl import logging
import flax
import jax
import numpy as np

from vit_jax import input_pipeline
from vit_jax import sharding
from vit_jax.evaluators import classification

DEFAULT_L2_GRID = tuple(2.0**e for e in range(-10, 11, 2))


@dataclasses.dataclass(frozen=True)
class FewShotSection:
  """The few-shot linear evaluator (fields `evals.fewshot.*`)."""

  every: int
  dataset: str
  shots: tuple[int, ...]
  seeds: int
  representation: str
  l2_grid: tuple[float, ...]
  default_l2: float
  pool_per_class: int
  max_test_examples: int

  def __post_init__(self):
    if not self.shots or min(self.shots) < 1:
      raise ValueError(
          f'config.evals.fewshot.shots={self.shots} must be a '
          'non-empty list of positive image counts per class.'
      )
    if self.seeds < 1:
      raise ValueError(
          f'config.evals.fewshot.seeds={self.seeds} must be ' '>= 1.'
      )
    if self.pool_per_class < max(self.shots):
      raise ValueError(
          f'config.evals.fewshot.pool_per_class={self.pool_per_class} is '
          f'smaller than the largest shot count {max(self.shots)} '
          f'(evals.fewshot.shots={self.shots}): raise it to at least '
          f'{max(self.shots)}.'
      )
    if self.every < 0:
      raise ValueError(
          f'config.evals.fewshot.every={self.every} must be ' '>= 0 (0: off).'
      )


def solve_least_squares(
    features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float
) -> tuple[np.ndarray, np.ndarray]:
  """Ridge regression to {-1, 1} one-vs-rest targets, in closed form.

  Minimises ||X W + b - Y||^2 + l2 ||W||^2 (the bias is not regularised).

  Args:
    features: `[n, d]`.
    labels: `[n]` integer classes.
    num_classes: K.
    l2: Regulariser (> 0 keeps the system well posed when n < d).

  Returns:
    (weights `[d, K]`, bias `[K]`), float64.
  """
  x = np.asarray(features, np.float64)
  targets = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
  design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  reg = l2 * np.eye(design.shape[1])
  reg[-1, -1] = 0.0
  solution = np.linalg.solve(design.T @ design + reg, design.T @ targets)
  return solution[:-1], solution[-1]


def accuracy(
    weights: np.ndarray,
    bias: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
) -> float:
  """Top-1 accuracy of the linear classifier."""
  predictions = (np.asarray(features, np.float64) @ weights + bias).argmax(-1)
  return float(np.mean(predictions == np.asarray(labels)))


def select_l2(
    features: np.ndarray,
    labels: np.ndarray,
    shots: int,
    num_classes: int,
    grid: Sequence[float],
    default_l2: float,
) -> float:
  """Leave-one-shot-out choice of the regulariser.

  Args:
    features: `[shots * K, d]`, ordered so that example `i` of every class
      comes before example `i + 1` (as `draw_shots` returns them).
    labels: `[shots * K]`.
    shots: k.
    num_classes: K.
    grid: Candidate values.
    default_l2: Used when k == 1.

  Returns:
    The value with the best mean held-out accuracy (the larger on ties).
  """
  if shots < 2:
    return default_l2
  fold = np.arange(len(labels)) // num_classes  # Shot index of each row.
  best, best_acc = default_l2, -1.0
  for l2 in sorted(grid):
    accs = []
    for f in range(shots):
      train, held = fold != f, fold == f
      w, b = solve_least_squares(
          features[train], labels[train], num_classes, l2
      )
      accs.append(accuracy(w, b, features[held], labels[held]))
    if np.mean(accs) >= best_acc:
      best, best_acc = l2, float(np.mean(accs))
  return best


def draw_shots(
    labels: np.ndarray, shots: int, num_classes: int, seed: int
) -> np.ndarray:
  """Indices of `shots` random examples per class, shot-major order.

  Raises:
    ValueError: a class has fewer than `shots` examples in the pool.
  """
  rng = np.random.default_rng(seed)
  per_class = []
  for c in range(num_classes):
    candidates = np.flatnonzero(labels == c)
    if len(candidates) < shots:
      raise ValueError(
          f'Few-shot: class {c} has {len(candidates)} examples in the pool, '
          f'fewer than {shots} shots; lower evals.fewshot.shots or raise '
          'evals.fewshot.pool_per_class.'
      )
    per_class.append(rng.choice(candidates, shots, replace=False))
  return np.stack(per_class, axis=1).ravel()  # [shot, class] -> flat.


def few_shot_accuracies(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    *,
    shots: Iterable[int] = (1, 5),
    seeds: int = 3,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    default_l2: float = 1.0,
) -> dict[int, list[float]]:
  """Test accuracy for each k and seed.

  Returns:
    {k: [accuracy of seed 0, seed 1, ...]}.
  """
  out: dict[int, list[float]] = {}
  for k in shots:
    out[k] = []
    for seed in range(seeds):
      idx = draw_shots(train_labels, k, num_classes, seed)
      x, y = train_features[idx], train_labels[idx]
      l2 = select_l2(x, y, k, num_classes, l2_grid, default_l2)
      w, b = solve_least_squares(x, y, num_classes, l2)
      out[k].append(accuracy(w, b, test_features, test_labels))
  return out


def _representation(intermediates: Any, name: str) -> jax.Array:
  flat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(intermediates), sep='/'
  )
  found = {k: v for k, v in flat.items() if k == name}
  if not found:
    raise ValueError(
        f'evals.fewshot.representation={name!r} is not sown by the model; '
        f'available: {sorted(flat)}.'
    )
  value = found[name][0]
  # Token sequences ([batch, tokens, d]) are averaged over the tokens.
  return value.mean(axis=1) if value.ndim == 3 else value


def make_feature_fn(
    model: flax.linen.Module,
    representation: str,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
) -> Callable[[Any, Any], dict[str, jax.Array]]:
  """A jitted `(params, batch) -> {'features', 'labels', 'mask'}`.

  Inputs are sharded like training; outputs are replicated, so every process
  gets the whole batch's features (the solver runs on each host).
  """

  def features(params, batch):
    _, state = model.apply(
        {'params': params},
        batch['image'],
        train=False,
        mutable=['intermediates'],
    )
    return {
        'features': _representation(
            state['intermediates'], representation
        ).astype(np.float32),
        'labels': batch['labels'].argmax(-1),
        'mask': batch['mask'],
    }

  return jax.jit(
      sharding.on_mesh(features, mesh),
      in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
  )


def extract(
    feature_fn: Callable[[Any, Any], dict[str, jax.Array]],
    params: Any,
    dataset: Any,
    mesh: jax.sharding.Mesh,
    *,
    per_class_limit: int | None = None,
    num_classes: int | None = None,
    max_examples: int | None = None,
    num_batches: int | None = None,
    what: str = 'fewshot features',
) -> tuple[np.ndarray, np.ndarray]:
  """Features and integer labels of the real (mask 1) examples.

  Stops early once every class has `per_class_limit` examples or
  `max_examples` were read (the same decision on every process: features
  are replicated). Progress is logged as `<what>: 3/12 batches (1.2 s)`
  (`num_batches`: the most there can be, when known).
  """
  feats, labels = [], []
  counts = np.zeros(num_classes or 0, np.int64)
  progress = classification.Progress(what, num_batches)
  for batch in sharding.prefetch_to_device(
      dataset.as_numpy_iterator(), sharding.batch_sharding(mesh)
  ):
    progress.step()
    out = jax.device_get(feature_fn(params, batch))
    mask = np.asarray(out['mask']) > 0
    y = np.asarray(out['labels'])[mask]
    feats.append(np.asarray(out['features'])[mask])
    labels.append(y)
    if per_class_limit and num_classes:
      counts += np.bincount(y, minlength=num_classes)
      if counts.min() >= per_class_limit:
        break
    if max_examples and sum(len(l) for l in labels) >= max_examples:
      break
  return np.concatenate(feats), np.concatenate(labels)


@dataclasses.dataclass
class FewShotEvaluator:
  """Few-shot linear accuracy of a model's frozen features on one dataset.

  Built once per run (features are jitted with the training shardings);
  `run(params)` returns metrics named `fewshot/<dataset>_<k>shot` (mean over
  seeds) and `fewshot/<dataset>_<k>shot_std`.

  Attributes:
    section: The run's `evals.fewshot` section: `dataset` (default: the
      training data's), `shots`, `seeds`, `representation`, `l2_grid`,
      `default_l2`, `pool_per_class`, `max_test_examples`.
    data: The run's data section (batch size, preprocessing; the dataset
      unless `section.dataset` names another).
    model: The model being trained.
    mesh: Device mesh.
    param_shardings: Shardings of the parameters.
    off_switch: How the user turns the evaluation off, named when the data
      does not fit the shots (training: the config field; the evaluate
      command: its flag).
  """

  section: FewShotSection
  data: input_pipeline.DataSection
  model: flax.linen.Module
  mesh: jax.sharding.Mesh
  param_shardings: Any
  off_switch: str = 'evals.fewshot.every=0'

  def __post_init__(self):
    fs = self.section
    self.shots = tuple(int(k) for k in fs.shots)
    self.seeds = int(fs.seeds)
    self.l2_grid = tuple(float(v) for v in (fs.l2_grid or DEFAULT_L2_GRID))
    self.default_l2 = float(fs.default_l2)
    self.pool_per_class = int(fs.pool_per_class)
    self.max_test_examples = int(fs.max_test_examples or 0) or None
    self.probe_data = self.data
    if fs.dataset and fs.dataset != self.data.dataset:
      # Another dataset (transfer): its own splits and classes, not the
      # training run's.
      self.probe_data = dataclasses.replace(
          self.data,
          dataset=fs.dataset,
          train_split=None,
          eval_split=None,
          num_classes=None,
      )
    self.source = input_pipeline.get_source(self.probe_data)
    self.info = input_pipeline.get_dataset_info(self.probe_data, self.source)
    self.check_data()
    self.feature_fn = make_feature_fn(
        self.model, fs.representation, self.mesh, self.param_shardings
    )
    self.name = self.probe_data.dataset

  def check_data(self) -> None:
    """Checks the dataset's splits against the shots before training starts.

    Without this a run whose dataset is too small for its shots would train
    to the end and only then fail, in the final evaluation. (Shots, seeds
    and pool size on their own are checked when the config is parsed.)

    Raises:
      ValueError: naming the dataset, split and class that do not fit, and
        what to change.
    """
    most = max(self.shots)
    where = f'few-shot dataset {self.probe_data.dataset!r}'
    if not self.source.split_size(self.info.eval_split):
      raise ValueError(
          f'The test split {self.info.eval_split!r} of the {where} is '
          'empty: set eval_split (or evals.fewshot.dataset) to a dataset '
          'with test images.'
      )
    counts = self.source.class_counts(
        self.info.train_split, self.info.num_classes, most
    )
    short = np.flatnonzero(counts < most)
    if short.size:
      c = int(short[0])
      name = (
          f' ({self.info.class_names[c]!r})'
          if c < len(self.info.class_names)
          else ''
      )
      raise ValueError(
          f'Few-shot: class {c}{name} has {counts[c]} examples in split '
          f'{self.info.train_split!r} of the {where}, fewer than the largest '
          f'of evals.fewshot.shots={self.shots} ({short.size} class(es) '
          f'short of {most}). Lower evals.fewshot.shots to at most '
          f'{int(counts.min())}, add examples to that class, or turn the '
          f'few-shot evaluation off with {self.off_switch}.'
      )

  def features(
      self, params: Any
  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((pool features, labels), (test features, labels))."""
    train_ds, train_batches = input_pipeline.eval_dataset(
        self.probe_data, split=self.info.train_split, source=self.source
    )
    test_ds, test_batches = input_pipeline.eval_dataset(
        self.probe_data, split=self.info.eval_split, source=self.source
    )
    # The pool stops once every class has pool_per_class examples, the
    # test features after max_test_examples: the splits' batches are the
    # most they read.
    test_most = test_batches
    if self.max_test_examples:
      test_most = min(
          test_batches,
          math.ceil(
              self.max_test_examples / max(1, self.probe_data.batch_eval)
          ),
      )
    pool = extract(
        self.feature_fn,
        params,
        train_ds,
        self.mesh,
        per_class_limit=self.pool_per_class,
        num_classes=self.info.num_classes,
        num_batches=train_batches,
        what=f'fewshot {self.name} pool',
    )
    test = extract(
        self.feature_fn,
        params,
        test_ds,
        self.mesh,
        max_examples=self.max_test_examples,
        num_batches=test_most,
        what=f'fewshot {self.name} test',
    )
    return pool, test

  def run(self, params: Any) -> dict[str, float]:
    """Few-shot metrics for `params`.

    Logs the featurising progress (`fewshot <dataset> pool: 3/12 batches
    (1.2 s)`) and the total, e.g. `fewshot digits: 1,000 pool and 299 test
    images featurised in 2.1 s, 2 shots x 3 seeds solved in 0.3 s`.
    """
    start = time.perf_counter()
    (x, y), (tx, ty) = self.features(params)
    featurised = time.perf_counter()
    results = few_shot_accuracies(
        x,
        y,
        tx,
        ty,
        self.info.num_classes,
        shots=self.shots,
        seeds=self.seeds,
        l2_grid=self.l2_grid,
        default_l2=self.default_l2,
    )
    if jax.process_index() == 0:
      logging.info(
          'fewshot %s: %s pool and %s test images featurised in %.1f s, '
          '%d shots x %d seeds solved in %.1f s',
          self.name,
          f'{len(y):,}',
          f'{len(ty):,}',
          featurised - start,
          len(self.shots),
          self.seeds,
          time.perf_counter() - featurised,
      )
    metrics = {}
    for k, accs in results.items():
      metrics[f'fewshot/{self.name}_{k}shot'] = float(np.mean(accs))
      metrics[f'fewshot/{self.name}_{k}shot_std'] = float(np.std(accs))
    return metrics
