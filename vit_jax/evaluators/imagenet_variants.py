"""ImageNet-ReaL, -v2, -A, -R and -Sketch: a 1000-way ImageNet head on the
test sets that probe how far its accuracy carries.

Each set is read through tensorflow-datasets, preprocessed as the run's own
evaluation split (`config.image_size`, `config.pp`'s evaluation crop) and
counted by the classification evaluator's masked sums with the training
shardings:

  imagenet_real    `imagenet2012_real`, split 'validation': the ImageNet
                   validation images with the reassessed labels of Beyer et
                   al. (2020); a prediction is right when it is any of an
                   image's labels, and images left without one are skipped.
  imagenet_v2      `imagenet_v2` ('matched-frequency'), split 'test': a new
                   test set collected like the original (Recht et al., 2019).
  imagenet_a       `imagenet_a`, split 'test': natural adversarial examples
                   (Hendrycks et al., 2021) of 200 classes.
  imagenet_r       `imagenet_r`, split 'test': renditions (art, cartoons,
                   sculptures, ...) of 200 classes (Hendrycks et al., 2021).
  imagenet_sketch  `imagenet_sketch`, split 'test': sketches of the 1000
                   classes (Wang et al., 2019).

For -A and -R the prediction is the best of their 200 classes (the head's
other 800 outputs are dropped), as their authors evaluate; the classes are
listed in `vit_jax/labels/imagenet_a.txt` and `imagenet_r.txt`.

Metrics, `<name>/accuracy` (top-1), `<name>/top5` and `<name>/examples`
(images counted), go with the run's `eval/...` ones to `metrics.jsonl`.
"""

from collections.abc import Iterable, Mapping
import dataclasses
import functools
import os
from typing import Any

import flax
import jax

from vit_jax import input_pipeline
from vit_jax import sharding
from vit_jax.evaluators import classification

# Outputs of the head every variant is labelled in: ImageNet-1k's classes.
NUM_CLASSES = 1000
_LABELS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'labels'
)


@dataclasses.dataclass(frozen=True)
class Variant:
  """Where a variant's images are and how they are scored.

  Attributes:
    tfds_name: tensorflow-datasets name (with its builder config, if any).
    split: The split evaluated.
    label_key: The feature holding the labels: an ImageNet class, or a list
      of them (ImageNet-ReaL).
    class_subset: Name of the list in `vit_jax/labels/` of the classes the
      prediction is taken among; None: all 1000.
  """

  tfds_name: str
  split: str
  label_key: str = 'label'
  class_subset: str | None = None


# Name (the config group `evals.<name>` and the metrics' prefix) -> variant.
VARIANTS: dict[str, Variant] = {
    'imagenet_real': Variant(
        'imagenet2012_real', 'validation', label_key='real_label'
    ),
    'imagenet_v2': Variant('imagenet_v2/matched-frequency', 'test'),
    'imagenet_a': Variant('imagenet_a', 'test', class_subset='imagenet_a'),
    'imagenet_r': Variant('imagenet_r', 'test', class_subset='imagenet_r'),
    'imagenet_sketch': Variant('imagenet_sketch', 'test'),
}


@dataclasses.dataclass(frozen=True)
class VariantSection:
  """One ImageNet-variant evaluator (fields `evals.<name>.*`).

  Checked by `check_sections`, which knows the variant's name.
  """

  every: int


def check_sections(sections: Mapping[str, VariantSection]) -> None:
  """Raises, naming the field, for a section out of range.

  Args:
    sections: {variant name: its section}.
  """
  for name, section in sections.items():
    if section.every < 0:
      raise ValueError(
          f'config.evals.{name}.every={section.every} must be >= 0 (0: off).'
      )


def check_head(names: Iterable[str], head_classes: int | None) -> None:
  """Raises unless a run's head is the 1000-way ImageNet head.

  Every variant is labelled in ImageNet-1k's classes, in their order: a
  prediction means something there only from such a head.

  Args:
    names: The variants the run evaluates.
    head_classes: Outputs of the run's classification head; None when its
      objective trains none (masked patch prediction).
  """
  names = list(names)
  if not names or head_classes == NUM_CLASSES:
    return
  head = (
      'trains no classification head (config.objective)'
      if head_classes is None
      else f'has a {head_classes}-way head'
  )
  raise ValueError(
      f'config.evals.{names[0]}.every > 0 scores a 1000-way ImageNet head, '
      f'but this run {head}: train or fine-tune on imagenet2012 '
      f'(num_classes=1000), or set config.evals.{names[0]}.every=0.'
  )


def _wnids(list_name: str) -> list[str]:
  """The WordNet ids of a list in `vit_jax/labels/`, in file order."""
  with open(
      os.path.join(_LABELS_DIR, f'{list_name}.txt'), encoding='utf-8'
  ) as f:
    return [line.split('\t', 1)[0] for line in f.read().splitlines() if line]


