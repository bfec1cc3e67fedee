"""Every config field with its default, and the typed sections of a run.

Each experiment file in configs/ starts from `get_base()` and sets what
differs; every field is declared and documented here once. Field names are a
contract (scripts, docs and `metrics.jsonl` rely on them).

At the top of a run (`train.train_and_evaluate`, `vit_jax.evaluate`,
`vit_jax.analysis`) `parse(config)` reads the config once into frozen
sections (`Run`: model, data, optim, objective, loop, evals, mesh) and checks
every field there, before any work; each module then receives only the
section (or the values) it uses, never the whole ConfigDict. A section's
attributes have the names of the config fields they come from, so every
error names the field to change.
"""

from collections.abc import Mapping
import dataclasses
import difflib
from typing import Any

import ml_collections

from vit_jax import config_errors
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import objectives
from vit_jax import optim
from vit_jax import preprocess
from vit_jax import sharding
from vit_jax import timm_models
from vit_jax.evaluators import fewshot
from vit_jax.evaluators import imagenet_variants
from vit_jax.models import registry

# The sections the modules below own, composed here into a `Run` (and still
# importable from here, where they were first declared).
ModelSection = registry.ModelSection
DataSection = input_pipeline.DataSection
OptimSection = optim.OptimSection
ObjectiveSection = objectives.ObjectiveSection
FewShotSection = fewshot.FewShotSection
VariantSection = imagenet_variants.VariantSection
MeshSection = sharding.MeshSection


CONFIG_FILE = 'config.json'  # A run's config, in its workdir.

# Base fields holding free-form mappings (get_model overrides, preprocessing
# options): their keys are checked by the code that consumes them.
_FREE_FORM = frozenset({'model', 'pp'})


def _walk(config: Any, name: str) -> tuple[bool, Any]:
  """(found, value) of a dotted field; not found when a part is absent."""
  value = config
  for part in name.split('.'):
    if isinstance(value, Mapping) or hasattr(value, 'keys'):
      if part not in value:
        return False, None
      value = value[part]
    elif value is not None and hasattr(value, part):
      value = getattr(value, part)
    else:
      return False, None
  return True, value


def _plain(value: Any) -> Any:
  """ConfigDicts and mappings as dicts, lists as tuples (immutable values)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _check_fields(
    config: Any, base: ml_collections.ConfigDict, prefix: str = ''
) -> None:
  """Refuses fields `get_base()` does not declare (typos), naming them."""
  keys = config.keys() if hasattr(config, 'keys') else ()
  for key in keys:
    if key not in base:
      close = difflib.get_close_matches(key, list(base.keys()), n=3)
      hint = f' Did you mean {close}?' if close else ''
      raise ValueError(
          f'config.{prefix}{key} is not a config field: every field is '
          f'declared in vit_jax.config_lib.get_base().{hint}'
      )
    if (
        isinstance(base[key], ml_collections.ConfigDict)
        and prefix + key not in _FREE_FORM
    ):
      _check_fields(config[key], base[key], f'{prefix}{key}.')


@dataclasses.dataclass(frozen=True)
class LoopSection:
  """Steps, averaging, logging and checkpointing of the training loop."""

  seed: int
  total_steps: int
  accum_steps: int
  ema_decay: float | None
  log_every: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int
  async_checkpoints: bool
  profile: bool
  prefetch: int

  def __post_init__(self):
    if self.accum_steps < 1:
      raise ValueError(
          f'config.accum_steps={self.accum_steps} must be ' '>= 1.'
      )
    config_errors.check_positive(
        log_every=self.log_every,
        eval_every=self.eval_every,
        checkpoint_every=self.checkpoint_every,
        keep_checkpoints=self.keep_checkpoints,
        prefetch=self.prefetch,
    )
    if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
      raise ValueError(
          f'config.ema_decay={self.ema_decay} must be in ' '[0, 1).'
      )

  @property
  def use_ema(self) -> bool:
    """Whether the run keeps (and evaluates) a Polyak average."""
    return self.ema_decay is not None


@dataclasses.dataclass(frozen=True)
class EvalsSection:
  """Evaluators beside the objective's own (`vit_jax/evaluators`)."""

  fewshot: FewShotSection = dataclasses.field(
      metadata={'section': FewShotSection}
  )
  # The ImageNet variants, one field per key of imagenet_variants.VARIANTS.
  imagenet_real: VariantSection = dataclasses.field(
      metadata={'section': VariantSection}
  )
  imagenet_v2: VariantSection = dataclasses.field(
      metadata={'section': VariantSection}
  )
  imagenet_a: VariantSection = dataclasses.field(
      metadata={'section': VariantSection}
  )
  imagenet_r: VariantSection = dataclasses.field(
      metadata={'section': VariantSection}
  )
  imagenet_sketch: VariantSection = dataclasses.field(
      metadata={'section': VariantSection}
  )

  def __post_init__(self):
    imagenet_variants.check_sections(self.variants)

  @property
  def variants(self) -> dict[str, VariantSection]:
    """The section of every ImageNet-variant evaluator, by name."""
    return {name: getattr(self, name) for name in imagenet_variants.VARIANTS}


