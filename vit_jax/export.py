r"""Serving artefacts: StableHLO (`jax.export`) and a TF SavedModel.

  python -m vit_jax.export --workdir=/tmp/vit_digits --format=stablehlo \
      --out=/tmp/vit_digits_hlo
  python -m vit_jax.export --workdir=/tmp/vit_digits --format=savedmodel \
      --out=/tmp/vit_digits_tf
  python -m vit_jax.export --pretrained_path=ViT-B_16.npz --model=ViT-B_16 \
      --format=savedmodel --out=/tmp/b16_tf

StableHLO: `<out>/model.jax_exported`, a serialised `jax.export.Exported`
whose batch dimension is symbolic, with the parameters inside:

  exported = jax.export.deserialize(open(path, 'rb').read())
  logits = exported.call(images)   # images [N, H, W, 3] float32 in [-1, 1]

SavedModel (through jax2tf, the parameters as TF variables), for TF
Serving: signature `serving_default` takes `images` [N, H, W, 3] float32 in
[-1, 1] and returns `logits` [N, classes]; `serving_uint8` takes raw
`images` [N, h, w, 3] uint8 of any one size and applies the evaluation
preprocessing first (bilinear resize to H x W, then to [-1, 1]).

Both write `<out>/serving.json` (input size, classes, platforms) and, when
the source has class names, `<out>/labels.txt`.

`--dynamic_image_size` (ViTs): height and width are symbolic too, any
multiples of the patch size (total stride), the position embeddings resized
to each input's patch grid in the forward pass (corner-aligned bilinear,
`posemb_resize='bilinear'`, the one resize `jax.export` traces at a symbolic
size):

  python -m vit_jax.export --workdir=/tmp/vit_digits --dynamic_image_size \
      --out=/tmp/vit_digits_any_size
  exported.call(images_32x48)   # [N, 32, 48, 3]

The SavedModel's `serving_default` then takes [N, H, W, 3] of any such size
and `serving_uint8` resizes each batch to the nearest multiples of the patch
size instead of the one H x W.
"""

from collections.abc import Sequence
import json
import os
from typing import Any

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ('stablehlo', 'savedmodel')
STABLEHLO_FILE = 'model.jax_exported'
SERVING_FILE = 'serving.json'
LABELS_FILE = 'labels.txt'
# jax.export lowers for platforms it does not run on, so one artefact can
# serve on any of them.
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def _portable(model: Any) -> Any:
  # attention_impl='auto' picks per the tracing backend (fused kernels on
  # GPU and TPU); an artefact for several platforms needs the one every
  # platform runs.
  if hasattr(model, 'attention_impl'):
    return model.clone(attention_impl='einsum')
  return model


def _check_dynamic(model: Any, source: str) -> Any:
  """`model` with `dynamic_image_size`, refused where a symbolic height and
  width cannot be traced."""
  # pylint: disable-next=g-import-not-at-top
  from vit_jax import loading

  model = loading.dynamic_model(model, source)
  if getattr(model, 'posemb', 'learn') == 'sincos2d':
    raise ValueError(
        f"{source}: posemb='sincos2d' tables are built at a concrete size: "
        'export it without --dynamic_image_size (one image size).'
    )
  if model.posemb_resize != 'bilinear':
    raise ValueError(
        f"{source}: posemb_resize='{model.posemb_resize}' resizes with "
        'jax.image.resize, which needs concrete sizes: export it without '
        "--dynamic_image_size, or with posemb_resize='bilinear'."
    )
  return model


def _input_shape(
    image_size: Sequence[int], stride: Sequence[int] | None
) -> tuple[Any, ...]:
  """(batch, height, width, 3): batch symbolic; height and width symbolic
  multiples of `stride` (h, w) when given, else `image_size`."""
  if stride is None:
    (batch,) = jax.export.symbolic_shape('batch')
    return (batch, *image_size, 3)
  return tuple(
      jax.export.symbolic_shape(
          f'batch, {stride[0]}*height, {stride[1]}*width, 3'
      )
  )


def _host(params: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)


