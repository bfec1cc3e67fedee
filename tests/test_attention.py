"""Attention implementations and remat policies: same function, other cost.

Every implementation that runs on CPU gives einsum's logits and gradients;
the TPU kernel paths, flash and splash (padding, masking, layout, and on a
mesh one kernel call per shard of the batch and heads), are checked with
jax's own references of the kernels in place of the kernels (compiling them
for a TPU is test_tpu_compile's); the choice of 'auto' is a
table per backend, logged; explicit choices a backend cannot run are refused
with the reason. Remat policies change what the backward pass keeps, never
the gradients.
"""

import logging

import jax
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as tpu_splash,
)
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_images
from helpers import randomize
from vit_jax import sharding
import vit_jax.models
from vit_jax.models import vit

IMAGES = random_images((3, 16, 16, 3))
LABELS = np.eye(7, dtype=np.float32)[[0, 3, 6]]


def _model(**extra):
  return vit_jax.models.get_model(
      'testing',
      num_classes=7,
      patches={'size': (4, 4)},
      transformer={
          'num_layers': 2,
          'attention_dropout_rate': 0.0,
          'dropout_rate': 0.0,
      },
      **extra,
  )


PARAMS = randomize(
    jax.jit(lambda: _model().init(jax.random.key(0), IMAGES, train=False))()[
        'params'
    ]
)


def _logits_and_grads(model, params=PARAMS):
  def loss(p):
    logits = model.apply({'params': p}, IMAGES, train=False)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * LABELS, -1)), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logits), jax.tree_util.tree_map(np.asarray, grads)


def _assert_close(a, b, rtol=1e-5):
  scale = max(np.abs(b).max(), 1e-30)
  np.testing.assert_array_less(np.abs(a - b).max() / scale, rtol)


def _assert_same(result, expected, rtol=1e-5):
  (logits, grads), (ref_logits, ref_grads) = result, expected
  assert np.abs(ref_logits).max() > 0.1  # Random heads: not trivially equal.
  _assert_close(logits, ref_logits, rtol)
  flat, ref = (
      jax.tree_util.tree_leaves_with_path(g) for g in (grads, ref_grads)
  )
  largest = max(np.abs(r).max() for _, r in ref)
  for (path, g), (_, r) in zip(flat, ref):
    # Relative to the largest gradient of the leaf; a leaf whose gradient is
    # zero in exact arithmetic (the key bias: softmax ignores a constant
    # logit shift) holds rounding noise, compared on the global scale.
    scale = max(np.abs(r).max(), 1e-3 * largest)
    assert np.abs(g - r).max() <= rtol * scale, path


REFERENCE = _logits_and_grads(_model(attention_impl='einsum'))


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['xla', 'auto'])
def test_cpu_implementations_give_einsum_logits_and_gradients(impl):
  _assert_same(_logits_and_grads(_model(attention_impl=impl)), REFERENCE)


def _flash_reference(q, k, v, segment_ids, sm_scale):
  return tpu_flash.mha_reference(
      q,
      k,
      v,
      None,
      tpu_flash.SegmentIds(q=segment_ids, kv=segment_ids),
      sm_scale=sm_scale,
  )


def _splash_reference(q, k, v, segment_ids):
  """Splash's reference, on the kernel's interface: [B, H, T, D] in and out."""
  t = q.shape[2]
  one_head = lambda q, k, v, ids: tpu_splash.attention_reference(
      np.ones((t, t), bool), q, k, v, tpu_splash.SegmentIds(q=ids, kv=ids)
  )
  per_example = jax.vmap(one_head, in_axes=(0, 0, 0, None))  # Over heads.
  return jax.vmap(per_example)(q, k, v, segment_ids).astype(q.dtype)