@dataclasses.dataclass(frozen=True)
class Run:
  """A config read once: one frozen section per part of the run."""

  model: ModelSection
  data: DataSection
  optim: OptimSection
  objective: ObjectiveSection
  loop: LoopSection
  evals: EvalsSection
  mesh: MeshSection


# Section name -> (class, prefix of its fields in the config).
_SECTIONS = {
    'model': (ModelSection, ''),
    'data': (DataSection, ''),
    'optim': (OptimSection, ''),
    'objective': (ObjectiveSection, ''),
    'loop': (LoopSection, ''),
    'evals': (EvalsSection, 'evals.'),
    'mesh': (MeshSection, ''),
}


def _build(cls: type[Any], config: Any, base: Any, prefix: str) -> Any:
  """One section: each attribute read from the config field of its name."""
  values = {}
  for f in dataclasses.fields(cls):
    name = prefix + f.name
    if 'section' in f.metadata:
      values[f.name] = _build(f.metadata['section'], config, base, name + '.')
      continue
    found, value = _walk(config, name)
    if not found:  # Omitted: get_base()'s value.
      found, value = _walk(base, name)
    if not found:
      raise KeyError(
          f'{cls.__name__}.{f.name}: {name!r} is not a field of '
          'config_lib.get_base().'
      )
    value = _plain(value)
    if 'parse' in f.metadata:
      value = f.metadata['parse'](value)
    values[f.name] = value
  return cls(**values)


def section(config: Any, name: str) -> Any:
  """One section of a config, e.g. `section(config, 'data')`.

  For code that needs only one part of a run (benchmarks, data tools); a run
  uses `parse`, which also checks the sections against each other.

  Args:
    config: An experiment config (ConfigDict), or a mapping of some fields
      (the others: `get_base()`'s values).
    name: One of 'model', 'data', 'optim', 'objective', 'loop', 'evals',
      'mesh'.

  Returns:
    The section.

  Raises:
    ValueError: a field `get_base()` does not declare, or a value of the
      section out of range, naming the field.
  """
  base = get_base()
  _check_fields(config, base)
  cls, prefix = _SECTIONS[name]
  return _build(cls, config, base, prefix)


def parse(config: Any) -> Run:
  """Reads and checks a config once: its typed, frozen sections.

  A field the config omits means what `get_base()` declares for it, so
  partial configs (tests, notebooks: a dict of the fields that differ) parse
  like full ones.

  Args:
    config: An experiment config (ConfigDict), or a mapping of some fields.

  Returns:
    The run's sections.

  Raises:
    ValueError: a field `get_base()` does not declare, a value out of range,
      or sections that do not fit together (image size vs the model's
      patch size); each names the field and the fix.
  """
  base = get_base()
  _check_fields(config, base)
  run = Run(
      **{
          name: _build(cls, config, base, prefix)
          for name, (cls, prefix) in _SECTIONS.items()
      }
  )
  check_image_size(run.model, run.data.image_size)
  check_flexi_run(run)
  if run.data.naflex.enabled:
    run = dataclasses.replace(
        run, data=with_naflex_patch_size(run.model, run.data)
    )
  check_naflex_objective(run.model, run.objective)
  check_naflex_pairing(run.model, run.data)
  image_folder_used = 'image_folder' in (
      run.data.dataset,
      run.evals.fewshot.dataset,
  )
  if run.data.image_folder and not image_folder_used:
    raise ValueError(
        f'config.image_folder={run.data.image_folder!r} is set but '
        f'config.dataset={run.data.dataset!r}: add '
        '--config.dataset=image_folder to train on the folder (or leave '
        'image_folder empty).'
    )
  return run


def with_naflex_patch_size(
    model: ModelSection, data: DataSection
) -> DataSection:
  """`data` with `naflex.patch_size` the model's (checked if given)."""
  stride, kind = model.total_stride()
  if kind != 'patch size':
    raise ValueError(
        f'config.naflex.seq_lens={data.naflex.seq_lens} needs a plain ViT; '
        f'{model.model_name} has a ResNet stem: set config.naflex.seq_lens=()'
        ' or choose a ViT.'
    )
  given = data.naflex.patch_size
  if given and given != stride:
    raise ValueError(
        f'config.naflex.patch_size={given} differs from the patch size '
        f'{stride} of {model.model_name}: set it to {stride} (or 0: the '
        "model's)."
    )
  naflex = dataclasses.replace(data.naflex, patch_size=stride)
  return dataclasses.replace(data, naflex=naflex)


def check_naflex_pairing(model: ModelSection, data: DataSection) -> None:
  """Raises unless a NaFlex model and NaFlex batches come together.

  A NaFlex model takes patch sequences (`config.naflex.seq_lens` makes the
  pipeline yield them); any other model takes image arrays.
  """
  if model.is_naflex() and not data.naflex.enabled:
    raise ValueError(
        'config.model.naflex=True takes NaFlex patch sequences: set '
        'config.naflex.seq_lens (e.g. 256 or 256,576,784 tokens per image), '
        'or leave config.model.naflex off.'
    )
  if data.naflex.enabled and not model.is_naflex():
    raise ValueError(
        f'config.naflex.seq_lens={list(data.naflex.seq_lens)} makes NaFlex '
        f'patch sequences, which {model.model_name} takes only as a NaFlex '
        'model: add --config.model.naflex=True (with classifier gap or map), '
        'or set config.naflex.seq_lens=().'
    )


