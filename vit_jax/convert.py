r"""Interchange with transformers and timm: the command line.

  # A run (or an .npz) to a transformers directory, and back:
  python -m vit_jax.convert --input=/tmp/vit_digits --output=/tmp/vit_hf
  python -m vit_jax.convert --input=/tmp/vit_hf --output=/tmp/vit_back.npz
  # To timm's `vision_transformer` state dict:
  python -m vit_jax.convert --input=/tmp/vit_digits \
      --output=/tmp/vit_timm.safetensors
  # A timm model's .safetensors (DINOv2, SigLIP 2, AIMv2, ...; the names
  # are TIMM_MODELS') to an .npz:
  python -m vit_jax.convert --input=/tmp/dinov2.safetensors \
      --timm_model=vit_small_patch14_dinov2 --output=/tmp/dinov2.npz

`convert(input_path, output)` is what the command does, from Python. The
formats live in `vit_jax.interop` (`from_transformers`, `to_transformers`,
`from_timm`, `to_timm`, ...) and the loader of any input in
`vit_jax.loading` (`load_model`, ...); their public names are importable from
here too, where they were first declared.
"""

from collections.abc import Sequence

from vit_jax import checkpoint
from vit_jax import interop
from vit_jax import loading
from vit_jax import timm_interop
from vit_jax import timm_models

_FORMATS = ('transformers', 'timm', 'npz')

# The formats (vit_jax.interop).
Params = interop.Params
TRANSFORMERS_CONFIG = interop.TRANSFORMERS_CONFIG
TRANSFORMERS_WEIGHTS = interop.TRANSFORMERS_WEIGHTS
TRANSFORMERS_INDEX = interop.TRANSFORMERS_INDEX
TIMM_METADATA_KEY = interop.TIMM_METADATA_KEY
ConversionError = interop.ConversionError
VitSpec = interop.VitSpec
spec_from_params = interop.spec_from_params
spec_from_model = interop.spec_from_model
model_from_spec = interop.model_from_spec
follow_umask = interop.follow_umask
check_output = interop.check_output
write_output = interop.write_output
read_transformers_config = interop.read_transformers_config
transformers_class_names = interop.transformers_class_names
from_transformers = interop.from_transformers
transformers_config = interop.transformers_config
to_transformers = interop.to_transformers
timm_kwargs = interop.timm_kwargs
from_timm = interop.from_timm
create_timm_model = interop.create_timm_model
# timm's models of today's families (vit_jax.timm_models, timm_interop).
TIMM_MODELS = timm_models.TIMM_MODELS
TimmModel = timm_models.TimmModel
load_timm = timm_interop.load_timm
to_timm = timm_interop.to_timm
# The loader (vit_jax.loading).
Loaded = loading.Loaded
load_run = loading.load_run
load_npz = loading.load_npz
load_model = loading.load_model
define_model_flags = loading.define_model_flags
load_from_flags = loading.load_from_flags


def output_format(output: str, to: str | None) -> str:
  """'transformers', 'timm' or 'npz', from --to or the output's name."""
  if to:
    if to not in _FORMATS:
      raise ConversionError(f'--to={to!r}; use one of {_FORMATS}.')
    return to
  if output.endswith('.npz'):
    return 'npz'
  if output.endswith('.safetensors'):
    return 'timm'
  return 'transformers'


