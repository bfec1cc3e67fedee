r"""Top-k predictions of a model on image files: a table, or JSON.

  # A training run (its final parameters, class names and preprocessing):
  python -m vit_jax.predict --workdir=/tmp/vit_digits --images=/tmp/digits
  # A published checkpoint with the ImageNet class names shipped here:
  python -m vit_jax.predict --pretrained_path=ViT-B_16.npz --model=ViT-B_16 \
      --labels=imagenet1k --images=cat.jpg,dog.png --top_k=5 --json

`--images` (and paths after the flags) takes files and directories
(searched recursively for .jpg, .jpeg and .png). Images go through the
evaluation preprocessing (decode, RGB, bilinear resize, or the run's central
crop, then [-1, 1]) and are batched and sharded over all devices like
evaluation batches.

`--labels`: `imagenet1k` or `imagenet21k` (the lists shipped in
`vit_jax/labels/`, see SOURCE.md there), or a file with one name per line;
by default the run's class names (or a transformers directory's
`id2label`). The list must have one name per class of the head.

`--dynamic_image_size` (ViTs): each image at its own size, rounded to the
nearest multiple of the patch size (total stride), resized whole (no central
crop); the position embeddings are resized to its grid in the forward pass
(`get_model(..., dynamic_image_size=True)`).

`--naflex` (NaFlex ViTs; on by default for a run trained with NaFlex): each
image at its own aspect ratio, resized to the largest whole-patch size within
`--naflex_seq_len` tokens (default: the run's longest `naflex.seq_lens`,
else 256), cut into patches and padded to that length, as NaFlex evaluation
does; images of any shapes share one batch and one compiled program.
"""

from collections.abc import Sequence
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

LABEL_LISTS = ('imagenet1k', 'imagenet21k')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_LABELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'labels')


class PredictError(ValueError):
  """Inputs predict cannot use (names the file or the mismatch)."""


