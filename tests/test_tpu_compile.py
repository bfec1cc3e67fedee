"""The TPU attention kernels compile for a TPU slice, on every mesh.

Deviceless: libtpu's compiler runs on this CPU host against the abstract
devices of a `v5e:2x2` slice (4 chips), so a Pallas (Mosaic) kernel that
XLA cannot partition fails here as it would on the pod. A tiny ViT's loss and
gradients, sharded as the train step shards them, are compiled with each
kernel over data-parallel, FSDP and data x model meshes. Skipped when libtpu
is not installed (`pip install "libtpu==0.0.42.*"`, the version jax's `tpu`
extra pins).
"""

import jax
import jax.numpy as jnp
import pytest

from vit_jax import sharding
import vit_jax.models
from vit_jax.models import vit

pytest.importorskip('libtpu')
# pylint: disable-next=g-import-not-at-top,g-bad-import-order
from jax.experimental import topologies

# The slow tier: TPU compiles (libtpu), seconds each.
pytestmark = pytest.mark.slow

BATCH = 8
IMAGE = 32  # 8-pixel patches: 16 tokens and the class token, padded to 128.
MESHES = {
    'data': (('data', 4), ('fsdp', 1)),
    'fsdp': (('data', 1), ('fsdp', 4)),
    'data_model': (('data', 2), ('model', 2)),
}


@pytest.fixture(scope='module')
def devices():
  return topologies.get_topology_desc(
      platform='tpu', topology_name='v5e:2x2'
  ).devices


def _compiled_loss_and_grads(impl, mesh):
  # Head size 64 and bfloat16: a real ViT's attention, 2 heads for 'model'.
  model = vit_jax.models.get_model(
      'testing',
      num_classes=7,
      hidden_size=128,
      patches={'size': (8, 8)},
      transformer={
          'num_heads': 2,
          'mlp_dim': 128,
          'num_layers': 1,
          'dropout_rate': 0.0,
          'attention_dropout_rate': 0.0,
      },
      attention_impl=impl,
      dtype=jnp.bfloat16,
  )
  images = jax.ShapeDtypeStruct(
      (BATCH, IMAGE, IMAGE, 3),
      jnp.float32,
      sharding=sharding.batch_sharding(mesh),
  )
  params = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros(images.shape), train=False
      )
  )['params']
  shardings = sharding.tree_shardings(
      params, mesh, fsdp_min_size=16, param_axes=vit_jax.models.PARAM_AXES
  )
  params = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      params,
      shardings,
  )

  def loss(p, x):
    # As the train step: the model's activation rules resolve on the mesh.
    with sharding.activation_sharding(mesh):
      logits = model.apply({'params': p}, x, train=False)
    return jnp.mean(logits.astype(jnp.float32) ** 2)

  return jax.jit(jax.value_and_grad(loss)).lower(params, images).compile()


@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('impl', ['flash', 'splash'])
def test_tpu_kernels_compile_for_a_v5e_slice_on_every_mesh(
    monkeypatch, devices, impl, mesh_name
):
  # The compiling host is a CPU: the model is told what it is compiled for.
  monkeypatch.setattr(vit, '_backend', lambda: 'tpu')
  mesh = sharding.make_mesh(MESHES[mesh_name], devices)
  hlo = _compiled_loss_and_grads(impl, mesh).as_text()
  # The kernel is in the program, not an XLA fallback: its forward pass and
  # the two kernels of its backward pass (dq, dk/dv) of the one layer.
  assert hlo.count('tpu_custom_call') == 3, hlo.count('tpu_custom_call')