def check_naflex_objective(
    model: ModelSection, objective: ObjectiveSection
) -> None:
  """Raises for an objective a NaFlex model's patch sequences cannot feed.

  Masked patch prediction and mixup work on image arrays; a NaFlex batch
  holds patch sequences of images of different grids.
  """
  if not model.is_naflex():
    return
  if objective.objective != objectives.classification.NAME:
    raise ValueError(
        f'config.objective={objective.objective!r} needs image arrays; a '
        'NaFlex model (config.model.naflex=True) trains with '
        f"config.objective='{objectives.classification.NAME}'."
    )
  if objective.mixup_alpha:
    raise ValueError(
        f'config.mixup_alpha={objective.mixup_alpha} mixes image arrays; a '
        'NaFlex model (config.model.naflex=True) takes patch sequences of '
        'images of different grids: set config.mixup_alpha=0.'
    )


def check_image_size(model: ModelSection, image_size: int) -> None:
  """Raises unless `image_size` is a multiple of the model's token stride."""
  stride, kind = model.total_stride()
  if image_size < stride:
    raise ValueError(
        f'config.image_size={image_size} is smaller than the {kind} {stride} '
        f'of {model.model_name}: use at least {stride} (a multiple of it).'
    )
  if image_size % stride:
    raise ValueError(
        f'config.image_size={image_size} is not a multiple of the {kind} '
        f'{stride} of {model.model_name}: use e.g. '
        f'{image_size // stride * stride}.'
    )


def check_flexi_run(run: Run) -> None:
  """Raises unless a FlexiViT run's patch sizes can train on its images.

  Every size in `config.model.flexi_patch_sizes` must divide
  `config.image_size`, and the objective must be one whose targets do not
  depend on the patch size (classification).
  """
  sizes = run.model.flexi_patch_sizes()
  if not sizes:
    return
  bad = [p for p in sizes if run.data.image_size % p]
  if bad:
    raise ValueError(
        f'config.model.flexi_patch_sizes: {bad} do not divide '
        f'config.image_size={run.data.image_size}: use sizes that divide it '
        '(FlexiViT at 240 px: 48,40,30,24,20,16,15,12,10,8).'
    )
  if run.objective.objective != 'classification':
    raise ValueError(
        f'config.model.flexi_patch_sizes is set with '
        f'config.objective={run.objective.objective!r}: FlexiViT training '
        'needs the classification objective (or leave the sizes empty).'
    )


