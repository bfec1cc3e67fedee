"""VTAB-1k: the task table, its splits and labels, the config and summary.

The datasets cannot be downloaded here: the tests write small tfds-format
fixtures with the real builders (`tfds_fixtures.prepare`) and read them with
the real loading code. Expected labels, splits and means are computed here
from task_adaptation's definitions and hand-made values.
"""

import json
import os
import shlex
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tfds_fixtures

from helpers import run_module
from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax.datasets import vtab
from vit_jax.evaluators import vtab as vtab_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The benchmark's 19 tasks by group (ViT paper Table 9, VTAB's grouping).
NATURAL = (
    'caltech101',
    'cifar100',
    'dtd',
    'oxford_flowers102',
    'oxford_iiit_pet',
    'sun397',
    'svhn',
)
SPECIALIZED = ('patch_camelyon', 'eurosat', 'resisc45', 'diabetic_retinopathy')
STRUCTURED = (
    'clevr_count',
    'clevr_distance',
    'dmlab',
    'dsprites_location',
    'dsprites_orientation',
    'kitti_distance',
    'smallnorb_azimuth',
    'smallnorb_elevation',
)


# ----------------------------------------------------------------------------
# Label definitions, written out here from task_adaptation's data/*.py.
# ----------------------------------------------------------------------------


def last_threshold_below(value, thresholds):
  """task_adaptation's bins: the last threshold strictly below the value."""
  return max(i for i, t in enumerate(thresholds) if t < value)


def clevr_distance_reference(depths):
  return last_threshold_below(
      min(depths), [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]
  )


def kitti_distance_reference(types, depths):
  # Car, Van, Truck are KITTI types 0, 1, 2; 1000 m when there is none.
  vehicles = [z for t, z in zip(types, depths) if t in (0, 1, 2)] + [1000.0]
  return last_threshold_below(min(vehicles), [-100.0, 8.0, 20.0, 999.0])


def test_the_table_has_the_19_tasks_in_their_groups():
  assert tuple(t.name for t in vtab.tasks_of(vtab.NATURAL)) == NATURAL
  assert tuple(t.name for t in vtab.tasks_of(vtab.SPECIALIZED)) == SPECIALIZED
  assert tuple(t.name for t in vtab.tasks_of(vtab.STRUCTURED)) == STRUCTURED
  assert len(vtab.TASKS) == 19
  classes = {t.name: t.num_classes for t in vtab.TASKS.values()}
  # task_adaptation: the tfds labels' classes, clevr 8 counts (3-10) and 6
  # distances, dsprites 16 bins, KITTI 4 distances, smallNORB 18 / 9.
  assert classes == {
      'caltech101': 102,
      'cifar100': 100,
      'dtd': 47,
      'oxford_flowers102': 102,
      'oxford_iiit_pet': 37,
      'sun397': 397,
      'svhn': 10,
      'patch_camelyon': 2,
      'eurosat': 10,
      'resisc45': 45,
      'diabetic_retinopathy': 5,
      'clevr_count': 8,
      'clevr_distance': 6,
      'dmlab': 6,
      'dsprites_location': 16,
      'dsprites_orientation': 16,
      'kitti_distance': 4,
      'smallnorb_azimuth': 18,
      'smallnorb_elevation': 9,
  }


def _clevr_features(depths):
  n = len(depths)
  return {
      'objects': {
          'size': tf.zeros([n], tf.int64),
          'pixel_coords': tf.constant(
              [[10.0, 20.0, d] for d in depths], tf.float32, shape=[n, 3]
          ),
      }
  }


def _label(task, features):
  return int(vtab.get_task(task).label_of(features).numpy())


@pytest.mark.parametrize(
    'depths, count, distance',
    [
        ([9.2, 12.0, 8.3, 10.1, 11.0], 2, 1),  # 5 objects; nearest 8.3.
        ([7.0, 9.0, 9.5], 0, 0),  # 3 objects; nearest below 8.
        ([8.0, 9.0, 9.9], 0, 0),  # 8.0 is not above the threshold 8.0.
        ([10.5] * 10, 7, 5),  # 10 objects; nearest beyond 10.
        ([9.7, 9.6, 9.75, 11.0], 1, 4),
    ],
)
def test_clevr_labels(depths, count, distance):
  features = _clevr_features(depths)
  assert _label('clevr_count', features) == count == len(depths) - 3
  assert _label('clevr_distance', features) == distance
  assert distance == clevr_distance_reference(depths)


