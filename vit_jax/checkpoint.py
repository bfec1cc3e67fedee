"""Published `.npz` checkpoints: load, save, inspect, fine-tuning surgery.

The function names are those of the official vit_jax code base, so code
written against it ports unchanged: `load`, `save`, `inspect_params`,
`load_pretrained`, `interpolate_posembed`.

Layouts. An `.npz` holds flat `a/b/c` keys. The gs://vit_models files use the
pre-Linen module numbering inside encoder blocks (`LayerNorm_0`,
`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`) and, for old
hybrids, GroupNorm parameters shaped (1, 1, 1, C); newer files use Linen
numbering (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`) and
may carry an `opt/target/` or `params/` prefix, or scan-stacked blocks
(`Transformer/encoderblock/...` with a leading layer axis). big_vision's files
(classification ViTs, and the image tower `img/` of SigLIP / SigLIP 2 two-tower
files) keep the position embeddings at the top (`pos_embedding`, without a
class slot: big_vision adds them before prepending the class token) and may
have a `MAPHead_0`. `load` accepts all of them, says which layout it found,
and returns the tree of `vit_jax.models` with its default (unscanned)
options; `save` writes the published gs://vit_models layout, which the
original vit_jax code and timm read.

Safety: files are read with `allow_pickle=False`, so a checkpoint can never
execute code; object arrays are refused with a message naming the key.
"""

from collections.abc import Iterable, Mapping
import io
import math
import os
import re
from typing import Any
import zipfile

from absl import logging
import flax
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from vit_jax.models import vit as vit_lib

Params = Any

# Top-level entries that fine-tuning replaces instead of loading.
_HEAD = 'head'
_PRE_LOGITS = 'pre_logits'
_POSEMB_PATH = ('Transformer', 'posembed_input', 'pos_embedding')
_BLOCK_RE = re.compile(r'^encoderblock_(\d+)$')
_SCANNED_BLOCK = 'encoderblock'
# Children of an encoder block: Linen name -> pre-Linen (published) name. The
# old API numbered all submodules of a parent with one counter.
_PUBLISHED_BLOCK_NAMES = {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}
_NUMBERED_RE = re.compile(r'^(.+)_(\d+)$')
_GROUPNORM_RE = re.compile(r'^gn(\d+|_root|_proj)$')
_KNOWN_PREFIXES = (('opt', 'target'), ('params',))
# Layouts `load` tells apart (and logs).
LAYOUT_PUBLISHED = 'published (gs://vit_models, pre-Linen numbering)'
LAYOUT_LINEN = 'Linen numbering (vit_jax, Flax)'
LAYOUT_BIG_VISION = 'big_vision (top-level pos_embedding / MAPHead_0)'
_BIG_VISION_POSEMB = 'pos_embedding'
_MAP_HEAD = 'MAPHead_0'
# A SigLIP file's towers; `load(path, tower='img')` picks one.
_TOWERS = ('img', 'txt')

POSEMB_METHODS = ('bilinear', 'bicubic', 'linear')
_EMBEDDING_KERNEL = 'embedding/kernel'
# FlexiViT's resize of a patch-embedding kernel (defined with the model, which
# applies it in the forward pass).
resample_patch_embedding = vit_lib.resample_patch_embedding


class CheckpointError(ValueError):
  """A checkpoint file or parameter tree that cannot be used as asked."""


# ----------------------------------------------------------------------------
# File access (local paths, or gs:// and other remote paths via tf.io.gfile).
# ----------------------------------------------------------------------------


_URL_SCHEMES = ('http://', 'https://')


def _is_url(path: str) -> bool:
  return str(path).startswith(_URL_SCHEMES)


def _is_remote(path: str) -> bool:
  return '://' in str(path)


def default_cache_dir() -> str:
  """Where `download` keeps checkpoints: $VIT_JAX_CACHE or ~/.cache/vit_jax."""
  return os.environ.get('VIT_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'vit_jax'
  )


