"""Tests of training: configs, CLI, determinism across shardings, accum."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

from clu import metric_writers
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

import helpers
import train_worker
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import hlo
from vit_jax import objectives
from vit_jax import optim
from vit_jax import run_checkpoints
from vit_jax import sharding
from vit_jax import train
from vit_jax import writers
from vit_jax.evaluators import classification
import vit_jax.models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
CONFIG_ARGS = {
    'digits.py': [None, 'runlocal'],
    'digits_resnet.py': [None, 'runlocal'],
    'finetune.py': [
        'b16,cifar10',
        'ViT-L_16,imagenet2012',
        'r50_b16,pets',
        'ti16,digits,runlocal',
        'b16,cifar10,linear_probe',
        'ti16,digits,head_only,runlocal',
    ],
    'vtab.py': [
        'b16,clevr_count',
        'l16,dsprites_orientation',
        'ti16,dtd,runlocal',
    ],
    'flexivit.py': ['b', 'l', 's,runlocal'],
    'pretrain_imagenet21k.py': ['b16', 'b16,runlocal'],
    'pretrain_imagenet.py': ['b16', 'b16,runlocal'],
    'pretrain_jft.py': ['l16', 'l16,runlocal'],
    'mpp_pretrain.py': ['b16', 'b16,target=4x4', 'runlocal'],
    'pretrain_vit_g14_pod.py': [None, 'runlocal'],
    'augreg.py': [
        'b16,i21k',
        's16,i1k,medium2',
        'l16,i21k',
        'ti16,i1k,runlocal',
    ],
}


def load_config(name, arg=None):
  path = os.path.join(REPO, 'configs', name)
  return config_lib.load_config_file(f'{path}:{arg}' if arg else path)


def run_main(*args, timeout=600):
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
  )
  return result


# ----------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------


def test_every_config_file_is_covered():
  assert sorted(os.path.basename(c) for c in CONFIGS) == sorted(CONFIG_ARGS)


@pytest.mark.parametrize(
    'name,arg', [(n, a) for n, args in CONFIG_ARGS.items() for a in args]
)
def test_config_loads_and_locks(name, arg):
  config = load_config(name, arg)
  assert isinstance(config, ml_collections.ConfigDict)
  for field in (
      'model_name',
      'dataset',
      'tfds_data_dir',
      'image_size',
      'batch',
      'batch_eval',
      'total_steps',
      'warmup_steps',
      'base_lr',
      'decay_type',
      'weight_decay',
      'grad_clip_norm',
      'accum_steps',
      'label_smoothing',
      'eval_every',
      'checkpoint_every',
      'keep_checkpoints',
      'pretrained_path',
      'mesh',
      'seed',
      'ema_decay',
  ):
    assert field in config, field
  import vit_jax.models  # pylint: disable=g-import-not-at-top

  assert config.model_name in vit_jax.models.MODEL_NAMES
  # Every field is one get_base() declares, and every section checks out.
  run = config_lib.parse(config)
  assert run.model.model_name == config.model_name
  assert run.data.batch % run.loop.accum_steps == 0
  config.lock()
  with pytest.raises(AttributeError):
    config.no_such_field = 1
  if arg and 'runlocal' in arg:
    # Smoke runs take seconds; the MPP one is a real (few-minute) run.
    limit = 1000 if name == 'mpp_pretrain.py' else 10
    assert config.total_steps <= limit
    # A VTAB smoke run keeps its task (tests/test_vtab.py runs it on
    # fixtures); the others train on the bundled digits.
    local = 'vtab/dtd' if name == 'vtab.py' else 'digits'
    assert config.dataset == local


def test_finetune_config_follows_the_paper_recipe():
  config = load_config('finetune.py', 'b16,cifar10')
  assert (config.model_name, config.dataset) == ('ViT-B_16', 'cifar10')
  assert (config.optimizer, config.momentum, config.batch) == ('sgd', 0.9, 512)
  assert (config.decay_type, config.weight_decay, config.grad_clip_norm) == (
      'cosine',
      0.0,
      1.0,
  )
  assert (config.image_size, config.total_steps) == (384, 10_000)
  assert load_config('finetune.py', 'b16,pets').total_steps == 500


@pytest.mark.slow
def test_unknown_config_field_is_refused_by_the_cli(tmp_path):
  result = run_main(
      '--config=configs/digits.py:runlocal',
      f'--workdir={tmp_path}',
      '--config.no_such_field=3',
  )
  helpers.assert_refused(result, 'config.no_such_field is not a field')


@pytest.mark.slow
def test_the_cli_sets_threefry_partitionable_itself(tmp_path):
  # Turned off in the environment, the program turns it on: the error is the
  # config's, not the library's refusal of the flag.
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'vit_jax.main',
          '--config=configs/digits.py:runlocal',
          f'--workdir={tmp_path}',
          '--config.batch=0',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env={**env, 'JAX_THREEFRY_PARTITIONABLE': '0'},
  )
  helpers.assert_refused(result, 'config.batch=0 must be positive')
  assert 'jax_threefry_partitionable' not in result.stderr


def test_the_library_refuses_threefry_partitionable_off(tmp_path):
  """Bit-identical runs across shardings depend on it; nothing is written."""
  config = load_config('digits.py', 'runlocal')
  config.tfds_data_dir = str(tmp_path / 'tfds')
  workdir = tmp_path / 'run'
  previous = jax.config.jax_threefry_partitionable
  jax.config.update('jax_threefry_partitionable', False)
  try:
    with pytest.raises(
        RuntimeError, match='jax_threefry_partitionable is ' 'off'
    ):
      train.train_and_evaluate(config, str(workdir))
  finally:
    jax.config.update('jax_threefry_partitionable', previous)
  assert not workdir.exists()


# ----------------------------------------------------------------------------
# The main job and fine-tuning through the CLI.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_main_job_writes_everything(digits_run):
  # `digits_run` (conftest): configs/digits.py:runlocal through the CLI.
  workdir, _, stderr = digits_run
  assert 'steps/s' in stderr  # Progress with ETA.
  assert 'eval/accuracy' in stderr
  lines = [
      json.loads(l) for l in open(os.path.join(workdir, train.METRICS_FILE))
  ]
  train_lines = [l for l in lines if 'train/loss' in l]
  assert [l['step'] for l in train_lines] == [2, 4]
  assert all({'train/loss', 'train/lr'} <= set(l) for l in train_lines)
  assert any('eval/accuracy' in l and 'eval/loss' in l for l in lines)
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  steps = sorted(
      int(s)
      for s in os.listdir(os.path.join(workdir, 'checkpoints'))
      if s.isdigit()
  )
  assert steps == [2, 4]
  params = checkpoint.load(
      os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE)
  )
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
      1,
      17,
      192,
  )
  assert json.load(open(os.path.join(workdir, 'class_names.json')))[
      'class_names'
  ] == [str(d) for d in range(10)]
  # Adam (two moments) and EMA: four float32 copies of the parameters, on
  # the one device.
  n = sum(v.size for v in checkpoint.flatten(params).values())
  size = re.search(
      r'train state: ([\d.]+) MiB per device of ([\d.]+) MiB', stderr
  )
  assert size, 'no train-state size line'
  assert float(size.group(1)) == float(size.group(2))
  assert abs(float(size.group(2)) - 16 * n / 2**20) <= 0.051


@pytest.mark.slow
def test_finetune_from_npz_at_higher_resolution_through_the_cli(
    digits_run, tmp_path
):
  workdir, tfds_dir, _ = digits_run
  pretrained = os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE)
  result = run_main(
      '--config=configs/finetune.py:ti16,digits,runlocal',
      f'--workdir={tmp_path}',
      f'--config.tfds_data_dir={tfds_dir}',
      f'--config.pretrained_path={pretrained}',
      '--config.image_size=32',
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert (
      'resizing position embeddings (1, 17, 192) -> (1, 65, 192)'
      in result.stderr
  )
  tuned = checkpoint.load(
      os.path.join(str(tmp_path), run_checkpoints.FINAL_PARAMS_FILE)
  )
  assert tuned['Transformer']['posembed_input']['pos_embedding'].shape == (
      1,
      65,
      192,
  )


@pytest.mark.slow
def test_finetune_resizes_a_non_square_patch_grid_by_its_real_shape(tmp_path):
  """4x1 patches: a 16 px image has a 4x16 grid (64 tokens, which read as a
  square would be 8x8) and 32 px an 8x32 one; the fine-tuning run resizes
  the position embeddings as that grid, as scipy's zoom does."""
  import scipy.ndimage  # pylint: disable=g-import-not-at-top

  from helpers import init_params  # pylint: disable=g-import-not-at-top
  from helpers import randomize  # pylint: disable=g-import-not-at-top

  patches = {'patches': {'size': (4, 1)}, 'transformer': {'num_layers': 1}}
  model = vit_jax.models.get_model('testing', num_classes=10, **patches)
  params = randomize(init_params(model, np.zeros((1, 16, 16, 3), np.float32)))
  pretrained = str(tmp_path / 'pretrained.npz')
  checkpoint.save(params, pretrained)
  config = load_config('digits.py', 'runlocal')
  config.tfds_data_dir = str(tmp_path / 'tfds')
  config.model_name = 'testing'
  config.model = patches
  config.image_size = 32
  config.pretrained_path = pretrained
  config.total_steps = 1
  config.warmup_steps = 0
  config.base_lr = 1e-12  # The one step leaves the embeddings as loaded.
  config.evals.fewshot.every = 0
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  tuned = checkpoint.load(
      os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE)
  )
  old = params['Transformer']['posembed_input']['pos_embedding']
  grid = np.asarray(old)[0, 1:].reshape(4, 16, -1)
  expected = scipy.ndimage.zoom(grid, (2, 2, 1), order=1).reshape(1, 256, -1)
  new = tuned['Transformer']['posembed_input']['pos_embedding']
  assert new.shape == (1, 257, old.shape[-1])
  np.testing.assert_allclose(new[:, :1], old[:, :1], atol=1e-6)
  np.testing.assert_allclose(new[:, 1:], expected, atol=1e-6)