@pytest.mark.parametrize(
    'types, depths, expected',
    [
        ([0], [5.0], 0),  # A car at 5 m.
        ([3, 2, 0], [2.0, 12.0, 25.0], 1),  # Nearest vehicle: a truck, 12 m.
        ([1, 7], [30.0, 3.0], 2),  # A van at 30 m; Misc is no vehicle.
        ([3, 4, 5], [4.0, 9.0, 15.0], 3),  # Pedestrians, cyclist: none.
        ([], [], 3),  # No objects.
        ([0, 0], [20.0, 8.0], 0),  # 8 m is not above the threshold 8.
    ],
)
def test_kitti_distance_label(types, depths, expected):
  features = {
      'objects': {
          'type': tf.constant(types, tf.int64, shape=[len(types)]),
          'location': tf.constant(
              [[1.0, 1.5, z] for z in depths], tf.float32, shape=[len(types), 3]
          ),
      }
  }
  assert _label('kitti_distance', features) == expected
  assert expected == kitti_distance_reference(types, depths)


def test_dsprites_bins_and_smallnorb_labels():
  # 32 x positions in 16 bins: pairs; 40 orientations in 16: 2.5 per bin.
  for x in range(32):
    assert _label('dsprites_location', {'label_x_position': x}) == x // 2
  orientations = {0: 0, 2: 0, 3: 1, 4: 1, 5: 2, 7: 2, 8: 3, 37: 14, 39: 15}
  for value, expected in orientations.items():
    assert _label('dsprites_orientation', {'label_orientation': value}) == (
        expected
    )
  smallnorb = {'label_azimuth': 13, 'label_elevation': 4, 'label_category': 2}
  assert _label('smallnorb_azimuth', smallnorb) == 13
  assert _label('smallnorb_elevation', smallnorb) == 4


# ----------------------------------------------------------------------------
# Splits.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'task, train_size, val200, test',
    [
        # The real datasets' tfds train sizes; task_adaptation's percents.
        ('caltech101', 3060, 'train[2754:2954]', 'test'),  # 90%.
        ('cifar100', 50000, 'train[45000:45200]', 'test'),  # 90%.
        ('oxford_iiit_pet', 3680, 'train[2944:3144]', 'test'),  # 80%.
        ('svhn', 73257, 'train[65931:66131]', 'test'),  # 90%.
        ('eurosat', 27000, 'train[16200:16400]', 'train[21600:]'),  # 60/20.
        ('resisc45', 31500, 'train[18900:19100]', 'train[25200:]'),  # 60/20.
        ('clevr_count', 70000, 'train[63000:63200]', 'validation'),
        ('dsprites_location', 737280, 'train[589824:590024]', 'train[663552:]'),
        ('dtd', 1880, 'validation[:200]', 'test'),
        ('sun397', 76128, 'validation[:200]', 'test'),
        ('kitti_distance', 6347, 'validation[:200]', 'test'),
        ('smallnorb_azimuth', 24300, 'test[:200]', 'test[50%:]'),
    ],
)
def test_split_strings(task, train_size, val200, test):
  splits = vtab.get_task(task).splits.resolve(train_size)
  assert splits == {
      'train800': 'train[:800]',
      'val200': val200,
      'train800val200': f'train[:800]+{val200}',
      'test': test,
  }


def test_holdout_trains_on_train800_and_evaluates_on_val200():
  resolve = input_pipeline.resolve_splits
  assert resolve('vtab/dtd', None, None) == ('train800val200', 'test')
  assert resolve('vtab/dtd', None, 'holdout') == ('train800', 'val200')
  assert resolve('vtab/dtd', 'train800val200', 'holdout') == (
      'train800val200',
      'val200',
  )
  # Other presets keep their train split with the held-out slice.
  assert resolve('cifar10', None, 'holdout') == ('train[:98%]', 'train[98%:]')


