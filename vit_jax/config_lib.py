"""Fields shared by every experiment config, with their defaults.

Each experiment file in configs/ starts from `get_base()` and sets what
differs; every field is documented here once. Field names are a contract
(scripts, docs and `metrics.jsonl` rely on them).
"""

from collections.abc import Mapping
from typing import Any

import ml_collections


_FROM_BASE = object()
CONFIG_FILE = 'config.json'  # A run's config, in its workdir.


def _walk(config: Any, name: str) -> tuple[bool, Any]:
  """(found, value) of a dotted field; not found when a part is absent."""
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  value = config
  for part in name.split('.'):
    if value is None:
      return False, None
    if isinstance(value, Mapping) or hasattr(value, 'keys'):
      if part not in value:
        return False, None
    elif not hasattr(value, part):
      return False, None
    value = vit.config_value(value, part)
  return True, value


def get(config: Any, name: str, default: Any = _FROM_BASE) -> Any:
  """`config.<name>`; for a field the config lacks, `get_base()`'s value.

  Works on ConfigDicts, dicts and plain objects, so library functions accept
  partial configs (tests, notebooks) as well as the full experiment configs,
  and a field a config omits means what `get_base()` declares for it (one
  source of defaults). A dotted name ('evals.fewshot.every') walks nested
  fields.

  Args:
    config: The (possibly partial) config.
    name: Field name or dotted path.
    default: Only for fields whose `get_base()` value is None (derived
      elsewhere, e.g. from a dataset preset): returned when the field is
      absent or None.

  Returns:
    The value.

  Raises:
    KeyError: `name` is not a field of `get_base()` and `default` is not
      given.
  """
  found, value = _walk(config, name)
  if default is not _FROM_BASE:
    return default if value is None else value
  if found:
    return value
  found, value = _walk(get_base(), name)
  if not found:
    raise KeyError(f'{name!r} is not a config field (config_lib.get_base()).')
  return value


def get_base() -> ml_collections.ConfigDict:
  """Returns the base config (digits, a small ViT, 2-core CPU friendly)."""
  c = ml_collections.ConfigDict()
  # Model.
  c.model_name = 'ViT-Ti_16'  # Registry name (vit_jax.models.MODEL_NAMES).
  c.model = ml_collections.ConfigDict()  # get_model overrides (nested dicts).
  c.compute_dtype = 'float32'  # 'bfloat16' for mixed precision.
  c.remat = False  # Recompute encoder blocks in the backward pass.
  c.scan = False  # nn.scan over encoder blocks.
  c.pretrained_path = ''  # .npz to fine-tune from (local, gs:// or URL).
  # Data.
  c.dataset = 'digits'  # tfds name, 'digits' or 'image_folder'.
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
  c.prefetch = 2  # Batches in flight to the devices.
  # Optimisation.
  c.batch = 512  # Global training batch.
  c.batch_eval = 512  # Global evaluation batch.
  c.accum_steps = 1  # Micro-batches per update (gradient accumulation).
  c.total_steps = 10_000  # Optimizer updates.
  c.optimizer = 'sgd'  # 'sgd' (momentum) or 'adam' (decoupled decay).
  c.base_lr = 0.03  # Peak learning rate.
  c.warmup_steps = 500  # Linear warm-up from 0.
  c.decay_type = 'cosine'  # 'cosine', 'linear' or 'constant' after warm-up.
  c.weight_decay = 0.0  # Decoupled weight decay of matrices.
  c.momentum = 0.9  # SGD momentum.
  c.beta1 = 0.9  # Adam beta1.
  c.beta2 = 0.999  # Adam beta2.
  c.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
  c.loss = 'softmax_xent'  # Or 'sigmoid_xent'.
  c.objective = 'classification'  # Or 'mpp': masked patch prediction.
  c.mpp = ml_collections.ConfigDict()  # objectives.mpp.MppConfig fields.
  c.mpp.target = '3bit'  # '3bit' mean colour, '4x4' colours, 'l2' pixels.
  c.mpp.corruption_rate = 0.5  # Fraction of patches corrupted per image.
  c.mpp.mask_prob = 0.8  # Of those: replaced by the [mask] embedding,
  c.mpp.random_prob = 0.1  # by a random patch's (the rest are kept).
  c.mpp.bits = 3  # Bits per colour channel of the targets.
  c.label_smoothing = 0.0  # Label-smoothing factor.
  c.ema_decay = ml_collections.config_dict.placeholder(float)  # Polyak, [0, 1).
  # Sharding.
  c.mesh = (('data', -1), ('fsdp', 1))  # Mesh axes; fsdp > 1 shards params.
  c.sharding_rules = (('.*', 'fsdp'),)  # (regex, spec) per parameter path.
  c.fsdp_min_size = 2**14  # Smaller tensors are replicated under FSDP.
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
  return c


