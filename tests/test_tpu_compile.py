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
from vit_jax.models import vit
import vit_jax.models

pytest.importorskip('libtpu')
# pylint: disable-next=g-import-not-at-top,g-bad-import-order
from jax.experimental import topologies

BATCH = 8
IMAGE = 32  # 8-pixel patches: 16 tokens and the class token, padded to 128.
MESHES = {
    'data': (('data', 4), ('fsdp', 1)),
    'fsdp': (('data', 1), ('fsdp', 4)),
    'data_model': (('data', 2), ('model', 2)),
}


@pytest.fixture(scope='module')
def devices():
  return topologies.get_topology_desc(platform='tpu',
                                      topology_name='v5e:2x2').devices


def _compiled_loss_and_grads(impl, mesh):
  # Head size 64 and bfloat16: a real ViT's attention, 2 heads for 'model'.
  model = vit_jax.models.get_model(
      'testing', num_classes=7, hidden_size=128, patches={'size': (8, 8)},
      transformer={'num_heads': 2, 'mlp_dim': 128, 'num_layers': 1,
                   'dropout_rate': 0.0, 'attention_dropout_rate': 0.0},
      attention_impl=impl, dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((BATCH, IMAGE, IMAGE, 3), jnp.float32,
                                sharding=sharding.batch_sharding(mesh))
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros(images.shape), train=False))['params']
  shardings = sharding.tree_shardings(
      params, mesh, fsdp_min_size=16, param_axes=vit_jax.models.PARAM_AXES)
  params = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      params, shardings)

  def loss(p, x):
    # As the train step: the model's activation rules resolve on the mesh.
    with sharding.activation_sharding(mesh):
      logits = model.apply({'params': p}, x, train=False)
    return jnp.mean(logits.astype(jnp.float32) ** 2)

  return jax.jit(jax.value_and_grad(loss)).lower(params, images).compile()


@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('impl', ['flash', 'splash'])
def test_tpu_kernels_compile_for_a_v5e_slice_on_every_mesh(
    monkeypatch, devices, impl, mesh_name):
  # The compiling host is a CPU: the model is told what it is compiled for.
  monkeypatch.setattr(vit, '_backend', lambda: 'tpu')
  mesh = sharding.make_mesh(MESHES[mesh_name], devices)
  hlo = _compiled_loss_and_grads(impl, mesh).as_text()
  # The kernel is in the program, not an XLA fallback: its forward pass and
  # the two kernels of its backward pass (dq, dk/dv) of the one layer.
  assert hlo.count('tpu_custom_call') == 3, hlo.count('tpu_custom_call')