def _data(dataset, tfds_dir, **overrides):
  config = ml_collections.ConfigDict(
      {
          'model_name': 'testing',
          'model': {'patches': {'size': (4, 4)}},
          'dataset': dataset,
          'tfds_data_dir': tfds_dir,
          'image_size': 16,
          'batch': 8,
          'batch_eval': 8,
          'shuffle_buffer': 100,
          **overrides,
      }
  )
  return config_lib.section(config, 'data')


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'dataset': 'vtab/clevr_cnt'}, r"Unknown VTAB task 'vtab/clevr_cnt'"),
        (
            {'train_split': 'train[:800]'},
            r'config.train_split=.*train800val200',
        ),
        ({'train_split': 'holdout'}, r'config.train_split=.holdout. is not'),
        ({'eval_split': 'validation'}, r'config.eval_split=.*holdout'),
    ],
)
def test_config_mistakes_are_refused_when_parsed(overrides, message):
  with pytest.raises(ValueError, match=message):
    _data(overrides.pop('dataset', 'vtab/dtd'), '/nonexistent', **overrides)


# ----------------------------------------------------------------------------
# Fixtures: the real builders with small hand-made examples.
# ----------------------------------------------------------------------------


def _dsprites_example(i, rng):
  image = (rng.random((64, 64, 1)) < 0.3).astype(np.uint8)  # 0 / 1.
  return {
      'image': image,
      'label_orientation': i % 40,
      'label_scale': i % 6,
      'label_shape': i % 3,
      'label_x_position': (7 * i) % 32,
      'label_y_position': (3 * i) % 32,
      'value_orientation': 0.0,
      'value_scale': 0.0,
      'value_shape': 0.0,
      'value_x_position': float(i),  # Names the example: its index.
      'value_y_position': 0.0,
  }


def _small_image(i, size=8):
  # Tiny images that differ: a pixel pattern from the index.
  rng = np.random.default_rng(i)
  return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


DSPRITES_EXAMPLES = 1000  # 80% = 800 train800, then val200, then 100 test.
SMALL_TEST = 10


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """Prepared fixtures: dsprites, dtd, retinopathy (1k splits), clevr, kitti."""
  path = str(tmp_path_factory.mktemp('vtab_tfds'))
  rng = np.random.default_rng(0)
  tfds_fixtures.prepare(
      'dsprites',
      path,
      {'train': [_dsprites_example(i, rng) for i in range(DSPRITES_EXAMPLES)]},
  )

  def classified(n, num_classes, key, offset=0):
    return [
        {
            'image': _small_image(offset + i),
            'label': i % num_classes,
            key: str(i),
        }
        for i in range(n)
    ]

  tfds_fixtures.prepare(
      'dtd',
      path,
      {
          'train': classified(800, 47, 'file_name'),
          'validation': classified(200, 47, 'file_name', 1000),
          'test': classified(SMALL_TEST, 47, 'file_name', 2000),
      },
  )
  tfds_fixtures.prepare(
      'diabetic_retinopathy_detection',
      path,
      {
          'train': classified(800, 5, 'name'),
          'validation': classified(200, 5, 'name', 1000),
          'test': classified(SMALL_TEST, 5, 'name', 2000),
      },
      config='btgraham-300',
  )
  tfds_fixtures.prepare(
      'clevr',
      path,
      {'train': [_clevr(CLEVR_SCENES[0])], 'validation': _clevr_scenes()},
  )
  tfds_fixtures.prepare(
      'kitti',
      path,
      {
          'train': [_kitti(KITTI_SCENES[0])],
          'validation': [_kitti(KITTI_SCENES[0])],
          'test': [_kitti(s) for s in KITTI_SCENES],
      },
  )
  return path


# Object depths of clevr scenes (3 to 8 objects: counts 0 to 5).
CLEVR_SCENES = (
    [9.2, 12.0, 8.3],
    [7.5, 9.0, 9.6, 12.0],
    [10.4, 11.0, 12.0, 13.0, 14.0],
    [9.1, 9.3, 9.4, 9.9, 10.0, 11.0],
    [9.8, 12.0, 11.0, 10.0, 13.0, 14.0, 15.0],
    [8.7, 9.5, 9.5, 9.9, 10.0, 11.0, 12.0, 13.0],
)


def _clevr(depths):
  return {
      'file_name': 'scene.png',
      'image': _small_image(len(depths)),
      'objects': [
          {
              '3d_coords': [0.0, 0.0, 0.0],
              'color': 0,
              'material': 0,
              'pixel_coords': [5.0, 5.0, d],
              'rotation': 0.0,
              'shape': 0,
              'size': 0,
          }
          for d in depths
      ],
      'question_answer': [],
  }


def _clevr_scenes():
  return [_clevr(d) for d in CLEVR_SCENES]