@pytest.mark.parametrize('mesh_name', ['fsdp', 'data_model'])
@pytest.mark.parametrize('impl', ['flash', 'splash'])
def test_naflex_padding_masks_compile_into_the_tpu_kernels(
    monkeypatch, devices, impl, mesh_name
):
  """A NaFlex model's padding reaches the kernels as segment ids."""
  monkeypatch.setattr(vit, '_backend', lambda: 'tpu')
  mesh = sharding.make_mesh(MESHES[mesh_name], devices)
  model = vit_jax.models.get_model(
      'testing',
      num_classes=7,
      classifier='map',
      naflex=True,
      hidden_size=128,
      patches={'size': (8, 8)},
      transformer={
          'num_heads': 2,
          'mlp_dim': 128,
          'num_layers': 1,
          'dropout_rate': 0.0,
          'attention_dropout_rate': 0.0,
      },
      attention_impl=impl,
      dtype=jnp.bfloat16,
  )
  on_batch = sharding.batch_sharding(mesh)
  seq_len = 100  # Padded to the kernels' block of 128.
  inputs = (
      jax.ShapeDtypeStruct(
          (BATCH, seq_len, 8 * 8 * 3), jnp.float32, sharding=on_batch
      ),
      *(
          jax.ShapeDtypeStruct((BATCH, seq_len), jnp.int32, sharding=on_batch)
          for _ in range(3)
      ),
  )
  params = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), vit.naflex_init_inputs((8, 8)), train=False
      )
  )['params']
  shardings = sharding.tree_shardings(
      params, mesh, fsdp_min_size=16, param_axes=vit_jax.models.PARAM_AXES
  )
  params = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      params,
      shardings,
  )

  def loss(p, x):
    with sharding.activation_sharding(mesh):
      logits = model.apply({'params': p}, x, train=False)
    return jnp.mean(logits.astype(jnp.float32) ** 2)

  hlo = (
      jax.jit(jax.value_and_grad(loss))
      .lower(params, inputs)
      .compile()
      .as_text()
  )
  assert hlo.count('tpu_custom_call') == 3, hlo.count('tpu_custom_call')


# ----------------------------------------------------------------------------
# vit_jax.aot: a run's train and eval steps, as vit_jax.main builds them.
# ----------------------------------------------------------------------------

# The digits config with a one-block ViT whose attention is a real ViT's
# (head size 64, bfloat16), 32 px, 8x8 patches.
AOT_TINY = [
    ('image_size', '32'),
    ('model.patches.size', '(8, 8)'),
    ('model.hidden_size', '128'),
    ('model.transformer.num_heads', '2'),
    ('model.transformer.mlp_dim', '128'),
    ('model.transformer.num_layers', '1'),
    ('model.transformer.attention_dropout_rate', '0.0'),
    ('compute_dtype', "'bfloat16'"),
    ('batch', '32'),
    ('batch_eval', '32'),
    ('fsdp_min_size', '16'),
]
AOT_MESHES = {
    'data': (('data', -1),),
    'fsdp': (('fsdp', -1),),
    'data_model': (('data', -1), ('model', 2)),
    'data_fsdp_model': (('data', -1), ('fsdp', 2), ('model', 2)),
}


def _aot_report(topology, impl, mesh_name):
  # pylint: disable-next=g-import-not-at-top
  from vit_jax import aot
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config_file('configs/digits.py')
  config_lib.apply_overrides(
      config,
      AOT_TINY
      + [
          ('model.attention_impl', repr(impl)),
          ('mesh', repr(AOT_MESHES[mesh_name])),
      ],
  )
  return aot.compile_run(config, topology=topology, num_classes=10)


def _check_scheme(report, mesh_name):
  """The collectives each parallelism scheme implies, in both steps."""
  train = report['train_step']['collectives']
  evaluate = report['eval_step']['collectives']
  # Gradients (and the eval sums) are reduced over the batch shards.
  assert 'all-reduce' in train and 'all-reduce' in evaluate, (train, evaluate)
  if 'fsdp' in mesh_name:  # Parameters gathered just in time.
    assert 'all-gather' in train and 'all-gather' in evaluate
  else:  # Data and tensor parallelism gather no weight.
    assert 'all-gather' not in train and 'all-gather' not in evaluate


