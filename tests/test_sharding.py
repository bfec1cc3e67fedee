"""Tests of vit_jax.sharding: mesh, batch axes, stacked-layer detection."""

import inspect
import logging
import re

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import train_worker
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import objectives
from vit_jax import optim
from vit_jax import sharding
from vit_jax import train
import vit_jax.models
from vit_jax.models import rope

# 8 devices: 4 distinct batch slices (data x fsdp), each held by 2 'model'
# devices.
WITH_MODEL_AXIS = (('data', 2), ('fsdp', 2), ('model', 2))


# ----------------------------------------------------------------------------
# Batches are split over the data-like axes only.
# ----------------------------------------------------------------------------


def test_todays_meshes_split_the_batch_over_every_device():
  for axes in (
      (('data', -1), ('fsdp', 1)),
      (('data', 1), ('fsdp', -1)),
      (('data', 2), ('fsdp', 4)),
  ):
    mesh = sharding.make_mesh(axes)
    assert sharding.batch_axes(mesh) == ('data', 'fsdp') == mesh.axis_names
    assert sharding.batch_sharding(mesh).spec == P(('data', 'fsdp'))
    assert sharding.micro_batch_sharding(mesh).spec == P(None, ('data', 'fsdp'))
    assert sharding.batch_shards(mesh) == 8


def test_batch_is_split_over_data_and_fsdp_and_copied_over_model():
  mesh = sharding.make_mesh(WITH_MODEL_AXIS)
  assert sharding.batch_axes(mesh) == ('data', 'fsdp')
  assert sharding.batch_shards(mesh) == 4
  batch_sharding = sharding.batch_sharding(mesh)
  assert batch_sharding.spec == P(('data', 'fsdp'))
  assert sharding.micro_batch_sharding(mesh).spec == P(None, ('data', 'fsdp'))

  # 12 examples: divisible by the 4 batch slices, not by the 8 devices.
  assert sharding.check_batch_size(12, mesh) == 12
  images = np.arange(12 * 2, dtype=np.float32).reshape(12, 2)
  batch = sharding.make_global_batch({'image': images}, batch_sharding)
  rows = {}
  for shard in batch['image'].addressable_shards:
    assert shard.data.shape == (3, 2)
    np.testing.assert_array_equal(shard.data, images[shard.index])
    coords = np.argwhere(mesh.devices == shard.device)[0]
    rows.setdefault(tuple(coords[:2]), []).append(shard.index[0].start)
  # Each (data, fsdp) position holds its own 3 examples on both 'model'
  # devices; the 4 positions together hold the batch once.
  assert len(rows) == 4
  assert all(
      len(set(starts)) == 1 and len(starts) == 2 for starts in rows.values()
  )
  assert sorted(starts[0] for starts in rows.values()) == [0, 3, 6, 9]


def test_batch_sizes_are_checked_against_the_data_like_axes():
  mesh = sharding.make_mesh(WITH_MODEL_AXIS)
  for batch in (4, 8, 12, 20):
    assert sharding.check_batch_size(batch, mesh) == batch
  with pytest.raises(
      ValueError,
      match=re.escape(
          'config.batch_eval=10 is not divisible by the 4 batch shards of the '
          'mesh (data x fsdp = 2 x 2; the other axes hold copies); use a '
          'multiple of 4 (e.g. 8)'
      ),
  ):
    sharding.check_batch_size(10, mesh, what='config.batch_eval')
  # Where the data-like axes are every device, today's message.
  with pytest.raises(
      ValueError,
      match=re.escape(
          'config.batch=12 is not divisible by the 8 devices of the mesh; '
          'use a '
          'multiple of 8 (e.g. 16)'
      ),
  ):
    sharding.check_batch_size(12, sharding.make_mesh())


