"""Tests of the input pipelines: digits, image folders, sharding, resume."""

import collections
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from helpers import init_params
from helpers import make_image_folder
from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax import sharding
import vit_jax.models


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A tfds data directory with `digits` prepared once per test session."""
  path = str(tmp_path_factory.mktemp('tfds'))
  input_pipeline.get_source(
      data(
          ml_collections.ConfigDict(
              {'dataset': 'digits', 'tfds_data_dir': path}
          )
      )
  )
  return path


# Partial configs name a model with 4x4 patches: a field they omit means
# get_base()'s value (ViT-Ti_16's 16-pixel patches would not fit 8 px).
TINY_MODEL = {'model_name': 'testing', 'model': {'patches': {'size': (4, 4)}}}


def digits_config(tfds_dir, **overrides):
  config = ml_collections.ConfigDict(
      {
          **TINY_MODEL,
          'dataset': 'digits',
          'tfds_data_dir': tfds_dir,
          'image_size': 8,
          'batch': 32,
          'batch_eval': 64,
          'seed': 0,
          'shuffle_buffer': 2000,
      }
  )
  config.update(overrides)
  return config


def folder_config(root, **overrides):
  config = ml_collections.ConfigDict(
      {
          **TINY_MODEL,
          'dataset': 'image_folder',
          'image_folder': str(root),
          'image_size': 16,
          'batch': 6,
          'batch_eval': 8,
          'seed': 0,
          'image_folder_test_percent': 30,
      }
  )
  config.update(overrides)
  return config


def data(config):
  """The data section of a partial config (the rest: get_base()'s)."""
  return config_lib.section(config, 'data')


def _fingerprints(batches):
  """Multiset of (label, image hash) of the real (mask = 1) examples."""
  out = collections.Counter()
  for batch in batches:
    images, labels, mask = (
        np.asarray(batch[k]) for k in ('image', 'labels', 'mask')
    )
    for image, label, m in zip(images, labels, mask):
      if m:
        out[
            (int(label.argmax()), hashlib.sha1(image.tobytes()).hexdigest())
        ] += 1
  return out


# ----------------------------------------------------------------------------
# digits.
# ----------------------------------------------------------------------------


def test_digits_builder_yields_the_documented_split(tfds_dir):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  builder = tfds.builder('digits', data_dir=tfds_dir)
  assert builder.info.splits['train'].num_examples == 1498
  assert builder.info.splits['test'].num_examples == 299
  digits = datasets.load_digits()
  assert len(digits.images) == 1797
  expected_images = np.round(digits.images * 255 / 16).astype(np.uint8)
  is_test = np.arange(1797) % 6 == 5
  for split, indices in (('train', ~is_test), ('test', is_test)):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    labels = np.array([e['label'] for e in examples])
    assert set(labels) == set(range(10))
    np.testing.assert_array_equal(
        np.bincount(labels, minlength=10), np.bincount(digits.target[indices])
    )
    got = sorted(
        e['image'][..., 0].tobytes() + bytes([e['label']]) for e in examples
    )
    want = sorted(
        i.tobytes() + bytes([int(t)])
        for i, t in zip(expected_images[indices], digits.target[indices])
    )
    assert got == want
  assert len(examples[0]['image'].shape) == 3


def test_digits_goes_through_the_tfds_code_path(tfds_dir):
  source = input_pipeline.get_source(data(digits_config(tfds_dir)))
  assert isinstance(source, input_pipeline.TfdsSource)
  assert isinstance(source.builder, tfds.core.DatasetBuilder)
  info = input_pipeline.get_dataset_info(data(digits_config(tfds_dir)))
  assert (
      info.num_classes,
      info.num_train_examples,
      info.num_eval_examples,
  ) == (10, 1498, 299)
  holdout = input_pipeline.get_dataset_info(
      data(digits_config(tfds_dir, eval_split='holdout'))
  )
  assert holdout.eval_split == 'train[90%:]'
  assert holdout.num_eval_examples == 150


def test_train_batches_are_rgb_in_range_with_one_hot_labels(tfds_dir):
  batch = next(
      input_pipeline.train_iterator(
          data(digits_config(tfds_dir, image_size=16))
      )
  )
  assert batch['image'].shape == (32, 16, 16, 3)
  assert batch['image'].dtype == np.float32
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
  np.testing.assert_array_equal(batch['labels'].sum(1), 1)


# ----------------------------------------------------------------------------
# Evaluation: every example exactly once.
# ----------------------------------------------------------------------------


def _single_pass_fingerprints(config, split):
  source = input_pipeline.get_source(data(config))
  shard = source.shard(split, 0, 1)
  pp = input_pipeline._preprocess_config(  # pylint: disable=protected-access
      data(config),
      input_pipeline.get_dataset_info(data(config), source).num_classes,
  )
  fn = input_pipeline.preprocess.make_preprocess_fn(pp, train=False)
  examples = list(shard.dataset.map(fn).as_numpy_iterator())
  return _fingerprints(
      [
          {
              'image': np.stack([e['image'] for e in examples]),
              'labels': np.stack([e['labels'] for e in examples]),
              'mask': np.ones(len(examples)),
          }
      ]
  )


@pytest.mark.parametrize('num_devices', [1, 2, 8])
def test_eval_yields_each_example_once_on_1_2_8_devices(tfds_dir, num_devices):
  config = digits_config(tfds_dir, batch_eval=8 * 7)
  mesh = sharding.make_mesh(devices=jax.devices()[:num_devices])
  ds, num_batches = input_pipeline.eval_dataset(data(config))
  batches = list(
      sharding.prefetch_to_device(
          ds.as_numpy_iterator(), sharding.batch_sharding(mesh)
      )
  )
  assert len(batches) == num_batches == 6  # ceil(299 / 56)
  assert all(
      len(b['image'].sharding.device_set) == num_devices for b in batches
  )
  assert sum(float(b['mask'].sum()) for b in batches) == 299
  np.testing.assert_array_equal(np.asarray(batches[-1]['mask'])[-37:], 0)
  assert np.asarray(batches[-1]['mask'])[-38] == 1
  assert _fingerprints(batches) == _single_pass_fingerprints(config, 'test')


@pytest.mark.parametrize('kind', ['digits', 'folder'])
def test_two_processes_read_disjoint_shards_covering_the_data(
    tfds_dir, tmp_path, kind
):
  if kind == 'digits':
    config = digits_config(tfds_dir, batch_eval=62)
  else:
    make_image_folder(tmp_path, per_class=9)
    config = folder_config(tmp_path, batch_eval=4)
  parts, steps = [], []
  for index in range(2):
    ds, n = input_pipeline.eval_dataset(
        data(config), process_index=index, process_count=2
    )
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == n
    parts.append(_fingerprints(batches))
    steps.append(n)
  assert steps[0] == steps[1]  # Same number of batches on every process.
  full = _single_pass_fingerprints(
      config, input_pipeline.get_dataset_info(data(config)).eval_split
  )
  assert parts[0] + parts[1] == full
  if kind == 'folder':  # Unique images: the shards share none.
    assert not set(parts[0]) & set(parts[1])
  # Training shards are disjoint too (unique images in the folder case).
  if kind == 'folder':
    assert (
        input_pipeline.train_iterator(
            data(config), process_index=1, process_count=2
        ).batch_size
        == 3
    )
    source = input_pipeline.get_source(data(config))
    seen = [
        {
            e['image']
            for e in source.shard('train', index, 2).dataset.as_numpy_iterator()
        }
        for index in range(2)
    ]
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == source.split_size('train')


_WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address='127.0.0.1:' + sys.argv[1],
                               num_processes=2, process_id=int(sys.argv[2]))
    import ml_collections
    import numpy as np
    from vit_jax import config_lib, input_pipeline, sharding
    config = ml_collections.ConfigDict(json.loads(sys.argv[3]))
    data = lambda c: config_lib.section(c, 'data')
    mesh = sharding.make_mesh()
    batch_sharding = sharding.batch_sharding(mesh)
    ds, num_batches = input_pipeline.eval_dataset(data(config))

    @jax.jit
    def stats(batch):
      mask = batch['mask']
      return (mask.sum(), (batch['labels'] * mask[:, None]).sum(0),
              (batch['image'].sum((1, 2, 3)) * mask).sum())

    total, counts, checksum = 0.0, np.zeros(10), 0.0
    for batch in sharding.prefetch_to_device(ds.as_numpy_iterator(),
                                             batch_sharding):
      assert batch['image'].shape[0] == config.batch_eval
      m, c, s = stats(batch)
      total, counts, checksum = total + float(m), counts + np.asarray(c), (
          checksum + float(s))
    train = next(sharding.prefetch_to_device(
        input_pipeline.train_iterator(data(config)), batch_sharding))
    print('RESULT ' + json.dumps({
        'devices': jax.device_count(), 'num_batches': num_batches,
        'total': total, 'counts': counts.tolist(), 'checksum': checksum,
        'train_shape': list(train['image'].shape)}))
    jax.distributed.shutdown()