def get_base() -> ml_collections.ConfigDict:
  """Returns the base config (digits, a small ViT, 2-core CPU friendly).

  Every field is declared here with a one-line comment. A default another
  module needs on its own (a public dataclass or function constructible
  without a config) is declared once, there, and read here::

    mpp.*           `objectives.mpp.MppConfig`: target='3bit',
                    corruption_rate=0.5, mask_prob=0.8, random_prob=0.1,
                    bits=3.
    mesh            `sharding.DEFAULT_MESH`: (('data', -1), ('fsdp', 1)).
    sharding_rules  `sharding.DEFAULT_RULES`: (('.*', 'auto'),).
    fsdp_min_size   `sharding.DEFAULT_FSDP_MIN_SIZE`: 16384 (2**14).

  The two free-form groups are empty here; their fields take these values
  when a config leaves them out::

    model.*  the registry's config of `model_name`
             (`vit_jax.models.model_fields(model_name)`).
    pp.*     `preprocess.PreprocessConfig`: inception_crop=True,
             crop_area_range=(0.05, 1.0), flip=True, eval_crop_fraction=1.0,
             randaugment=(), mean=None, std=None (None: pixels in
             [-1, 1]); a dataset preset may set others
             (`input_pipeline.DATASET_PRESETS`: 'digits' and the VTAB
             tasks turn inception_crop and flip off).

  Returns:
    A new ConfigDict (callers change their copy).
  """
  mpp_defaults = objectives.mpp.MppConfig()
  c = ml_collections.ConfigDict()
  # Model.
  c.model_name = 'ViT-Ti_16'  # Registry name (vit_jax.models.MODEL_NAMES).
  c.model = ml_collections.ConfigDict()  # get_model overrides (nested dicts).
  c.compute_dtype = 'float32'  # 'bfloat16' for mixed precision.
  c.remat = False  # Recompute encoder blocks in the backward pass.
  c.scan = False  # nn.scan over encoder blocks.
  c.pretrained_path = ''  # .npz to fine-tune from (local, gs:// or URL).
  # The timm model (vit_jax.timm_models.TIMM_MODELS) the model is; a
  # .safetensors pretrained_path is read in its layout.
  c.timm_model = ''
  # Data.
  c.dataset = 'digits'  # tfds name, 'digits', 'image_folder', 'vtab/<task>'.
  c.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # tfds dir.
  c.tfds_download = False  # Download unprepared tfds datasets (network).
  c.image_folder = ''  # Root of an image-folder dataset.
  c.image_folder_test_percent = 10  # Automatic test split of image folders.
  c.skip_bad_images = False  # Skip undecodable images (else an error).
  c.train_split = ml_collections.config_dict.placeholder(str)  # Preset.
  c.eval_split = ml_collections.config_dict.placeholder(str)  # Or 'holdout'.
  c.num_classes = ml_collections.config_dict.placeholder(int)  # Preset.
  c.image_size = 224  # Input resolution (pixels).
  c.pp = ml_collections.ConfigDict()  # preprocess.PreprocessConfig fields.
  c.shuffle_buffer = 50_000  # Examples in the shuffle buffer.
  # NaFlex: images at their own aspect ratio as patch sequences (tuples).
  c.naflex = ml_collections.ConfigDict()
  # Tokens per image, one per bucket drawn per step, e.g. (256, 576, 784);
  # the batch is config.batch at the longest, scaled up for shorter ones.
  # () = fixed-size images of config.image_size.
  c.naflex.seq_lens = ()
  c.naflex.patch_size = 0  # Pixels per patch side; 0: the model's.
  c.prefetch = 2  # Batches in flight to the devices.
  # Optimisation.
  c.batch = 512  # Global training batch.
  c.batch_eval = 512  # Global evaluation batch.
  c.accum_steps = 1  # Micro-batches per update (gradient accumulation).
  c.total_steps = 10_000  # Optimizer updates.
  c.optimizer = 'sgd'  # 'sgd' (momentum), 'adam', 'adafactor' or 'muon'.
  c.base_lr = 0.03  # Peak learning rate.
  c.warmup_steps = 500  # Linear warm-up from 0.
  c.decay_type = 'cosine'  # 'cosine', 'linear' or 'constant' after warm-up.
  c.weight_decay = 0.0  # Decoupled weight decay of matrices.
  c.momentum = 0.9  # Momentum of SGD, Adafactor and Muon.
  c.beta1 = 0.9  # Adam beta1 (also Muon's AdamW).
  c.beta2 = 0.999  # Adam beta2; Adafactor: its second-moment decay cap.
  c.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
  # Dtype of the first moment / momentum (Adam, SGD, Adafactor, Muon), e.g.
  # 'bfloat16' (half the memory of that state); None: the parameters' dtype.
  c.mu_dtype = ml_collections.config_dict.placeholder(str)
  # (regex, options) pairs: the regex searched in '/'-joined parameter paths,
  # options any of lr_mult, weight_decay, frozen (docs/finetuning.md).
  c.param_groups = ()
  # Layer-wise lr decay: block i of L at decay**(L - i), embeddings
  # decay**(L + 1), head 1; None: off.
  c.layer_decay = ml_collections.config_dict.placeholder(float)
  c.loss = 'softmax_xent'  # Or 'sigmoid_xent'.
  c.objective = 'classification'  # Or 'mpp': masked patch prediction.
  c.mpp = ml_collections.ConfigDict()  # objectives.mpp.MppConfig fields.
  # '3bit' mean colour, '4x4' colours, 'l2' pixels.
  c.mpp.target = mpp_defaults.target
  # Fraction of patches corrupted per image.
  c.mpp.corruption_rate = mpp_defaults.corruption_rate
  # Of those: replaced by the [mask] embedding,
  c.mpp.mask_prob = mpp_defaults.mask_prob
  # by a random patch's (the rest are kept).
  c.mpp.random_prob = mpp_defaults.random_prob
  c.mpp.bits = mpp_defaults.bits  # Bits per colour channel of the targets.
  c.label_smoothing = 0.0  # Label-smoothing factor.
  # Mixup (classification): Beta(a, a) mixing of each batch's images and
  # labels with the batch rolled by one; 0 turns it off.
  c.mixup_alpha = 0.0
  c.ema_decay = ml_collections.config_dict.placeholder(float)  # Polyak, [0, 1).
  # Optimiser rules beside Adam and SGD. optimizer='adafactor' also reads
  # momentum (0: none), mu_dtype (of the momentum) and beta2 (the cap of the
  # second-moment decay); 'muon' reads momentum (Muon's), mu_dtype, and
  # beta1, beta2 (of the AdamW for the parameters that are not matrices).
  c.adafactor = ml_collections.ConfigDict()
  # Second-moment decay 1 - t^-decay_rate at step t (capped at beta2).
  c.adafactor.decay_rate = 0.8
  # Factor a leaf's second moment when its two largest dims are at least this.
  c.adafactor.min_dim_size_to_factor = 32
  # Clip each leaf's update to this RMS; None: no clipping.
  c.adafactor.clipping_threshold = ml_collections.config_dict.placeholder(float)
  c.muon = ml_collections.ConfigDict()
  # Muon's updates scaled to this RMS (0.2: AdamW's, so one base_lr serves
  # both); None: optax's sqrt(max(1, fan_out / fan_in)) instead.
  c.muon.consistent_rms = 0.2
  # Sharding.
  c.mesh = sharding.DEFAULT_MESH  # Mesh axes; fsdp > 1 shards params.
  # (regex, spec) per parameter path.
  c.sharding_rules = sharding.DEFAULT_RULES
  # Smaller tensors are replicated under FSDP.
  c.fsdp_min_size = sharding.DEFAULT_FSDP_MIN_SIZE
  # Loop.
  c.seed = 0  # Run seed (init, dropout, data order).
  c.log_every = 50  # Steps between training-metric writes.
  c.eval_every = 1000  # Steps between evaluations (and at the end).
  c.checkpoint_every = 1000  # Steps between checkpoints (and at the end).
  c.keep_checkpoints = 3  # Checkpoints kept.
  c.async_checkpoints = True  # Write checkpoints in the background.
  c.profile = False  # Capture a profiler trace early in training.
  # Extra evaluators (vit_jax/evaluators), run every `every` steps and at the
  # end; 0 disables.
  c.evals = ml_collections.ConfigDict()
  c.evals.fewshot = ml_collections.ConfigDict()
  c.evals.fewshot.every = 0  # Steps between few-shot evaluations; 0: off.
  c.evals.fewshot.dataset = ''  # Dataset of the probe ('' = config.dataset).
  c.evals.fewshot.shots = (1, 5, 10, 25)  # Training images per class.
  c.evals.fewshot.seeds = 3  # Random draws of the shots per k.
  c.evals.fewshot.representation = 'pre_logits'  # A sown intermediate.
  c.evals.fewshot.l2_grid = ()  # Regulariser sweep (() = 2^-10 ... 2^10).
  c.evals.fewshot.default_l2 = 1.0  # Regulariser when k = 1.
  c.evals.fewshot.pool_per_class = 100  # Train images featurised per class.
  c.evals.fewshot.max_test_examples = 10_000  # Test images featurised.
  # ImageNet variants (tfds, read from tfds_data_dir) scored by a 1000-way
  # ImageNet head; metrics <name>/accuracy, <name>/top5, <name>/examples.
  c.evals.imagenet_real = ml_collections.ConfigDict()
  c.evals.imagenet_real.every = 0  # Steps between ImageNet-ReaL evals; 0: off.
  c.evals.imagenet_v2 = ml_collections.ConfigDict()
  c.evals.imagenet_v2.every = 0  # Steps between ImageNet-v2 evals; 0: off.
  c.evals.imagenet_a = ml_collections.ConfigDict()
  c.evals.imagenet_a.every = 0  # Steps between ImageNet-A evals; 0: off.
  c.evals.imagenet_r = ml_collections.ConfigDict()
  c.evals.imagenet_r.every = 0  # Steps between ImageNet-R evals; 0: off.
  c.evals.imagenet_sketch = ml_collections.ConfigDict()
  c.evals.imagenet_sketch.every = 0  # Steps between ImageNet-Sketch evals.
  return c