def test_train_step_uses_the_micro_batch_sharding(monkeypatch):
  calls = []
  real = sharding.micro_batch_sharding

  def spy(mesh):
    calls.append(mesh)
    return real(mesh)

  monkeypatch.setattr(sharding, 'micro_batch_sharding', spy)
  run = config_lib.parse(
      train_worker.config_for(WITH_MODEL_AXIS, accum_steps=2)
  )
  mesh = sharding.make_mesh(WITH_MODEL_AXIS)
  objective = objectives.get(run.objective)
  model = train.build_model(run.model, objective, num_classes=7)
  tx, _ = optim.make_optimizer(run.optim)
  train.make_train_step(run.loop, objective, model, tx, mesh, None)
  assert calls == [mesh]


@pytest.mark.slow
def test_same_steps_with_a_model_axis_as_on_one_device():
  # Tensor parallel over 'model', FSDP over 'fsdp', with accumulation: same
  # numbers as one device, with micro-batches split over data x fsdp only.
  reference = train_worker.run_steps(
      (('data', -1), ('fsdp', 1)), jax.devices()[:1], accum_steps=2
  )
  losses, params, _ = train_worker.run_steps(WITH_MODEL_AXIS, accum_steps=2)
  np.testing.assert_allclose(losses, reference[0], rtol=1e-4)
  assert not np.allclose(losses[0], losses[-1])  # Training happened.
  flat, ref = checkpoint.flatten(params), checkpoint.flatten(reference[1])
  assert sorted(flat) == sorted(ref)
  # Against the global scale, as in test_train: attention key biases have an
  # exactly zero gradient, so Adam turns rounding noise into lr-sized steps.
  scale = max(np.abs(v).max() for v in ref.values())
  for key in ref:
    if not key.endswith('key/bias'):
      assert np.abs(flat[key] - ref[key]).max() <= 1e-4 * scale, key


# ----------------------------------------------------------------------------
# Mesh construction.
# ----------------------------------------------------------------------------


def test_mesh_is_jax_make_mesh_with_auto_axes():
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 4)))
  expected = jax.make_mesh(
      (2, 4), ('data', 'fsdp'), (AxisType.Auto, AxisType.Auto)
  )
  assert mesh == expected
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]


def test_unknown_axis_names_are_refused():
  with pytest.raises(ValueError, match=r"unknown axis name\(s\) \['batch'\]"):
    sharding.make_mesh((('batch', -1), ('fsdp', 1)))


def test_topology_that_cannot_be_mapped_falls_back_to_device_order(
    monkeypatch, caplog
):
  def unmappable(*args, **kwargs):
    raise NotImplementedError('Failed to find assignment for logical axis')

  monkeypatch.setattr(jax, 'make_mesh', unmappable)
  # Nor with a physical axis split (tests/test_tpu_compile.py: when it can).
  monkeypatch.setattr(sharding.mesh_utils, 'create_device_mesh', unmappable)
  with caplog.at_level(logging.WARNING):
    mesh = sharding.make_mesh((('data', 4), ('fsdp', 2)))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  assert list(mesh.devices.flat) == jax.devices()
  assert 'plain device order: Failed to find assignment' in caplog.text