def _use_references(monkeypatch, calls):
  """Jax's references in place of the TPU kernels, each call's shapes kept."""

  def flash(q, k, v, segment_ids, sm_scale):
    calls.append((q.shape, segment_ids.shape))
    return _flash_reference(q, k, v, segment_ids, sm_scale)

  def splash(q, k, v, segment_ids):
    calls.append((q.shape, segment_ids.shape))
    return _splash_reference(q, k, v, segment_ids)

  monkeypatch.setattr(vit, '_tpu_flash_attention', flash)
  monkeypatch.setattr(vit, '_tpu_splash_attention', splash)
  monkeypatch.setattr(vit, '_backend', lambda: 'tpu')


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['flash', 'splash'])
def test_tpu_kernel_paths_pad_mask_and_lay_out_like_einsum(monkeypatch, impl):
  """The kernel's reference in place of the kernel: 17 tokens are padded to
  128, the padding masked by segment ids, and cut off again."""
  calls = []
  _use_references(monkeypatch, calls)
  _assert_same(_logits_and_grads(_model(attention_impl=impl)), REFERENCE)
  # Without a mesh the kernel sees the whole batch and every head.
  assert calls and calls[0] == ((3, 2, 128, 5), (3, 128))  # Head size 5.
  if impl == 'flash':
    # 'auto' on TPU is the same kernel.
    _assert_same(_logits_and_grads(_model(attention_impl='auto')), REFERENCE)


MESH_IMAGES = random_images((8, 16, 16, 3), seed=1)
MESH_LABELS = np.eye(7, dtype=np.float32)[np.arange(8) % 7]


def _mesh_logits_and_grads(model, mesh, rules=True, param_rule='auto'):
  """Loss and gradients as the train step computes them on `mesh`: jitted
  with the parameters' and the batch's shardings, the model's activation
  rules in force (or only the mesh, with `rules=False`)."""
  param_shardings = sharding.tree_shardings(
      PARAMS,
      mesh,
      rules=(('.*', param_rule),),
      fsdp_min_size=16,
      param_axes=vit_jax.models.PARAM_AXES,
  )

  def loss(p, images):
    logits = model.apply({'params': p}, images, train=False)
    return (
        -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * MESH_LABELS, -1)),
        logits,
    )

  def on_mesh(p, images):
    if rules:
      with sharding.activation_sharding(mesh):
        return jax.value_and_grad(loss, has_aux=True)(p, images)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jax.value_and_grad(loss, has_aux=True)(p, images)

  step = jax.jit(
      on_mesh, in_shardings=(param_shardings, sharding.batch_sharding(mesh))
  )
  (_, logits), grads = step(PARAMS, MESH_IMAGES)
  return np.asarray(logits), jax.tree_util.tree_map(np.asarray, grads)


@pytest.fixture(scope='module')
def mesh_reference():
  model = _model(attention_impl='einsum')

  def loss(p):
    logits = model.apply({'params': p}, MESH_IMAGES, train=False)
    return (
        -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * MESH_LABELS, -1)),
        logits,
    )

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(PARAMS)
  return np.asarray(logits), jax.tree_util.tree_map(np.asarray, grads)


# (mesh axes, whether the logical rules are in force, the parameters' rule,
# the [B, H] each kernel call sees of the 8 examples and 2 heads).
MESHES = {
    'data': ((('data', 8), ('fsdp', 1)), True, 'auto', (1, 2)),
    'fsdp': ((('data', 1), ('fsdp', 8)), True, 'auto', (1, 2)),
    'data_fsdp': ((('data', 2), ('fsdp', 4)), True, 'auto', (1, 2)),
    'data_model': ((('data', 4), ('model', 2)), True, 'auto', (2, 1)),
    # 2 heads over 4 devices (whose parameters `sharding` would refuse to
    # split): the heads stay whole on each device.
    'data_model4': ((('data', 2), ('model', 4)), True, 'replicate', (4, 2)),
    # A mesh without the model's rules: nothing says how to split, so every
    # device runs the kernel on the whole batch (correct, and it compiles).
    'mesh_only': ((('data', 8),), False, 'auto', (8, 2)),
}