def download(url: str, cache_dir: str | None = None) -> str:
  """Downloads an http(s) checkpoint once and returns its local path.

  The official files are also served over https (e.g.
  https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz), which
  needs no Google Cloud credentials. A file already in the cache is reused;
  a download is written to a temporary file and renamed when complete, so an
  interrupted one is never mistaken for a checkpoint.

  Args:
    url: http:// or https:// address of an `.npz`.
    cache_dir: Folder for downloads (default: `default_cache_dir()`).

  Returns:
    The local path of the downloaded file.

  Raises:
    FileNotFoundError: The server has no such file, or it cannot be reached
      (no network); the message says how to continue offline.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import urllib.error  # pylint: disable=g-import-not-at-top
  import urllib.parse  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top

  parsed = urllib.parse.urlparse(url)
  # Host and path in the name: two servers' ViT-B_16.npz must not collide.
  name = re.sub(r'[^A-Za-z0-9._-]+', '_', parsed.netloc + parsed.path)
  cache_dir = cache_dir or default_cache_dir()
  local = os.path.join(cache_dir, name)
  if os.path.exists(local):
    return local
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f'{local}.download.{os.getpid()}'
  logging.info('Downloading %s to %s', url, local)
  try:
    with (
        urllib.request.urlopen(url, timeout=60) as response,
        open(tmp, 'wb') as f,
    ):
      shutil.copyfileobj(response, f, length=1 << 20)
    os.replace(tmp, local)
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, 'reason', None) or e
    raise FileNotFoundError(
        f'Could not download checkpoint {url} ({reason}). Without network, '
        'copy the file to this machine and pass its local path.'
    ) from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return local


def _gfile():
  # TensorFlow is imported only for remote paths: it takes seconds to import
  # and local files do not need it.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.io.gfile


def _exists(path: str) -> bool:
  return _gfile().exists(path) if _is_remote(path) else os.path.exists(path)


def _open(path: str, mode: str):
  return _gfile().GFile(path, mode) if _is_remote(path) else open(path, mode)


# ----------------------------------------------------------------------------
# Tree layouts.
# ----------------------------------------------------------------------------


def _to_dict(tree: Params) -> dict[str, Any]:
  """Returns a mutable nested dict (unfreezes FrozenDicts)."""
  if isinstance(tree, flax.core.FrozenDict):
    tree = tree.unfreeze()
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def flatten(params: Params) -> dict[str, Any]:
  """Nested parameter dict -> {'a/b/c': array}."""
  return traverse_util.flatten_dict(_to_dict(params), sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': array} -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def to_linen_names(tree: Params) -> dict[str, Any]:
  """Renumbers pre-Linen module names (`MlpBlock_3`) to Linen (`MlpBlock_0`).

  Within every dict, the `Name_<n>` keys of each `Name` are renumbered 0, 1,
  ... in increasing order of `n`. Linen-numbered trees are unchanged.

  Args:
    tree: A nested parameter dict.

  Returns:
    A new nested dict.
  """
  if not isinstance(tree, Mapping):
    return tree
  numbered: dict[str, list[tuple[int, str]]] = {}
  for key in tree:
    match = _NUMBERED_RE.match(key)
    if match:
      numbered.setdefault(match.group(1), []).append((int(match.group(2)), key))
  renamed: dict[str, str] = {}
  for prefix, items in numbered.items():
    for new_index, (_, key) in enumerate(sorted(items)):
      renamed[key] = f'{prefix}_{new_index}'
  return {
      renamed[k] if k in renamed else k: to_linen_names(v)
      for k, v in tree.items()
  }


def to_published_names(params: Params) -> dict[str, Any]:
  """Renames encoder-block children to the published pre-Linen numbering."""
  params = _to_dict(params)
  transformer = params.get('Transformer')
  if isinstance(transformer, dict):
    for name, block in transformer.items():
      if _BLOCK_RE.match(name) or name == _SCANNED_BLOCK:
        transformer[name] = {
            _PUBLISHED_BLOCK_NAMES.get(k, k): v for k, v in block.items()
        }
  return params


def _squeeze_groupnorm(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old hybrid checkpoints store GroupNorm scale/bias as (1, 1, 1, C)."""
  out = {}
  for key, value in flat.items():
    parts = key.split('/')
    if (
        len(parts) > 1
        and _GROUPNORM_RE.match(parts[-2])
        and parts[-1] in ('scale', 'bias')
        and value.ndim == 4
    ):
      value = value.reshape(value.shape[-1])
    out[key] = value
  return out


def is_scanned(params: Params) -> bool:
  """Whether the encoder blocks are stacked (`Transformer/encoderblock`)."""
  transformer = (
      params.get('Transformer', {}) if isinstance(params, Mapping) else {}
  )
  return isinstance(transformer, Mapping) and _SCANNED_BLOCK in transformer


