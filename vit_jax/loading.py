r"""Loads a model to run from any source: a run, `.npz`, transformers, timm.

  loaded = loading.load_model('/tmp/vit_digits')  # A training run directory.
  logits = loaded.model.apply({'params': loaded.params}, images, train=False)

`load_model(source)` reads a training run directory (`load_run`: its
config, newest checkpoint and class names), a published-layout `.npz`
(`load_npz`), a transformers directory or a timm `.safetensors` (through
`vit_jax.interop`, whose optional dependencies are imported only for
those). `define_model_flags` /
`load_from_flags` are the flags the serving commands (`vit_jax.predict`,
`vit_jax.export`, `vit_jax.analysis`) share; `define_dynamic_image_size_flag`
and `dynamic_model` the run-time resolution option of those and
`vit_jax.evaluate`.
"""

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

from vit_jax import checkpoint
from vit_jax import interop
from vit_jax import timm_interop
from vit_jax import timm_models
import vit_jax.models


@dataclasses.dataclass
class Loaded:
  """A model ready to run, from any supported source.

  Attributes:
    model: The flax module (unscanned: `params` has one entry per block).
    params: Its parameters (host arrays).
    image_size: (height, width) of its inputs.
    class_names: Label names when the source has them, else None.
    source: What was read (for messages).
    run: The parsed run config (`config_lib.Run`) of a workdir, or None.
    timm_model: The `vit_jax.timm_models.TIMM_MODELS` name of a timm file,
      or None.
  """

  model: Any
  params: interop.Params
  image_size: tuple[int, int]
  class_names: tuple[str, ...] | None
  source: str
  run: Any = None
  timm_model: str | None = None

  @property
  def normalization(self) -> tuple[Any, Any]:
    """(mean, std) of [0, 1] pixels the inputs are normalised with.

    A run's `config.pp.mean` / `std`; a timm family's, from
    `vit_jax.timm_models`; (None, None) means [-1, 1].
    """
    if self.run is not None:
      pp = self.run.data.pp
      return pp.get('mean'), pp.get('std')
    if self.timm_model:
      preprocessing = timm_models.TIMM_MODELS[self.timm_model].preprocessing
      return preprocessing.get('mean'), preprocessing.get('std')
    return None, None


def _is_run_dir(path: str) -> bool:
  # A run's config.json is the experiment config; a transformers one has
  # model_type.
  file = os.path.join(path, interop.TRANSFORMERS_CONFIG)
  if not os.path.isfile(file):
    return False
  with open(file, encoding='utf-8') as f:
    fields = json.load(f)
  return 'model_name' in fields and 'model_type' not in fields


def _head_size(params: interop.Params) -> int | None:
  head = checkpoint.flatten(params).get('head/kernel')
  return None if head is None else int(head.shape[-1])


def load_run(workdir: str) -> Loaded:
  """The model of a training run, as its `config.json` built it.

  Parameters: the newest checkpoint's (EMA ones when the run kept them),
  else `final_params.npz`. The head is the one the parameters have (none
  after masked patch prediction, whose own head is left unused).

  Raises:
    FileNotFoundError: neither a checkpoint nor final parameters.
  """
  # pylint: disable=g-import-not-at-top
  from vit_jax import config_lib
  from vit_jax import input_pipeline
  from vit_jax import run_checkpoints
  # pylint: enable=g-import-not-at-top
  run = config_lib.parse(config_lib.load_run_config(workdir))
  try:
    step, params = run_checkpoints.load_params(workdir)
    source = f'{workdir} step {step}'
  except FileNotFoundError:
    source = os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE)
    if not os.path.exists(source):
      raise FileNotFoundError(
          f'{workdir} has neither a checkpoint nor '
          f'{run_checkpoints.FINAL_PARAMS_FILE}: nothing to load.'
      ) from None
    params = checkpoint.load(source)
  params = checkpoint.unstack_encoder_blocks(params)
  class_names = None
  names_file = os.path.join(workdir, input_pipeline.CLASS_NAMES_FILE)
  if os.path.exists(names_file):
    with open(names_file, encoding='utf-8') as f:
      class_names = tuple(json.load(f)['class_names']) or None
  args = run.model.model_args()
  args.pop('scan', None)  # The blocks are unstacked above.
  args.pop('remat', None)
  model = vit_jax.models.get_model(num_classes=_head_size(params), **args)
  size = run.data.image_size
  return Loaded(model, params, (size, size), class_names, source, run=run)