# (types, depths) of KITTI scenes, one of each distance class.
KITTI_SCENES = (
    ([0, 3], [6.0, 2.0]),
    ([3, 1], [4.0, 15.0]),
    ([2, 7, 0], [45.0, 3.0, 30.0]),
    ([3, 5], [5.0, 7.0]),
)


def _kitti(scene):
  types, depths = scene
  return {
      'image': _small_image(len(types)),
      'image/file_name': 'scene.png',
      'objects': [
          {
              'alpha': 0.0,
              'bbox': tfds.features.BBox(0.1, 0.1, 0.5, 0.5),
              'dimensions': [1.0, 1.0, 1.0],
              'location': [1.0, 1.0, z],
              'occluded': 0,
              'rotation_y': 0.0,
              'truncated': 0.0,
              'type': t,
          }
          for t, z in zip(types, depths)
      ],
  }


def _labels(source, split):
  shard = source.shard(split, 0, 1)
  return [int(f['label']) for f in shard.dataset.as_numpy_iterator()]


def _source(dataset, tfds_dir):
  return input_pipeline.get_source(_data(dataset, tfds_dir))


def test_labels_through_the_real_builders(tfds_dir):
  # The tfds test sets hold one scene of each label (written shuffled): the
  # labels read back are each scene's, by the definitions above.
  count = _source('vtab/clevr_count', tfds_dir)
  assert sorted(_labels(count, 'test')) == [len(d) - 3 for d in CLEVR_SCENES]
  distance = _source('vtab/clevr_distance', tfds_dir)
  assert sorted(_labels(distance, 'test')) == sorted(
      clevr_distance_reference(d) for d in CLEVR_SCENES
  )
  kitti = _source('vtab/kitti_distance', tfds_dir)
  assert sorted(_labels(kitti, 'test')) == sorted(
      kitti_distance_reference(*s) for s in KITTI_SCENES
  )
  assert sorted(_labels(kitti, 'test')) == [0, 1, 2, 3]


def test_1k_splits_on_a_single_split_dataset(tfds_dir):
  source = _source('vtab/dsprites_location', tfds_dir)
  # 80% of 1000 is train, the next 10% val: val200 = train[800:1000].
  assert source.splits == {
      'train800': 'train[:800]',
      'val200': 'train[800:1000]',
      'train800val200': 'train[:800]+train[800:1000]',
      'test': 'train[900:]',
  }
  sizes = {s: source.split_size(s) for s in vtab.SPLITS}
  assert sizes == {
      'train800': 800,
      'val200': 200,
      'train800val200': 1000,
      'test': 100,
  }
  info = input_pipeline.get_dataset_info(
      _data('vtab/dsprites_location', tfds_dir)
  )
  assert (info.train_split, info.num_train_examples) == ('train800val200', 1000)
  assert (info.eval_split, info.num_eval_examples) == ('test', 100)
  assert info.num_classes == 16


def test_1k_splits_on_a_dataset_with_a_validation_split(tfds_dir):
  source = _source('vtab/diabetic_retinopathy', tfds_dir)
  sizes = {s: source.split_size(s) for s in vtab.SPLITS}
  assert sizes == {
      'train800': 800,
      'val200': 200,
      'train800val200': 1000,
      'test': SMALL_TEST,
  }
  assert source.class_names == ('0', '1', '2', '3', '4')
  # Two processes read disjoint halves of the 1,000.
  halves = [source.shard('train800val200', i, 2) for i in range(2)]
  assert [h.num_examples for h in halves] == [500, 500]


def test_a_dataset_too_small_for_the_splits_is_named(tfds_dir):
  source = _source('vtab/clevr_count', tfds_dir)  # 1 train example.
  with pytest.raises(ValueError, match=r"train\[:800\]' of clevr.*prepare"):
    source.split_size('train800')


def test_dsprites_trains_on_its_pixels_scaled_uncropped_and_unflipped(
    tfds_dir,
):
  # At its own size (64 px) an image that is not cropped, flipped or
  # rescaled comes out exactly as stored, 0/1 taken to -1/1.
  rng = np.random.default_rng(0)
  stored = {
      (2 * _dsprites_example(i, rng)['image'][..., 0] - 1.0).tobytes()
      for i in range(DSPRITES_EXAMPLES)
  }
  data = _data('vtab/dsprites_location', tfds_dir, image_size=64, batch=50)
  batch = next(
      input_pipeline.train_iterator(data, process_index=0, process_count=1)
  )
  images = batch['image']
  assert images.shape == (50, 64, 64, 3)
  for image in images:
    assert np.array_equal(image[..., 0], image[..., 2])  # Grey as RGB.
    assert image[..., 0].astype(np.float64).tobytes() in stored