def _stack(leaves):
  xp = jnp if any(isinstance(x, jax.Array) for x in leaves) else np
  return xp.stack(leaves, axis=0)


def stack_encoder_blocks(params: Params) -> dict[str, Any]:
  """Loop layout (`encoderblock_0..L-1`) -> scan layout (`encoderblock`).

  Args:
    params: Parameters with unscanned encoder blocks; returned unchanged if
      they are already scanned or have no encoder.

  Returns:
    A new nested dict whose block parameters have a leading axis of size L.
  """
  params = _to_dict(params)
  transformer = params.get('Transformer')
  if not isinstance(transformer, dict) or _SCANNED_BLOCK in transformer:
    return params
  blocks = sorted(
      (int(m.group(1)), k) for k in transformer if (m := _BLOCK_RE.match(k))
  )
  if not blocks:
    return params
  if [i for i, _ in blocks] != list(range(len(blocks))):
    raise CheckpointError(
        'Encoder blocks are not numbered 0..L-1: '
        f'{[k for _, k in blocks]}; the checkpoint is incomplete.'
    )
  trees = [transformer.pop(k) for _, k in blocks]
  transformer[_SCANNED_BLOCK] = jax.tree_util.tree_map(
      lambda *xs: _stack(list(xs)), *trees
  )
  return params


def unstack_encoder_blocks(params: Params) -> dict[str, Any]:
  """Scan layout (`encoderblock`) -> loop layout (`encoderblock_0..L-1`).

  Args:
    params: Parameters with scanned encoder blocks; returned unchanged if they
      are already unscanned.

  Returns:
    A new nested dict.
  """
  params = _to_dict(params)
  transformer = params.get('Transformer')
  if not isinstance(transformer, dict) or _SCANNED_BLOCK not in transformer:
    return params
  stacked = transformer.pop(_SCANNED_BLOCK)
  num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    transformer[f'encoderblock_{i}'] = jax.tree_util.tree_map(
        lambda x, i=i: x[i], stacked
    )
  return params


def _strip_known_prefix(flat: dict[str, Any]) -> dict[str, Any]:
  for prefix in _KNOWN_PREFIXES:
    head = '/'.join(prefix) + '/'
    if flat and all(k.startswith(head) for k in flat):
      return {k[len(head) :]: v for k, v in flat.items()}
  return flat


# ----------------------------------------------------------------------------
# Load and save.
# ----------------------------------------------------------------------------


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Reads every array of an npz, refusing pickles, with precise errors."""
  if _is_url(path):
    path = download(path)
  if not _exists(path):
    raise FileNotFoundError(
        f'Checkpoint {path} does not exist. Check the path; official '
        'checkpoints are listed at https://github.com/google-research/'
        'vision_transformer and live under gs://vit_models/ (copy one locally '
        'with `gsutil cp` when this machine has no network).'
    )
  hint = (
      'Re-download or re-export it: a complete checkpoint is a zip of '
      '.npy arrays written by numpy.savez or vit_jax.checkpoint.save.'
  )
  flat = {}
  key = None
  try:
    with _open(path, 'rb') as f:
      npz = np.load(f, allow_pickle=False)
      if not hasattr(npz, 'files'):
        raise CheckpointError(
            f'{path} holds a single array, not a parameter archive (.npz). '
            + hint
        )
      with npz:
        for key in npz.files:
          flat[key] = npz[key]
  except CheckpointError:
    raise
  except ValueError as e:
    if 'allow_pickle' in str(e) and key is not None:
      raise CheckpointError(
          f'{path}: array {key!r} holds Python objects (pickled data). '
          'Refused: unpickling can execute arbitrary code. Re-save the '
          'checkpoint with numeric arrays only.'
      ) from e
    raise CheckpointError(
        f'{path} is not a readable .npz checkpoint ({e}). ' + hint
    ) from e
  except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
    where = f' (while reading {key!r})' if key is not None else ''
    raise CheckpointError(
        f'{path} is not a readable .npz checkpoint: truncated or corrupt'
        f'{where}: {type(e).__name__}: {e}. ' + hint
    ) from e
  if not flat:
    raise CheckpointError(f'{path} contains no arrays. ' + hint)
  return flat


def _split_tower_suffix(path: str, tower: str | None) -> tuple[str, str | None]:
  """'file.npz:img' (big_vision's way of naming a tower) -> ('file.npz',
  'img'), so that a config's `pretrained_path` can name a tower."""
  head, sep, tail = str(path).rpartition(':')
  if sep and tail in _TOWERS and head.endswith('.npz'):
    if tower not in (None, tail):
      raise CheckpointError(
          f'{path} names tower {tail!r} but tower=' f'{tower!r} was asked for.'
      )
    return head, tail
  return path, tower