# ----------------------------------------------------------------------------
# Command-line overrides (`--config.<field>=<value>`) and the field listing.
# ----------------------------------------------------------------------------

# Preprocessing fields the input pipeline sets itself.
_PP_FIELDS_SET_ELSEWHERE = {
    'image_size': 'config.image_size',
    'num_classes': 'config.num_classes',
}
_TRUE = ('true', 't', 'yes', 'y', '1', 'on')
_FALSE = ('false', 'f', 'no', 'n', '0', 'off')


def _dotted_names(config: Any, prefix: str = '') -> list[str]:
  """Every leaf field of a ConfigDict as a dotted name, in declared order."""
  names = []
  for key in config.keys():
    value = config[key]
    if (
        isinstance(value, ml_collections.ConfigDict)
        and prefix + key not in _FREE_FORM
    ):
      names.extend(_dotted_names(value, f'{prefix}{key}.'))
    else:
      names.append(prefix + key)
  return names


def parse_value(
    text: str, current: Any, kind: type[Any] | None, name: str
) -> Any:
  """A command-line value as the type of the field it sets.

  Args:
    text: The text after `=`.
    current: The field's value now (its type decides when `kind` is None).
    kind: The field's declared type, if known (placeholders have one).
    name: Dotted field name, for the error message.

  Returns:
    The typed value; 'None' gives None.

  Raises:
    ValueError: naming the field, the text and the type expected.
  """
  import ast  # pylint: disable=g-import-not-at-top

  kind = kind or (type(current) if current is not None else None)
  if kind is ml_collections.ConfigDict:
    kind = dict
  if text.strip() in ('None', 'none', 'null'):
    return None
  try:
    if kind is bool:
      if text.lower() in _TRUE:
        return True
      if text.lower() in _FALSE:
        return False
      raise ValueError
    if kind is int:
      return int(text)
    if kind is float:
      return float(text)
    if kind is str:
      if len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
        return text[1:-1]
      return text
    if kind in (tuple, list):
      value = ast.literal_eval(text) if text.strip() else ()
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return tuple(value)
    if kind is dict:
      value = ast.literal_eval(text)
      if not isinstance(value, Mapping):
        raise ValueError
      return value
  except (ValueError, SyntaxError):
    assert kind is not None  # Only the typed branches above raise.
    raise ValueError(
        f'config.{name}={text!r}: expected {kind.__name__} (e.g. '
        f'{current!r}).'
    ) from None
  try:  # Type unknown (a field whose value is None): a Python literal.
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _set(config: Any, parts: list[str], value: Any) -> None:
  """Sets a dotted field, creating the groups on the way."""
  node = config
  for part in parts[:-1]:
    if part not in node or node[part] is None:
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  try:
    node[parts[-1]] = value
  except TypeError as e:  # ConfigDict's own type check.
    raise ValueError(f'config.{".".join(parts)}={value!r}: {e}') from None