def convert(
    input_path: str,
    output: str,
    *,
    to: str | None = None,
    model_name: str | None = None,
    gelu_approximate: bool = True,
    layer_norm_epsilon: float = 1e-6,
    overwrite: bool = False,
    timm_model: str | None = None,
) -> str:
  """What `python -m vit_jax.convert` does: any input to any format.

  Args:
    input_path: A run directory, an `.npz`, a transformers directory or a
      timm `.safetensors` (see `load_model`).
    output: An `.npz`, a `.safetensors` (timm) or a directory
      (transformers); see `output_format`.
    to: The output format, instead of the one `output`'s name implies.
    model_name: For an `.npz` input: see `load_npz`.
    gelu_approximate: For an `.npz` input without `model_name`.
    layer_norm_epsilon: Likewise.
    overwrite: Replace an existing `output` (a file, or a directory and
      all the files in it); without it an existing output is refused
      before anything is read.
    timm_model: For a timm `.safetensors` input: its timm model name (one
      of `TIMM_MODELS`); a `.safetensors` output is then that timm model's
      state dict too.

  Returns:
    The format written.

  Raises:
    FileExistsError: `output` exists and `overwrite` is False.
  """
  fmt = output_format(output, to)
  if timm_model:
    timm_interop.timm_model_entry(timm_model)  # An unknown name, first.
  check_output(output, overwrite=overwrite)
  loaded = load_model(
      input_path,
      model_name=model_name,
      gelu_approximate=gelu_approximate,
      layer_norm_epsilon=layer_norm_epsilon,
      timm_model=timm_model,
  )
  if fmt == 'npz':
    if '://' in str(output):  # checkpoint.save replaces it atomically.
      checkpoint.save(loaded.params, output)
    else:
      write_output(output, lambda path: checkpoint.save(loaded.params, path))
  elif fmt == 'timm':
    write_output(
        output,
        lambda path: to_timm(
            loaded.model,
            loaded.params,
            path,
            timm_model=timm_model,
            image_size=loaded.image_size,
        ),
    )
  else:
    names = loaded.class_names
    spec = spec_from_model(
        loaded.model, loaded.params, image_size=loaded.image_size
    )
    if names is not None and len(names) != spec.num_classes:
      names = None  # e.g. a run whose head was fine-tuned elsewhere.
    write_output(
        output,
        lambda path: to_transformers(
            loaded.model,
            loaded.params,
            path,
            class_names=names,
            image_size=loaded.image_size,
        ),
    )
  return fmt


def main(argv: Sequence[str]) -> None:
  # pylint: disable=g-import-not-at-top
  from absl import app
  from absl import flags
  # pylint: enable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  flag_values = flags.FLAGS
  fmt = convert(
      flag_values.input,
      flag_values.output,
      to=flag_values.to,
      model_name=flag_values.model,
      gelu_approximate=flag_values.gelu_approximate,
      layer_norm_epsilon=flag_values.layer_norm_epsilon,
      overwrite=flag_values.overwrite,
      timm_model=flag_values.timm_model,
  )
  print(f'Wrote {flag_values.output} ({fmt}) from {flag_values.input}.')


def _define_flags() -> None:
  # pylint: disable=g-import-not-at-top
  from absl import flags
  # pylint: enable=g-import-not-at-top
  flags.DEFINE_string(
      'input',
      None,
      'A run directory, an .npz, a '
      'transformers directory or a timm .safetensors.',
  )
  flags.DEFINE_string(
      'output',
      None,
      'An .npz, a directory (transformers) ' 'or a .safetensors (timm).',
  )
  flags.DEFINE_bool(
      'overwrite',
      False,
      'Replace an existing --output (a '
      'file, or a directory and every file in it).',
  )
  flags.DEFINE_enum(
      'to',
      None,
      list(_FORMATS),
      "Output format (default: from the output's name).",
  )
  flags.DEFINE_string(
      'model',
      None,
      'Registry name for an .npz input ' '(default: inferred from the shapes).',
  )
  flags.DEFINE_bool(
      'gelu_approximate',
      True,
      'For an .npz input: tanh GELU '
      '(the paper code) or, with --nogelu_approximate, exact.',
  )
  flags.DEFINE_float('layer_norm_epsilon', 1e-6, 'For an .npz input.')
  flags.DEFINE_string(
      'timm_model',
      None,
      'For a timm .safetensors input: its timm model name (one of '
      'vit_jax.convert.TIMM_MODELS, e.g. vit_small_patch14_dinov2).',
  )
  flags.mark_flags_as_required(['input', 'output'])


if __name__ == '__main__':
  # pylint: disable=g-import-not-at-top
  from vit_jax import cli as _cli
  # pylint: enable=g-import-not-at-top
  _define_flags()
  _cli.run(main)