def _write_side_files(
    out_dir: str,
    *,
    fmt: str,
    image_size: Sequence[int],
    num_classes: int,
    platforms: Sequence[str],
    class_names: Sequence[str] | None,
    multiple_of: Sequence[int] | None = None,
) -> None:
  # fileio imports TensorFlow (seconds): not for --help or a refusal.
  from vit_jax import fileio  # pylint: disable=g-import-not-at-top

  h, w = image_size
  images: dict[str, Any] = {
      'shape': [None, h, w, 3],
      'dtype': 'float32',
      'range': [-1.0, 1.0],
  }
  resize = 'resize to H x W'
  if multiple_of is not None:
    images['shape'] = [None, None, None, 3]
    images['multiple_of'] = [int(m) for m in multiple_of]
    images['trained_size'] = [int(h), int(w)]
    resize = 'resize to the nearest multiples of multiple_of'
  info = {
      'format': fmt,
      'platforms': list(platforms),
      'inputs': {'images': images},
      'outputs': {'logits': {'shape': [None, num_classes], 'dtype': 'float32'}},
  }
  if fmt == 'savedmodel':
    info['signatures'] = {
        'serving_default': 'images float32 [N, H, W, 3] in [-1, 1] -> logits',
        'serving_uint8': f'images uint8 [N, h, w, 3] -> {resize} '
        '(bilinear), [-1, 1] -> logits',
    }
  fileio.write_text_atomic(
      os.path.join(out_dir, SERVING_FILE), json.dumps(info, indent=1)
  )
  if class_names:
    fileio.write_text_atomic(
        os.path.join(out_dir, LABELS_FILE),
        ''.join(f'{n}\n' for n in class_names),
    )


def _num_classes(model: Any, params: Any, image_size: Sequence[int]) -> int:
  shape = jax.eval_shape(
      lambda p: model.apply(
          {'params': p}, jnp.zeros((1, *image_size, 3)), train=False
      ),
      params,
  )
  return int(shape.shape[-1])


def export_stablehlo(
    model: Any,
    params: Any,
    image_size: Sequence[int],
    out_dir: str,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    class_names: Sequence[str] | None = None,
    dynamic_image_size: bool = False,
) -> str:
  """Serialises `images -> logits` with a symbolic batch dimension.

  Args:
    model: A flax module (`model.apply(..., train=False)` gives logits).
    params: Its parameters (embedded as constants).
    image_size: (height, width) of the inputs (with `dynamic_image_size`:
      the size the parameters were trained at).
    out_dir: Output directory (created).
    platforms: jax.export platforms ('cpu', 'cuda', 'rocm', 'tpu').
    class_names: Written to labels.txt when given.
    dynamic_image_size: Symbolic height and width too, multiples of the
      model's total stride (a ViT with `posemb_resize='bilinear'`).

  Returns:
    The path of the `.jax_exported` file.

  Raises:
    ValueError: `dynamic_image_size` for a model that cannot trace it.
  """
  stride = None
  if dynamic_image_size:
    model = _check_dynamic(model, 'the model')
    stride = model.total_stride
  model = _portable(model)
  params = _host(params)

  def serve(images):
    logits = model.apply({'params': params}, images, train=False)
    return logits.astype(jnp.float32)

  exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(
      jax.ShapeDtypeStruct(_input_shape(image_size, stride), jnp.float32)
  )
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, STABLEHLO_FILE)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(exported.serialize())
  os.replace(tmp, path)
  _write_side_files(
      out_dir,
      fmt='stablehlo',
      image_size=image_size,
      num_classes=int(exported.out_avals[0].shape[-1]),
      platforms=platforms,
      class_names=class_names,
      multiple_of=stride,
  )
  return path