# ----------------------------------------------------------------------------
# The config.
# ----------------------------------------------------------------------------


def _vtab_config(arg):
  return config_lib.load_config_file(
      os.path.join(REPO, f'configs/vtab.py:{arg}')
  )


def test_config_is_the_papers_vtab_recipe():
  c = _vtab_config('b16,clevr_count')
  # Appendix B.1.1 and Table 4 (VTAB row).
  expected = {
      'model_name': 'ViT-B_16',
      'dataset': 'vtab/clevr_count',
      'optimizer': 'sgd',
      'momentum': 0.9,
      'batch': 512,
      'total_steps': 2500,
      'base_lr': 0.01,
      'decay_type': 'cosine',
      'weight_decay': 0.0,
      'grad_clip_norm': 1.0,
      'image_size': 384,
      'train_split': None,
      'eval_split': None,
      'eval_every': 2500,
  }
  assert {k: c[k] for k in expected} == expected
  run = config_lib.parse(c)
  assert run.data.dataset == 'vtab/clevr_count'


def test_runlocal_keeps_the_task():
  c = _vtab_config('ti16,dsprites_orientation,runlocal')
  assert c.dataset == 'vtab/dsprites_orientation'
  assert c.image_size == 16 and c.total_steps < 10
  with pytest.raises(ValueError, match='Unknown VTAB task'):
    _vtab_config('b16,clevr')


# ----------------------------------------------------------------------------
# The summary.
# ----------------------------------------------------------------------------


def write_run(
    root,
    name,
    task,
    accuracy,
    *,
    step=2500,
    total_steps=2500,
    final=True,
    eval_split=None,
):
  """A workdir as a finished (or not) run leaves it, by hand."""
  path = os.path.join(root, name)
  os.makedirs(os.path.join(path, 'checkpoints', str(step)), exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(
        {
            'dataset': f'vtab/{task}',
            'train_split': None,
            'eval_split': eval_split,
            'total_steps': total_steps,
        },
        f,
    )
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps({'step': 1, 'train/loss': 2.0}) + '\n')
    f.write(json.dumps({'step': step, 'eval/accuracy': accuracy}) + '\n')
  if final:
    open(os.path.join(path, 'final_params.npz'), 'wb').close()
  return path


# Hand-picked accuracies, one per task.
ACCURACIES = {
    name: round(0.3 + 0.035 * i, 4)
    for i, name in enumerate(NATURAL + SPECIALIZED + STRUCTURED)
}


def test_summary_means_of_the_groups(tmp_path):
  for name, accuracy in ACCURACIES.items():
    write_run(tmp_path, f'run_{name}', name, accuracy)
  (tmp_path / 'notes').mkdir()  # Not a run: ignored.
  summary = vtab_summary.summarize(str(tmp_path))
  assert summary.split == 'test' and not summary.not_done
  for group, names in (
      ('natural', NATURAL),
      ('specialized', SPECIALIZED),
      ('structured', STRUCTURED),
  ):
    expected = np.mean([ACCURACIES[n] for n in names])
    assert summary.mean(group) == pytest.approx(expected)
  assert summary.mean() == pytest.approx(np.mean(list(ACCURACIES.values())))
  table = vtab_summary.format_summary(summary)
  natural = np.mean([ACCURACIES[n] for n in NATURAL]) * 100
  assert 'natural (7)' in table and f'{natural:.1f}' in table
  assert f'{100 * ACCURACIES["kitti_distance"]:.1f}' in table
  assert 'missing' not in table


