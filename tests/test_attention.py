"""Attention implementations and remat policies: same function, other cost.

Every implementation that runs on CPU gives einsum's logits and gradients;
the TPU flash path (padding, masking, layout) is checked with jax's own
reference of the kernel in place of the kernel; the choice of 'auto' is a
table per backend, logged; explicit choices a backend cannot run are refused
with the reason. Remat policies change what the backward pass keeps, never
the gradients.
"""

import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
import numpy as np
import pytest

from helpers import randomize
from helpers import random_images
from vit_jax.models import vit
import vit_jax.models

IMAGES = random_images((3, 16, 16, 3))
LABELS = np.eye(7, dtype=np.float32)[[0, 3, 6]]


def _model(**extra):
  return vit_jax.models.get_model(
      'testing', num_classes=7, patches={'size': (4, 4)},
      transformer={'num_layers': 2, 'attention_dropout_rate': 0.0,
                   'dropout_rate': 0.0}, **extra)


PARAMS = randomize(jax.jit(lambda: _model().init(
    jax.random.key(0), IMAGES, train=False))()['params'])


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
  flat, ref = (jax.tree_util.tree_leaves_with_path(g)
               for g in (grads, ref_grads))
  largest = max(np.abs(r).max() for _, r in ref)
  for (path, g), (_, r) in zip(flat, ref):
    # Relative to the largest gradient of the leaf; a leaf whose gradient is
    # zero in exact arithmetic (the key bias: softmax ignores a constant
    # logit shift) holds rounding noise, compared on the global scale.
    scale = max(np.abs(r).max(), 1e-3 * largest)
    assert np.abs(g - r).max() <= rtol * scale, path


REFERENCE = _logits_and_grads(_model(attention_impl='einsum'))


@pytest.mark.parametrize('impl', ['xla', 'auto'])
def test_cpu_implementations_give_einsum_logits_and_gradients(impl):
  _assert_same(_logits_and_grads(_model(attention_impl=impl)), REFERENCE)


def test_tpu_flash_path_pads_masks_and_lays_out_like_einsum(monkeypatch):
  """The kernel's reference in place of the kernel: 17 tokens are padded to
  128, the padding masked by segment ids, and cut off again."""
  calls = []

  def reference_kernel(q, k, v, segment_ids, sm_scale):
    calls.append((q.shape, segment_ids.shape))
    return tpu_flash.mha_reference(
        q, k, v, None, tpu_flash.SegmentIds(q=segment_ids, kv=segment_ids),
        sm_scale=sm_scale)

  monkeypatch.setattr(vit, '_tpu_flash_attention', reference_kernel)
  monkeypatch.setattr(vit, '_backend', lambda: 'tpu')
  _assert_same(_logits_and_grads(_model(attention_impl='flash')), REFERENCE)
  # 'auto' on TPU is the same kernel.
  _assert_same(_logits_and_grads(_model(attention_impl='auto')), REFERENCE)
  assert calls and calls[0] == ((3, 2, 128, 5), (3, 128))  # Head size 5.


def test_auto_chooses_per_backend():
  choose = lambda backend, dtype=jnp.bfloat16, head_dim=64, dropout=False: (
      vit.resolve_attention_impl('auto', backend=backend, dtype=dtype,
                                 head_dim=head_dim, dropout=dropout)[0])
  assert choose('cpu') == 'einsum'
  assert choose('gpu') == 'cudnn'
  assert choose('gpu', dtype=jnp.float32) == 'xla'  # cuDNN: bf16/fp16 only.
  assert choose('gpu', head_dim=160) == 'xla'
  assert choose('tpu') == 'flash'
  assert choose('gpu', dropout=True) == 'einsum'  # Only einsum has dropout.
  assert choose('metal') == 'xla'


@pytest.mark.parametrize('impl,kwargs,message', [
    ('cudnn', {}, r"'cudnn' needs an NVIDIA GPU.*backend 'cpu'"),
    ('cudnn', {'backend': 'gpu', 'dtype': jnp.float32},
     r"dtype float32.*'auto' or 'xla'"),
    ('flash', {}, r"'flash' is the TPU kernel; the backend is 'cpu'"),
    ('xla', {'dropout': True}, r"no dropout on the attention weights"),
    ('fused', {}, r"attention_impl='fused'; use one of"),
])
def test_choices_a_backend_cannot_run_are_refused(impl, kwargs, message):
  kwargs = {'backend': 'cpu', 'dtype': jnp.bfloat16, 'head_dim': 64,
            'dropout': False, **kwargs}
  with pytest.raises(ValueError, match=message):
    vit.resolve_attention_impl(impl, **kwargs)


def test_auto_logs_its_choice_and_a_cpu_model_falls_back(caplog):
  vit._logged_choices.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.INFO):
    _model(attention_impl='auto').apply({'params': PARAMS}, IMAGES,
                                        train=False)
  assert ("attention_impl='auto' on cpu: 'einsum' (fastest measured on CPU)"
          in caplog.text)
  with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
    _model(attention_impl='cudnn').apply({'params': PARAMS}, IMAGES,
                                         train=False)


def test_attention_weights_only_when_asked_and_the_same_for_every_impl():
  def weights(impl):
    _, state = _model(attention_impl=impl).apply(
        {'params': PARAMS}, IMAGES, train=False, mutable=['intermediates'])
    return np.asarray(state['intermediates']['Transformer']['encoderblock_1'][
        'MultiHeadDotProductAttention_0']['attention_weights'][0])
  einsum, xla = weights('einsum'), weights('xla')
  assert einsum.shape == (3, 2, 17, 17)
  np.testing.assert_allclose(einsum.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(xla, einsum, atol=1e-6)
  # Without the collection nothing is stored.
  out = _model(attention_impl='xla').apply({'params': PARAMS}, IMAGES,
                                           train=False)
  assert not isinstance(out, tuple)


@pytest.mark.parametrize('policy,scan', [
    *((p, False) for p in vit.REMAT_POLICIES),
    ('full', True), ('dots_with_no_batch_dims_saveable', True)])
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


def test_remat_policy_changes_what_the_backward_pass_saves():
  """Residuals kept for the backward pass: all with 'none', fewer with
  'dots_saveable' (matmul outputs only), fewest with 'full'."""
  def saved_bytes(policy):
    model = _model(remat_policy=policy)
    f = lambda p: model.apply({'params': p}, IMAGES, train=False).sum()
    _, vjp = jax.vjp(f, PARAMS)
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(vjp)
               if hasattr(x, 'nbytes'))
  none, dots, full = (saved_bytes(p) for p in ('none', 'dots_saveable',
                                                'full'))
  assert none > dots > full, (none, dots, full)


def test_bad_remat_settings_are_named():
  with pytest.raises(ValueError, match="remat_policy='some'; use one of"):
    _model(remat_policy='some').init(jax.random.key(0), IMAGES, train=False)
  with pytest.raises(ValueError, match="remat=True.*remat_policy='none'"):
    _model(remat=True, remat_policy='none').init(jax.random.key(0), IMAGES,
                                                 train=False)