@pytest.mark.slow
@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('impl', ['flash', 'splash'])
def test_tpu_kernels_run_per_shard_on_a_mesh_and_match_einsum(
    monkeypatch, mesh_reference, impl, mesh_name
):
  """Under `jax.shard_map` the kernel sees its shard of the batch and heads
  only; logits and gradients are einsum's on one device."""
  axes, rules, param_rule, (batch, heads) = MESHES[mesh_name]
  calls = []
  _use_references(monkeypatch, calls)
  mesh = sharding.make_mesh(axes)
  result = _mesh_logits_and_grads(
      _model(attention_impl=impl), mesh, rules, param_rule
  )
  _assert_same(result, mesh_reference)
  assert calls and set(calls) == {((batch, heads, 128, 5), (batch, 128))}


def test_tpu_kernel_inside_a_users_shard_map_runs_as_is(
    monkeypatch, mesh_reference
):
  """Axes an enclosing `shard_map` already made manual are left to it."""
  calls = []
  _use_references(monkeypatch, calls)
  mesh = sharding.make_mesh((('data', 8),))
  model = _model(attention_impl='flash')
  apply = jax.shard_map(
      lambda p, x: model.apply({'params': p}, x, train=False),
      mesh=mesh,
      in_specs=(
          jax.sharding.PartitionSpec(),
          jax.sharding.PartitionSpec('data'),
      ),
      out_specs=jax.sharding.PartitionSpec('data'),
  )
  logits = jax.jit(apply)(PARAMS, MESH_IMAGES)
  _assert_close(np.asarray(logits), mesh_reference[0])
  assert set(calls) == {((1, 2, 128, 5), (1, 128))}


@pytest.mark.slow
@pytest.mark.parametrize('mesh_name', [None, 'data_model'])
def test_the_splash_kernel_itself_in_the_pallas_interpreter(
    monkeypatch, mesh_reference, mesh_name
):
  """Not a reference: jax's splash kernel, interpreted on CPU, built as the
  model builds it (full mask, padding as a segment, mapped over examples)."""
  kernel = vit._tpu_splash_attention  # pylint: disable=protected-access
  calls = []

  def interpreted(q, k, v, segment_ids):
    calls.append(q.shape)
    return kernel(q, k, v, segment_ids, interpret=True)

  monkeypatch.setattr(vit, '_tpu_splash_attention', interpreted)
  monkeypatch.setattr(vit, '_backend', lambda: 'tpu')
  model = _model(attention_impl='splash')
  if mesh_name is None:
    _assert_same(_logits_and_grads(model), REFERENCE)
    assert calls == [(3, 2, 128, 5)] * 2  # Two layers.
  else:
    axes, _, _, (batch, heads) = MESHES[mesh_name]
    _assert_same(
        _mesh_logits_and_grads(model, sharding.make_mesh(axes)), mesh_reference
    )
    assert set(calls) == {(batch, heads, 128, 5)}


def test_auto_chooses_per_backend():
  choose = lambda backend, dtype=jnp.bfloat16, head_dim=64, dropout=False: (
      vit.resolve_attention_impl(
          'auto',
          backend=backend,
          dtype=dtype,
          head_dim=head_dim,
          dropout=dropout,
      )[0]
  )
  assert choose('cpu') == 'einsum'
  assert choose('gpu') == 'cudnn'
  assert choose('gpu', dtype=jnp.float32) == 'xla'  # cuDNN: bf16/fp16 only.
  assert choose('gpu', head_dim=160) == 'xla'
  assert choose('tpu') == 'flash'
  assert choose('gpu', dropout=True) == 'einsum'  # Only einsum has dropout.
  assert choose('metal') == 'xla'