@pytest.mark.slow
def test_resume_refuses_a_workdir_of_another_model(digits_run, tmp_path):
  workdir, tfds_dir, _ = digits_run
  result = run_main(
      '--config=configs/digits.py:runlocal',
      f'--workdir={workdir}',
      f'--config.tfds_data_dir={tfds_dir}',
      '--config.model_name=ViT-S_16',
  )
  helpers.assert_refused(
      result,
      'holds a run of another config',
      "model_name: run 'ViT-Ti_16', command 'ViT-S_16'",
  )


# ----------------------------------------------------------------------------
# Sharding: same numbers everywhere; communication and memory as designed.
# ----------------------------------------------------------------------------

DATA_PARALLEL = (('data', -1), ('fsdp', 1))
FSDP = (('data', 1), ('fsdp', -1))
TENSOR_PARALLEL = (('data', 2), ('model', 4))
TENSOR_PARALLEL_FSDP = (('data', 2), ('fsdp', 2), ('model', 2))


@pytest.fixture(scope='module')
def one_device_run():
  return train_worker.run_steps(DATA_PARALLEL, jax.devices()[:1])


def _assert_same_run(run, reference):
  losses, params = run[0], run[1]
  ref_losses, ref_params = reference[0], reference[1]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
  assert not np.allclose(losses[0], losses[-1])  # Training happened.
  flat, ref = checkpoint.flatten(params), checkpoint.flatten(ref_params)
  assert sorted(flat) == sorted(ref)
  diff = np.concatenate([(flat[k] - ref[k]).ravel() for k in sorted(ref)])
  whole = np.concatenate([ref[k].ravel() for k in sorted(ref)])
  assert np.linalg.norm(diff) / np.linalg.norm(whole) <= 1e-4
  # Per tensor, against the global scale. Attention key biases are left out:
  # softmax is invariant to them, so their gradient is exactly zero and Adam
  # turns its rounding noise into lr-sized steps in any implementation.
  scale = np.abs(whole).max()
  for key in ref:
    if not key.endswith('key/bias'):
      assert np.abs(flat[key] - ref[key]).max() <= 1e-4 * scale, key


@pytest.mark.slow
@pytest.mark.parametrize(
    'mesh',
    [DATA_PARALLEL, FSDP, TENSOR_PARALLEL, TENSOR_PARALLEL_FSDP],
    ids=['dp', 'fsdp', 'data2_model4', 'data2_fsdp2_model2'],
)
def test_same_steps_on_8_devices_as_on_1(one_device_run, mesh):
  _assert_same_run(train_worker.run_steps(mesh), one_device_run)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', ['data', 'fsdp', 'data_fsdp_model'])
