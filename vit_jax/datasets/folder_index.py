"""A one-time index of which files of an image folder decode.

Decoding every image of a large folder to find the unreadable ones takes
minutes to an hour (ImageNet-1k: 1.28M files); doing it again at every start
of a run, in every process, is wasted work. `verdicts` keeps each file's
verdict (decodes, or the reason it does not) in a JSON index keyed by the
file's relative path, size and modification time (ns). A restart lists and
stats the files, finds each one in the index and decodes nothing; a file
that is new or was replaced or rewritten (other size or mtime) is checked on
its own; files that are gone drop out of the index.

The index is `<root>/.vit_jax_index.json` when the folder is writable, else
`$XDG_CACHE_HOME/vit_jax/image_folder_index/<hash of the folder's real
path>.json` (default `~/.cache`). It is written atomically (temporary file +
rename) and only by the callers asked to (process 0 of a run); an index that
cannot be written is a warning, one that cannot be read or parsed is
ignored and rewritten.
"""

from collections.abc import Mapping, Sequence
import concurrent.futures
import contextlib
import hashlib
import json
import os
import time

from absl import logging

INDEX_NAME = '.vit_jax_index.json'
# Seconds between two progress lines of the readability check.
PROGRESS_SECONDS = 10.0
_FORMAT = 'vit_jax image folder index'
_VERSION = 1
# Files per task of the thread pool: few enough futures for a million files,
# small enough for a smooth progress line.
_CHUNK = 64

# (size in bytes, modification time in ns) of a file; None when it cannot be
# stat'ed (e.g. a dangling link): such a file is checked at every start.
Stat = tuple[int, int] | None
# Relative directory -> file name -> (size, mtime_ns, error or None).
_Index = dict[str, dict[str, tuple[int, int, str | None]]]


def scan(folder: str, extensions: tuple[str, ...]) -> list[tuple[str, Stat]]:
  """Lists the files of `folder` whose names end in `extensions`.

  Args:
    folder: A directory.
    extensions: Lower-case name endings, e.g. ('.jpg', '.png'); a name
      matches in any letter case.

  Returns:
    (name, stat) of each matching file, sorted by name.
  """
  out = []
  with os.scandir(folder) as entries:
    for entry in entries:
      if entry.name.lower().endswith(extensions):
        try:
          st = entry.stat()
          stat = (st.st_size, st.st_mtime_ns)
        except OSError:
          stat = None
        out.append((entry.name, stat))
  # Names in one folder are unique: the stats are never compared.
  return sorted(out, key=lambda x: x[0])


def check_image(path: str) -> str | None:
  """Returns None if the image at `path` decodes, else the reason.

  JPEGs are decoded at 1/8 scale (PIL `draft`, libjpeg's DCT scaling): every
  byte of the entropy-coded data is still read and Huffman-decoded, so
  truncated or garbled files fail as with a full decode, at a fraction of
  the cost. What this skips is the full-size inverse DCT, upsampling and
  colour conversion, which do not fail on data that decoded. Other formats
  are fully decoded.

  Args:
    path: Image file.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      if image.format == 'JPEG':
        image.draft(image.mode, (1, 1))
      image.load()
    return None
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'


def _check_chunk(paths: Sequence[str]) -> list[str | None]:
  return [check_image(p) for p in paths]


def check_images(
    paths: Sequence[str], *, where: str, threads: int | None = None
) -> list[str | None]:
  """`check_image` of every path, in threads, with a progress line.

  PIL releases the GIL while it decodes, so threads use all cores (measured:
  1.8x with 2 threads on 2 cores) without starting processes, which would
  each import this package's TensorFlow.

  Args:
    paths: Image files.
    where: What to call them in the progress line (the folder).
    threads: Worker threads (default: 4 per core, at most 64).

  Returns:
    One verdict per path, in order: None, or why it does not decode.
  """
  threads = threads or min(64, 4 * (os.cpu_count() or 1))
  chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
  out = []
  start = last = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for chunk_verdicts in pool.map(_check_chunk, chunks):
      out.extend(chunk_verdicts)
      now = time.monotonic()
      if now - last >= PROGRESS_SECONDS:
        last = now
        logging.info(
            'Checking images in %s: %s / %s (%s/s)',
            where,
            f'{len(out):,}',
            f'{len(paths):,}',
            f'{len(out) / (now - start):,.0f}',
        )
  seconds = time.monotonic() - start
  logging.info(
      'Checked %s images in %s in %.1f s (%s/s), %d unreadable.',
      f'{len(paths):,}',
      where,
      seconds,
      f'{len(paths) / max(seconds, 1e-9):,.0f}',
      sum(v is not None for v in out),
  )
  return out


def cache_path(root: str) -> str:
  """Where the index of `root` goes when `root` is not writable."""
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache'
  )
  key = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:24]
  return os.path.join(cache, 'vit_jax', 'image_folder_index', f'{key}.json')


def _load(path: str) -> _Index | None:
  """The index at `path`; None if absent, unreadable or not an index."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
    if data['format'] != _FORMAT or data['version'] != _VERSION:
      raise ValueError(f'not a version-{_VERSION} index')
    index = {}
    for directory, entry in data['dirs'].items():
      names, sizes, mtimes, errors = (
          entry[k] for k in ('names', 'sizes', 'mtime_ns', 'errors')
      )
      if not len(names) == len(sizes) == len(mtimes):
        raise ValueError(f'lists of unequal length for {directory!r}')
      if not all(isinstance(e, str) for e in errors.values()):
        raise ValueError(f'an error that is not a string in {directory!r}')
      index[directory] = {
          n: (s, m, errors.get(n)) for n, s, m in zip(names, sizes, mtimes)
      }
    return index
  except FileNotFoundError:
    return None
  except Exception as e:  # pylint: disable=broad-except
    # Garbled, truncated by hand, another version, a directory, ...: the
    # index is only a cache, so it is rebuilt rather than trusted.
    logging.warning(
        'Ignoring the image folder index %s (%s: %s); it is ' 'rebuilt.',
        path,
        type(e).__name__,
        e,
    )
    return None