def test_other_mesh_errors_are_not_swallowed(monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError('not a topology problem')

  monkeypatch.setattr(jax, 'make_mesh', broken)
  with pytest.raises(RuntimeError, match='not a topology problem'):
    sharding.make_mesh()


class _SliceDevice:
  """Stands for a device of a multi-slice job (only what mesh_utils reads)."""

  platform = device_kind = 'cpu'

  def __init__(self, id_, slice_index):
    self.id, self.slice_index = id_, slice_index

  def __repr__(self):
    return f'D{self.id}@{self.slice_index}'


def test_multi_slice_mesh_puts_the_slices_on_a_data_like_axis():
  # Interleaved on purpose: the hybrid mesh groups each slice's devices.
  devices = [_SliceDevice(i, i % 2) for i in range(8)]
  names, sizes = ('data', 'fsdp', 'model'), (2, 2, 2)
  array = sharding._device_array(names, sizes, devices)
  assert array.shape == sizes
  assert {d.slice_index for d in array[0].flat} == {0}
  assert {d.slice_index for d in array[1].flat} == {1}
  # 'data' of size 1: the slices go along 'fsdp'.
  array = sharding._device_array(('data', 'fsdp'), (1, 8), devices)
  assert [d.slice_index for d in array.flat] == [0] * 4 + [1] * 4
  # No data-like axis divides: plain order, as before.
  array = sharding._device_array(('data', 'fsdp', 'model'), (1, 1, 8), devices)
  assert list(array.flat) == devices


# ----------------------------------------------------------------------------
# FSDP never shards the layer axis of stacked (scanned) blocks.
# ----------------------------------------------------------------------------


def _abstract_state(model):
  image_size = (
      2 * model.total_stride[0] if hasattr(model, 'total_stride') else 32
  )

  def init(rng):
    params = model.init(
        rng, jnp.zeros((1, image_size, image_size, 3)), train=False
    )['params']
    return {
        'params': params,
        'opt_state': optax.adam(1e-3).init(params),
        'ema_params': params,
    }

  return jax.eval_shape(init, jax.random.key(0))


def _shallow(name, scan=False):
  config = vit_jax.models.get_config(name)
  overrides = {'scan': True} if scan else {}
  if 'transformer' in config:
    overrides['transformer'] = {'num_layers': 3}
  if 'num_blocks' in config:
    overrides['num_blocks'] = 2
  return vit_jax.models.get_model(name, num_classes=10, **overrides)


@pytest.mark.parametrize('name', vit_jax.models.MODEL_NAMES)
def test_stacks_are_exactly_the_scanned_blocks(name):
  unscanned = _abstract_state(_shallow(name))
  assert not sharding.stacked_paths(unscanned)
  if 'transformer' not in vit_jax.models.get_config(name):
    return
  state = _abstract_state(_shallow(name, scan=True))
  paths = {
      sharding.path_str(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]
  }
  # The parameters of one block, from the unscanned layout (16 for the 2020
  # ViT's block; the block options add or remove some).
  per_block = len(
      checkpoint.flatten(unscanned['params']['Transformer']['encoderblock_0'])
  )
  # The scan layout vit.py documents: one `Transformer/encoderblock` whose
  # parameters carry the layer axis.
  scanned = {p for p in paths if '/Transformer/encoderblock/' in p}
  # params, Adam's mu and nu, EMA params.
  assert len(scanned) == 4 * per_block
  if name == 'ViT-B_16':
    assert per_block == 16
  assert sharding.stacked_paths(state) == scanned


def test_fsdp_never_shards_the_layer_axis():
  # 8 layers and widths not divisible by 8: the layer axis is the only
  # dimension FSDP over 8 devices could split.
  model = vit_jax.models.get_model(
      'testing',
      num_classes=10,
      scan=True,
      hidden_size=12,
      transformer={'num_layers': 8, 'mlp_dim': 20, 'num_heads': 3},
  )
  state = _abstract_state(model)
  mesh = sharding.make_mesh((('data', 1), ('fsdp', -1)))
  shardings = sharding.tree_shardings(state, mesh, fsdp_min_size=1)
  stacked = sharding.stacked_paths(state)
  assert len(stacked) == 4 * 16
  would_split = 0
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    path = sharding.path_str(path)
    if path in stacked:
      # What a rule blind to the layer axis would do.
      blind = sharding.partition_spec(path, x.shape, mesh, fsdp_min_size=1)
      would_split += blind[:1] == ('fsdp',)
  assert would_split > 0  # The test can fail.
  flat = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
  )[0]
  for path, s in flat:
    if sharding.path_str(path) in stacked:
      assert s.spec[:1] != ('fsdp',), sharding.path_str(path)


def test_rules_know_no_model_parameter_names():
  source = inspect.getsource(sharding)
  modules = set()
  for name in ('ViT-B_16', 'R50+ViT-B_16', 'Mixer-B_16'):
    for scan in ((False, True) if 'Mixer' not in name else (False,)):
      state = _abstract_state(_shallow(name, scan))
      for path, _ in jax.tree_util.tree_flatten_with_path(state['params'])[0]:
        # Module names; leaf names (kernel, bias, scale) are flax's own.
        modules.update(sharding.path_str(path[:-1]).split('/'))
  modules = {m for m in modules if len(m) > 5}
  assert 'encoderblock' in modules and 'Transformer' in modules
  found = sorted(m for m in modules if re.search(rf'\b{m}\b', source))
  assert not found, found