def test_same_steps_on_2_processes_by_4_devices(one_device_run, tmp_path, mesh):
  out = str(tmp_path / 'run')
  result = subprocess.run(
      [
          sys.executable,
          os.path.join(REPO, 'launch', 'local.py'),
          '--num_processes=2',
          '--devices_per_process=4',
          '--',
          sys.executable,
          os.path.join(REPO, 'tests', 'train_worker.py'),
          f'--out={out}',
          f'--mesh={mesh}',
      ],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=REPO,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
  )
  assert result.returncode == 0, result.stdout[-4000:]
  info = json.load(open(out + '.json'))
  assert (info['devices'], info['processes']) == (8, 2)
  params = checkpoint.unflatten(dict(np.load(out + '.npz')))
  _assert_same_run((info['losses'], params), one_device_run)


def _model(config, num_classes):
  """`train.build_model` of a config, as `train_and_evaluate` calls it."""
  run = config_lib.parse(config)
  return train.build_model(
      run.model, objectives.get(run.objective), num_classes
  )


def _optimizer(config):
  return optim.make_optimizer(config_lib.parse(config).optim)


def _train_state(config, model, tx, mesh, rng):
  run = config_lib.parse(config)
  return train.create_train_state(
      run, objectives.get(run.objective), model, tx, mesh, rng
  )


def _train_step(config, model, tx, mesh, shardings):
  run = config_lib.parse(config)
  return train.make_train_step(
      run.loop, objectives.get(run.objective), model, tx, mesh, shardings
  )


def _initial_state(mesh_axes):
  """(config, mesh, model, tx, state, shardings, abstract) of the worker's
  config on `mesh_axes`."""
  config = train_worker.config_for(mesh_axes)
  mesh = sharding.make_mesh(mesh_axes)
  model = _model(config, num_classes=7)
  tx, _ = _optimizer(config)
  state, shardings, abstract = _train_state(
      config, model, tx, mesh, jax.random.key(0)
  )
  return config, mesh, model, tx, state, shardings, abstract


def _compiled_step(mesh_axes):
  config, mesh, model, tx, state, shardings, _ = _initial_state(mesh_axes)
  step_fn = _train_step(config, model, tx, mesh, shardings)
  batch = next(train_worker.global_batches())
  compiled = step_fn.lower(state, batch, jax.random.key(1)).compile()
  return compiled.as_text(), state


@pytest.mark.slow
def test_data_parallel_step_only_reduces_gradients():
  hlo, state = _compiled_step(DATA_PARALLEL)
  assert 'all-reduce' in hlo
  assert 'all-gather' not in hlo  # No parameter gathering.
  for leaf in jax.tree_util.tree_leaves(state.params):
    assert leaf.sharding.is_fully_replicated


@pytest.mark.slow
def test_fsdp_shards_parameters_and_optimizer_state():
  hlo, state = _compiled_step(FSDP)
  del hlo  # XLA picks the collectives; what FSDP promises is the memory.
  for tree in (state.params, state.opt_state):
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if x.ndim]
    total = sum(x.nbytes for x in leaves)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    assert per_device <= total / 8 * 1.15, (per_device, total)


# Device ids of the groups along one axis, by hand: the CPU mesh lays the
# devices out in id order (test_sharding checks it).
MODEL_GROUPS_OF_4 = [[0, 1, 2, 3], [4, 5, 6, 7]]
DATA_GROUPS_OF_2 = [[0, 4], [1, 5], [2, 6], [3, 7]]  # (data 2, model 4)
MODEL_GROUPS_OF_2 = [[0, 1], [2, 3], [4, 5], [6, 7]]
FSDP_GROUPS_OF_2 = [[0, 2], [1, 3], [4, 6], [5, 7]]  # (data 2, fsdp 2, model 2)
# The worker's model: 2 blocks; a block's activations on one device are
# [batch / batch shards, 16 patches + class token, hidden 16].
WORKER_LAYERS = 2
# Parameters Megatron splits over the model axis, and the dimension split
# (attention heads, MLP hidden units); every other parameter is whole.
MEGATRON_DIMS = {
    'query/kernel': 1,
    'key/kernel': 1,
    'value/kernel': 1,
    'query/bias': 0,
    'key/bias': 0,
    'value/bias': 0,
    'out/kernel': 0,
    'Dense_0/kernel': 1,
    'Dense_0/bias': 0,
    'Dense_1/kernel': 0,
}


def _megatron_dim(key):
  return next(
      (
          d
          for suffix, d in MEGATRON_DIMS.items()
          if key.endswith('/MultiHeadDotProductAttention_0/' + suffix)
          or key.endswith('/MlpBlock_0/' + suffix)
      ),
      None,
  )


def _is_scalars(type_text):
  return all(shape == () for shape in hlo.result_shapes(type_text))


def test_hlo_device_groups_are_read_in_each_print_format():
  # Hand-made lines in the three forms XLA prints, groups worked out by hand.
  line = (
      '%%x = f32[8]{0} all-reduce(f32[8]{0} %%p), channel_id=1, '
      'replica_groups=%s, use_global_device_ids=true'
  )
  assert hlo.replica_groups(line % '{{0,2},{1,3}}') == [[0, 2], [1, 3]]
  assert hlo.replica_groups(line % '[2,4]<=[8]') == MODEL_GROUPS_OF_4
  assert hlo.replica_groups(line % '[4,2]<=[2,4]T(1,0)') == DATA_GROUPS_OF_2
  assert (
      hlo.replica_groups(
          line % "mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}"
      )
      == DATA_GROUPS_OF_2
  )
  # Ids laid out as [2,4] transposed: 0 4 1 5 2 6 3 7 on a (4, 2) mesh.
  assert (
      hlo.replica_groups(
          line % "mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) "
          "{'axis_0'}"
      )
      == MODEL_GROUPS_OF_4
  )
  assert hlo.replica_groups('%y = f32[] add(%a, %b)') is None
  (found,) = hlo.collectives(line % '[2,4]<=[8]')
  assert found == ('all-reduce', 'f32[8]{0}', MODEL_GROUPS_OF_4)
  assert hlo.result_shapes('(f32[7,16]{1,0}, f32[], bf16[3]{0})') == [
      (7, 16),
      (),
      (3,),
  ]