@pytest.mark.parametrize('mesh_name', list(AOT_MESHES))
@pytest.mark.parametrize('impl', ['einsum', 'xla', 'flash', 'splash'])
def test_train_and_eval_steps_compile_and_fit_a_v5e_slice(impl, mesh_name):
  report = _aot_report('v5e:2x2', impl, mesh_name)
  assert report['devices'] == 4 and report['device_kind'] == 'TPU v5 lite'
  assert report['fits'] and report['margin_bytes'] > 15 * 2**30
  assert report['attention']['impl'] == impl
  kernels = [
      report[s]['custom_calls'].get('tpu_custom_call', 0)
      for s in ('train_step', 'eval_step')
  ]
  # One block: the kernel forward, and its two backward kernels (dq, dk/dv)
  # in the train step; the forward alone in the eval step.
  assert kernels == ([3, 1] if impl in ('flash', 'splash') else [0, 0])
  _check_scheme(report, mesh_name)
  assert report['per_step']['flops'] > 0
  assert report['estimate']['step_seconds'] > 0


@pytest.mark.parametrize(
    'topology,devices,processes',
    [
        ('v4:2x2x1', 4, 1),  # One device per chip (megacore), as on a v4 VM.
        ('v5e:2x4', 8, 2),  # A slice of two hosts.
    ],
)
@pytest.mark.parametrize('impl', ['flash', 'splash'])
def test_kernels_compile_on_a_v4_and_a_two_host_slice(
    topology, devices, processes, impl
):
  report = _aot_report(topology, impl, 'data_fsdp_model')
  assert (report['devices'], report['processes']) == (devices, processes)
  assert report['fits']
  assert report['train_step']['custom_calls']['tpu_custom_call'] == 3
  assert report['eval_step']['custom_calls']['tpu_custom_call'] == 1
  _check_scheme(report, 'data_fsdp_model')


def test_auto_on_a_tpu_takes_the_compilers_fastest_estimate():
  report = _aot_report('v5e:2x2', 'auto', 'data_model')
  attention = report['attention']
  estimates = attention['estimates']
  assert set(estimates) == {'flash', 'splash', 'xla'}
  assert all(v is not None and v > 0 for v in estimates.values())
  assert attention['impl'] == min(estimates, key=estimates.get)
  assert "compiler's estimate" in attention['reason']
  kernels = report['train_step']['custom_calls'].get('tpu_custom_call', 0)
  assert kernels == (3 if attention['impl'] in ('flash', 'splash') else 0)


def test_a_step_the_compiler_cannot_fit_is_refused_in_one_line():
  # pylint: disable-next=g-import-not-at-top
  from vit_jax import aot
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config_file('configs/digits.py')
  # About 45 GiB of activations per chip of 16.
  config_lib.apply_overrides(config, AOT_TINY + [('batch', '1048576')])
  with pytest.raises(aot.AotError) as refused:
    aot.compile_run(config, topology='v5e:2x2', num_classes=10)
  message = str(refused.value)
  assert '\n' not in message
  assert message.startswith(
      'ViT-Ti_16 on v5e:2x2 does not fit, the compiler '
      'says of the train step: "Ran out of memory'
  )
  assert 'lower config.batch (1048576)' in message


def _is_box(coords):
  """Whether a set of (x, y, z) chip coordinates fills a box: neighbours."""
  coords = {tuple(c) for c in coords}
  spans = [sorted({c[i] for c in coords}) for i in range(3)]
  dense = all(s == list(range(s[0], s[-1] + 1)) for s in spans)
  return dense and len(coords) == len(spans[0]) * len(spans[1]) * len(spans[2])


def test_a_mesh_axis_that_splits_a_physical_axis_stays_on_neighbours(caplog):
  # G/14's mesh on a v4 8x8x4 slice: fsdp 16 is no product of whole physical
  # axes (8, 8, 4), so jax.make_mesh gives up; splitting one (8 = 2 x 4)
  # still lays every fsdp group and every model group on a box of chips.
  devices = topologies.get_topology_desc(
      platform='tpu', topology_name='v4:8x8x4', chip_config_name='megacore'
  ).devices
  mesh = sharding.make_mesh((('data', 4), ('fsdp', 16), ('model', 4)), devices)
  assert 'plain device order' not in caplog.text
  array = mesh.devices
  assert sorted(d.id for d in array.flat) == sorted(d.id for d in devices)
  for d in range(4):
    for m in range(4):
      assert _is_box(device.coords for device in array[d, :, m])
    for f in range(16):
      assert _is_box(device.coords for device in array[d, f, :])