def load_npz(
    path: str,
    model_name: str | None = None,
    *,
    gelu_approximate: bool = True,
    layer_norm_epsilon: float = 1e-6,
    options: Mapping[str, Any] | None = None,
) -> Loaded:
  """A published-layout `.npz` (any layout `checkpoint.load` reads).

  Args:
    path: The file (local or gs://; `file.npz:img` for a SigLIP tower).
    model_name: The registry name; without it, a plain ViT is inferred
      from the shapes (`spec_from_params`).
    gelu_approximate: Without `model_name`: see `VitSpec`.
    layer_norm_epsilon: Likewise.
    options: With `model_name`: other `get_model` fields, e.g. the
      `options` of the `TIMM_MODELS` entry an `.npz` was converted from.

  Returns:
    A `Loaded` whose image size is the one the position embeddings cover.
  """
  params = checkpoint.unstack_encoder_blocks(checkpoint.load(path))
  if not model_name:
    spec = interop.spec_from_params(
        params,
        gelu_approximate=gelu_approximate,
        layer_norm_epsilon=layer_norm_epsilon,
    )
    return Loaded(
        interop.model_from_spec(spec), params, spec.image_size, None, path
    )
  model = vit_jax.models.get_model(
      model_name, num_classes=_head_size(params), **(options or {})
  )
  flat = checkpoint.flatten(params)
  posemb = flat.get(interop.POSEMB_PATH)
  stride = getattr(model, 'total_stride', None)
  if posemb is None or stride is None:
    raise interop.ConversionError(
        f'{path}: cannot tell the image size of {model_name} from its '
        'parameters: pass image_size.'
    )
  # A class token has an embedding of its own unless the table covers the
  # patches only (`posemb_class_token=False`, timm's `no_embed_class`).
  class_entry = 'cls' in flat and getattr(model, 'posemb_class_token', True)
  grid = interop.square_grid(
      posemb.shape[1] - (1 if class_entry else 0), interop.POSEMB_PATH
  )
  return Loaded(
      model, params, (grid[0] * stride[0], grid[1] * stride[1]), None, path
  )


def load_model(
    source: str,
    *,
    model_name: str | None = None,
    image_size: int | None = None,
    gelu_approximate: bool = True,
    layer_norm_epsilon: float = 1e-6,
    timm_model: str | None = None,
) -> Loaded:
  """Loads a model from a run, an npz, a transformers dir or a timm file.

  Args:
    source: A training run directory (`load_run`), a transformers
      directory (`from_transformers`), a timm `.safetensors`
      (`from_timm`, or `load_timm` with `timm_model`) or an `.npz`
      (`load_npz`).
    model_name: For an `.npz`: see `load_npz`.
    image_size: Input size; default: the run's, or what the position
      embeddings cover.
    gelu_approximate: For an `.npz` without `model_name`: see `VitSpec`.
    layer_norm_epsilon: Likewise.
    timm_model: The timm model name of a timm `.safetensors` (one of
      `vit_jax.timm_models.TIMM_MODELS`, e.g.
      'vit_small_patch14_reg4_dinov2'): read as that model
      (`timm_interop.load_timm`). Files `to_timm` wrote with a timm model
      name carry it: for them it may be left out.

  Returns:
    A `Loaded`.

  Raises:
    ConversionError: `timm_model` with another source than a
      `.safetensors` file, or with `model_name`.
  """
  source = str(source)
  if not timm_model and source.endswith('.safetensors'):
    # A file `to_timm` wrote for a timm model says which.
    timm_model = timm_interop.stored_timm_model(source)
  if timm_model:
    if not source.endswith('.safetensors') or os.path.isdir(source):
      raise interop.ConversionError(
          f'timm_model={timm_model!r} reads a timm .safetensors file; '
          f'{source} is not one: drop --timm_model, or pass the '
          '.safetensors state dict.'
      )
    if model_name:
      raise interop.ConversionError(
          f'timm_model={timm_model!r} names the model already: drop '
          f'model_name={model_name!r}.'
      )
    model, params = timm_interop.load_timm(source, timm_model)
    loaded = Loaded(
        model,
        params,
        timm_interop.image_size_of(model, params, timm_model),
        None,
        source,
        timm_model=timm_model,
    )
  elif os.path.isdir(source) and _is_run_dir(source):
    loaded = load_run(source)
  elif os.path.isdir(source):
    model, params = interop.from_transformers(source)
    loaded = Loaded(
        model,
        params,
        interop.spec_from_model(model, params).image_size,
        interop.transformers_class_names(source),
        source,
    )
  elif source.endswith('.safetensors'):
    model, params = interop.from_timm(source)
    loaded = Loaded(
        model,
        params,
        interop.spec_from_model(model, params).image_size,
        None,
        source,
    )
  else:
    loaded = load_npz(
        source,
        model_name,
        gelu_approximate=gelu_approximate,
        layer_norm_epsilon=layer_norm_epsilon,
    )
  if image_size:
    loaded.image_size = (int(image_size), int(image_size))
  return loaded