@pytest.mark.parametrize(
    'impl,kwargs,message',
    [
        ('cudnn', {}, r"'cudnn' needs an NVIDIA GPU.*backend 'cpu'"),
        (
            'cudnn',
            {'backend': 'gpu', 'dtype': jnp.float32},
            r"dtype float32.*'auto' or 'xla'",
        ),
        ('flash', {}, r"'flash' is a TPU kernel; the backend is 'cpu'"),
        (
            'splash',
            {'backend': 'gpu'},
            r"'splash' is a TPU kernel; the backend " r"is 'gpu'",
        ),
        ('xla', {'dropout': True}, r'no dropout on the attention weights'),
        ('fused', {}, r"attention_impl='fused'; use one of"),
    ],
)
def test_choices_a_backend_cannot_run_are_refused(impl, kwargs, message):
  kwargs = {
      'backend': 'cpu',
      'dtype': jnp.bfloat16,
      'head_dim': 64,
      'dropout': False,
      **kwargs,
  }
  with pytest.raises(ValueError, match=message):
    vit.resolve_attention_impl(impl, **kwargs)


def test_auto_logs_its_choice_and_a_cpu_model_falls_back(caplog):
  vit._logged_choices.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.INFO):
    _model(attention_impl='auto').apply({'params': PARAMS}, IMAGES, train=False)
  assert (
      "attention_impl='auto' on cpu: 'einsum' (fastest measured on CPU)"
      in caplog.text
  )
  with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
    _model(attention_impl='cudnn').apply(
        {'params': PARAMS}, IMAGES, train=False
    )


def test_attention_weights_only_when_asked_and_the_same_for_every_impl():
  def weights(impl):
    _, state = _model(attention_impl=impl).apply(
        {'params': PARAMS}, IMAGES, train=False, mutable=['intermediates']
    )
    return np.asarray(
        state['intermediates']['Transformer']['encoderblock_1'][
            'MultiHeadDotProductAttention_0'
        ]['attention_weights'][0]
    )

  einsum, xla = weights('einsum'), weights('xla')
  assert einsum.shape == (3, 2, 17, 17)
  np.testing.assert_allclose(einsum.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(xla, einsum, atol=1e-6)
  # Without the collection nothing is stored.
  out = _model(attention_impl='xla').apply(
      {'params': PARAMS}, IMAGES, train=False
  )
  assert not isinstance(out, tuple)


@pytest.mark.slow
@pytest.mark.parametrize(
    'policy,scan',
    [
        *((p, False) for p in vit.REMAT_POLICIES),
        ('full', True),
        ('dots_with_no_batch_dims_saveable', True),
    ],
)
def test_remat_policies_keep_the_gradients(policy, scan):
  params = PARAMS
  if scan:
    from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top

    params = checkpoint.stack_encoder_blocks(jax.device_get(PARAMS))
  result = _logits_and_grads(_model(remat_policy=policy, scan=scan), params)
  if scan:
    from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top

    result = (result[0], checkpoint.unstack_encoder_blocks(result[1]))
  _assert_same(result, REFERENCE, rtol=1e-4 if scan else 1e-5)


@pytest.mark.slow
def test_remat_policy_changes_what_the_backward_pass_saves():
  """Residuals kept for the backward pass: all with 'none', fewer with
  'dots_saveable' (matmul outputs only), fewest with 'full'."""

  def saved_bytes(policy):
    model = _model(remat_policy=policy)
    f = lambda p: model.apply({'params': p}, IMAGES, train=False).sum()
    _, vjp = jax.vjp(f, PARAMS)
    return sum(
        x.nbytes for x in jax.tree_util.tree_leaves(vjp) if hasattr(x, 'nbytes')
    )

  none, dots, full = (saved_bytes(p) for p in ('none', 'dots_saveable', 'full'))
  assert none > dots > full, (none, dots, full)


def test_bad_remat_settings_are_named():
  with pytest.raises(ValueError, match="remat_policy='some'; use one of"):
    _model(remat_policy='some').init(jax.random.key(0), IMAGES, train=False)
  with pytest.raises(ValueError, match="remat=True.*remat_policy='none'"):
    _model(remat=True, remat_policy='none').init(
        jax.random.key(0), IMAGES, train=False
    )