def load_stablehlo(out_dir: str) -> jax.export.Exported:
  """The `Exported` of `export_stablehlo` (call it: `.call(images)`)."""
  with open(os.path.join(out_dir, STABLEHLO_FILE), 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


def export_savedmodel(
    model: Any,
    params: Any,
    image_size: Sequence[int],
    out_dir: str,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    class_names: Sequence[str] | None = None,
    dynamic_image_size: bool = False,
    normalization: tuple[Any, Any] = (None, None),
) -> str:
  """Writes a TF SavedModel with the serving signatures (module docstring).

  Args:
    model: A flax module.
    params: Its parameters (stored as TF variables).
    image_size: (height, width) of the model's inputs (with
      `dynamic_image_size`: the size the parameters were trained at).
    out_dir: SavedModel directory.
    platforms: Platforms of the embedded StableHLO ('cpu', 'cuda', 'tpu').
    class_names: Written to labels.txt when given.
    dynamic_image_size: Any height and width that are multiples of the
      model's total stride (see `export_stablehlo`).
    normalization: (mean, std) of [0, 1] pixels `serving_uint8` normalises
      with (`preprocess.normalize`); (None, None): [-1, 1].

  Returns:
    `out_dir`.

  Raises:
    ValueError: `dynamic_image_size` for a model that cannot trace it.
  """
  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf
  import tensorflow as tf

  from vit_jax import preprocess
  # pylint: enable=g-import-not-at-top
  stride = None
  images_shape = '(batch, ...)'
  if dynamic_image_size:
    model = _check_dynamic(model, 'the model')
    stride = model.total_stride
    images_shape = f'(batch, {stride[0]}*height, {stride[1]}*width, 3)'
  model = _portable(model)
  params = _host(params)
  h, w = image_size
  num_classes = _num_classes(model, params, image_size)
  predict = jax2tf.convert(
      lambda p, images: model.apply({'params': p}, images, train=False).astype(
          jnp.float32
      ),
      polymorphic_shapes=[None, images_shape],
      with_gradient=False,
      native_serialization_platforms=tuple(platforms),
  )
  module = tf.Module()
  # Variables, not constants: a graph proto holds at most 2 GB.
  module.params = tf.nest.map_structure(
      lambda x: tf.Variable(x, trainable=False), params
  )
  variables = module.params

  side = None if dynamic_image_size else (h, w)

  @tf.function(
      autograph=False,
      input_signature=[
          tf.TensorSpec(
              [None, *(side or (None, None)), 3], tf.float32, name='images'
          )
      ],
  )
  def serve(images):
    return {'logits': predict(variables, images)}

  def serving_size(images):
    if stride is None:
      return (h, w)
    # The nearest multiples of the stride (at least one), as
    # `vit_jax.predict.own_size` rounds (half to even, like Python's round).
    return [
        tf.maximum(
            1, tf.cast(tf.round(tf.shape(images)[axis + 1] / s), tf.int32)
        )
        * s
        for axis, s in enumerate(stride)
    ]

  @tf.function(
      autograph=False,
      input_signature=[
          tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')
      ],
  )
  def serve_uint8(images):
    # The evaluation preprocessing (vit_jax.preprocess), batched.
    x = preprocess.normalize(
        preprocess.resize(images, serving_size(images)), *normalization
    )
    return {'logits': predict(variables, x)}

  module.serve, module.serve_uint8 = serve, serve_uint8
  os.makedirs(out_dir, exist_ok=True)  # Made here: with the umask's mode.
  # TensorFlow's save silences absl logging while it walks the module and
  # then "restores" the verbosity flag's value, which before absl's flags are
  # parsed (a program of the caller's own) is WARNING: keep the level as it was,
  # so the caller's INFO logs (ours included) still show afterwards.
  absl_logger = absl_logging.get_absl_logger()
  level = absl_logger.level
  try:
    tf.saved_model.save(
        module,
        out_dir,
        signatures={'serving_default': serve, 'serving_uint8': serve_uint8},
    )
  finally:
    absl_logger.setLevel(level)
  # TensorFlow makes its directories 0755 whatever the umask; give what it
  # wrote the modes of the other files.
  from vit_jax import interop  # pylint: disable=g-import-not-at-top

  for name in ('saved_model.pb', 'fingerprint.pb', 'variables', 'assets'):
    if os.path.exists(os.path.join(out_dir, name)):
      interop.follow_umask(os.path.join(out_dir, name))
  _write_side_files(
      out_dir,
      fmt='savedmodel',
      image_size=image_size,
      num_classes=num_classes,
      platforms=platforms,
      class_names=class_names,
      multiple_of=stride,
  )
  return out_dir


def check_platforms(platforms: Sequence[str]) -> None:
  """Refuses platform names `jax.export` does not lower for."""
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise ValueError(
        f'--platforms={",".join(platforms)}: use one or more '
        f'of {",".join(PLATFORMS)}.'
    )


def export(
    loaded: Any,
    fmt: str,
    out_dir: str,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    overwrite: bool = False,
    dynamic_image_size: bool = False,
) -> str:
  """Exports a `vit_jax.loading.Loaded` model in format `fmt`.

  Args:
    loaded: The model (`vit_jax.loading.load_model`).
    fmt: One of `FORMATS`.
    out_dir: Output directory; written beside it and moved into place once
      complete, so it ends up holding only this export's files.
    platforms: Platforms to lower for (`PLATFORMS`).
    overwrite: Replace an existing `out_dir` that holds files (refused
      otherwise, before any work).
    dynamic_image_size: Symbolic height and width (`export_stablehlo`).

  Returns:
    The path of the StableHLO file, or the SavedModel directory.
  """
  # pylint: disable-next=g-import-not-at-top
  from vit_jax import interop

  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r}; use one of {FORMATS}.')
  check_platforms(platforms)
  interop.check_output(out_dir, overwrite=overwrite, flag='--out')
  if dynamic_image_size:  # Refused before anything is lowered or written.
    _check_dynamic(loaded.model, loaded.source)
  # The uint8 signature normalises as the model's training did.
  extra = {} if fmt == 'stablehlo' else {'normalization': loaded.normalization}
  fn = export_stablehlo if fmt == 'stablehlo' else export_savedmodel
  interop.write_output(
      out_dir,
      lambda stage: fn(
          loaded.model,
          loaded.params,
          loaded.image_size,
          stage,
          platforms=platforms,
          class_names=loaded.class_names,
          dynamic_image_size=dynamic_image_size,
          **extra,
      ),
  )
  return (
      os.path.join(out_dir, STABLEHLO_FILE) if fmt == 'stablehlo' else out_dir
  )