@pytest.mark.slow
def test_tensor_parallel_step_reduces_each_block_twice_and_gathers_nothing():
  text, state = _compiled_step(TENSOR_PARALLEL)
  ops = hlo.collectives(text)
  # No weight (nor anything else) is ever gathered: Megatron's split keeps
  # every matmul local and sums partial outputs.
  assert {op for op, _, _ in ops} == {'all-reduce'}, ops
  block = (train_worker.GLOBAL_BATCH // 2, 17, 16)
  on_model = [t for _, t, g in ops if g == MODEL_GROUPS_OF_4]
  on_data = [t for _, t, g in ops if g == DATA_GROUPS_OF_2]
  # Attention output and MLP output of each block, forward and backward.
  assert [hlo.result_shapes(t) for t in on_model if not _is_scalars(t)] == [
      [block]
  ] * (4 * WORKER_LAYERS)
  # The gradients are summed over the data axis only, each device its own
  # part: as many numbers as the parameters it holds (and the loss).
  held = sum(
      x.addressable_shards[0].data.size
      for x in jax.tree_util.tree_leaves(state.params)
  )
  assert (
      sum(
          int(np.prod(shape))
          for t in on_data
          for shape in hlo.result_shapes(t)
          if shape
      )
      == held
  )
  assert all(g in (MODEL_GROUPS_OF_4, DATA_GROUPS_OF_2) for _, _, g in ops)


@pytest.mark.slow
def test_tensor_parallel_with_fsdp_gathers_over_fsdp_and_reduces_over_model():
  text, state = _compiled_step(TENSOR_PARALLEL_FSDP)
  ops = hlo.collectives(text)
  block = (train_worker.GLOBAL_BATCH // 4, 17, 16)
  on_model = [(op, t) for op, t, g in ops if g == MODEL_GROUPS_OF_2]
  assert [
      hlo.result_shapes(t)
      for op, t in on_model
      if op == 'all-reduce' and hlo.result_shapes(t) == [block]
  ] == [[block]] * (4 * WORKER_LAYERS)
  # FSDP gathers weights over 'fsdp'. Over 'model' XLA may gather a weight
  # that has no tensor-parallel axis, but never a Megatron-split one.
  assert any(op == 'all-gather' and g == FSDP_GROUPS_OF_2 for op, _, g in ops)
  whole = {
      tuple(v.shape)
      for k, v in checkpoint.flatten(state.params).items()
      if _megatron_dim(k) is None
  }
  for op, t in on_model:
    if op == 'all-gather':
      assert set(hlo.result_shapes(t)) <= whole, t


@pytest.mark.parametrize(
    'mesh_axes,batch_axes',
    [(TENSOR_PARALLEL, '{"data"}'), (TENSOR_PARALLEL_FSDP, '{"data", "fsdp"}')],
)
def test_train_step_constrains_block_boundaries_to_the_batch_axes(
    mesh_axes, batch_axes
):
  # XLA's propagation may find the split by itself on a small model; the
  # constraints make it the program's contract. Read before compilation.
  config, mesh, model, tx, state, shardings, _ = _initial_state(mesh_axes)
  step_fn = _train_step(config, model, tx, mesh, shardings)
  text = step_fn.lower(
      state, next(train_worker.global_batches()), jax.random.key(1)
  ).as_text()
  constraints = re.findall(
      r'sdy\.sharding_constraint %\S+ <@mesh, (.*)> : ' r'tensor<([\dx]+)xf32>',
      text,
  )
  # Each block's input and output, forward and backward.
  assert constraints == [(f'[{batch_axes}, {{}}, {{}}]', '16x17x16')] * (
      4 * WORKER_LAYERS
  )


@pytest.mark.parametrize('mesh_axes', [TENSOR_PARALLEL, TENSOR_PARALLEL_FSDP])
def test_tensor_parallel_splits_heads_and_mlp_over_the_model_axis(mesh_axes):
  *_, state, _, _ = _initial_state(mesh_axes)
  model_size = dict(mesh_axes)['model']
  expected = per_device = 0
  for key, x in checkpoint.flatten(state.params).items():
    dim = _megatron_dim(key)
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    if dim is not None:
      assert spec[dim] == 'model', (key, spec)
    assert 'model' not in [spec[d] for d in range(x.ndim) if d != dim], key
    split = model_size if dim is not None else 1
    if 'fsdp' in spec:
      split *= 2
    expected += x.nbytes // split
    per_device += x.addressable_shards[0].data.nbytes
  assert per_device == expected


@pytest.mark.parametrize('scan', [False, True])
def test_big_vit_state_per_device_is_about_total_over_model_axis(scan):
  # Shapes only: ViT-B_16's train state on a (data 2, model 4) mesh.
  model = vit_jax.models.get_model('ViT-B_16', num_classes=1000, scan=scan)
  config = train_worker.config_for(TENSOR_PARALLEL)
  config.model_name, config.model, config.image_size = 'ViT-B_16', {}, 224
  run = config_lib.parse(config)
  tx, _ = optim.make_optimizer(run.optim)

  def init(rng):
    params = model.init(rng, jnp.zeros((1, 224, 224, 3)), train=False)['params']
    return {'params': params, 'opt_state': tx.init(params)}

  abstract = jax.eval_shape(init, jax.random.key(0))
  mesh = sharding.make_mesh(TENSOR_PARALLEL)
  shardings = sharding.shardings_from_config(abstract, mesh, run.mesh)
  per_device, total = train.state_size_mib(abstract, shardings)
  # Embedding, head, norms and output biases (1.7% of the weights) are whole.
  assert total / 4 < per_device <= total / 4 * 1.06, (per_device, total)
  q = shardings['params']['Transformer'][
      'encoderblock' if scan else 'encoderblock_0'
  ]['MultiHeadDotProductAttention_0']['query']['kernel']
  assert q.spec == (
      P(None, None, 'model', None) if scan else P(None, 'model', None)
  )


def test_vit_g14_pod_config_fits_its_mesh():
  # The config's mesh on the 256 chips its docstring describes, from shapes
  # only (an abstract mesh: no devices needed).
  run = config_lib.parse(load_config('pretrain_vit_g14_pod.py'))
  names, sizes = sharding.mesh_shape(run.mesh.mesh, 256)
  assert dict(zip(names, sizes)) == {'data': 4, 'fsdp': 16, 'model': 4}
  mesh = jax.sharding.AbstractMesh(
      sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  objective = objectives.get(run.objective)
  model = train.build_model(run.model, objective, num_classes=1000)
  tx, _ = optim.make_optimizer(run.optim)

  def init(rng):
    params = objective.init(model, rng, jnp.zeros((1, 224, 224, 3)))
    return {'params': params, 'opt_state': tx.init(params)}

  abstract = jax.eval_shape(init, jax.random.key(0))
  n = sum(x.size for x in jax.tree_util.tree_leaves(abstract['params']))
  assert n == 1_844_440_680 + 1664 * 1664 + 1664  # + the representation.
  shardings = sharding.shardings_from_config(abstract, mesh, run.mesh)
  per_device, total = train.state_size_mib(abstract, shardings)
  # Adafactor: parameters in float32, momentum in bfloat16 (6 bytes a
  # parameter; Adam's float32 second moment would add 4) and the factored
  # second moment's rows and columns, under 0.5% more.
  assert n * 6 < total * 2**20 < n * 6 * 1.005, (total, n)
  # 64-way (fsdp x model) but for the few small tensors kept whole or split
  # one way (biases, the head, the factored statistics): under 5 MiB more.
  assert total / 64 <= per_device < total / 64 + 5, (per_device, total)
  print(
      f'ViT-G/14 on {dict(zip(names, sizes))}: train state '
      f'{per_device:.0f} MiB per device of {total:.0f} MiB'
  )


def test_heads_not_divisible_by_the_model_axis_are_refused_before_init():
  config = train_worker.config_for((('data', 1), ('model', 8)))
  mesh = sharding.make_mesh(config.mesh)
  model = _model(config, num_classes=7)
  tx, _ = _optimizer(config)
  with pytest.raises(
      ValueError,
      match=re.escape(
          "MultiHeadDotProductAttention_0/key/bias (4, 4): its 'heads' "
          'dimension (4) is not divisible by the mesh axis model (8)'
      ),
  ):
    _train_state(config, model, tx, mesh, jax.random.key(0))


@pytest.mark.parametrize(
    'rules, message',
    [
        (
            (('.*', 'fsdb'),),
            "the spec is not one of ('auto', 'fsdp', " "'replicate')",
        ),
        # An axis name is not a spec: (None, 'model') is.
        (
            (('.*', 'model'),),
            "config.sharding_rules[0]=('.*', 'model'): the spec "
            'is not one of',
        ),
        ((('.*', (None, 'tensor')),), 'nor a tuple of mesh axis names'),
        ((('[', 'auto'),), "'[' is not a regex"),
        ((('.*',),), 'is not a (regex, spec) pair'),
    ],
)
def test_bad_sharding_rules_are_refused_when_the_config_is_read(rules, message):
  config = train_worker.config_for(DATA_PARALLEL)
  config.sharding_rules = rules
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.parse(config)


@pytest.mark.parametrize('mesh_axes', [DATA_PARALLEL, FSDP])
def test_train_state_size_is_what_the_devices_hold(mesh_axes):
  *_, state, shardings, abstract = _initial_state(mesh_axes)
  per_device, total = train.state_size_mib(abstract, shardings)
  leaves = jax.tree_util.tree_leaves(state)
  assert total == sum(x.nbytes for x in leaves) / 2**20
  assert (
      per_device
      == sum(x.addressable_shards[0].data.nbytes for x in leaves) / 2**20
  )
  # Adam: parameters and two moments in float32, plus int32 step counters.
  n = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  counters = [x for x in leaves if x.dtype == jnp.int32]
  assert all(x.shape == () for x in counters)
  assert total * 2**20 == 3 * 4 * n + 4 * len(counters)
  if mesh_axes == FSDP:
    assert per_device < total / 4
  else:
    assert per_device == total


@pytest.mark.slow
def test_accum_steps_equals_one_batch_of_four_times_the_size():
  config = train_worker.config_for(DATA_PARALLEL)
  config.warmup_steps = 0  # A non-zero learning rate at the first step.
  config.model.transformer.dropout_rate = 0.0
  config.model.transformer.attention_dropout_rate = 0.0
  mesh = sharding.make_mesh(DATA_PARALLEL)
  model = _model(config, num_classes=7)
  tx, _ = _optimizer(config)
  state, shardings, _ = _train_state(config, model, tx, mesh, jax.random.key(0))
  big = {
      'image': np.random.default_rng(1)
      .uniform(-1, 1, (64, 16, 16, 3))
      .astype(np.float32),
      'labels': np.eye(7, dtype=np.float32)[np.arange(64) % 7],
  }
  results = []
  for accum in (1, 4):
    config.accum_steps = accum
    config.batch = 64
    step_fn = _train_step(config, model, tx, mesh, shardings)
    copy = jax.tree_util.tree_map(jnp.copy, state)  # The state is donated.
    results.append(step_fn(copy, big, jax.random.key(2)))
  (one, m_one), (four, m_four) = results
  np.testing.assert_allclose(m_four['loss'], m_one['loss'], rtol=1e-5)
  for a, b in zip(
      jax.tree_util.tree_leaves(four.params),
      jax.tree_util.tree_leaves(one.params),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert not np.allclose(four.params['head']['kernel'], 0)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_batch_not_divisible_by_devices_times_accum():
  config = train_worker.config_for(DATA_PARALLEL, accum_steps=4)
  mesh = sharding.make_mesh(DATA_PARALLEL)
  with pytest.raises(
      ValueError,
      match=r'config.batch=16 is not divisible by '
      r'devices x accum_steps = 8 x 4',
  ):
    train.check_batches(config_lib.parse(config), mesh)
  config.accum_steps = 3
  with pytest.raises(ValueError, match='accum_steps=3 does not divide'):
    train.check_batches(config_lib.parse(config), mesh)


@pytest.mark.slow
def test_tpu_launch_scripts_issue_the_expected_commands():
  env = dict(
      os.environ,
      DRY_RUN='1',
      PROJECT='my-project',
      TPU_NAME='pod',
      ACCELERATOR='v4-32',
  )
  launch = os.path.join(REPO, 'launch')
  for script in glob.glob(os.path.join(launch, '*.sh')):
    subprocess.run(['bash', '-n', script], check=True)

  def dry(script, *args):
    return subprocess.run(
        ['bash', os.path.join(launch, script), *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout

  assert 'tpu-vm create pod' in dry('tpu_create.sh')
  assert '--accelerator-type=v4-32' in dry('tpu_create.sh')
  run = dry(
      'tpu_run.sh',
      '--config=configs/finetune.py:b16,cifar10',
      '--workdir=gs://bucket/run',
      '--config.batch=512',
  )
  assert 'tpu-vm ssh pod' in run and '--worker=all' in run
  assert 'vit_jax.main' in run and 'distributed' in run
  assert 'gs://bucket/run' in run
  # Worker 0 first: is a run going, then does the config fit the slice.
  check, aot, start = [
      shlex.split(l)[-1] for l in run.splitlines() if l.startswith('gcloud ')
  ]
  assert check.endswith("pgrep -af 'vit_jax[.]main' || true")
  assert '--worker=0' in run.splitlines()[0]
  assert aot.endswith(
      'python3 -m vit_jax.aot --topology=v4:2x2x4 '
      r'--config=configs/finetune.py:b16\,cifar10 '
      '--config.batch=512 '
  )
  assert 'vit_jax.main' in start and 'vit_jax.aot' not in start
  setup = dry('tpu_setup.sh')
  assert '--worker=all' in setup
  assert ' archive ' in setup and ' HEAD' not in setup  # The working tree.
  assert (
      "pip install -q -c constraints.txt -e '.[tpu]'"
      in shlex.split(setup.splitlines()[-1])[-1]
  )
  stop = shlex.split(dry('tpu_stop.sh').splitlines()[0])
  assert '--worker=all' in stop
  assert stop[-1].startswith("--command=pkill -TERM -f 'vit_jax[.]main'")
  assert 'tpu-vm delete pod' in dry('tpu_delete.sh')


_RECORD_DISTRIBUTED_INIT = """
import json, sys
import jax
def record(**kwargs):  # Stands for jax.distributed.initialize: no cluster.
  print('INIT ' + json.dumps(kwargs))
  raise SystemExit(0)
jax.distributed.initialize = record
from vit_jax import cli
from vit_jax import main
sys.argv = ['vit_jax.main', '--config=configs/digits.py',
            '--workdir=unused', *sys.argv[1:]]
cli.run(main.main, config_flag='config')
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    'flags, expected',
    [
        (['--distributed', '--local_device_ids=0,1,2,3'], [0, 1, 2, 3]),
        (['--distributed'], None),
    ],
)
def test_local_device_ids_reach_jax_distributed(flags, expected):
  # In a subprocess: main's absl flags are defined once per process.
  result = subprocess.run(
      [sys.executable, '-c', _RECORD_DISTRIBUTED_INIT, *flags],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  (line,) = [l for l in result.stdout.splitlines() if l.startswith('INIT ')]
  assert json.loads(line[5:])['local_device_ids'] == expected


@pytest.mark.slow
def test_slurm_launch_issues_the_expected_commands():
  launch = os.path.join(REPO, 'launch')
  for script in ('slurm.sbatch', 'slurm_submit.sh'):
    subprocess.run(['bash', '-n', os.path.join(launch, script)], check=True)
  args = [
      '--config=configs/pretrain_imagenet21k.py:b16',
      '--workdir=/shared/runs/b 16',
  ]  # A space survives the quoting.

  def dry(script, **env):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(('SLURM_', 'XLA_FLAGS', 'PER'))
    } | env
    return subprocess.run(
        ['bash', os.path.join(launch, script), *args],
        env={**env, 'DRY_RUN': '1'},
        capture_output=True,
        text=True,
        check=True,
    ).stdout

  submit = dry(
      'slurm_submit.sh',
      NODES='4',
      GPUS_PER_NODE='8',
      PARTITION='gpu',
      TIME='24:00:00',
  )
  assert submit.startswith('sbatch ')
  for option in (
      '--nodes=4',
      '--ntasks-per-node=8',
      '--gpus-per-node=8',
      '--partition=gpu',
      '--time=24:00:00',
      'slurm.sbatch',
  ):
    assert option in submit, option
  assert '--ntasks-per-node=1' in dry('slurm_submit.sh', PER='node')
  # Inside the allocation: the same vit_jax.main command in every task.
  per_gpu = dry('slurm.sbatch')
  env_line, command = per_gpu.splitlines()
  assert shlex.split(command) == [
      'srun',
      '--kill-on-bad-exit=1',
      'python',
      '-m',
      'vit_jax.main',
      '--distributed',
      *args,
  ]
  assert env_line == 'XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true'
  per_node = dry('slurm.sbatch', PER='node', SLURM_GPUS_ON_NODE='4')
  assert '--local_device_ids=0,1,2,3' in shlex.split(per_node.splitlines()[1])
  assert 'XLA_FLAGS=--mine' in dry('slurm.sbatch', XLA_FLAGS='--mine')


@pytest.mark.slow
def test_non_finite_loss_stops_and_names_the_step(tmp_path):
  config = load_config('digits.py', 'runlocal')
  config.tfds_data_dir = str(tmp_path / 'tfds')
  config.optimizer = 'sgd'
  config.base_lr = 1e30
  config.grad_clip_norm = 0.0
  config.total_steps = 6
  config.log_every = 1
  config.checkpoint_every = 1
  config.async_checkpoints = False
  workdir = str(tmp_path / 'run')
  with pytest.raises(
      train.NonFiniteLossError,
      match=r'at step (\d+)\. Stopped; the last good checkpoint '
      r'is step \d+',
  ) as e:
    train.train_and_evaluate(config, workdir)
  bad_step = int(e.value.args[0].split('at step ')[1].split('.')[0])
  saved = sorted(
      int(s)
      for s in os.listdir(os.path.join(workdir, 'checkpoints'))
      if s.isdigit()
  )
  assert saved and max(saved) == bad_step - 1
  assert not os.path.exists(
      os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE)
  )
  logged = [
      json.loads(l)['step']
      for l in open(os.path.join(workdir, train.METRICS_FILE))
  ]
  assert logged and max(logged) == bad_step - 1


@pytest.mark.slow
@pytest.mark.parametrize('where', ['evaluator', 'step'])
def test_an_error_mid_run_still_closes_the_writers_and_the_checkpointer(
    tmp_path, monkeypatch, where
):
  """Whatever raises in the middle of a run, nothing is left open."""
  closed = []
  close_checkpointer = run_checkpoints.Checkpointer.close

  def spy_close(self):
    closed.append(self.directory)
    close_checkpointer(self)

  monkeypatch.setattr(run_checkpoints.Checkpointer, 'close', spy_close)
  jsonl_writers = []

  class SpyJsonlWriter(writers.JsonlWriter):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      jsonl_writers.append(self)

  monkeypatch.setattr(writers, 'JsonlWriter', SpyJsonlWriter)
  create_default_writer = metric_writers.create_default_writer
  closed_default_writers = 0

  def spy_default_writer(*args, **kwargs):
    writer = create_default_writer(*args, **kwargs)
    close_writer = writer.close

    def close():
      nonlocal closed_default_writers
      closed_default_writers += 1
      close_writer()

    writer.close = close
    return writer

  monkeypatch.setattr(
      metric_writers, 'create_default_writer', spy_default_writer
  )

  class ExtraWriter(writers.ScalarWriter):
    closed = False

    def write_scalars(self, step, scalars):
      pass

    def close(self):
      self.closed = True

  if where == 'evaluator':  # The evaluation of step 2 (not the last) fails.

    def broken_evaluate(*args, **kwargs):
      del args, kwargs
      raise RuntimeError('evaluator broke')

    monkeypatch.setattr(classification, 'evaluate', broken_evaluate)
  else:  # The third step fails, while step 2's checkpoint may be saving.
    make_train_step = train.make_train_step

    def failing_make_train_step(*args, **kwargs):
      step_fn, calls = make_train_step(*args, **kwargs), []

      def step(*step_args):
        calls.append(1)
        if len(calls) == 3:
          raise RuntimeError('step broke')
        return step_fn(*step_args)

      return step

    monkeypatch.setattr(train, 'make_train_step', failing_make_train_step)

  config = load_config('digits.py', 'runlocal')
  config.tfds_data_dir = str(tmp_path / 'tfds')
  config.log_every = 1
  config.eval_every = 2
  config.checkpoint_every = 2
  config.async_checkpoints = True
  workdir = str(tmp_path / 'run')
  extra = ExtraWriter()
  with pytest.raises(RuntimeError, match=f'{where} broke'):
    train.train_and_evaluate(config, workdir, extra_writers=[extra])
  assert closed == [os.path.join(workdir, run_checkpoints.CHECKPOINT_DIR)]
  assert os.path.isdir(
      os.path.join(workdir, run_checkpoints.CHECKPOINT_DIR, '2')
  )
  assert extra.closed
  assert len(jsonl_writers) == 1
  assert jsonl_writers[0]._file.closed  # pylint: disable=protected-access
  assert closed_default_writers == 1  # Console and TensorBoard summaries.


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top

  config = load_config('digits.py', 'runlocal')
  config.tfds_data_dir = str(tmp_path / 'tfds')
  config.total_steps = 6
  config.log_every = 1
  config.eval_every = 6
  config.checkpoint_every = 2
  config.model.transformer.dropout_rate = 0.1  # Dropout keys must resume too.
  config.pp.inception_crop = True  # So must the augmentation.
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, straight)
  train.train_and_evaluate(config, resumed)
  # As if killed after the checkpoint of step 4 was written.
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  os.remove(os.path.join(resumed, run_checkpoints.FINAL_PARAMS_FILE))
  train.train_and_evaluate(config, resumed)

  def train_lines(workdir):
    lines = [
        json.loads(l) for l in open(os.path.join(workdir, train.METRICS_FILE))
    ]
    return [(l['step'], l['train/loss']) for l in lines if 'train/loss' in l]

  assert train_lines(resumed) == train_lines(straight)
  assert [s for s, _ in train_lines(resumed)] == [1, 2, 3, 4, 5, 6]
  a = checkpoint.flatten(
      checkpoint.load(os.path.join(straight, run_checkpoints.FINAL_PARAMS_FILE))
  )
  b = checkpoint.flatten(
      checkpoint.load(os.path.join(resumed, run_checkpoints.FINAL_PARAMS_FILE))
  )
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_model_args_build_the_config_s_model_and_train_adds_the_mpp_head():
  config = config_lib.get_base()
  config.model_name = 'testing'
  config.model = {'transformer': {'num_layers': 2}}
  config.compute_dtype = 'bfloat16'
  config.remat = config.scan = True
  model = vit_jax.models.get_model(
      num_classes=4, **config_lib.parse(config).model.model_args()
  )
  assert type(model) is vit_jax.models.VisionTransformer  # pylint: disable=unidiomatic-typecheck
  assert (
      model.model_name,
      model.num_classes,
      model.dtype,
      model.remat,
      model.scan,
  ) == ('testing', 4, jnp.bfloat16, True, True)
  assert model.transformer['num_layers'] == 2
  fields = (
      'model_name',
      'num_classes',
      'dtype',
      'remat',
      'scan',
      'transformer',
      'patches',
  )
  trained = _model(config, 4)
  assert [getattr(trained, f) for f in fields] == [
      getattr(model, f) for f in fields
  ]
  config.objective = 'mpp'  # No classifier; a head of 2^(3*3) colours.
  pretrained = _model(config, 4)
  assert (pretrained.vit.num_classes, pretrained.num_outputs) == (None, 512)
  assert [getattr(pretrained.vit, f) for f in fields[2:]] == [
      getattr(model, f) for f in fields[2:]
  ]


def test_a_mixer_config_builds_and_refuses_remat():
  """remat / scan reach the model only when on: the Mixer has neither."""
  config = load_config('finetune.py', 'mixer_b16,digits,runlocal')
  model = _model(config, 10)
  assert isinstance(model, vit_jax.models.MlpMixer)
  logits = model.apply(
      jax.jit(
          lambda: model.init(
              jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False
          )
      )(),
      jnp.zeros((2, 16, 16, 3)),
      train=False,
  )
  assert logits.shape == (2, 10)
  config.remat = True
  with pytest.raises(
      ValueError,
      match=r'config.remat=True: Mixer-B_16 '
      r'\(MlpMixer\) has no remat option',
  ):
    config_lib.parse(config)


@pytest.mark.slow
def test_bfloat16_and_scan_remat_train_steps():
  mesh = sharding.make_mesh(DATA_PARALLEL)
  batch = next(train_worker.global_batches())
  params = None
  results = {}
  for name, extra in (
      ('loop', {}),
      ('scan_remat', {'scan': True, 'remat': True}),
      ('bf16', {'compute_dtype': 'bfloat16'}),
  ):
    config = train_worker.config_for(DATA_PARALLEL)
    config.warmup_steps = 0
    # Scanned blocks draw their dropout keys differently from the unrolled
    # loop, so compare the computations without dropout.
    config.model.transformer.dropout_rate = 0.0
    config.model.transformer.attention_dropout_rate = 0.0
    config.update(extra)
    model = _model(config, num_classes=7)
    tx, _ = _optimizer(config)
    state, shardings, _ = _train_state(
        config, model, tx, mesh, jax.random.key(0)
    )
    if params is None:  # A random head: logits depend on every layer.
      params = jax.device_get(state.params)
      params['head']['kernel'] = (
          np.random.default_rng(0)
          .normal(size=params['head']['kernel'].shape)
          .astype(np.float32)
      )
    start = checkpoint.stack_encoder_blocks(params) if config.scan else params
    state = train.state_from_params(start, tx, shardings, use_ema=False)
    step_fn = _train_step(config, model, tx, mesh, shardings)
    state, metrics = step_fn(state, batch, jax.random.key(1))
    assert all(
        x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params)
    )
    results[name] = (
        float(metrics['loss']),
        checkpoint.flatten(
            checkpoint.unstack_encoder_blocks(jax.device_get(state.params))
        ),
    )
  loop_loss, loop_params = results['loop']
  assert np.isfinite(loop_loss) and abs(loop_loss - np.log(7)) > 0.05
  scan_loss, scan_params = results['scan_remat']
  np.testing.assert_allclose(scan_loss, loop_loss, rtol=1e-5)
  for key, value in loop_params.items():
    np.testing.assert_allclose(
        scan_params[key], value, atol=1e-5, rtol=1e-4, err_msg=key
    )
  np.testing.assert_allclose(results['bf16'][0], loop_loss, rtol=0.05)


def test_weight_decay_applies_to_kernels_only_in_any_layout():
  config = train_worker.config_for(DATA_PARALLEL)
  tx, _ = _optimizer(config)
  for scan in (False, True):
    config.scan = scan
    model = _model(config, num_classes=7)
    params = jax.eval_shape(
        lambda m=model: m.init(
            jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False
        )
    )['params']
    masks = checkpoint.flatten(optim._decay_mask(params))  # pylint: disable=protected-access
    assert masks[
        'Transformer/encoderblock'
        + ('' if scan else '_0')
        + '/MlpBlock_0/Dense_0/kernel'
    ]
    assert not masks[
        'Transformer/encoderblock'
        + ('' if scan else '_0')
        + '/LayerNorm_0/scale'
    ]
    assert not masks[
        'Transformer/encoderblock'
        + ('' if scan else '_0')
        + '/MultiHeadDotProductAttention_0/query/bias'
    ]
    assert masks['embedding/kernel'] and masks['head/kernel']
    assert not masks['Transformer/posembed_input/pos_embedding']
  del tx


@pytest.mark.parametrize('remote', [False, True])
def test_metrics_jsonl_writer_local_and_remote(tmp_path, remote):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  path = (
      f'ram://{tmp_path}/metrics.jsonl'
      if remote
      else str(tmp_path / 'metrics.jsonl')
  )
  writer = writers.JsonlWriter(path)
  for step in (1, 2, 3):
    writer.write_scalars(step, {'train/loss': np.float32(1.0 / step)})
  writer.close()
  read = lambda: [
      json.loads(l) for l in tf.io.gfile.GFile(path).read().splitlines()
  ]
  assert [r['step'] for r in read()] == [1, 2, 3]
  assert read()[1] == {'step': 2, 'train/loss': 0.5}
  resumed = writers.JsonlWriter(path, resume_step=2)  # Drops step 3.
  resumed.write_scalars(3, {'train/loss': 0.25})
  resumed.close()
  assert [(r['step'], r['train/loss']) for r in read()] == [
      (1, 1.0),
      (2, 0.5),
      (3, 0.25),
  ]


def test_progress_bar_follows_written_steps():
  bar = writers.ProgressBar(total_steps=100)
  bar.write_scalars(30, {'train/loss': np.float32(0.5)})  # Resumed at 30.
  assert bar._bar.n == 30
  bar.write_scalars(50, {'eval/accuracy': 0.75, 'steps_per_sec': 3.0})
  assert bar._bar.n == 50
  assert bar._bar.postfix == 'loss=0.5, eval/accuracy=0.75'
  bar.write_scalars(50, {'train/loss': 0.25})  # Never moves backwards.
  assert bar._bar.n == 50 and 'loss=0.25' in bar._bar.postfix
  bar.close()


def test_progress_log_speed_eta_and_first_step(caplog):
  now = [100.0]
  progress = writers.ProgressLog(
      10, 1010, 64, every_secs=30, clock=lambda: now[0]
  )
  caplog.set_level('INFO', logger='absl')
  now[0] += 12.5  # Step 11 compiled and ran.
  progress.first_step(11, 12.5)
  assert (
      'Step 11 took 12.5 s (compiling the train step included)' in caplog.text
  )
  now[0] += 10
  assert progress.update(61) is None  # Not due yet.
  now[0] += 30  # 100 steps of 64 images in 40 s since step 11.
  line = progress.update(111)
  # 0.4 s/step, 160 images/s, 899 steps left: 359.6 s.
  assert line == (
      'step 111/1010 (11%): 160.0 images/s, 0.400 s/step, ' 'ETA 6m00s'
  ), line
  assert line in caplog.text
  now[0] += 1
  assert progress.update(1010) is not None  # The last step always logs.


@pytest.mark.parametrize(
    'seconds,text',
    [(0.4, '0s'), (42, '42s'), (60, '1m00s'), (187, '3m07s'), (7500, '2h05m')],
)
def test_durations_read_as_a_person_would(seconds, text):
  assert writers.format_duration(seconds) == text


@pytest.mark.parametrize(
    'arg,randaugment,mixup,regularisation,decay',
    [
        # (The AugReg paper's levels; big_vision's default level per model.)
        ('b16,i21k', (2, 10), 0.2, 0.0, 0.1),  # light2
        ('ti16,i21k', (), 0.0, 0.0, 0.03),  # none
        ('l16,i21k,strong1', (2, 20), 0.5, 0.0, 0.1),
        ('s16,i1k', (2, 15), 0.5, 0.1, 0.1),  # medium2
        ('ti16,i1k', (2, 0), 0.0, 0.1, 0.1),  # light1
    ],
)
def test_augreg_recipe_values(arg, randaugment, mixup, regularisation, decay):
  config = load_config('augreg.py', arg)
  run = config_lib.parse(config)
  assert tuple(run.data.pp['randaugment']) == randaugment
  assert run.objective.mixup_alpha == mixup
  assert run.model.model['stochastic_depth'] == regularisation
  assert run.model.model['transformer']['dropout_rate'] == regularisation
  assert run.optim.weight_decay == decay
  assert (run.optim.optimizer, run.optim.base_lr, run.data.batch) == (
      'adam',
      1e-3,
      4096,
  )
  assert run.optim.decay_type == 'cosine' and run.optim.warmup_steps == 10_000
  assert run.objective.loss == 'sigmoid_xent'
  images = 14_197_122 if 'i21k' in arg else 1_281_167
  assert run.optim.total_steps == 300 * images // 4096
  with pytest.raises(ValueError, match='unknown augmentation level'):
    load_config('augreg.py', 'b16,i21k,medium9')