def _select_tower(
    flat: dict[str, Any], tower: str | None, path: str
) -> dict[str, Any]:
  """The `tower/` subtree of a two-tower file, or `flat` itself."""
  tops = {k.split('/', 1)[0] for k in flat}
  towers = sorted(tops & set(_TOWERS))
  if tower is None:
    if towers:
      raise CheckpointError(
          f'{path} is a two-tower (SigLIP-style) checkpoint with towers '
          f'{towers}: load the image tower with checkpoint.load(path, '
          f"tower='img') (or the path '{path}:img')."
      )
    return flat
  if tower not in towers:
    raise CheckpointError(
        f'{path} has no tower {tower!r}; its top-level entries are '
        f'{_format_keys(tops)}.'
    )
  head = tower + '/'
  skipped = sorted(tops - {tower})
  logging.info(
      'checkpoint.load: %s: tower %r (skipping %s)',
      path,
      tower,
      ', '.join(skipped) or 'nothing',
  )
  return {k[len(head) :]: v for k, v in flat.items() if k.startswith(head)}


def detect_layout(flat: Mapping[str, Any]) -> str:
  """Which layout a flat {'a/b/c': array} checkpoint is in.

  Args:
    flat: Keys without the `params/` (or `opt/target/`) prefix.

  Returns:
    `LAYOUT_BIG_VISION`, `LAYOUT_PUBLISHED` or `LAYOUT_LINEN`.
  """
  if _BIG_VISION_POSEMB in flat or any(
      k.startswith(_MAP_HEAD + '/') for k in flat
  ):
    return LAYOUT_BIG_VISION
  published = set(_PUBLISHED_BLOCK_NAMES.values()) - {'LayerNorm_0'}
  for key in flat:
    parts = key.split('/')
    if (
        len(parts) > 2
        and parts[0] == 'Transformer'
        and (_BLOCK_RE.match(parts[1]) or parts[1] == _SCANNED_BLOCK)
        and parts[2] in published
    ):
      return LAYOUT_PUBLISHED
  return LAYOUT_LINEN


def _from_big_vision(flat: dict[str, Any]) -> dict[str, Any]:
  """big_vision names -> vit_jax names (same numbers for every input).

  big_vision adds `pos_embedding` (1, h*w, D) to the patches and then
  prepends the class token; vit_jax adds (1, 1 + h*w, D) after it. A zero
  class slot makes the two the same sums: cls + 0 is cls.
  """
  flat = dict(flat)
  posemb = flat.pop(_BIG_VISION_POSEMB, None)
  if posemb is not None:
    posemb = np.asarray(posemb)
    if 'cls' in flat:
      posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    flat['/'.join(_POSEMB_PATH)] = posemb
  return flat


def load(path: str, tower: str | None = None) -> dict[str, Any]:
  """Loads parameters from an `.npz` in any supported layout.

  Published gs://vit_models files (pre-Linen numbering), Linen-numbered and
  scan-stacked files, big_vision classification files and the towers of
  SigLIP two-tower files all load into the tree of `vit_jax.models`; the
  layout found is logged. big_vision's learned position embeddings get a
  zero class slot when the file has a class token (same numbers, see
  `_from_big_vision`); a file without position embeddings (big_vision's
  'sincos2d', or none) needs a model built with that `posemb`.

  Args:
    path: Local path, a remote path readable by tf.io.gfile (gs://...) or
      an http(s) URL (downloaded once, see `download`). big_vision's
      'file.npz:img' form names a tower.
    tower: For two-tower (SigLIP) files: 'img' for the image tower (the text
      tower, temperature and bias are skipped).

  Returns:
    Nested dict of numpy arrays with the parameter names of `vit_jax.models`
    (Linen numbering, unscanned encoder blocks, 1-D GroupNorm parameters).

  Raises:
    FileNotFoundError: The file does not exist.
    CheckpointError: The file is not a readable npz, is truncated, or holds
      pickled object arrays (never unpickled); a two-tower file without
      `tower`, or a tower it does not have.
  """
  path, tower = _split_tower_suffix(path, tower)
  flat = _strip_known_prefix(_read_npz(path))
  flat = _select_tower(flat, tower, path)
  flat = _squeeze_groupnorm(flat)
  layout = detect_layout(flat)
  stacked = any(k.startswith(f'Transformer/{_SCANNED_BLOCK}/') for k in flat)
  logging.info(
      'checkpoint.load: %s: %s layout%s',
      path,
      layout,
      ', stacked (scan) blocks' if stacked else '',
  )
  if layout == LAYOUT_BIG_VISION:
    flat = _from_big_vision(flat)
  params = to_linen_names(unflatten(flat))
  return unstack_encoder_blocks(params)