def main(argv: Sequence[str]) -> None:
  # pylint: disable=g-import-not-at-top
  from absl import app
  from absl import flags

  from vit_jax import interop
  from vit_jax import loading
  # pylint: enable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  # Every refusal before the model is read, lowered or written.
  check_platforms(f.platforms)
  interop.check_output(f.out, overwrite=f.overwrite, flag='--out')
  loaded = loading.load_from_flags()
  path = export(
      loaded,
      f.format,
      f.out,
      platforms=f.platforms,
      overwrite=f.overwrite,
      dynamic_image_size=f.dynamic_image_size,
  )
  size = f'{loaded.image_size[0]}x{loaded.image_size[1]}'
  if f.dynamic_image_size:
    sh, sw = loaded.model.total_stride
    size = f'any {sh}*h x {sw}*w (trained at {size})'
  print(
      f'Wrote {path} ({f.format}, {size} inputs, platforms '
      f'{",".join(f.platforms)}) from {loaded.source}.'
  )


def _define_flags() -> None:
  # pylint: disable=g-import-not-at-top
  from absl import flags

  from vit_jax import loading
  # pylint: enable=g-import-not-at-top
  loading.define_model_flags()
  loading.define_dynamic_image_size_flag(
      'height and width of the exported function are symbolic, any '
      'multiples of the patch size.'
  )
  # --help lists them with this program's own flags.
  flags.adopt_module_key_flags(loading)
  flags.DEFINE_enum('format', 'stablehlo', list(FORMATS), 'What to write.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_bool(
      'overwrite',
      False,
      'Replace an existing --out that '
      'holds files (everything in it is deleted).',
  )
  flags.DEFINE_list(
      'platforms',
      list(DEFAULT_PLATFORMS),
      'Platforms to lower for (cpu, cuda, rocm, tpu).',
  )
  flags.mark_flags_as_required(['out'])


if __name__ == '__main__':
  # pylint: disable-next=g-import-not-at-top
  from vit_jax import cli as _cli

  _define_flags()
  _cli.run(main)