def _free_form_fields(
    config: Any, group: str
) -> tuple[dict[str, Any], Mapping[str, str | None]]:
  """(fields with values, fields set elsewhere) of `model` or `pp`."""
  if group == 'model':
    fields = models.model_fields(config.model_name)
    values = models.get_config(
        config.model_name, **_plain(config.get('model') or {})
    )
    merged = {}
    for key, default in fields.items():
      value = values.get(key, default)
      if isinstance(default, Mapping):
        value = {**default, **(value or {})}
      merged[key] = value
    return merged, registry.MODEL_FIELDS_SET_ELSEWHERE
  fields = {
      f.name: f.default
      for f in dataclasses.fields(preprocess.PreprocessConfig)
      if f.default is not dataclasses.MISSING
  }
  return (
      {**fields, **_plain(config.get('pp') or {})},
      _PP_FIELDS_SET_ELSEWHERE,
  )


def _override_free_form(config: Any, name: str, text: str) -> None:
  group, _, rest = name.partition('.')
  if not rest:  # The whole group: `--config.model="{...}"`.
    value = parse_value(text, {}, dict, name)
    for key, inner in _flatten(value).items():
      _override_free_form(config, f'{group}.{key}', repr(inner))
    return
  fields, elsewhere = _free_form_fields(config, group)
  parts = rest.split('.')
  what = (
      f'of {config.model_name} (vit_jax.models.model_fields)'
      if group == 'model'
      else 'of preprocess.PreprocessConfig'
  )
  if parts[0] in elsewhere:
    other = elsewhere[parts[0]]
    raise ValueError(
        f'config.{name} is set by {other} (override that).'
        if other
        else f'config.{name} cannot be set from a config.'
    )
  node = fields
  for i, part in enumerate(parts):
    if not isinstance(node, Mapping) or part not in node:
      raise config_errors.unknown_field(
          name, config_errors.nested_names(fields, f'{group}.'), what
      )
    if i == len(parts) - 1 and isinstance(node[part], Mapping):
      keys = config_errors.nested_names(
          node[part], f'{group}.{".".join(parts)}.'
      )
      raise ValueError(
          f'config.{name} is a group of fields: set one of '
          f'them (e.g. config.{keys[0]}).'
      )
    if i < len(parts) - 1 and not isinstance(node[part], Mapping):
      raise ValueError(
          f'config.{group}.{".".join(parts[:i + 1])} is not a '
          f'group of fields {what}.'
      )
    node = node[part]
  value = parse_value(text, node, None, name)
  _set(config, [group] + parts, value)


def _flatten(value: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, inner in value.items():
    if isinstance(inner, Mapping):
      out.update(_flatten(inner, f'{prefix}{key}.'))
    else:
      out[prefix + key] = inner
  return out


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]
) -> None:
  """Applies `--config.<field>=<value>` overrides to a config, in place.

  Any field `get_base()` declares can be set, whether or not the config file
  set it; so can any field of the model (`model.transformer.dropout_rate`,
  `model.classifier`, `model.attention_impl`: `vit_jax.models.model_fields`
  of the final `model_name`) and of the preprocessing (`pp.flip`). Values
  are read as the field's type. Model and preprocessing fields are applied
  after the others, so `--config.model_name` decides which model's fields
  exist.

  Args:
    config: The loaded experiment config.
    overrides: (dotted field name without `config.`, text) pairs, in command
      line order.

  Raises:
    ValueError: an unknown field (naming the closest ones) or a value that
      does not parse as the field's type; nothing has been changed then
      only if it is the first override.
  """
  base = get_base()
  declared = _dotted_names(base)
  ordered = [o for o in overrides if o[0].split('.')[0] not in _FREE_FORM] + [
      o for o in overrides if o[0].split('.')[0] in _FREE_FORM
  ]
  for name, text in ordered:
    if name.split('.')[0] in _FREE_FORM:
      _override_free_form(config, name, text)
      continue
    found, default = _walk(base, name)
    if not found:
      raise config_errors.unknown_field(
          name, declared, 'of vit_jax.config_lib.get_base()'
      )
    if isinstance(default, ml_collections.ConfigDict):
      raise ValueError(
          f'config.{name} is a group of fields: set one of them '
          f'(e.g. config.{_dotted_names(default, name + ".")[0]})'
          '.'
      )
    parent, _, last = name.rpartition('.')
    kind = (_walk(base, parent)[1] if parent else base).get_type(last)
    found, current = _walk(config, name)
    value = parse_value(text, current if found else default, kind, name)
    _set(config, name.split('.'), value)


def _base_comments() -> dict[str, str]:
  """{dotted field: its comment} read from `get_base()`'s source."""
  import inspect  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  comments, block = {}, []
  for line in inspect.getsource(get_base).splitlines():
    stripped = line.strip()
    if stripped.startswith('#'):
      block.append(stripped.lstrip('# '))
      continue
    match = re.match(r'c\.([\w.]+) = .*?(?:#\s*(.*))?$', stripped)
    if match:
      comments[match.group(1)] = match.group(2) or ' '.join(block)
    block = []
  return comments