# ----------------------------------------------------------------------------
# The 'auto' rule: tensor parallelism from the model's logical axes, then FSDP.
# ----------------------------------------------------------------------------


def _specs(state, mesh, spec):
  shardings = sharding.tree_shardings(
      state, mesh, (('.*', spec),), 1, vit_jax.models.PARAM_AXES
  )
  return {
      sharding.path_str(p): s.spec
      for p, s in jax.tree_util.tree_flatten_with_path(
          shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
      )[0]
  }


@pytest.mark.parametrize(
    'name,scan',
    [
        ('ViT-B_16', False),
        ('ViT-B_16', True),
        ('R50+ViT-B_16', False),
        ('Mixer-B_16', False),
    ],
)
def test_auto_is_fsdp_on_meshes_without_a_model_axis(name, scan):
  state = _abstract_state(_shallow(name, scan))
  for axes in (
      (('data', -1), ('fsdp', 1)),
      (('data', 2), ('fsdp', 4)),
      (('data', 2), ('fsdp', 4), ('model', 1)),
  ):
    mesh = sharding.make_mesh(axes)
    assert _specs(state, mesh, 'auto') == _specs(state, mesh, 'fsdp'), axes


def test_auto_splits_heads_and_mlp_over_model_and_fsdp_takes_the_rest():
  state = _abstract_state(_shallow('ViT-B_16', scan=True))
  mesh = sharding.make_mesh((('data', 1), ('fsdp', 2), ('model', 4)))
  auto, fsdp = _specs(state, mesh, 'auto'), _specs(state, mesh, 'fsdp')
  block = 'params/Transformer/encoderblock/'
  attention = block + 'MultiHeadDotProductAttention_0/'
  # [layers, hidden, heads, head size] and so on, worked out by hand.
  expected = {
      attention + 'query/kernel': P(None, 'fsdp', 'model', None),
      attention + 'value/bias': P(None, 'model', 'fsdp'),
      attention + 'out/kernel': P(None, 'model', None, 'fsdp'),
      attention + 'out/bias': P(None, 'fsdp'),
      block + 'MlpBlock_0/Dense_0/kernel': P(None, 'fsdp', 'model'),
      block + 'MlpBlock_0/Dense_0/bias': P(None, 'model'),
      block + 'MlpBlock_0/Dense_1/kernel': P(None, 'model', 'fsdp'),
      block + 'LayerNorm_0/scale': P(None, 'fsdp'),
      'params/head/kernel': P('fsdp', None),
  }
  for path, spec in expected.items():
    assert auto[path] == spec, path
    # Adam's moments follow their parameters.
    assert auto[path.replace('params/', 'opt_state/0/mu/', 1)] == spec, path
  # 'fsdp' alone keeps whole copies over 'model'.
  assert not any('model' in spec for spec in fsdp.values())


def test_every_logical_axes_rule_of_the_model_names_real_parameters():
  for scan in (False, True):
    # With the block options that add split parameters (SwiGLU's Dense_2,
    # the MLP's hidden norm, RoPE-Mixed's learned frequencies).
    model = _shallow('ViT-B_16', scan).clone(
        mlp='swiglu', mlp_norm=True, rope='mixed', rope_options=rope.MIXED
    )
    state = _abstract_state(model)
    paths = [
        sharding.path_str(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(state['params'])[0]
    ]
    for pattern, _ in vit_jax.models.PARAM_AXES:
      matched = [p for p in paths if re.fullmatch(pattern, 'params/' + p)]
      # Each of the 3 blocks (or the one stack) has its q, k, v, SwiGLU's
      # two input layers, the norm's scale and bias, or one of each other
      # parameter.
      per_block = (
          3
          if 'query' in pattern
          else 2
          if ('Dense_[02]' in pattern or 'LayerNorm_0' in pattern)
          else 1
      )
      assert len(matched) == (1 if scan else 3) * per_block, (pattern, scan)
      assert all('encoderblock' in p for p in matched)