def model_args(config: Any) -> dict[str, Any]:
  """The config's model as values for `vit_jax.models.get_model`.

  `vit_jax.models.get_model(num_classes=n, **model_args(config))` is the
  model a run of `config` trains (objective-specific heads aside: see
  `train.build_model`).

  Args:
    config: Provides `model_name` and optionally `model` (get_model
      overrides), `compute_dtype`, `remat`, `scan` (else `get_base()`'s).

  Returns:
    {'name': registry name, 'dtype': compute dtype, the `config.model`
    overrides, and 'remat' / 'scan' when they are on}.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  overrides = get(config, 'model')
  overrides = (overrides.to_dict() if hasattr(overrides, 'to_dict')
               else dict(overrides or {}))
  args = {'name': config.model_name,
          'dtype': jnp.dtype(get(config, 'compute_dtype')), **overrides}
  # Only when on: families without the option (MlpMixer has neither) build
  # with the defaults, and asking them for it names the field.
  for option in ('remat', 'scan'):
    if get(config, option):
      args[option] = True
  return args


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
        'python -m vit_jax.main.')
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
        'of a file in configs/, e.g. configs/finetune.py:b16,cifar10.')
  module_name = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
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
    'ti16': 'ViT-Ti_16', 's16': 'ViT-S_16', 's32': 'ViT-S_32',
    'b8': 'ViT-B_8', 'b16': 'ViT-B_16', 'b32': 'ViT-B_32',
    'l16': 'ViT-L_16', 'l32': 'ViT-L_32', 'h14': 'ViT-H_14',
    'g14': 'ViT-g_14', 'G14': 'ViT-G_14', 'r_ti16': 'R+ViT-Ti_16',
    'r26_s32': 'R26+ViT-S_32', 'r50_b16': 'R50+ViT-B_16',
    'r50_l32': 'R50+ViT-L_32', 'mixer_b16': 'Mixer-B_16',
    'mixer_b32': 'Mixer-B_32', 'mixer_l16': 'Mixer-L_16',
}


def resolve_model(name: str) -> str:
  """Maps a short name ('b16') or a registry name to the registry name."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  full = MODEL_ALIASES.get(name, name)
  models.get_config(full)  # Raises with the list of known names.
  return full


def set_runlocal(c: ml_collections.ConfigDict) -> None:
  """Turns a config into a seconds-long smoke run on digits (CPU).

  The model keeps its family and width but gets 4x4 patches and one block,
  so a 16-pixel run exercises the real code path in a few seconds.
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  if models.model_class(c.model_name) is models.MlpMixer:
    c.model = {'patches': {'size': (4, 4)}, 'num_blocks': 1}
  elif models.get_config(c.model_name).get('resnet') is not None:
    c.model = {'resnet': {'num_layers': (), 'width_factor': 0.5},
               'patches': {'size': (1, 1)}, 'transformer': {'num_layers': 1}}
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


def pretraining_base(model_arg: str, *, dropout: float
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
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  c = get_base()
  c.model_name = resolve_model(model_arg)
  hidden = models.get_config(c.model_name).get('hidden_size')
  c.model = {'representation_size': hidden,
             'transformer': {'dropout_rate': dropout}}
  c.image_size = 224
  c.optimizer = 'adam'
  c.batch = 4096
  c.batch_eval = 4096
  c.warmup_steps = 10_000
  c.grad_clip_norm = 1.0
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  return c