def _to_host(x: Any) -> np.ndarray:
  """Fetches an array to host memory (all-gathering multi-host shards)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  x = np.asarray(jax.device_get(x))
  # bfloat16 has no portable npz encoding; the published files are float32.
  if x.dtype.kind == 'V' or x.dtype == jnp.bfloat16:
    x = x.astype(np.float32)
  return x


def save(params: Params, path: str) -> None:
  """Saves parameters as an `.npz` in the published gs://vit_models layout.

  The file loads with `load`, with the original vit_jax `checkpoint.load` and
  with timm. Scanned blocks are unstacked; bfloat16 is stored as float32.
  The write is atomic: a temporary file is renamed over `path`, so an
  interrupted save never leaves a truncated checkpoint. In a multi-process
  run, call it on every process (sharded arrays are gathered collectively);
  only process 0 writes.

  Args:
    params: Nested parameter dict (numpy or jax arrays, possibly sharded).
    path: Destination (local or gs://).
  """
  params = to_published_names(unstack_encoder_blocks(_to_dict(params)))
  flat: dict[str, Any] = {k: _to_host(v) for k, v in flatten(params).items()}
  if jax.process_index() != 0:
    return
  directory = os.path.dirname(str(path))
  tmp = f'{path}.tmp-{os.getpid()}'
  if _is_remote(path):
    gfile = _gfile()
    if directory:
      gfile.makedirs(directory)
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    with gfile.GFile(tmp, 'wb') as f:
      f.write(buffer.getvalue())
    gfile.rename(tmp, path, overwrite=True)
    return
  if directory:
    os.makedirs(directory, exist_ok=True)
  try:
    with open(tmp, 'wb') as f:
      np.savez(f, **flat)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ----------------------------------------------------------------------------
# Inspection and fine-tuning surgery.
# ----------------------------------------------------------------------------


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, 'shape', np.shape(x)))


def _format_keys(keys: Iterable[str], limit: int = 20) -> str:
  keys = sorted(keys)
  shown = ', '.join(keys[:limit])
  more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
  return f'[{shown}{more}]'


def inspect_params(
    params: Params,
    expected: Params,
    *,
    fail_if_extra: bool = True,
    fail_if_missing: bool = True,
    fail_if_shape_mismatch: bool = True,
) -> Params:
  """Checks `params` against the tree `expected` (e.g. a model's init).

  Args:
    params: Parameters to check (e.g. from `load`).
    expected: Reference tree; leaves may be arrays or
      `jax.ShapeDtypeStruct` objects.
    fail_if_extra: Raise on keys absent from `expected`.
    fail_if_missing: Raise on keys of `expected` absent from `params`.
    fail_if_shape_mismatch: Raise on keys whose shapes differ.

  Returns:
    `params`, unchanged.

  Raises:
    CheckpointError: naming every missing, extra and mis-shaped key (with the
      found and expected shapes).
  """
  got, want = flatten(params), flatten(expected)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  mismatched = sorted(
      k for k in set(got) & set(want) if _shape(got[k]) != _shape(want[k])
  )
  for keys, what in ((missing, 'missing'), (extra, 'extra')):
    if keys:
      logging.warning(
          'inspect_params: %d %s keys: %s', len(keys), what, _format_keys(keys)
      )
  problems = []
  if missing and fail_if_missing:
    problems.append(f'missing keys {_format_keys(missing)}')
  if extra and fail_if_extra:
    problems.append(f'unexpected keys {_format_keys(extra)}')
  if mismatched and fail_if_shape_mismatch:
    problems.append(
        'shape mismatches '
        + '; '.join(
            f'{k}: found {_shape(got[k])}, expected {_shape(want[k])}'
            for k in mismatched
        )
    )
  if problems:
    raise CheckpointError(
        'Parameters do not match the model: '
        + '; '.join(problems)
        + '. Check that the checkpoint was made for this model name and '
        'options (scan layouts are converted automatically).'
    )
  return params


def _infer_grid(num_tokens: int, what: str) -> tuple[int, int]:
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise CheckpointError(
        f'Cannot infer the {what} grid of {num_tokens} position embeddings: '
        'it is not a square. Pass the grid shape explicitly '
        '(grid_size=(h, w) / new_grid_size=(h, w)).'
    )
  return side, side


def square_image_grid(
    num_tokens: int, patch_shape: tuple[int, int], what: str
) -> tuple[int, int]:
  """The (h, w) token grid of a square image cut into `patch_shape` patches.

  With non-square patches the grid is not square, so it cannot be inferred
  from the token count alone; a square image (as every training run here
  uses) makes it unique: side = sqrt(tokens * ph * pw).

  Raises:
    CheckpointError: no square image gives `num_tokens` such patches.
  """
  ph, pw = patch_shape
  side = math.isqrt(num_tokens * ph * pw)
  if side * side != num_tokens * ph * pw or side % ph or side % pw:
    raise CheckpointError(
        f'{num_tokens} {what} position embeddings do not come from a square '
        f'image cut into {ph}x{pw} patches. Pass the grid shape explicitly '
        '(grid_size=(h, w) / new_grid_size=(h, w)).'
    )
  return side // ph, side // pw


def interpolate_posembed(
    posemb: np.ndarray,
    num_tokens: int,
    has_class_token: bool,
    *,
    grid_size: tuple[int, int] | None = None,
    new_grid_size: tuple[int, int] | None = None,
    method: str = 'bilinear',
) -> np.ndarray:
  """Resizes position embeddings to a new patch grid (paper §3.2).

  The class-token embedding, if any, is kept as is; the patch embeddings are
  interpolated in 2-D according to their position in the image.

  Args:
    posemb: (1, T, D) position embeddings.
    num_tokens: New sequence length T' (including the class token, if any).
    has_class_token: Whether the first embedding belongs to a class token.
    grid_size: (h, w) of the old grid; inferred when square.
    new_grid_size: (h', w') of the new grid; inferred when square.
    method: 'bilinear' gives exactly the numbers of the original vit_jax code
      (`scipy.ndimage.zoom(order=1)`, corner-aligned); 'bicubic' uses
      half-pixel-centred bicubic interpolation (as timm does); 'linear'
      half-pixel-centred linear interpolation, antialiased when shrinking
      (big_vision FlexiViT's run-time resize).

  Returns:
    (1, T', D) numpy array.

  Raises:
    CheckpointError: a grid is not square and was not given, or does not
      match the token counts; or `method` is unknown.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise CheckpointError(
        f'Position embeddings must be shaped (1, tokens, dim); got '
        f'{posemb.shape}.'
    )
  if method not in POSEMB_METHODS:
    raise CheckpointError(
        f'Unknown interpolation method {method!r}; use one of '
        f'{POSEMB_METHODS}.'
    )
  extra = 1 if has_class_token else 0
  posemb_tok, posemb_grid = posemb[:, :extra], posemb[0, extra:]
  old = (
      tuple(grid_size)
      if grid_size
      else _infer_grid(len(posemb_grid), 'checkpoint')
  )
  new = (
      tuple(new_grid_size)
      if new_grid_size
      else _infer_grid(num_tokens - extra, 'new')
  )
  for size, count, what in (
      (old, len(posemb_grid), 'checkpoint'),
      (new, num_tokens - extra, 'new'),
  ):
    if size[0] * size[1] != count:
      raise CheckpointError(
          f'The {what} grid {size} does not hold {count} patch embeddings.'
      )
  dim = posemb.shape[-1]
  grid = posemb_grid.reshape(old[0], old[1], dim)
  if old != new:
    logging.info('interpolate_posembed: grid %s -> %s (%s)', old, new, method)
    if method == 'bilinear':
      import scipy.ndimage  # pylint: disable=g-import-not-at-top

      zoom = (new[0] / old[0], new[1] / old[1], 1)
      grid = scipy.ndimage.zoom(grid, zoom, order=1)
    else:
      grid = np.asarray(
          vit_lib.resize_posemb_grid(
              jnp.asarray(grid, jnp.float32), new, method=method
          )
      ).astype(posemb.dtype)
  grid = grid.reshape(1, new[0] * new[1], dim)
  return np.concatenate([posemb_tok, grid], axis=1)


def _resample_kernel(
    restored: dict[str, Any],
    expected: Mapping[str, Any],
    patch_size: int | tuple[int, int] | None,
    path: str,
) -> None:
  """Resamples `restored`'s patch-embedding kernel to `patch_size`.

  Raises:
    CheckpointError: the checkpoint's patch size differs from the model's
      and no `patch_size` was given, or `patch_size` is not the model's.
  """
  if _EMBEDDING_KERNEL not in restored or _EMBEDDING_KERNEL not in expected:
    return
  old, want = _shape(restored[_EMBEDDING_KERNEL]), _shape(
      expected[_EMBEDDING_KERNEL]
  )
  if patch_size is None:
    if old[:2] != want[:2] and old[2:] == want[2:]:
      raise CheckpointError(
          f'{path}: {_EMBEDDING_KERNEL}: the checkpoint has {old[0]}x{old[1]} '
          f'patches, the model {want[0]}x{want[1]}: pass '
          f'patch_size={tuple(want[:2])} to resample the kernel (FlexiViT), '
          "or build the model with the checkpoint's patch size."
      )
    return
  size = vit_lib.patch_size_of(patch_size)
  if size != tuple(want[:2]):
    raise CheckpointError(
        f"patch_size={patch_size!r}, but the model's kernel is "
        f'{want[0]}x{want[1]}: build the model with patches '
        f"{{'size': {size}}} (or pass patch_size={tuple(want[:2])})."
    )
  if old[:2] != size:
    logging.info(
        'load_pretrained: resampling %s %s -> %s (FlexiViT PI-resize)',
        _EMBEDDING_KERNEL,
        old,
        size,
    )
    restored[_EMBEDDING_KERNEL] = np.asarray(
        resample_patch_embedding(np.asarray(restored[_EMBEDDING_KERNEL]), size)
    )


def load_pretrained(
    *,
    pretrained_path: str,
    init_params: Params,
    model_config: Any,
    new_grid_size: tuple[int, int] | None = None,
    grid_size: tuple[int, int] | None = None,
    patch_shape: tuple[int, int] | None = None,
    posemb_method: str = 'bilinear',
    patch_size: int | tuple[int, int] | None = None,
    restored: Params | None = None,
) -> dict[str, Any]:
  """Loads a pre-trained checkpoint for fine-tuning (paper §3.2).

  * The head is replaced by its fresh initialisation from `init_params`
    (zero kernel), whatever its size in the checkpoint.
  * `pre_logits` is dropped when `model_config` has no representation layer;
    when it has one the checkpoint lacks, the fresh one is used.
  * Position embeddings are interpolated to the new patch grid (with
    `posemb_class_token=False` the table has no class-token entry).
  * With `patch_size`, the patch-embedding kernel is resampled to it with
    FlexiViT's pseudo-inverse resize (`resample_patch_embedding`): a /16
    checkpoint runs as /8 or /32 (the grid follows from `init_params`).
  * Scanned and unscanned layouts are converted to match `init_params`.

  Every other parameter must be present with the expected shape.

  Args:
    pretrained_path: Checkpoint path (local, gs:// or http(s) URL).
    init_params: Freshly initialised parameters of the model to fine-tune.
    model_config: The model's config (dict, ConfigDict or module) providing
      `representation_size` and `classifier`.
    new_grid_size: Patch grid of the new resolution; needed only when it is
      not square.
    grid_size: Patch grid of the checkpoint; needed only when not square.
    patch_shape: Input pixels per token (h, w) of the checkpoint and the
      model (`model.total_stride`): when not square, the grids not given
      are those of square images (`square_image_grid`).
    posemb_method: One of `POSEMB_METHODS`: 'bilinear' (the original
      code's numbers), 'bicubic' or 'linear' (big_vision FlexiViT's).
    patch_size: The patch size (h, w) (or an int) of `init_params`' kernel
      when the checkpoint's differs: its kernel is resampled to it. None:
      the sizes must agree.
    restored: The checkpoint's parameters, already read (e.g. from a timm
      file by `vit_jax.loading`); `pretrained_path` then only names them in
      messages.

  Returns:
    Nested dict with the structure and dtypes of `init_params`.

  Raises:
    FileNotFoundError, CheckpointError: unreadable file; missing, extra or
      mis-shaped keys (listed by name).
  """
  restored = flatten(
      load(pretrained_path) if restored is None else _to_dict(restored)
  )
  scanned = is_scanned(_to_dict(init_params))
  expected = flatten(unstack_encoder_blocks(_to_dict(init_params)))
  _resample_kernel(restored, expected, patch_size, pretrained_path)
  has_representation = (
      vit_lib.config_value(model_config, 'representation_size') is not None
  )
  # A representation layer absent from the checkpoint starts fresh.
  fresh_pre_logits = has_representation and not any(
      k.startswith(_PRE_LOGITS + '/') for k in restored
  )

  def replaced(key):
    top = key.split('/', 1)[0]
    return top == _HEAD or (top == _PRE_LOGITS and fresh_pre_logits)

  old_has_cls, new_has_cls = 'cls' in restored, 'cls' in expected
  if old_has_cls and not new_has_cls:
    # A class-token checkpoint fine-tuned with classifier='gap': the class
    # token and its position embedding are not used.
    logging.info(
        'load_pretrained: the model has no class token; dropping '
        "the checkpoint's class token and its position embedding"
    )
  # Heads of another task, and what masked-patch-prediction pre-training
  # adds (`mpp_head`, `mpp_mask_token`), are not part of the new model.
  dropped = sorted(
      k
      for k in restored
      if k not in expected
      and (
          k.split('/', 1)[0] in (_HEAD, _PRE_LOGITS)
          or k == 'cls'
          or k.startswith('mpp_')
      )
  )
  if dropped:
    logging.info('load_pretrained: dropping %s', _format_keys(dropped))
  restored = {k: v for k, v in restored.items() if k not in dropped}

  posemb_key = '/'.join(_POSEMB_PATH)
  # Without `posemb_class_token` (timm's no_embed_class) the table covers
  # the patches only, in the checkpoint as in the model: no class slot.
  if not vit_lib.config_value(model_config, 'posemb_class_token', True):
    old_has_cls = new_has_cls = False
  if posemb_key in restored and posemb_key in expected:
    posemb = restored[posemb_key]
    if old_has_cls and not new_has_cls:
      posemb = posemb[:, 1:]
    elif new_has_cls and not old_has_cls:
      raise CheckpointError(
          f'{pretrained_path} was trained without a class token but the model '
          "uses one: fine-tune with classifier='gap' instead."
      )
    old, new = _shape(posemb), _shape(expected[posemb_key])
    if old != new:
      if old[-1] != new[-1]:
        raise CheckpointError(
            f'{pretrained_path}: {posemb_key}: found {old}, expected {new} '
            '(different hidden size: a checkpoint of another model).'
        )
      logging.info(
          'load_pretrained: resizing position embeddings %s -> %s', old, new
      )
      if patch_shape is not None and patch_shape[0] != patch_shape[1]:
        extra = 1 if new_has_cls else 0
        grid_size = grid_size or square_image_grid(
            old[1] - extra, patch_shape, 'checkpoint'
        )
        new_grid_size = new_grid_size or square_image_grid(
            new[1] - extra, patch_shape, 'new'
        )
      posemb = interpolate_posembed(
          posemb,
          new[1],
          has_class_token=new_has_cls,
          grid_size=grid_size,
          new_grid_size=new_grid_size,
          method=posemb_method,
      )
    restored[posemb_key] = posemb

  kept = {k: v for k, v in restored.items() if not replaced(k)}
  fresh = {k: v for k, v in expected.items() if replaced(k)}
  try:
    inspect_params(
        unflatten(kept),
        unflatten({k: v for k, v in expected.items() if k not in fresh}),
    )
  except CheckpointError as e:
    raise CheckpointError(f'{pretrained_path}: {e}') from None

  out = {}
  for key, want in expected.items():
    if key in fresh:
      out[key] = want
    else:
      value = np.asarray(kept[key])
      dtype = getattr(want, 'dtype', value.dtype)
      out[key] = value.astype(dtype) if value.dtype != dtype else value
  params = unflatten(out)
  return stack_encoder_blocks(params) if scanned else params