def describe(config: ml_collections.ConfigDict) -> str:
  """Every field a command line can set, with its value and comment.

  What `--print_config` prints: the fields of `get_base()` (the config's
  values), then every field of the config's model and preprocessing.

  Args:
    config: An experiment config (after overrides).

  Returns:
    Text, one `config.<field> = <value>  # comment` line per field.
  """
  comments = _base_comments()
  lines = []
  for name in _dotted_names(get_base()):
    if name in _FREE_FORM:
      continue
    found, value = _walk(config, name)
    value = _plain(value) if found else _plain(_walk(get_base(), name)[1])
    comment = comments.get(name, '')
    lines.append(
        f'config.{name} = {value!r}' + (f'  # {comment}' if comment else '')
    )
  for group in sorted(_FREE_FORM):
    fields, elsewhere = _free_form_fields(config, group)
    lines.append(f'# config.{group}.*: {comments.get(group, "")}')
    for name, value in _flatten(fields).items():
      if name.split('.')[0] not in elsewhere:
        lines.append(f'config.{group}.{name} = {value!r}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Run identity: which fields may differ between two commands of one run.
# ----------------------------------------------------------------------------

# Fields that change only how a run is watched, laid out or read, never what
# it trains: a resumed run may change them (its log says so).
RUN_WATCH_FIELDS = frozenset(
    {
        'log_every',
        'eval_every',
        'checkpoint_every',
        'keep_checkpoints',
        'async_checkpoints',
        'profile',
        'prefetch',
        'batch_eval',
        'tfds_data_dir',
        'tfds_download',
        'mesh',
        'sharding_rules',
        'fsdp_min_size',
        'remat',
        'model.remat_policy',
        'model.attention_impl',
    }
)
# Prefixes of such fields (every few-shot evaluator setting).
_RUN_WATCH_PREFIXES = ('evals.',)
# May grow or shrink while a run lives (the schedule follows); said in the
# log. Everything else is the run's identity.
RUN_EXTENDABLE_FIELDS = frozenset({'total_steps'})


def run_fields(config: Any) -> dict[str, Any]:
  """Every field's effective value, by dotted name, as JSON would store it.

  Omitted fields take `get_base()`'s value and the model and preprocessing
  groups are expanded to all their fields (`model.transformer.dropout_rate`
  of the model's own config when the config file does not set it), so two
  configs that train the same thing compare equal however they were written.

  Args:
    config: An experiment config, or a mapping of some fields (e.g. a run's
      `config.json`).

  Returns:
    {dotted field name: value (tuples as lists)}.
  """
  import json  # pylint: disable=g-import-not-at-top

  base = get_base()
  full = get_base()
  full.update(
      _plain(config)
      if not isinstance(config, ml_collections.ConfigDict)
      else config.to_dict()
  )
  fields = {}
  for name in _dotted_names(base):
    if name in _FREE_FORM:
      continue
    fields[name] = _plain(_walk(full, name)[1])
  for group in sorted(_FREE_FORM):
    values, _ = _free_form_fields(full, group)
    fields.update({f'{group}.{k}': v for k, v in _flatten(values).items()})
  return json.loads(json.dumps(fields, default=str))


def run_differences(
    saved: Any, requested: Any
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
  """What differs between a run's config and a command's, and may it.

  Args:
    saved: The config the run was started with (its `config.json`).
    requested: The config of the new command.

  Returns:
    (differences that change what is trained, differences allowed for a
    resumed run: watch fields and `total_steps`), each {field: (saved,
    requested)}.
  """
  old, new = run_fields(saved), run_fields(requested)
  identity: dict[str, tuple[Any, Any]] = {}
  allowed: dict[str, tuple[Any, Any]] = {}
  for name in sorted(set(old) | set(new)):
    if old.get(name) == new.get(name):
      continue
    watch = (
        name in RUN_WATCH_FIELDS
        or name in RUN_EXTENDABLE_FIELDS
        or name.startswith(_RUN_WATCH_PREFIXES)
    )
    (allowed if watch else identity)[name] = (old.get(name), new.get(name))
  return identity, allowed


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`).

  Raises:
    FileNotFoundError: naming the file, when the workdir is not a run.
  """
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: --workdir must be a directory written by '
        'python -m vit_jax.main.'
    )
  with tf.io.gfile.GFile(path) as f:
    fields = json.load(f)
  config = get_base()
  config.update(fields)
  return config


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads an experiment config the way `--config=` does, from Python.

  For notebooks and scripts: `load_config_file('configs/finetune.py:b16,
  cifar10')` returns what `python -m vit_jax.main
  --config=configs/finetune.py:b16,cifar10` trains with (before
  `--config.<field>` overrides, which are plain assignments here).

  Args:
    spec: `<path to a config .py file>[:<argument of its get_config>]`.

  Returns:
    The file's `get_config(argument)` (or `get_config()` without one).

  Raises:
    FileNotFoundError: naming the file, when it does not exist.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  path, sep, arg = spec.partition('.py:')
  path = path + '.py' if sep else spec
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'Config file {path} does not exist (from {spec!r}). Give the path '
        'of a file in configs/, e.g. configs/finetune.py:b16,cifar10.'
    )
  module_name = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  assert module_spec is not None and module_spec.loader is not None, path
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if sep else module.get_config()


def parse_args(arg: str | None) -> tuple[list[str], bool]:
  """Splits 'a,b,runlocal' into (['a', 'b'], runlocal=True)."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  runlocal = 'runlocal' in parts
  return [p for p in parts if p != 'runlocal'], runlocal


# Short names accepted in config arguments (full registry names work too).
MODEL_ALIASES = {
    'ti16': 'ViT-Ti_16',
    's16': 'ViT-S_16',
    's32': 'ViT-S_32',
    'b8': 'ViT-B_8',
    'b16': 'ViT-B_16',
    'b32': 'ViT-B_32',
    'l16': 'ViT-L_16',
    'l32': 'ViT-L_32',
    'h14': 'ViT-H_14',
    'g14': 'ViT-g_14',
    'G14': 'ViT-G_14',
    'r_ti16': 'R+ViT-Ti_16',
    'r26_s32': 'R26+ViT-S_32',
    'r50_b16': 'R50+ViT-B_16',
    'r50_l32': 'R50+ViT-L_32',
    'mixer_b16': 'Mixer-B_16',
    'mixer_b32': 'Mixer-B_32',
    'mixer_l16': 'Mixer-L_16',
}


def resolve_model(name: str) -> str:
  """Maps a short name ('b16') or a registry name to the registry name."""
  full = MODEL_ALIASES.get(name, name)
  models.get_config(full)  # Raises with the list of known names.
  return full


def use_timm_model(
    c: ml_collections.ConfigDict, name: str, *, image_size: bool = True
) -> timm_models.TimmModel:
  """Makes `c`'s model timm's model `name`, with its preprocessing.

  Sets `config.timm_model`, `model_name` (the registry's), the `model`
  options that make it behave as timm's model of that name, `pp.mean` /
  `pp.std` and (with `image_size`) the resolution of its published weights,
  so that the run's config records them. Options already in `c.model` (a
  runlocal model's patches and depth) are kept.

  Args:
    c: The config to change.
    name: A `vit_jax.timm_models.TIMM_MODELS` name.
    image_size: Also set `config.image_size` to the weights' resolution.

  Returns:
    The model's `TIMM_MODELS` entry.

  Raises:
    ValueError: an unknown name, naming the closest ones.
  """
  entry = timm_models.TIMM_MODELS.get(name)
  if entry is None:
    raise config_errors.unknown_field(
        name, list(timm_models.TIMM_MODELS), 'of vit_jax.timm_models'
    )
  c.timm_model = name
  c.model_name = entry.registry
  model = dict(entry.options)
  model.update(c.model)
  c.model = model
  for key in ('mean', 'std'):
    if entry.preprocessing.get(key) is not None:
      c.pp[key] = tuple(entry.preprocessing[key])
  if image_size and entry.preprocessing.get('image_size'):
    c.image_size = int(entry.preprocessing['image_size'])
  return entry


def set_runlocal(c: ml_collections.ConfigDict) -> None:
  """Turns a config into a seconds-long smoke run on digits (CPU).

  The model keeps its family and width but gets 4x4 patches and one block,
  so a 16-pixel run exercises the real code path in a few seconds.
  """
  if models.model_class(c.model_name) is models.MlpMixer:
    c.model = {'patches': {'size': (4, 4)}, 'num_blocks': 1}
  elif models.get_config(c.model_name).get('resnet') is not None:
    c.model = {
        'resnet': {'num_layers': (), 'width_factor': 0.5},
        'patches': {'size': (1, 1)},
        'transformer': {'num_layers': 1},
    }
  else:
    c.model = {'patches': {'size': (4, 4)}, 'transformer': {'num_layers': 1}}
  c.dataset = 'digits'
  c.image_folder = ''
  c.num_classes = None
  c.train_split = None
  c.eval_split = None
  c.loss = 'softmax_xent'
  c.pp = {'inception_crop': False, 'flip': False}
  c.image_size = 16
  c.shuffle_buffer = 2000
  c.batch = 16
  c.batch_eval = 64
  c.accum_steps = 1
  c.total_steps = 4
  c.warmup_steps = 1
  c.log_every = 2
  c.eval_every = 4
  c.checkpoint_every = 2
  if c.evals.fewshot.every:
    c.evals.fewshot.every = 4
    c.evals.fewshot.shots = (1, 5)
    c.evals.fewshot.seeds = 2
    c.evals.fewshot.pool_per_class = 10
  # Digits' 10-way head cannot be scored on ImageNet's classes.
  for name in imagenet_variants.VARIANTS:
    c.evals[name].every = 0


def pretraining_base(
    model_arg: str, *, dropout: float
) -> ml_collections.ConfigDict:
  """What the paper's pre-training rows share (Table 3, Appendix B.1).

  Adam (β1 0.9, β2 0.999), batch 4096, 10k linear warm-up steps, clipping at
  global norm 1, 224 px, and a tanh representation layer of the model's width.

  Args:
    model_arg: Registry or short model name.
    dropout: Transformer dropout rate of the row.

  Returns:
    A base config; the caller sets dataset, lr, decay, weight decay, steps.
  """
  c = get_base()
  c.model_name = resolve_model(model_arg)
  hidden = models.get_config(c.model_name).get('hidden_size')
  c.model = {
      'representation_size': hidden,
      'transformer': {'dropout_rate': dropout},
  }
  c.image_size = 224
  c.optimizer = 'adam'
  c.batch = 4096
  c.batch_eval = 4096
  c.warmup_steps = 10_000
  c.grad_clip_norm = 1.0
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  return c
