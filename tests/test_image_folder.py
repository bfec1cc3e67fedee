"""Image folders: the one-time index of readable files and the split."""

import glob
import json
import logging
import math
import os
import shutil

from PIL import Image
import pytest

from helpers import make_image_folder
from vit_jax import input_pipeline
from vit_jax.datasets import folder_index

INDEX = folder_index.INDEX_NAME


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
  """A private cache directory: tests never write to ~/.cache."""
  path = tmp_path / 'cache'
  monkeypatch.setenv('XDG_CACHE_HOME', str(path))
  return path


@pytest.fixture
def decoded(monkeypatch):
  """The paths `check_image` was called with (from any thread)."""
  calls = []
  real = folder_index.check_image

  def counting(path):
    calls.append(path)
    return real(path)

  monkeypatch.setattr(folder_index, 'check_image', counting)
  return calls


def source(root, **kwargs):
  return input_pipeline.ImageFolderSource(str(root), test_percent=30, **kwargs)


def test_index_is_written_once_and_reused(tmp_path, decoded):
  root = tmp_path / 'images'
  make_image_folder(root)  # 3 classes x 7 images.
  first = source(root)
  assert len(decoded) == 21
  index = root / INDEX
  assert index.is_file()
  written = index.read_text(), index.stat().st_mtime_ns
  decoded.clear()
  second = source(root)
  assert decoded == []  # Nothing decoded on a restart.
  assert second.files == first.files
  assert second.class_names == ('cat', 'dog', 'fox')  # The index is no class.
  assert (index.read_text(), index.stat().st_mtime_ns) == written


def test_a_copy_with_its_mtimes_reuses_the_index(tmp_path, decoded):
  make_image_folder(tmp_path / 'images')
  source(tmp_path / 'images')
  shutil.copytree(tmp_path / 'images', tmp_path / 'copy')  # copy2: mtimes.
  decoded.clear()
  copy = source(tmp_path / 'copy')
  assert decoded == []
  assert copy.split_size('train') + copy.split_size('test') == 21


def _add(root, paths):
  shutil.copy(paths[0], root / 'dog' / 'new.png')
  return ['new.png'], 22


def _remove(root, paths):
  os.remove(paths[-1])
  return [], 20


def _resize_keeping_mtime(root, paths):
  stat = os.stat(paths[3])
  with open(paths[3], 'r+b') as f:
    f.truncate(stat.st_size // 3)
  os.utime(paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns))
  return [os.path.basename(paths[3])], 20


def _touch_keeping_size(root, paths):
  stat = os.stat(paths[5])
  os.utime(paths[5], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  return [os.path.basename(paths[5])], 21


def _replace(root, paths):
  # A new file renamed over an old one (as `cp` via a temporary file, rsync).
  tmp = root / 'tmp.png'
  shutil.copy(paths[1], tmp)
  with open(tmp, 'ab') as f:
    f.write(b'\0')
  os.replace(tmp, paths[2])
  return [os.path.basename(paths[2])], 21


@pytest.mark.parametrize(
    'change',
    [_add, _remove, _resize_keeping_mtime, _touch_keeping_size, _replace],
)
def test_only_changed_files_are_checked_again(tmp_path, decoded, change):
  root = tmp_path / 'images'
  paths = make_image_folder(root)
  source(root)
  decoded.clear()
  changed, readable = change(root, paths)
  after = source(root, skip_bad_images=True)
  assert sorted(os.path.basename(p) for p in decoded) == changed
  assert after.split_size('train') + after.split_size('test') == readable
  # The rewritten index knows the change: a third start decodes nothing.
  decoded.clear()
  again = source(root, skip_bad_images=True)
  assert decoded == []
  assert again.files == after.files
  assert again.num_skipped == after.num_skipped


def _refuse_writes_in(root, monkeypatch):
  """Makes `root` unwritable (root, the user, also needs the write refused)."""
  os.chmod(root, 0o555)
  if os.geteuid() == 0:  # Permission bits do not stop root.
    real = folder_index._write_atomic  # pylint: disable=protected-access

    def refuse(path, text):
      if os.path.dirname(path) == str(root):
        raise PermissionError(13, 'Permission denied', path)
      real(path, text)

    monkeypatch.setattr(folder_index, '_write_atomic', refuse)


def test_unwritable_folder_keeps_its_index_in_the_cache(
    tmp_path, decoded, monkeypatch, cache_home
):
  root = tmp_path / 'images'
  make_image_folder(root)
  _refuse_writes_in(root, monkeypatch)
  try:
    first = source(root)
    assert not (root / INDEX).exists()
    cached = glob.glob(
        str(cache_home / 'vit_jax' / 'image_folder_index' / '*.json')
    )
    assert cached == [folder_index.cache_path(str(root))]
    decoded.clear()
    second = source(root)
    assert decoded == []
    assert second.files == first.files
  finally:
    os.chmod(root, 0o755)


def test_no_writable_place_for_the_index_is_only_a_warning(
    tmp_path, decoded, monkeypatch, caplog
):
  root = tmp_path / 'images'
  make_image_folder(root)
  (tmp_path / 'a_file').write_text('')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'a_file'))
  _refuse_writes_in(root, monkeypatch)
  try:
    with caplog.at_level(logging.WARNING):
      first = source(root)
    assert first.split_size('train') + first.split_size('test') == 21
    assert 'Could not write the image folder index' in caplog.text
    decoded.clear()
    source(root)
    assert len(decoded) == 21  # Checked again, as the warning says.
  finally:
    os.chmod(root, 0o755)