""")


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_eval_exactly_once_with_two_jax_processes(tfds_dir, tmp_path):
  config = digits_config(tfds_dir, batch_eval=64, batch=16)
  worker = tmp_path / 'worker.py'
  worker.write_text(_WORKER)
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [
      subprocess.Popen(
          [sys.executable, str(worker), port, str(i), config.to_json()],
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          env=env,
      )
      for i in range(2)
  ]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = [l for l in out.splitlines() if l.startswith('RESULT ')][-1]
    results.append(json.loads(line[len('RESULT ') :]))
  expected = _single_pass_fingerprints(config, 'test')
  labels = collections.Counter(label for label, _ in expected.elements())
  for result in results:
    assert result['devices'] == 8
    assert result['num_batches'] == 5  # ceil(150 per process / 32)
    assert result['total'] == 299
    assert result['counts'] == [labels[i] for i in range(10)]
    assert result['train_shape'] == [16, 8, 8, 3]
  assert results[0]['checksum'] == pytest.approx(results[1]['checksum'])
  ds, _ = input_pipeline.eval_dataset(
      data(config), process_index=0, process_count=1
  )
  single = sum(
      float((b['image'].sum((1, 2, 3)) * b['mask']).sum())
      for b in ds.as_numpy_iterator()
  )
  assert results[0]['checksum'] == pytest.approx(single, rel=1e-5)


# ----------------------------------------------------------------------------
# Resume.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_restored_iterator_continues_with_the_same_next_batch(tmp_path):
  make_image_folder(tmp_path, per_class=7)  # 15 train images, batch 6.
  config = folder_config(tmp_path)  # Inception crop and flips are on.
  it = input_pipeline.train_iterator(data(config))
  states, batches = [], []
  for _ in range(8):  # More than 3 epochs.
    states.append(it.get_state())
    batches.append(next(it))
  assert states[-1] == {'position': 42, 'unit': 'global_examples'}
  for k in (1, 2, 5, 7):  # Mid-epoch and across epoch boundaries.
    restored = input_pipeline.train_iterator(data(config), state=states[k])
    for expected in batches[k : k + 2]:
      got = next(restored)
      np.testing.assert_array_equal(got['image'], expected['image'])
      np.testing.assert_array_equal(got['labels'], expected['labels'])
  # Each epoch is a new permutation; a new seed gives another stream.
  assert not np.array_equal(batches[0]['image'], batches[3]['image'][:6])
  other = next(
      input_pipeline.train_iterator(data(folder_config(tmp_path, seed=1)))
  )
  assert not np.array_equal(other['image'], batches[0]['image'])


def _take(iterator, n):
  """n batches of `iterator`, with the state before each."""
  states, batches = [], []
  for _ in range(n):
    states.append(iterator.get_state())
    batches.append(next(iterator))
  return states, batches


def _assert_same_batches(got, want):
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g['image'], w['image'])
    np.testing.assert_array_equal(g['labels'], w['labels'])


@pytest.mark.slow
def test_two_process_positions_count_global_examples_and_resume(tmp_path):
  """Pins `position` = examples of the global batches (all processes).

  With 2 processes (shards of 8 and 7 images, local batch 3, global 6) both
  iterators count 6 per batch, and an iterator rebuilt at that position on
  each process yields exactly the next batches of an uninterrupted pair,
  across epoch boundaries of both shards.
  """
  make_image_folder(tmp_path, per_class=7)  # 15 train images, batch 6.
  config = folder_config(tmp_path)
  global_batch, local_batch = 6, 6 // 2
  runs = [
      _take(
          input_pipeline.train_iterator(
              data(config), process_index=p, process_count=2
          ),
          8,
      )
      for p in range(2)
  ]
  for p, (states, batches) in enumerate(runs):
    assert [s['position'] for s in states] == [
        k * global_batch for k in range(8)
    ]
    assert all(len(b['image']) == local_batch for b in batches)
    for k in (1, 3, 5, 6):  # Inside epoch 0 and past the 8/7 boundaries.
      restored = input_pipeline.train_iterator(
          data(config), state=states[k], process_index=p, process_count=2
      )
      _assert_same_batches([next(restored), next(restored)], batches[k : k + 2])
      # A checkpoint written before positions were global (no 'unit')
      # counted this process's examples; it resumes at the same batch.
      legacy = input_pipeline.train_iterator(
          data(config),
          state={'position': k * local_batch},
          process_index=p,
          process_count=2,
      )
      _assert_same_batches([next(legacy)], batches[k : k + 1])
  # The processes read different shards: their streams differ.
  assert not np.array_equal(runs[0][1][0]['image'], runs[1][1][0]['image'])
  with pytest.raises(
      ValueError,
      match=r'position 9 \(global examples\) '
      r'does not split over 2 processes',
  ):
    input_pipeline.train_iterator(
        data(config),
        state=input_pipeline.state_at(9),
        process_index=0,
        process_count=2,
    )


@pytest.mark.slow
def test_checkpoint_position_resumes_both_of_two_processes(
    tfds_dir, tmp_path, monkeypatch
):
  """Pins the position train.py writes: steps * config.batch (global).

  Training runs as process 1 of 2 (its input pipeline reads shard 1 and
  half the batch); the checkpoint of step 2 must hold position 2 * 16, and
  iterators of both processes rebuilt from it must continue with batch 2 of
  an uninterrupted pair.
  """
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config_file(
      os.path.join(
          os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
          'configs',
          'digits.py',
      )
      + ':runlocal'
  )
  config.tfds_data_dir = tfds_dir
  config.total_steps = config.checkpoint_every = config.eval_every = 2
  config.evals.fewshot.every = 0
  config.async_checkpoints = False
  assert config.batch == 16
  original = input_pipeline.train_iterator

  def as_process_1_of_2(cfg, **kwargs):
    return original(cfg, process_index=1, process_count=2, **kwargs)

  monkeypatch.setattr(input_pipeline, 'train_iterator', as_process_1_of_2)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  # Orbax writes the JSON item `data` as checkpoints/<step>/data/metadata.
  with open(os.path.join(workdir, 'checkpoints', '2', 'data', 'metadata')) as f:
    saved = json.load(f)
  assert saved == {'position': 2 * 16, 'unit': 'global_examples'}
  for p in range(2):
    _, uninterrupted = _take(
        original(data(config), process_index=p, process_count=2), 3
    )
    restored = original(
        data(config), state=saved, process_index=p, process_count=2
    )
    _assert_same_batches([next(restored)], uninterrupted[2:])


# ----------------------------------------------------------------------------
# Image folders.
# ----------------------------------------------------------------------------


def test_image_folder_automatic_split_and_class_names(tmp_path):
  make_image_folder(tmp_path, per_class=10)
  config = folder_config(tmp_path)
  info = input_pipeline.get_dataset_info(data(config))
  assert info.class_names == ('cat', 'dog', 'fox')
  assert (info.num_train_examples, info.num_eval_examples) == (21, 9)
  again = input_pipeline.get_source(data(config))
  assert again.files == input_pipeline.get_source(data(config)).files
  path = input_pipeline.write_class_names(str(tmp_path / 'run'), info)
  assert json.load(open(path))['class_names'] == ['cat', 'dog', 'fox']


def test_image_folder_with_train_and_test_folders(tmp_path):
  make_image_folder(tmp_path, per_class=8, split_dirs=True)
  info = input_pipeline.get_dataset_info(data(folder_config(tmp_path)))
  assert (info.num_train_examples, info.num_eval_examples) == (18, 6)


@pytest.mark.slow
def test_image_folder_trains_and_evaluates(tmp_path):
  make_image_folder(tmp_path, per_class=12)
  config = folder_config(tmp_path, batch=24, batch_eval=16, image_size=16)
  mesh = sharding.make_mesh()  # 8 devices, data parallel.
  batch_sharding = sharding.batch_sharding(mesh)
  model = vit_jax.models.get_model(
      'testing',
      num_classes=3,
      patches={'size': (4, 4)},
      transformer={'dropout_rate': 0.0},
  )
  params = init_params(model, np.zeros((1, 16, 16, 3), np.float32))
  tx = optax.sgd(0.3, momentum=0.9)
  opt_state = tx.init(params)

  def loss_fn(p, batch):
    logits = model.apply({'params': p}, batch['image'], train=False)
    return optax.softmax_cross_entropy(logits, batch['labels']).mean()

  @jax.jit
  def step(p, o, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, o = tx.update(grads, o)
    return optax.apply_updates(p, updates), o, loss

  losses = []
  train = sharding.prefetch_to_device(
      input_pipeline.train_iterator(data(config)), batch_sharding
  )
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state, next(train))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

  @jax.jit
  def correct(p, batch):
    logits = model.apply({'params': p}, batch['image'], train=False)
    hit = jnp.take_along_axis(batch['labels'], logits.argmax(-1)[:, None], 1)
    return (hit[:, 0] * batch['mask']).sum(), batch['mask'].sum()

  ds, _ = input_pipeline.eval_dataset(data(config))
  hits = count = 0.0
  for batch in sharding.prefetch_to_device(
      ds.as_numpy_iterator(), batch_sharding
  ):
    h, c = correct(params, batch)
    hits, count = hits + float(h), count + float(c)
  assert count == 9  # 30% of 12 images per class are test images.
  assert hits / count >= 0.75


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_unknown_dataset_lists_what_is_accepted(tfds_dir):
  with pytest.raises(
      ValueError,
      match="Unknown dataset 'cifar11'.*cifar10.*"
      "digits.*'image_folder'.*tensorflow-datasets",
  ):
    input_pipeline.get_source(data(digits_config(tfds_dir, dataset='cifar11')))


def test_unprepared_tfds_dataset_without_network(tmp_path, monkeypatch):
  config = ml_collections.ConfigDict(
      {'dataset': 'cifar10', 'tfds_data_dir': str(tmp_path)}
  )
  with pytest.raises(
      input_pipeline.DatasetNotPreparedError,
      match=r"'cifar10' is not prepared in .*tfds build cifar10 "
      r'--data_dir=.*tfds_download=True',
  ):
    input_pipeline.get_source(data(config))

  def no_network(self, *args, **kwargs):
    raise ConnectionError('Failed to resolve storage.googleapis.com')

  monkeypatch.setattr(
      tfds.core.DatasetBuilder, 'download_and_prepare', no_network
  )
  config.tfds_download = True
  with pytest.raises(
      input_pipeline.DatasetNotPreparedError,
      match='downloading it failed.*ConnectionError.*tfds build',
  ):
    input_pipeline.get_source(data(config))


def test_empty_folder(tmp_path):
  with pytest.raises(ValueError, match='has no class sub-folders'):
    input_pipeline.get_source(data(folder_config(tmp_path)))


def test_class_folder_without_images(tmp_path):
  make_image_folder(tmp_path)
  os.makedirs(tmp_path / 'empty_class')
  (tmp_path / 'empty_class' / 'readme.txt').write_text('no images here')
  with pytest.raises(ValueError, match='empty_class contains no images'):
    input_pipeline.get_source(data(folder_config(tmp_path)))


def test_folder_with_one_class(tmp_path):
  make_image_folder(tmp_path, classes=('only',))
  with pytest.raises(ValueError, match='1 class folder.*at least 2'):
    input_pipeline.get_source(data(folder_config(tmp_path)))


def test_corrupt_image_is_named_or_skipped(tmp_path):
  paths = make_image_folder(tmp_path)
  bad = paths[3]
  raw = open(bad, 'rb').read()
  open(bad, 'wb').write(raw[: len(raw) // 3])
  (tmp_path / 'dog' / 'notes.JPG').write_text('not an image')
  with pytest.raises(input_pipeline.BadImageError) as e:
    input_pipeline.get_source(data(folder_config(tmp_path)))
  assert os.path.basename(bad) in str(e.value) or 'notes.JPG' in str(e.value)
  assert '2 unreadable' in str(e.value)
  assert 'skip_bad_images=True' in str(e.value)
  source = input_pipeline.get_source(
      data(folder_config(tmp_path, skip_bad_images=True))
  )
  assert source.num_skipped == 2
  assert source.split_size('train') + source.split_size('test') == 21 - 1
  batch = next(
      input_pipeline.train_iterator(
          data(folder_config(tmp_path, skip_bad_images=True)), source=source
      )
  )
  assert batch['image'].shape == (6, 16, 16, 3)


def test_batch_not_divisible_by_processes_or_devices(tfds_dir):
  with pytest.raises(
      ValueError,
      match=r'config.batch=33 must be a '
      'positive multiple of the 2 JAX processes',
  ):
    input_pipeline.train_iterator(
        data(digits_config(tfds_dir, batch=33)),
        process_index=0,
        process_count=2,
    )
  mesh = sharding.make_mesh()
  with pytest.raises(
      ValueError,
      match=r'config.batch=12 is not ' r'divisible by the 8 devices.*e.g. 16',
  ):
    sharding.check_batch_size(12, mesh)
  assert sharding.check_batch_size(16, mesh) == 16


def test_image_size_smaller_than_patch_size(tfds_dir):
  def published(name, image_size):
    config = digits_config(tfds_dir, image_size=image_size, model_name=name)
    config.model = {}  # The published patch size.
    return config

  # Checked where the config is parsed (it joins the model and the data).
  with pytest.raises(
      ValueError,
      match='config.image_size=8 is smaller than '
      'the patch size 16 of ViT-B_16',
  ):
    config_lib.parse(published('ViT-B_16', 8))
  with pytest.raises(
      ValueError, match='not a multiple of the total stride ' '16 of R50'
  ):
    config_lib.parse(published('R50+ViT-B_16', 40))
  config_lib.parse(published('R50+ViT-B_16', 32))


def test_mesh_config_that_does_not_fit_the_devices():
  with pytest.raises(ValueError, match=r'needs a multiple of 3 devices but 8'):
    sharding.make_mesh((('data', -1), ('fsdp', 3)))
  with pytest.raises(ValueError, match='covers 4 devices but 8'):
    sharding.make_mesh((('data', 2), ('fsdp', 2)))
  mesh = sharding.make_mesh((('data', -1), ('fsdp', 2)))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