def read_labels(spec: str) -> tuple[str, ...]:
  """Class names: a shipped list ('imagenet1k', 'imagenet21k') or a file.

  A line may be `<id><TAB><name>` (the shipped lists: WordNet synset and
  lemmas); the name is what is returned.
  """
  path = (
      os.path.join(_LABELS_DIR, f'{spec}.txt') if spec in LABEL_LISTS else spec
  )
  if not os.path.isfile(path):
    raise PredictError(
        f'--labels={spec}: no such file; use '
        f'{" or ".join(LABEL_LISTS)} or a file with one '
        'class name per line.'
    )
  with open(path, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  while lines and not lines[-1].strip():
    lines.pop()
  return tuple(line.split('\t', 1)[-1] for line in lines)


def list_images(paths: Sequence[str]) -> list[str]:
  """Files as given; directories searched recursively (sorted)."""
  found = []
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [
            os.path.join(root, f)
            for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    elif os.path.isfile(path):
      found.append(path)
    else:
      raise PredictError(f'--images: {path} does not exist.')
  if not found:
    raise PredictError(
        f'--images={",".join(paths)}: no .jpg, .jpeg or .png ' 'files.'
    )
  return found


def _check_readable(path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      image.load()
  except Exception as e:  # pylint: disable=broad-except
    raise PredictError(
        f'Cannot read image {path} ({type(e).__name__}: '
        f'{e}): remove it or pass only images.'
    ) from None


def load_image(
    path: str,
    image_size: tuple[int, int],
    crop_fraction: float = 1.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
  """One image through the evaluation preprocessing: [H, W, 3] float32.

  Values in [-1, 1], or normalised with `mean` and `std` when given
  (`preprocess.normalize`).
  """
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf

  from vit_jax import preprocess
  # pylint: enable=g-import-not-at-top
  image = preprocess.to_rgb(preprocess.decode(tf.io.read_file(path)))
  if crop_fraction < 1.0:
    if image_size[0] != image_size[1]:
      raise PredictError('A central crop needs a square image size.')
    image = preprocess.central_crop(
        preprocess.resize_small(image, round(image_size[0] / crop_fraction)),
        image_size[0],
    )
  else:
    image = preprocess.resize(image, image_size)
  return preprocess.normalize(image, mean, std).numpy().astype(np.float32)


def load_naflex_image(
    path: str,
    patch_size: int,
    seq_len: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[np.ndarray, ...]:
  """One image as NaFlex evaluation sees it: `(patches, ptype, yabs, xabs)`.

  Decoded, RGB, resized at its own aspect ratio to the most whole patches
  within `seq_len` (`preprocess.resize_to_sequence`), normalised as
  `load_image` does, padded to `seq_len` tokens.
  """
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf

  from vit_jax import preprocess
  # pylint: enable=g-import-not-at-top
  image = preprocess.to_rgb(preprocess.decode(tf.io.read_file(path)))
  image = preprocess.resize_to_sequence(image, patch_size, seq_len)
  return tuple(
      t.numpy()
      for t in preprocess.to_naflex(image, patch_size, seq_len, mean, std)
  )


def own_size(path: str, stride: tuple[int, int]) -> tuple[int, int]:
  """An image's (height, width), each the nearest multiple of `stride`
  (at least one)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as image:
    width, height = image.size
  return (
      max(1, round(height / stride[0])) * stride[0],
      max(1, round(width / stride[1])) * stride[1],
  )


def _dynamic(loaded: Any) -> Any:
  """`loaded.model` taking images at their own size."""
  # pylint: disable-next=g-import-not-at-top
  from vit_jax import loading

  try:
    return loading.dynamic_model(loaded.model, loaded.source)
  except ValueError as e:
    raise PredictError(str(e)) from None


def _naflex(loaded: Any) -> tuple[Any, int]:
  """(`loaded.model` taking NaFlex tuples, its patch size)."""
  # pylint: disable-next=g-import-not-at-top
  from vit_jax.models import vit

  model = loaded.model
  fields = {f.name for f in dataclasses.fields(model)}
  if 'naflex' not in fields or getattr(model, 'resnet', None) is not None:
    raise PredictError(
        f'{loaded.source}: {type(model).__name__} has no naflex option '
        '(plain ViTs only): leave --naflex off.'
    )
  patch_h, patch_w = vit.patch_size_of(model.patches)
  if patch_h != patch_w:
    raise PredictError(
        f'{loaded.source}: NaFlex needs square patches, not '
        f'{patch_h}x{patch_w}.'
    )
  return model.clone(naflex=True), patch_h


def naflex_default(loaded: Any) -> tuple[bool, int]:
  """(whether a run was trained with NaFlex, its evaluation length or 256)."""
  naflex = None if loaded.run is None else loaded.run.data.naflex
  if naflex is not None and naflex.enabled:
    return True, naflex.eval_seq_len
  return False, 256


def _preprocessing(loaded: Any) -> tuple[float, Any, Any]:
  """The run's evaluation crop (1: the whole image, resized), mean and std.

  A timm family's file (`loaded.timm_model`) is normalised as its weights
  were trained (`vit_jax.timm_models`); other sources without a run: [-1, 1].
  """
  if loaded.run is None:
    return 1.0, *loaded.normalization
  # pylint: disable-next=g-import-not-at-top
  from vit_jax import preprocess

  pp = preprocess.PreprocessConfig.from_config(
      loaded.run.data.pp, image_size=loaded.image_size[0], num_classes=1
  )
  return pp.eval_crop_fraction, pp.mean, pp.std


def _mesh_and_shardings(loaded: Any):
  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding
  import vit_jax.models
  # pylint: enable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: loaded.params)
  if loaded.run is not None:  # As the run evaluated.
    mesh = sharding.mesh_from_config(loaded.run.mesh)
    return mesh, sharding.shardings_from_config(shapes, mesh, loaded.run.mesh)
  mesh = sharding.make_mesh()
  return mesh, sharding.tree_shardings(
      shapes, mesh, param_axes=vit_jax.models.PARAM_AXES
  )


def predict(
    loaded: Any,
    paths: Sequence[str],
    *,
    top_k: int = 5,
    class_names: Sequence[str] | None = None,
    batch_size: int = 64,
    dynamic_image_size: bool = False,
    naflex_seq_len: int | None = None,
) -> list[dict[str, Any]]:
  """Top-k classes (softmax probabilities) of each image.

  Args:
    loaded: A `vit_jax.loading.Loaded` model.
    paths: Image files.
    top_k: Classes per image (at most the head's size).
    class_names: One name per class, or None (indices only).
    batch_size: Images per step (rounded up to a multiple of the batch
      shards; the last batch is padded).
    dynamic_image_size: Each image at its own size (`own_size`: the nearest
      multiple of the patch size), resized whole, the position embeddings
      resized to its grid; batches hold images of one size.
    naflex_seq_len: NaFlex: each image at its own aspect ratio in at most
      this many patches, padded to it (`load_naflex_image`); batches mix
      shapes.

  Returns:
    [{'image': path, 'top_k': [{'rank', 'index', 'label', 'probability'}]}].

  Raises:
    PredictError: no head, label count != classes, unreadable image, a
      model without `dynamic_image_size` or `naflex` asked for it.
  """
  # pylint: disable-next=g-import-not-at-top
  from vit_jax import sharding

  if dynamic_image_size and naflex_seq_len:
    raise PredictError(
        '--dynamic_image_size and --naflex are two ways to keep an image '
        'whole: choose one.'
    )
  patch_size = 0
  if naflex_seq_len:
    model, patch_size = _naflex(loaded)
  else:
    model = _dynamic(loaded) if dynamic_image_size else loaded.model
  h, w = loaded.image_size

  def blank_batch(n: int, size: tuple[int, int]) -> Any:
    """`n` inputs of zeros (the last batch's padding)."""
    if not naflex_seq_len:
      return np.zeros((n, *size, 3), np.float32)
    patches = np.zeros(
        (n, naflex_seq_len, patch_size * patch_size * 3), np.float32
    )
    ptype, yabs, xabs = (
        np.zeros((n, naflex_seq_len), np.int32) for _ in range(3)
    )
    # One patch of zeros, as evaluation pads: no all-padding sequence.
    ptype[:, 0] = 1
    return patches, ptype, yabs, xabs

  num_classes = int(
      jax.eval_shape(
          lambda p: model.apply(
              {'params': p}, blank_batch(1, (h, w)), train=False
          ),
          loaded.params,
      ).shape[-1]
  )
  if not getattr(model, 'num_classes', None):
    raise PredictError(
        f'{loaded.source} has no classification head '
        f'(num_classes={model.num_classes}): nothing to '
        'predict.'
    )
  if class_names is not None and len(class_names) != num_classes:
    raise PredictError(
        f"The label list has {len(class_names)} names but the model's head "
        f'has {num_classes} classes ({loaded.source}).'
    )
  for path in paths:  # Every image, before any work is done.
    _check_readable(path)
  mesh, param_shardings = _mesh_and_shardings(loaded)
  params = sharding.put_global(loaded.params, param_shardings)
  shards = sharding.batch_shards(mesh)
  batch_size = -(-max(1, batch_size) // shards) * shards
  batches = sharding.batch_sharding(mesh)
  fn = jax.jit(
      sharding.on_mesh(
          lambda p, x: jax.nn.softmax(
              model.apply({'params': p}, x, train=False).astype(np.float32),
              axis=-1,
          ),
          mesh,
      ),
      in_shardings=(param_shardings, batches),
      out_shardings=sharding.replicated(mesh),
  )
  crop, mean, std = _preprocessing(loaded)
  if dynamic_image_size:
    crop = 1.0
  k = min(top_k, num_classes)
  # One compiled program per size (NaFlex: one for all).
  by_size: dict[tuple[int, int], list[str]] = {}
  for path in paths:
    size = own_size(path, model.total_stride) if dynamic_image_size else (h, w)
    by_size.setdefault(size, []).append(path)
  found = {}
  for size, group in by_size.items():
    for start in range(0, len(group), batch_size):
      chunk = group[start : start + batch_size]
      images = blank_batch(batch_size, size)  # Zeros: the padding.
      for i, path in enumerate(chunk):
        if naflex_seq_len:
          for array, value in zip(
              images,
              load_naflex_image(path, patch_size, naflex_seq_len, mean, std),
          ):
            array[i] = value
        else:
          images[i] = load_image(path, size, crop, mean, std)
      probs = np.asarray(
          jax.device_get(fn(params, sharding.put_global(images, batches)))
      )[: len(chunk)]
      for path, p in zip(chunk, probs):
        order = np.argsort(-p, kind='stable')[:k]
        found[path] = {
            'image': path,
            'top_k': [
                {
                    'rank': r + 1,
                    'index': int(i),
                    'label': class_names[i]
                    if class_names is not None
                    else str(i),
                    'probability': float(p[i]),
                }
                for r, i in enumerate(order)
            ],
        }
  return [found[path] for path in paths]


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """One block per image: rank, probability, class index and label."""
  lines = []
  for result in results:
    lines.append(result['image'])
    for entry in result['top_k']:
      lines.append(
          f"  {entry['rank']:>2}  {entry['probability']:.4f}  "
          f"{entry['index']:>5}  {entry['label']}"
      )
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  # pylint: disable=g-import-not-at-top
  from absl import app
  from absl import flags

  from vit_jax import loading
  # pylint: enable=g-import-not-at-top
  f = flags.FLAGS
  images = list(f.images or []) + list(argv[1:])  # Shell globs too.
  if not images:
    raise app.UsageError(
        'Pass --images=FILE|DIR,... (or paths after the ' 'flags).'
    )
  if f.top_k < 1:
    raise app.UsageError(f'--top_k={f.top_k}: give 1 or more.')
  if f.batch_size is not None and f.batch_size < 1:
    raise app.UsageError(f'--batch_size={f.batch_size}: give 1 or more.')
  if f.naflex_seq_len is not None and f.naflex_seq_len < 1:
    raise app.UsageError(
        f'--naflex_seq_len={f.naflex_seq_len}: give 1 or more tokens.'
    )
  # The cheap refusals (paths, label file) before the model is read.
  paths = list_images(images)
  labels = read_labels(f.labels) if f.labels else None
  loaded = loading.load_from_flags()
  names = labels if labels is not None else loaded.class_names
  batch_size = f.batch_size or (
      loaded.run.data.batch_eval if loaded.run is not None else 64
  )
  run_naflex, run_seq_len = naflex_default(loaded)
  use_naflex = f.naflex if f['naflex'].present else run_naflex
  results = predict(
      loaded,
      paths,
      top_k=f.top_k,
      class_names=names,
      batch_size=batch_size,
      dynamic_image_size=f.dynamic_image_size,
      naflex_seq_len=(f.naflex_seq_len or run_seq_len) if use_naflex else None,
  )
  if jax.process_index() != 0:
    return
  if f.json:
    print(
        json.dumps({'source': loaded.source, 'predictions': results}, indent=1)
    )
  else:
    print(format_table(results))


def _define_flags() -> None:
  # pylint: disable=g-import-not-at-top
  from absl import flags

  from vit_jax import loading
  # pylint: enable=g-import-not-at-top
  loading.define_model_flags()
  loading.define_dynamic_image_size_flag(
      'each image at its own size, the nearest multiple of the patch size.'
  )
  # --help lists them with this program's own flags.
  flags.adopt_module_key_flags(loading)
  flags.DEFINE_list(
      'images',
      None,
      'Image files and directories (paths ' 'after the flags are added).',
  )
  flags.DEFINE_integer('top_k', 5, 'Classes shown per image.')
  flags.DEFINE_string(
      'labels',
      None,
      'imagenet1k, imagenet21k or a file '
      "(one name per line); default: the run's names.",
  )
  flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')
  flags.DEFINE_integer(
      'batch_size',
      None,
      'Images per step (default: the ' "run's batch_eval, else 64).",
  )
  flags.DEFINE_bool(
      'naflex',
      False,
      'Each image at its own aspect ratio as a NaFlex patch sequence '
      '(NaFlex ViTs; default: on for a run trained with NaFlex).',
  )
  flags.DEFINE_integer(
      'naflex_seq_len',
      None,
      "Tokens per image with --naflex (default: the run's longest "
      'naflex.seq_lens, else 256).',
  )


if __name__ == '__main__':
  # pylint: disable-next=g-import-not-at-top
  from vit_jax import cli as _cli

  _define_flags()
  _cli.run(main)