def _truncated(text):
  return text[: len(text) // 2]


def _misaligned(text):
  data = json.loads(text)
  data['dirs']['dog']['sizes'].pop()
  return json.dumps(data)


def _wrong_types(text):
  data = json.loads(text)
  data['dirs']['cat']['errors'] = ['not', 'a', 'dict']
  data['dirs']['dog']['sizes'] = [str(s) for s in data['dirs']['dog']['sizes']]
  return json.dumps(data)


@pytest.mark.parametrize(
    'garble',
    [
        _truncated,
        _misaligned,
        _wrong_types,
        lambda _: 'null',
        lambda _: '[]',
        lambda _: '{}',
        lambda _: '\xff\xfe binary',
        lambda t: t.replace('"version":1', '"version":99'),
    ],
)
def test_garbled_index_is_ignored_and_rebuilt(
    tmp_path, decoded, garble, caplog
):
  root = tmp_path / 'images'
  make_image_folder(root)
  first = source(root)
  index = root / INDEX
  index.write_text(garble(index.read_text()))
  decoded.clear()
  with caplog.at_level(logging.WARNING):
    second = source(root)
  assert 'Ignoring the image folder index' in caplog.text
  assert second.files == first.files
  assert len(decoded) == 21
  decoded.clear()
  source(root)
  assert decoded == []  # Rebuilt.


def test_bad_files_stay_known_across_restarts(tmp_path, decoded):
  root = tmp_path / 'images'
  paths = make_image_folder(root)
  with open(paths[4], 'r+b') as f:
    f.truncate(40)
  (root / 'dog' / 'notes.JPG').write_text('not an image')
  with pytest.raises(input_pipeline.BadImageError) as first:
    source(root)
  assert len(decoded) == 22
  message = str(first.value)
  assert message.startswith(f'Cannot decode image {paths[4]} (')
  assert (
      '2 unreadable file(s) in all. Remove or replace it, or set '
      'config.skip_bad_images=True' in message
  )
  decoded.clear()
  skipping = source(root, skip_bad_images=True)
  assert decoded == []
  assert skipping.num_skipped == 2
  kept = [p for f in skipping.files.values() for p, _ in f]
  assert len(kept) == 20 and paths[4] not in kept
  with pytest.raises(input_pipeline.BadImageError) as again:
    source(root)
  assert decoded == []
  assert str(again.value) == message


def test_only_the_writing_process_writes_the_index(tmp_path, decoded):
  root = tmp_path / 'images'
  make_image_folder(root)
  source(root, write_index=False)
  assert not (root / INDEX).exists()
  assert not os.path.exists(folder_index.cache_path(str(root)))
  source(root, write_index=True)
  assert (root / INDEX).exists()


def test_progress_line_while_checking(tmp_path, monkeypatch, caplog):
  root = tmp_path / 'images'
  make_image_folder(root)
  monkeypatch.setattr(folder_index, 'PROGRESS_SECONDS', 0.0)
  with caplog.at_level(logging.INFO, logger='absl'):
    source(root)
  assert f'Checking images in {root}: 21 / 21 (' in caplog.text
  assert f'Checked 21 images in {root} in ' in caplog.text


def _full_decode(path):
  try:
    with Image.open(path) as image:
      image.load()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def test_check_agrees_with_a_full_decode_on_truncated_files(tmp_path):
  # JPEGs are checked at 1/8 scale: truncated ones must still fail.
  paths = make_image_folder(tmp_path, per_class=2)  # .png, .PNG, .jpg, ...
  for path in paths:
    assert folder_index.check_image(path) is None
    raw = open(path, 'rb').read()
    for size in (40, len(raw) // 3, len(raw) // 2, len(raw) - 30):
      with open(path, 'wb') as f:
        f.write(raw[:size])
      assert folder_index.check_image(path) is not None, (path, size)
    for size in range(len(raw) - 30, len(raw)):
      with open(path, 'wb') as f:
        f.write(raw[:size])
      assert (folder_index.check_image(path) is None) == _full_decode(path)


def _expected_split(names, percent):
  """Test files: for m = 1, 2, ..., the file at ceil(100 m / percent) - 1.

  The documented rule ("percent of each class, evenly spaced, by name"),
  stated the other way round from the implementation's per-file test.
  """
  test = set()
  m = 1
  while percent and math.ceil(100 * m / percent) - 1 < len(names):
    test.add(names[math.ceil(100 * m / percent) - 1])
    m += 1
  return [n for n in names if n not in test], sorted(test)


@pytest.mark.parametrize(
    'per_class,percent', [(10, 30), (13, 10), (7, 25), (9, 50), (8, 0)]
)
def test_automatic_split_follows_the_documented_rule(
    tmp_path, per_class, percent
):
  root = tmp_path / 'images'
  make_image_folder(root, classes=('b', 'a', 'C'), per_class=per_class)
  shutil.copy(glob.glob(str(root / 'a' / 'img_000.*'))[0], root / 'a' / 'Z.PNG')
  (root / 'a' / 'readme.txt').write_text('ignored')
  classes = sorted(os.listdir(root))
  assert classes == ['C', 'a', 'b']
  expected = {'train': [], 'test': []}
  for label, name in enumerate(classes):
    files = sorted(
        f
        for f in os.listdir(root / name)
        if f.rsplit('.', 1)[-1].lower() in ('png', 'jpg', 'jpeg')
    )
    train, test = _expected_split(files, percent)
    expected['train'] += [(str(root / name / f), label) for f in train]
    expected['test'] += [(str(root / name / f), label) for f in test]
  if per_class == 10:  # Spelled out once: files 3, 6 and 9 of 10.
    assert [os.path.basename(p) for p, l in expected['test'] if l == 2] == [
        'img_003.JPEG',
        'img_006.PNG',
        'img_009.jpeg',
    ]
  for _ in range(2):  # First start, then from the index.
    got = input_pipeline.ImageFolderSource(str(root), test_percent=percent)
    assert got.class_names == ('C', 'a', 'b')
    assert {s: sorted(f) for s, f in got.files.items()} == {
        s: sorted(f) for s, f in expected.items()
    }


def test_train_and_test_folders_from_the_index(tmp_path, decoded):
  root = tmp_path / 'images'
  make_image_folder(root, per_class=8, split_dirs=True)
  first = source(root)
  decoded.clear()
  second = source(root)
  assert decoded == []
  assert second.files == first.files
  assert (len(second.files['train']), len(second.files['test'])) == (18, 6)
  assert second.files['test'][0][0] == os.path.join(
      str(root), 'test', 'cat', 'img_000.png'
  )