def test_summary_marks_missing_and_unfinished_tasks(tmp_path):
  for name in SPECIALIZED:
    write_run(tmp_path, name, name, ACCURACIES[name])
  write_run(tmp_path, 'dtd', 'dtd', 0.5, step=1000, final=False)
  write_run(tmp_path, 'svhn', 'svhn', 0.6, step=2000)  # Stopped early.
  summary = vtab_summary.summarize(str(tmp_path))
  status = {r.task.name: r.status for r in summary.results}
  assert status['dtd'] == status['svhn'] == 'unfinished'
  assert status['eurosat'] == 'done' and status['clevr_count'] == 'missing'
  assert summary.mean('natural') is None and summary.mean() is None
  assert summary.mean('specialized') == pytest.approx(
      np.mean([ACCURACIES[n] for n in SPECIALIZED])
  )
  table = vtab_summary.format_summary(summary)
  assert 'unfinished (step 1000)' in table
  assert len(summary.not_done) == 15 and 'cifar100' in table.splitlines()[-1]


def test_summary_refuses_two_runs_of_a_task_and_mixed_splits(tmp_path):
  write_run(tmp_path, 'a', 'dtd', 0.5)
  write_run(tmp_path, 'b', 'dtd', 0.6)
  with pytest.raises(ValueError, match='Two runs of the VTAB task dtd'):
    vtab_summary.summarize(str(tmp_path))
  other = tmp_path / 'mixed'
  write_run(other, 'dtd', 'dtd', 0.5)
  write_run(other, 'svhn', 'svhn', 0.6, eval_split='holdout')
  with pytest.raises(ValueError, match='different splits.*val200'):
    vtab_summary.summarize(str(other))


# ----------------------------------------------------------------------------
# End to end: the CLI on the fixtures, one task per group, then the summary.
# ----------------------------------------------------------------------------


E2E_TASKS = ('dtd', 'diabetic_retinopathy', 'dsprites_location')


@pytest.mark.slow
def test_runs_and_summary_through_the_command_lines(tfds_dir, tmp_path):
  for task in E2E_TASKS:
    result = run_module(
        'vit_jax.main',
        f'--config=configs/vtab.py:ti16,{task},runlocal',
        f'--workdir={tmp_path / task}',
        f'--config.tfds_data_dir={tfds_dir}',
    )
    assert result.returncode == 0, result.stderr[-3000:]
  result = run_module('vit_jax.vtab_summary', f'--workdirs={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = {
      line.split()[1]: line.split()[2:]
      for line in result.stdout.splitlines()[2:]
      if len(line.split()) >= 3
  }
  for task in E2E_TASKS:
    with open(tmp_path / task / 'metrics.jsonl') as f:
      last = [json.loads(l) for l in f if 'eval/accuracy' in l][-1]
    # Evaluated on the task's test split (its size), the accuracy shown.
    test_size = {'dsprites_location': 100}.get(task, SMALL_TEST)
    assert last['eval/examples'] == test_size
    assert lines[task] == [f'{100 * last["eval/accuracy"]:.1f}']
  assert lines['clevr_count'] == ['-', 'missing']
  assert 'Without a finished run (16)' in result.stdout


def test_the_docs_table_is_the_task_table():
  with open(os.path.join(REPO, 'docs', 'evaluation.md'), encoding='utf-8') as f:
    text = f.read()
  section = text[text.index('## VTAB-1k') :]
  section = section[: section.index('\n## ')]
  rows = [
      tuple(cell.strip().strip('`') for cell in line.split('|')[1:5])
      for line in section.splitlines()
      if line.startswith('| ') and line.split('|')[1].strip() in vtab.GROUPS
  ]
  assert rows == [
      (t.group, t.name, t.tfds_name, str(t.num_classes))
      for t in vtab.TASKS.values()
  ]


@pytest.mark.slow
def test_the_launcher_runs_every_task_in_its_workdir_then_the_summary():
  result = subprocess.run(
      [
          'bash',
          os.path.join(REPO, 'launch', 'vtab.sh'),
          'b16',
          '/runs/vtab',
          '--config.pretrained_path=B16.npz',
      ],
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, DRY_RUN='1', PYTHON=sys.executable, PYTHONPATH=REPO),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  commands = [shlex.split(line) for line in result.stdout.splitlines()]
  config = os.path.join(REPO, 'configs', 'vtab.py')
  main = [sys.executable, '-m', 'vit_jax.main']
  assert commands[:-1] == [
      main
      + [
          f'--config={config}:b16,{task}',
          f'--workdir=/runs/vtab/{task}',
          '--config.pretrained_path=B16.npz',
      ]
      for task in NATURAL + SPECIALIZED + STRUCTURED
  ]
  assert commands[-1] == [
      sys.executable,
      '-m',
      'vit_jax.vtab_summary',
      '--workdirs=/runs/vtab',
  ]