def _lookup(
    index: _Index | None, files: Mapping[str, Stat], out: dict[str, str | None]
) -> None:
  """Adds to `out` the verdicts `index` holds for `files` not in `out`."""
  if not index:
    return
  for rel, stat in files.items():
    if rel in out or stat is None:
      continue
    directory, _, name = rel.rpartition('/')
    entry = index.get(directory, {}).get(name)
    if entry is not None and (entry[0], entry[1]) == stat:
      out[rel] = entry[2]


def _build(
    files: Mapping[str, Stat], found: Mapping[str, str | None]
) -> _Index:
  index: _Index = {}
  for rel, stat in files.items():
    if stat is not None:
      directory, _, name = rel.rpartition('/')
      index.setdefault(directory, {})[name] = (*stat, found[rel])
  return index


def _dumps(index: _Index) -> str:
  dirs = {}
  for directory in sorted(index):
    names = sorted(index[directory])
    entries = [index[directory][n] for n in names]
    dirs[directory] = {
        'names': names,
        'sizes': [e[0] for e in entries],
        'mtime_ns': [e[1] for e in entries],
        'errors': {n: e[2] for n, e in zip(names, entries) if e[2]},
    }
  return json.dumps(
      {'format': _FORMAT, 'version': _VERSION, 'dirs': dirs},
      separators=(',', ':'),
  )


def _write_atomic(path: str, text: str) -> None:
  # Plain os rather than fileio.write_text_atomic: the folder is local
  # (os.scandir), its errors are OSError, and a temporary file left by a
  # failed write would be litter in the user's data folder.
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def verdicts(
    root: str, files: Mapping[str, Stat], *, write: bool
) -> dict[str, str | None]:
  """Whether each file decodes, from the index where it still applies.

  Args:
    root: The image folder.
    files: Relative path ('/'-separated) -> `Stat` of every image file.
    write: Whether to store the verdicts (only one process of a run should).

  Returns:
    Relative path -> None if the file decodes, else the reason.
  """
  root_path = os.path.join(root, INDEX_NAME)
  out: dict[str, str | None] = {}
  root_index = _load(root_path)
  _lookup(root_index, files, out)
  stored = sum(stat is not None for stat in files.values())
  # Exact: the root index holds every file with its stat and nothing else.
  exact = (
      root_index is not None
      and len(out) == stored
      and sum(map(len, root_index.values())) == stored
  )
  cache_index = None
  if not exact:
    cache_index = _load(cache_path(root))
    _lookup(cache_index, files, out)
  todo = sorted(rel for rel in files if rel not in out)
  logging.info(
      'Image folder %s: %s files, %s known from its index, %s to ' 'check.',
      root,
      f'{len(files):,}',
      f'{len(out):,}',
      f'{len(todo):,}',
  )
  if todo:
    checked = check_images(
        [os.path.join(root, rel) for rel in todo], where=root
    )
    out.update(zip(todo, checked))
  if write and not exact:
    index = _build(files, out)
    failures = []
    for path, old in ((root_path, root_index), (cache_path(root), cache_index)):
      if old == index:
        break
      try:
        _write_atomic(path, _dumps(index))
        logging.info('Wrote the image folder index %s.', path)
        break
      except OSError as e:
        failures.append(f'{path}: {type(e).__name__}: {e}')
    else:
      logging.warning(
          'Could not write the image folder index (%s); the next '
          'start checks the images again.',
          '; '.join(failures),
      )
  return out