def dynamic_model(model: Any, source: str) -> Any:
  """`model` taking images of any size (`dynamic_image_size=True`).

  Its learned position embeddings are resized to each input's patch grid in
  the forward pass; the parameters are unchanged.

  Args:
    model: A flax module from `vit_jax.models.get_model`.
    source: What it was loaded from (for the refusal).

  Raises:
    ValueError: the model has no such option (MLP-Mixer, BiT ResNet).
  """
  if 'dynamic_image_size' not in {f.name for f in dataclasses.fields(model)}:
    raise ValueError(
        f'{source}: {type(model).__name__} has no dynamic_image_size '
        'option (ViTs only): leave --dynamic_image_size off.'
    )
  return model.clone(dynamic_image_size=True)


def define_dynamic_image_size_flag(help_text: str) -> None:
  """`--dynamic_image_size` (see `dynamic_model`), in the program's words.

  Args:
    help_text: What the flag does in this program, after the common part.
  """
  # pylint: disable-next=g-import-not-at-top
  from absl import flags

  flags.DEFINE_bool(
      'dynamic_image_size',
      False,
      'Run the model at other image sizes than it was made for (sides '
      'multiples of the patch size), its position embeddings resized in the '
      f'forward pass (ViTs): {help_text}',
  )


def define_model_flags() -> None:
  """The flags of `load_from_flags` (for the export and predict commands)."""
  # pylint: disable-next=g-import-not-at-top
  from absl import flags

  flags.DEFINE_string('workdir', None, 'A training run directory.')
  flags.DEFINE_string(
      'pretrained_path',
      None,
      'An .npz (with --model, or a '
      'ViT inferred from its shapes), a transformers '
      'directory or a timm .safetensors.',
  )
  flags.DEFINE_string('model', None, 'Registry name for an .npz.')
  flags.DEFINE_string(
      'timm_model',
      None,
      'The timm model name of a timm .safetensors --pretrained_path (one '
      'of vit_jax.convert.TIMM_MODELS, e.g. vit_small_patch14_dinov2).',
  )
  flags.DEFINE_integer(
      'image_size',
      None,
      "Input size (default: the run's, "
      'or what the position embeddings cover).',
  )


def load_from_flags() -> Loaded:
  """`load_model` of --workdir or --pretrained_path (exactly one)."""
  # pylint: disable-next=g-import-not-at-top
  from absl import flags

  f = flags.FLAGS
  if bool(f.workdir) == bool(f.pretrained_path):
    raise interop.ConversionError(
        'Pass exactly one of --workdir or ' '--pretrained_path.'
    )
  return load_model(
      f.workdir or f.pretrained_path,
      model_name=f.model,
      image_size=f.image_size,
      timm_model=f.timm_model,
  )