@functools.cache
def class_subset(list_name: str) -> tuple[int, ...]:
  """ImageNet-1k indices of the classes in `vit_jax/labels/<list>.txt`.

  Args:
    list_name: 'imagenet_a' or 'imagenet_r'.

  Returns:
    The indices, ascending (the lists keep ImageNet's order).

  Raises:
    ValueError: a listed id that is not an ImageNet-1k class.
  """
  index = {wnid: i for i, wnid in enumerate(_wnids('imagenet1k'))}
  unknown = [w for w in _wnids(list_name) if w not in index]
  if unknown:
    raise ValueError(
        f'vit_jax/labels/{list_name}.txt lists {unknown[:3]}, not classes '
        'of imagenet1k.txt.'
    )
  return tuple(sorted(index[w] for w in _wnids(list_name)))


def variant_data(
    data: input_pipeline.DataSection, variant: Variant
) -> input_pipeline.DataSection:
  """The run's data section, pointed at a variant's split.

  Images are preprocessed as the run's evaluation split (size, evaluation
  crop, the training dataset's preset options included) and batched by
  `config.batch_eval`, from the run's `tfds_data_dir`.
  """
  preset = input_pipeline.DATASET_PRESETS.get(data.dataset, {})
  return dataclasses.replace(
      data,
      dataset=variant.tfds_name,
      train_split=variant.split,
      eval_split=variant.split,
      num_classes=NUM_CLASSES,
      pp={**preset.get('pp', {}), **data.pp},
  )


def metrics(name: str, totals: Mapping[str, float]) -> dict[str, float]:
  """`<name>/accuracy`, `<name>/top5`, `<name>/examples` from summed counts.

  Args:
    name: The variant.
    totals: `classification.eval_step`'s sums over the split.

  Returns:
    The metrics (accuracies 0 when no image was counted).
  """
  count = totals['count']
  return {
      f'{name}/accuracy': totals['correct'] / max(count, 1.0),
      f'{name}/top5': totals['correct_top5'] / max(count, 1.0),
      f'{name}/examples': count,
  }


class VariantEvaluator:
  """Accuracy of a 1000-way ImageNet classifier on one variant.

  Built once per run, before any work: the dataset must be prepared (or
  downloadable, with `config.tfds_download`); the evaluation step is jitted
  with the training shardings. `run(params)` returns `metrics`.
  """

  def __init__(
      self,
      name: str,
      data: input_pipeline.DataSection,
      model: flax.linen.Module,
      mesh: jax.sharding.Mesh,
      param_shardings: Any,
  ):
    """Reads the variant's dataset description and jits its evaluation.

    Args:
      name: A key of `VARIANTS`.
      data: The run's data section (data directory, image size, batch).
      model: The run's classifier (a 1000-way head: `check_head`).
      mesh: Device mesh.
      param_shardings: Shardings of the parameters.

    Raises:
      input_pipeline.DatasetNotPreparedError: the dataset is not prepared
        and cannot be, naming how to prepare it and how to turn the
        evaluator off.
    """
    self.name = name
    self.variant = VARIANTS[name]
    self.data = variant_data(data, self.variant)
    try:
      self.source = input_pipeline.TfdsSource(
          self.variant.tfds_name,
          data.tfds_data_dir,
          data.tfds_download,
          label_key=self.variant.label_key,
      )
    except input_pipeline.DatasetNotPreparedError as e:
      raise input_pipeline.DatasetNotPreparedError(
          f'{e} (Read by config.evals.{name}; '
          f'config.evals.{name}.every=0 turns it off.)'
      ) from e
    subset = (
        class_subset(self.variant.class_subset)
        if self.variant.class_subset
        else None
    )
    self.eval_fn = classification.make_eval_fn(
        model, mesh, param_shardings, class_subset=subset
    )
    self.batch_sharding = sharding.batch_sharding(mesh)

  def run(self, params: Any) -> dict[str, float]:
    """`<name>/accuracy`, `<name>/top5` and `<name>/examples` of `params`.

    Progress is logged as `imagenet_a: 3/15 batches (2.1 s)`, then
    `imagenet_a: 15 batches, 7,500 images in 9.8 s`.
    """
    dataset, num_batches = input_pipeline.eval_dataset(
        self.data, source=self.source
    )
    totals = classification.sum_over_dataset(
        params,
        self.eval_fn,
        dataset,
        self.batch_sharding,
        num_batches=num_batches,
        what=self.name,
    )
    return metrics(self.name, totals)


def make_evaluators(
    sections: Mapping[str, VariantSection],
    data: input_pipeline.DataSection,
    model: flax.linen.Module,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
    head_classes: int | None,
) -> dict[str, VariantEvaluator]:
  """The evaluators of the variants a run turns on (`every` > 0).

  Args:
    sections: {name: section} of every variant (`EvalsSection.variants`).
    data: The run's data section.
    model: The run's classifier.
    mesh: Device mesh.
    param_shardings: Shardings of the parameters.
    head_classes: Outputs of the classifier's head (None: no head).

  Returns:
    {name: evaluator}, empty when none is on.

  Raises:
    ValueError: the head is not ImageNet's 1000-way head.
    input_pipeline.DatasetNotPreparedError: a dataset is not prepared.
  """
  names = [name for name, s in sections.items() if s.every > 0]
  check_head(names, head_classes)
  return {
      name: VariantEvaluator(name, data, model, mesh, param_shardings)
      for name in names
  }
