"""The block options of today's ViT families, each against the math.

A NumPy forward pass written here from timm's definitions (LayerScale, QK
norm, SwiGLU, the MLP's hidden norm, RMSNorm, the bias switches, a class
token pooled or not, no_embed_class, pre/embed/fc norms, the MAP head's
sizes) checks the model's logits with each option on and in the families'
combinations; parameter counts are closed forms; scan, remat, every
attention implementation and tensor parallelism give the same numbers; bad
options are refused in one line, at parse time too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_images
from helpers import randomize
import numpy_reference
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import flops
from vit_jax import interop
from vit_jax import sharding
import vit_jax.models
from vit_jax.models import rope
from vit_jax.models import vit

D, HEADS, MLP, LAYERS, CLASSES = 32, 4, 48, 2, 5
IMAGES = random_images((2, 16, 16, 3))
GRID = 4  # 16 px images, 4x4 patches.

# Today's families' combinations (the option names are VisionTransformer's).
FAMILIES = {
    'dinov2': dict(layer_scale=1e-5, mlp='swiglu'),
    'aimv2': dict(
        norm='rmsnorm',
        mlp='swiglu',
        qkv_bias=False,
        proj_bias=False,
        mlp_bias=False,
        embed_norm=True,
        classifier='gap',
    ),
    'eva02': dict(
        qkv_bias='qv',
        mlp='swiglu',
        mlp_norm=True,
        class_token=True,
        classifier='gap',
        fc_norm=True,
    ),
    'pe_core': dict(
        pre_norm=True,
        class_token=True,
        classifier='map',
        map_num_heads=2,
        map_mlp_dim=24,
    ),
    'dinov2_reg': dict(
        layer_scale=1e-5, posemb_class_token=False, num_registers=2
    ),
}
SINGLE = {
    'layer_scale': dict(layer_scale=0.1),
    'qk_norm': dict(qk_norm=True),
    'qk_norm_rms': dict(qk_norm=True, norm='rmsnorm'),
    'swiglu': dict(mlp='swiglu'),
    'mlp_norm': dict(mlp_norm=True),
    'rmsnorm': dict(norm='rmsnorm'),
    'no_qkv_bias': dict(qkv_bias=False),
    'qv_bias': dict(qkv_bias='qv'),
    'no_proj_bias': dict(proj_bias=False),
    'no_mlp_bias': dict(mlp_bias=False),
    'gap_with_class_token': dict(class_token=True, classifier='gap'),
    'map_with_class_token': dict(class_token=True, classifier='map'),
    'no_embed_class': dict(posemb_class_token=False),
    'pre_norm': dict(pre_norm=True),
    'embed_norm': dict(embed_norm=True),
    'fc_norm': dict(classifier='gap', fc_norm=True),
    'map_sizes': dict(classifier='map', map_num_heads=2, map_mlp_dim=24),
    'map_rmsnorm': dict(classifier='map', norm='rmsnorm'),
    # A large epsilon shows which norms get it: all of them.
    'every_norm_eps': dict(
        layer_norm_epsilon=0.5,
        qk_norm=True,
        mlp_norm=True,
        pre_norm=True,
        embed_norm=True,
        classifier='gap',
        fc_norm=True,
    ),
    'every_rmsnorm_eps': dict(
        layer_norm_epsilon=0.5,
        norm='rmsnorm',
        qk_norm=True,
        mlp_norm=True,
        pre_norm=True,
        embed_norm=True,
        class_token=True,
        classifier='map',
    ),
}
CASES = {**SINGLE, **FAMILIES}


def _model(**options):
  return vit.VisionTransformer(
      num_classes=CLASSES,
      patches={'size': (4, 4)},
      hidden_size=D,
      transformer={
          'num_layers': LAYERS,
          'mlp_dim': MLP,
          'num_heads': HEADS,
          'dropout_rate': 0.0,
          'attention_dropout_rate': 0.0,
      },
      **options,
  )


def _params(model, images=IMAGES):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False)
  )
  return randomize(shapes['params'])


def _flat(params):
  return {
      '/'.join(str(k.key) for k in path): np.asarray(v, np.float64)
      for path, v in jax.tree_util.tree_leaves_with_path(params)
  }


# -- The NumPy reference: timm's definitions, written out. ------------------


def _norm(x, p, prefix, kind, eps):
  if kind == 'rmsnorm':  # timm's RmsNorm: no mean subtraction, no bias.
    return (
        x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p[prefix + '/scale']
    )
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p[prefix + '/scale'] + p[
      prefix + '/bias'
  ]


def _gelu(x):  # tanh GELU, the model's default (gelu_approximate=True).
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _silu(x):
  return x / (1 + np.exp(-x))


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _attention(
    x, kv, p, pre, o, eps, biases=('query', 'key', 'value'), start=0
):
  """Multi-head attention; `biases` names the projections that have one;
  with `o['rope_reference']` (test_rope's reference arguments), the GRID x
  GRID patch tokens from `start` on get RoPE."""
  proj = {}
  for name, inputs in (('query', x), ('key', kv), ('value', kv)):
    y = np.einsum('ntd,dhk->nhtk', inputs, p[f'{pre}/{name}/kernel'])
    if name in biases:
      y = y + p[f'{pre}/{name}/bias'][None, :, None]
    proj[name] = y
  q, k, v = proj['query'], proj['key'], proj['value']
  if o.get('qk_norm'):  # Per head, over head_dim.
    q = _norm(q, p, pre + '/query_norm', o.get('norm', 'layernorm'), eps)
    k = _norm(k, p, pre + '/key_norm', o.get('norm', 'layernorm'), eps)
  if o.get('rope_reference'):
    args, rotate_half = o['rope_reference']
    angles = numpy_reference.rope_angles((GRID, GRID), q.shape[-1], *args)
    patches = slice(start, start + GRID * GRID)
    q, k = q.copy(), k.copy()
    for y in (q, k):
      y[:, :, patches] = numpy_reference.rope_rotation(
          y[:, :, patches], angles, rotate_half
      )
  w = _softmax(np.einsum('nhqd,nhkd->nhqk', q, k) / np.sqrt(q.shape[-1]))
  out = np.einsum('nhqk,nhkd->nhqd', w, v)
  out = np.einsum('nhqd,hdo->nqo', out, p[pre + '/out/kernel'])
  if o.get('proj_bias', True):
    out = out + p[pre + '/out/bias']
  return out


def _dense(x, p, pre, bias=True):
  y = x @ p[pre + '/kernel']
  return y + p[pre + '/bias'] if bias else y


def reference_logits(p, images, o):
  """timm's forward pass with options `o` over our parameter names."""
  eps = o.get('layer_norm_epsilon', 1e-6)
  kind = o.get('norm', 'layernorm')
  norm = lambda x, prefix: _norm(x, p, prefix, kind, eps)
  classifier = o.get('classifier', 'token')
  cls_token = o.get('class_token')
  if cls_token is None:
    cls_token = classifier == 'token'
  n = images.shape[0]
  # Patch embedding: a 4x4 stride-4 convolution, patches in row-major order;
  # timm's has no bias with pre_norm.
  patches = images.reshape(n, GRID, 4, GRID, 4, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(n, GRID * GRID, 4 * 4 * 3).astype(np.float64)
  x = patches @ p['embedding/kernel'].reshape(4 * 4 * 3, D)
  if not o.get('pre_norm'):
    x = x + p['embedding/bias']
  if o.get('embed_norm'):
    x = norm(x, 'embedding_norm')
  cls = np.broadcast_to(p['cls'], (n, 1, D)) if cls_token else None
  if o.get('posemb') == 'none':  # No table (DINOv3: RoPE only).
    if cls_token:
      x = np.concatenate([cls, x], axis=1)
  elif cls_token and o.get('posemb_class_token', True):
    posemb = p['Transformer/posembed_input/pos_embedding']
    x = np.concatenate([cls, x], axis=1) + posemb
  else:  # timm's no_embed_class: the table covers the patches only.
    x = x + p['Transformer/posembed_input/pos_embedding']
    if cls_token:
      x = np.concatenate([cls, x], axis=1)
  registers = o.get('num_registers', 0)
  if registers:  # After the patches in this library (timm: before them).
    x = np.concatenate(
        [x, np.broadcast_to(p['registers'], (n, registers, D))], axis=1
    )
  if o.get('pre_norm'):
    x = norm(x, 'Transformer/pre_norm')
  qkv_bias = o.get('qkv_bias', True)
  biases = {
      True: ('query', 'key', 'value'),
      False: (),
      'qv': ('query', 'value'),
  }
  mlp_bias = o.get('mlp_bias', True)
  for i in range(LAYERS):
    pre = f'Transformer/encoderblock_{i}/'
    a = _attention(
        norm(x, pre + 'LayerNorm_0'),
        norm(x, pre + 'LayerNorm_0'),
        p,
        pre + 'MultiHeadDotProductAttention_0',
        o,
        eps,
        biases[qkv_bias],
        start=1 if cls_token else 0,
    )
    if o.get('layer_scale') is not None:
      a = a * p[pre + 'LayerScale_0/scale']
    x = x + a
    y = norm(x, pre + 'LayerNorm_1')
    if o.get('mlp') == 'swiglu':
      h = _silu(_dense(y, p, pre + 'MlpBlock_0/Dense_0', mlp_bias)) * _dense(
          y, p, pre + 'MlpBlock_0/Dense_2', mlp_bias
      )
    else:
      h = _gelu(_dense(y, p, pre + 'MlpBlock_0/Dense_0', mlp_bias))
    if o.get('mlp_norm'):
      h = norm(h, pre + 'MlpBlock_0/LayerNorm_0')
    y = _dense(h, p, pre + 'MlpBlock_0/Dense_1', mlp_bias)
    if o.get('layer_scale') is not None:
      y = y * p[pre + 'LayerScale_1/scale']
    x = x + y
  if not o.get('fc_norm'):
    x = norm(x, 'Transformer/encoder_norm')
  if registers:
    x = x[:, :-registers]
  if classifier == 'token':
    x = x[:, 0]
  elif classifier == 'gap':  # The non-prefix tokens (timm's avg pool).
    x = x[:, 1 if cls_token else 0 :].mean(axis=1)
  else:  # 'map': over every token, the class token too (timm's Eva).
    pre = 'MAPHead_0/'
    # The head count is in the kernels' shapes: (D, heads, D / heads).
    map_heads = o.get('map_num_heads') or HEADS
    kernel = p[pre + 'MultiHeadDotProductAttention_0/query/kernel']
    assert kernel.shape == (D, map_heads, D // map_heads)
    probe = np.broadcast_to(p[pre + 'probe'], (n, 1, D))
    a = _attention(probe, x, p, pre + 'MultiHeadDotProductAttention_0', {}, eps)
    h = _gelu(
        _dense(norm(a, pre + 'LayerNorm_0'), p, pre + 'MlpBlock_0/Dense_0')
    )
    x = (a + _dense(h, p, pre + 'MlpBlock_0/Dense_1'))[:, 0]
  if o.get('fc_norm'):
    x = norm(x, 'fc_norm')
  return _dense(x, p, 'head')


@pytest.mark.parametrize('case', list(CASES))
def test_logits_are_the_numpy_reference(case):
  options = CASES[case]
  model = _model(**options)
  params = _params(model)
  logits = np.asarray(
      jax.jit(lambda v: model.apply(v, IMAGES, train=False))({'params': params})
  )
  expected = reference_logits(_flat(params), IMAGES, options)
  difference = np.abs(logits - expected).max()
  assert np.abs(expected).max() > 0.1  # Random weights: not trivially equal.
  assert difference < 1e-5 * max(1.0, np.abs(expected).max()), difference


# The RoPE families, the whole forward pass: (model options, test_rope's
# reference arguments (convention, temperature, offset, indexing,
# ref_grid), rotate_half).
ROPE_FAMILIES = {
    'eva02_rope': (
        dict(FAMILIES['eva02'], rope='axial', rope_options=rope.EVA02),
        (('eva', 10000.0, 0.0, 'ij', (16, 16)), False),
    ),
    'dinov3': (
        dict(
            layer_scale=1e-5,
            qkv_bias=False,
            posemb='none',
            class_token=True,
            classifier='gap',
            num_registers=2,
            layer_norm_epsilon=1e-5,
            rope='axial',
            rope_options=rope.DINOV3,
        ),
        (('dinov3', 100.0, 0.0, 'ij', None), True),
    ),
    'pe_core_rope': (
        dict(
            FAMILIES['pe_core'],
            rope='axial',
            rope_options={**rope.PE, 'ref_grid': (14, 14)},
        ),
        (('eva', 10000.0, 1.0, 'xy', (14, 14)), False),
    ),
}


@pytest.mark.parametrize('case', list(ROPE_FAMILIES))
def test_rope_families_are_the_numpy_reference(case):
  """EVA-02, DINOv3 and Perception Encoder as timm computes them: the block
  options with RoPE on the patch tokens, against NumPy."""
  options, reference = ROPE_FAMILIES[case]
  model = _model(**options)
  params = _params(model)
  logits = np.asarray(
      jax.jit(lambda v: model.apply(v, IMAGES, train=False))({'params': params})
  )
  expected = reference_logits(
      _flat(params), IMAGES, dict(options, rope_reference=reference)
  )
  without_rope = reference_logits(_flat(params), IMAGES, options)
  scale = max(1.0, np.abs(expected).max())
  assert np.abs(expected).max() > 0.1  # Random weights: not trivially equal.
  assert np.abs(expected - without_rope).max() > 1e-3 * scale  # RoPE counts.
  assert np.abs(logits - expected).max() < 1e-5 * scale


# -- Parameter counts in closed form. ---------------------------------------


def _count(options):
  """Closed form of the tiny model's parameter count with `options`."""
  o = options
  norm = D if o.get('norm') == 'rmsnorm' else 2 * D  # Scale (and bias).
  head_dim = D // HEADS
  qk_norm = head_dim if o.get('norm') == 'rmsnorm' else 2 * head_dim
  classifier = o.get('classifier', 'token')
  cls = o.get('class_token', classifier == 'token')
  tokens = GRID * GRID + (1 if cls and o.get('posemb_class_token', True) else 0)
  qkv_bias = {True: 3, False: 0, 'qv': 2}[o.get('qkv_bias', True)]
  branches = 2 if o.get('mlp') == 'swiglu' else 1
  mlp_bias = o.get('mlp_bias', True)
  block = (
      2 * norm
      + 4 * D * D
      + qkv_bias * D
      + (D if o.get('proj_bias', True) else 0)
      + (2 * qk_norm if o.get('qk_norm') else 0)
      + branches * (D * MLP + (MLP if mlp_bias else 0))
      + MLP * D
      + (D if mlp_bias else 0)
      + (
          (MLP if o.get('norm') == 'rmsnorm' else 2 * MLP)
          if o.get('mlp_norm')
          else 0
      )
      + (2 * D if o.get('layer_scale') is not None else 0)
  )
  total = (
      4 * 4 * 3 * D
      + (0 if o.get('pre_norm') else D)  # Patch embedding (bias).
      + tokens * D
      + (D if cls else 0)
      + o.get('num_registers', 0) * D
      + LAYERS * block
      + norm  # encoder_norm, or fc_norm in its place.
      + (norm if o.get('pre_norm') else 0)
      + (norm if o.get('embed_norm') else 0)
      + D * CLASSES
      + CLASSES
  )
  if classifier == 'map':
    map_mlp = o.get('map_mlp_dim') or MLP
    total += D + 4 * D * D + 4 * D + norm + 2 * D * map_mlp + map_mlp + D
  return total


@pytest.mark.parametrize('case', list(CASES))
def test_parameter_counts_are_the_closed_form(case):
  params = _params(_model(**CASES[case]))
  count = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert count == _count(CASES[case])


def test_option_parameter_names():
  """The seam's names: LayerScale_{0,1}/scale, query_norm / key_norm,
  SwiGLU's Dense_{0,1,2}, the MLP's LayerNorm_0, RMSNorm's scale only,
  Transformer/pre_norm, embedding_norm, fc_norm."""
  params = _flat(
      _params(
          _model(
              layer_scale=1.0,
              qk_norm=True,
              mlp='swiglu',
              mlp_norm=True,
              norm='rmsnorm',
              qkv_bias='qv',
              pre_norm=True,
              embed_norm=True,
              classifier='gap',
              fc_norm=True,
          )
      )
  )
  block = 'Transformer/encoderblock_0/'
  attention = block + 'MultiHeadDotProductAttention_0/'
  assert {k[len(block) :] for k in params if k.startswith(block)} == {
      'LayerNorm_0/scale',
      'LayerNorm_1/scale',
      'LayerScale_0/scale',
      'LayerScale_1/scale',
      'MlpBlock_0/Dense_0/kernel',
      'MlpBlock_0/Dense_0/bias',
      'MlpBlock_0/Dense_1/kernel',
      'MlpBlock_0/Dense_1/bias',
      'MlpBlock_0/Dense_2/kernel',
      'MlpBlock_0/Dense_2/bias',
      'MlpBlock_0/LayerNorm_0/scale',
      'MultiHeadDotProductAttention_0/query/kernel',
      'MultiHeadDotProductAttention_0/query/bias',
      'MultiHeadDotProductAttention_0/key/kernel',
      'MultiHeadDotProductAttention_0/value/kernel',
      'MultiHeadDotProductAttention_0/value/bias',
      'MultiHeadDotProductAttention_0/out/kernel',
      'MultiHeadDotProductAttention_0/out/bias',
      'MultiHeadDotProductAttention_0/query_norm/scale',
      'MultiHeadDotProductAttention_0/key_norm/scale',
  }
  assert params[attention + 'query_norm/scale'].shape == (D // HEADS,)
  assert params[block + 'MlpBlock_0/Dense_2/kernel'].shape == (D, MLP)
  top = {k for k in params if not k.startswith('Transformer/encoderblock')}
  assert top == {
      'embedding/kernel',
      'embedding_norm/scale',
      'Transformer/posembed_input/pos_embedding',
      'Transformer/pre_norm/scale',
      'fc_norm/scale',
      'head/kernel',
      'head/bias',
  }


def test_default_options_keep_the_published_tree():
  """ViT-B_16's parameters are the published layout's, name for name."""
  shapes = jax.eval_shape(
      lambda: vit_jax.models.get_model('ViT-B_16', num_classes=10).init(
          jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False
      )
  )['params']
  flat = {k: v.shape for k, v in _flat_shapes(shapes).items()}
  block = {
      k.split('/', 2)[2]
      for k in flat
      if k.startswith('Transformer/encoderblock_0/')
  }
  projections = {
      f'MultiHeadDotProductAttention_0/{p}/{w}'
      for p in ('query', 'key', 'value', 'out')
      for w in ('kernel', 'bias')
  }
  assert block == projections | {
      'LayerNorm_0/scale',
      'LayerNorm_0/bias',
      'LayerNorm_1/scale',
      'LayerNorm_1/bias',
      'MlpBlock_0/Dense_0/kernel',
      'MlpBlock_0/Dense_0/bias',
      'MlpBlock_0/Dense_1/kernel',
      'MlpBlock_0/Dense_1/bias',
  }
  assert {k for k in flat if 'encoderblock' not in k} == {
      'cls',
      'embedding/kernel',
      'embedding/bias',
      'Transformer/posembed_input/pos_embedding',
      'Transformer/encoder_norm/scale',
      'Transformer/encoder_norm/bias',
      'head/kernel',
      'head/bias',
  }
  assert flat['Transformer/posembed_input/pos_embedding'] == (1, 197, 768)


def _flat_shapes(tree):
  return {
      '/'.join(str(k.key) for k in path): v
      for path, v in jax.tree_util.tree_leaves_with_path(tree)
  }


# -- The same numbers in every layout and implementation. -------------------

# Every option at once that changes a block (plus a pooled class token).
EVERY_BLOCK_OPTION = dict(
    layer_scale=0.5,
    qk_norm=True,
    mlp='swiglu',
    mlp_norm=True,
    qkv_bias='qv',
    proj_bias=False,
    pre_norm=True,
    class_token=True,
    classifier='gap',
    fc_norm=True,
    posemb_class_token=False,
)
LABELS = np.eye(CLASSES, dtype=np.float32)[[0, 3]]


def _logits_and_grads(model, params, images=IMAGES, labels=LABELS):
  def loss(p):
    logits = model.apply({'params': p}, images, train=False)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, -1)), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logits), _flat(grads)


def _assert_same(result, expected, rtol=2e-5):
  (logits, grads), (ref_logits, ref_grads) = result, expected
  assert np.abs(ref_logits).max() > 0.1
  assert np.abs(logits - ref_logits).max() <= rtol * np.abs(ref_logits).max()
  assert grads.keys() == ref_grads.keys()
  largest = max(np.abs(g).max() for g in ref_grads.values())
  for path, g in grads.items():
    # A leaf whose gradient is zero in exact arithmetic holds rounding
    # noise: compared on the global scale.
    scale = max(np.abs(ref_grads[path]).max(), 1e-2 * largest)
    assert np.abs(g - ref_grads[path]).max() <= rtol * scale, path


@pytest.fixture(scope='module')
def every_option():
  model = _model(attention_impl='einsum', **EVERY_BLOCK_OPTION)
  params = _params(model)
  return params, _logits_and_grads(model, params)


@pytest.mark.slow  # Compiles a backward pass (> 5 s on a busy CPU).
@pytest.mark.parametrize(
    'layout', [dict(scan=True), dict(remat_policy='dots_saveable')]
)
def test_scan_and_remat_give_the_loops_numbers(every_option, layout):
  params, expected = every_option
  model = _model(attention_impl='einsum', **EVERY_BLOCK_OPTION, **layout)
  if layout.get('scan'):
    # vit_jax.checkpoint's conversion stacks every new block parameter.
    params = checkpoint.stack_encoder_blocks(params)
    assert params['Transformer']['encoderblock']['LayerScale_1'][
        'scale'
    ].shape == (LAYERS, D)
  logits, grads = _logits_and_grads(model, params)
  if layout.get('scan'):
    grads = _flat(
        checkpoint.unstack_encoder_blocks(checkpoint.unflatten(grads))
    )
  _assert_same((logits, grads), expected)


@pytest.mark.slow
def test_xla_attention_gives_einsums_numbers(every_option):
  params, expected = every_option
  model = _model(attention_impl='xla', **EVERY_BLOCK_OPTION)
  _assert_same(_logits_and_grads(model, params), expected)


def _use_kernel_references(monkeypatch):
  """Jax's references of the TPU kernels in their place (as
  test_attention does)."""
  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as tpu_splash,
  )
  # pylint: enable=g-import-not-at-top

  def flash(q, k, v, segment_ids, sm_scale):
    ids = tpu_flash.SegmentIds(q=segment_ids, kv=segment_ids)
    return tpu_flash.mha_reference(q, k, v, None, ids, sm_scale=sm_scale)

  def splash(q, k, v, segment_ids):
    t = q.shape[2]
    one_head = lambda q, k, v, ids: tpu_splash.attention_reference(
        np.ones((t, t), bool), q, k, v, tpu_splash.SegmentIds(q=ids, kv=ids)
    )
    per_example = jax.vmap(one_head, in_axes=(0, 0, 0, None))
    return jax.vmap(per_example)(q, k, v, segment_ids).astype(q.dtype)

  monkeypatch.setattr(vit, '_tpu_flash_attention', flash)
  monkeypatch.setattr(vit, '_tpu_splash_attention', splash)
  monkeypatch.setattr(vit, '_backend', lambda: 'tpu')


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['flash', 'splash'])
def test_tpu_kernel_paths_give_einsums_numbers(monkeypatch, every_option, impl):
  params, expected = every_option
  _use_kernel_references(monkeypatch)
  model = _model(attention_impl=impl, **EVERY_BLOCK_OPTION)
  _assert_same(_logits_and_grads(model, params), expected)


@pytest.mark.slow
def test_tensor_parallel_mesh_gives_one_devices_numbers(every_option):
  """Heads, both SwiGLU branches and the MLP's norm split over 'model' (a
  data x model = 4 x 2 mesh of the 8 CPU devices): one device's numbers."""
  params, _ = every_option
  images = random_images((8, 16, 16, 3), seed=1)
  labels = np.eye(CLASSES, dtype=np.float32)[np.arange(8) % CLASSES]
  model = _model(attention_impl='einsum', **EVERY_BLOCK_OPTION)
  expected = _logits_and_grads(model, params, images, labels)
  mesh = sharding.make_mesh((('data', 4), ('model', 2)))
  shardings = sharding.tree_shardings(
      params,
      mesh,
      rules=(('.*', 'auto'),),
      fsdp_min_size=16,
      param_axes=vit_jax.models.PARAM_AXES,
  )
  flat_specs = {
      k: s.spec
      for k, s in _flat_shapes(shardings).items()
      if 'encoderblock_0/MlpBlock_0' in k
  }
  block = 'Transformer/encoderblock_0/MlpBlock_0/'
  assert (
      flat_specs[block + 'Dense_2/kernel']
      == flat_specs[block + 'Dense_0/kernel']
  )
  assert 'model' in str(flat_specs[block + 'Dense_2/kernel'])
  assert 'model' in str(flat_specs[block + 'LayerNorm_0/scale'])

  def loss(p, x):
    logits = model.apply({'params': p}, x, train=False)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, -1)), logits

  def on_mesh(p, x):
    with sharding.activation_sharding(mesh):
      return jax.value_and_grad(loss, has_aux=True)(p, x)

  step = jax.jit(
      on_mesh, in_shardings=(shardings, sharding.batch_sharding(mesh))
  )
  (_, logits), grads = step(params, images)
  _assert_same((np.asarray(logits), _flat(grads)), expected)


# -- Refusals, one line each, before any work. -------------------------------


REFUSED = [
    (dict(mlp='geglu'), r"^mlp='geglu': use one of \('gelu', 'swiglu'\)\."),
    (dict(norm='batchnorm'), r"^norm='batchnorm': use one of"),
    (dict(qkv_bias='k'), r"^qkv_bias='k': use one of \(True, False, 'qv'\)"),
    (dict(qkv_bias=1), r'^qkv_bias=1: use one of'),
    (dict(fc_norm=True), r"^fc_norm=True: use False: it norms the 'gap' pool"),
    (dict(map_num_heads=2), r"^map_num_heads=2: use None: it sizes the 'map'"),
    (
        dict(classifier='map', map_num_heads=3),
        r'^map_num_heads=3: use a divisor of hidden_size 32\.',
    ),
    (dict(classifier='map', map_mlp_dim=0), r'^map_mlp_dim=0: use a positive'),
    (
        dict(class_token=False),
        r"^class_token=False: use True or None: classifier='token' pools it",
    ),
    (
        dict(class_token=True, classifier='unpooled'),
        r"^class_token=True: use False or None with classifier='unpooled'",
    ),
    (dict(layer_scale='small'), r"^layer_scale='small': use the initial"),
    (dict(qk_norm='yes'), r"^qk_norm='yes': use True or False\."),
]


@pytest.mark.parametrize('options,message', REFUSED)
def test_bad_options_are_refused_in_one_line(options, message):
  with pytest.raises(ValueError, match=message):
    _model(**options).init(jax.random.key(0), IMAGES, train=False)


@pytest.mark.parametrize('options,message', REFUSED[:4])
def test_bad_options_are_refused_when_the_config_is_parsed(options, message):
  message = message.replace('^', r'^config\.model\.', 1)
  with pytest.raises(ValueError, match=message):
    config_lib.section(
        {'model_name': 'testing', 'model': dict(options)}, 'model'
    )


def test_naflex_refuses_a_class_token():
  model = _model(naflex=True, classifier='gap', class_token=True)
  with pytest.raises(ValueError, match=r'naflex=True does not take .*class'):
    model.init(
        jax.random.key(0),
        vit.naflex_init_inputs((4, 4), seq_len=16),
        train=False,
    )


@pytest.mark.parametrize(
    'options', [dict(mlp='swiglu'), dict(class_token=True, classifier='gap')]
)
def test_transformers_and_timm_conversion_refuses_the_options(options):
  model = _model(**options)
  with pytest.raises(interop.ConversionError, match=f'{next(iter(options))}='):
    interop.spec_from_model(model, _params(model))


def test_load_pretrained_resizes_a_table_without_a_class_entry(tmp_path):
  """posemb_class_token=False: the stored 4x4 table (16 rows, no class
  entry) is resized to the 8x8 grid of 32 px images, every row a patch's."""
  small = _model(posemb_class_token=False)
  params = _params(small)
  path = str(tmp_path / 'small.npz')
  checkpoint.save(params, path)
  big_images = random_images((1, 32, 32, 3))
  big = _model(posemb_class_token=False)
  init = _params(big, big_images)
  loaded = checkpoint.load_pretrained(
      pretrained_path=path, init_params=init, model_config=big
  )
  table = loaded['Transformer']['posembed_input']['pos_embedding']
  assert table.shape == (1, 64, D)
  # Corner-aligned bilinear: the 8x8 grid's corners are the 4x4 grid's.
  old = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])
  old, new = old.reshape(4, 4, D), np.asarray(table).reshape(8, 8, D)
  for (i, j), (oi, oj) in {
      (0, 0): (0, 0),
      (7, 7): (3, 3),
      (0, 7): (0, 3),
  }.items():
    np.testing.assert_allclose(new[i, j], old[oi, oj], rtol=1e-5, atol=1e-6)
  big.apply({'params': loaded}, big_images, train=False)


# -- Opt-in: timm's own layers (skipped unless torch and timm import). -------


def _from_timm(state, heads):
  """Our flat parameter names from a timm VisionTransformer's or Eva's
  state dict (timm's names; Linear weights are [out, in])."""
  s = {k: v.detach().double().numpy() for k, v in state.items()}
  d = s['patch_embed.proj.weight'].shape[0]
  hd = d // heads
  p = {
      'embedding/kernel': s['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
      'head/kernel': s['head.weight'].T,
  }
  renames = {
      'patch_embed.proj.bias': 'embedding/bias',
      'cls_token': 'cls',
      'pos_embed': 'Transformer/posembed_input/pos_embedding',
      'head.bias': 'head/bias',
      'attn_pool.latent': 'MAPHead_0/probe',
  }
  norms = {
      'patch_embed.norm': 'embedding_norm',
      'norm_pre': 'Transformer/pre_norm',
      'norm': 'Transformer/encoder_norm',
      'fc_norm': 'fc_norm',
      'attn_pool.norm': 'MAPHead_0/LayerNorm_0',
  }
  for i in range(len({k.split('.')[1] for k in s if k.startswith('blocks.')})):
    t, o = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    a = o + 'MultiHeadDotProductAttention_0/'
    norms.update(
        {
            t + 'norm1': o + 'LayerNorm_0',
            t + 'norm2': o + 'LayerNorm_1',
            t + 'attn.q_norm': a + 'query_norm',
            t + 'attn.k_norm': a + 'key_norm',
            t + 'mlp.norm': o + 'MlpBlock_0/LayerNorm_0',
        }
    )
    for timm_name, ours in (
        ('ls1.gamma', 'LayerScale_0/scale'),
        ('ls2.gamma', 'LayerScale_1/scale'),
        ('gamma_1', 'LayerScale_0/scale'),
        ('gamma_2', 'LayerScale_1/scale'),
    ):
      renames[t + timm_name] = o + ours
    qkv = s[t + 'attn.qkv.weight'].reshape(3, heads, hd, d)
    for j, name in enumerate(('query', 'key', 'value')):
      p[a + name + '/kernel'] = qkv[j].transpose(2, 0, 1)
    if t + 'attn.qkv.bias' in s:
      for j, name in enumerate(('query', 'key', 'value')):
        p[a + name + '/bias'] = s[t + 'attn.qkv.bias'].reshape(3, heads, hd)[j]
    for name in ('q', 'v'):  # Eva: q_bias and v_bias, no key bias.
      if f'{t}attn.{name}_bias' in s:
        full = {'q': 'query', 'v': 'value'}[name]
        p[f'{a}{full}/bias'] = s[f'{t}attn.{name}_bias'].reshape(heads, hd)
    p[a + 'out/kernel'] = s[t + 'attn.proj.weight'].T.reshape(heads, hd, d)
    renames[t + 'attn.proj.bias'] = a + 'out/bias'
    for timm_name, ours in (
        ('fc1', 'Dense_0'),
        ('fc1_g', 'Dense_0'),
        ('fc1_x', 'Dense_2'),
        ('fc2', 'Dense_1'),
    ):
      if f'{t}mlp.{timm_name}.weight' in s:
        p[f'{o}MlpBlock_0/{ours}/kernel'] = s[f'{t}mlp.{timm_name}.weight'].T
        renames[f'{t}mlp.{timm_name}.bias'] = f'{o}MlpBlock_0/{ours}/bias'
  if 'attn_pool.q.weight' in s:
    a = 'MAPHead_0/MultiHeadDotProductAttention_0/'
    p[a + 'query/kernel'] = s['attn_pool.q.weight'].T.reshape(d, heads, hd)
    p[a + 'query/bias'] = s['attn_pool.q.bias'].reshape(heads, hd)
    kv = s['attn_pool.kv.weight'].reshape(2, heads, hd, d)
    kv_bias = s['attn_pool.kv.bias'].reshape(2, heads, hd)
    for j, name in enumerate(('key', 'value')):
      p[a + name + '/kernel'] = kv[j].transpose(2, 0, 1)
      p[a + name + '/bias'] = kv_bias[j]
    p[a + 'out/kernel'] = s['attn_pool.proj.weight'].T.reshape(heads, hd, d)
    p[a + 'out/bias'] = s['attn_pool.proj.bias']
    for j in (1, 2):
      p[f'MAPHead_0/MlpBlock_0/Dense_{j - 1}/kernel'] = s[
          f'attn_pool.mlp.fc{j}.weight'
      ].T
      p[f'MAPHead_0/MlpBlock_0/Dense_{j - 1}/bias'] = s[
          f'attn_pool.mlp.fc{j}.bias'
      ]
  for timm_name, ours in norms.items():
    if timm_name + '.weight' in s:
      p[ours + '/scale'] = s[timm_name + '.weight']
      if timm_name + '.bias' in s:
        p[ours + '/bias'] = s[timm_name + '.bias']
  for timm_name, ours in renames.items():
    if timm_name in s:
      p[ours] = s[timm_name]
  return p


def _timm_cases():
  """(timm constructor, its kwargs, our options): today's families' blocks
  at D=32, 4 heads, 2 blocks, 4x4 patches of 16 px images."""
  # pylint: disable=g-import-not-at-top
  import functools

  from timm.layers import LayerNorm
  from timm.layers import RmsNorm
  from timm.layers import SwiGLU
  from timm.models.eva import Eva
  from timm.models.vision_transformer import VisionTransformer
  # pylint: enable=g-import-not-at-top

  common = dict(
      img_size=16, patch_size=4, embed_dim=D, depth=LAYERS, num_heads=HEADS
  )
  return {
      # AIMv2 / DINOv2-like, every vision_transformer.py option at once.
      'vit_rms_swiglu_every_norm': (
          VisionTransformer,
          dict(
              common,
              mlp_ratio=MLP / D,
              init_values=0.1,
              qk_norm=True,
              scale_mlp_norm=True,
              mlp_layer=SwiGLU,
              act_layer='silu',
              norm_layer=functools.partial(RmsNorm, eps=1e-5),
              embed_norm_layer=functools.partial(RmsNorm, eps=1e-5),
              pre_norm=True,
              class_token=True,
              global_pool='avg',
              fc_norm=True,
              no_embed_class=True,
              qkv_bias=False,
              proj_bias=False,
              num_classes=CLASSES,
          ),
          dict(
              layer_scale=0.1,
              qk_norm=True,
              mlp='swiglu',
              mlp_norm=True,
              norm='rmsnorm',
              layer_norm_epsilon=1e-5,
              embed_norm=True,
              pre_norm=True,
              class_token=True,
              classifier='gap',
              fc_norm=True,
              posemb_class_token=False,
              qkv_bias=False,
              proj_bias=False,
              mlp_bias=False,  # timm's Block gives the MLP proj_bias.
          ),
      ),
      # SigLIP-like MAP pooling, exact GELU, LayerNorm.
      'vit_map': (
          VisionTransformer,
          dict(
              common,
              mlp_ratio=MLP / D,
              class_token=False,
              global_pool='map',
              qk_norm=True,
              num_classes=CLASSES,
          ),
          dict(classifier='map', gelu_approximate=False, qk_norm=True),
      ),
      # EVA-02-like: q/v biases, SwiGLU with its norm, class token + avg
      # pool + fc_norm, LayerScale.
      'eva02': (
          Eva,
          dict(
              common,
              mlp_ratio=MLP / D,
              swiglu_mlp=True,
              scale_mlp=True,
              init_values=0.1,
              use_rot_pos_emb=False,
              num_classes=CLASSES,
          ),
          dict(
              qkv_bias='qv',
              mlp='swiglu',
              mlp_norm=True,
              class_token=True,
              classifier='gap',
              fc_norm=True,
              layer_scale=0.1,
          ),
      ),
      # Perception-Encoder-like: pre_norm (no patch bias), class token and
      # MAP over every token, the MAP head's own sizes.
      'pe_core': (
          Eva,
          dict(
              common,
              mlp_ratio=MLP / D,
              use_pre_transformer_norm=True,
              global_pool='map',
              attn_pool_num_heads=2,
              attn_pool_mlp_ratio=0.75,
              norm_layer=functools.partial(LayerNorm, eps=1e-5),
              use_rot_pos_emb=False,
              num_classes=CLASSES,
          ),
          dict(
              pre_norm=True,
              class_token=True,
              classifier='map',
              map_num_heads=2,
              map_mlp_dim=24,
              layer_norm_epsilon=1e-5,
              gelu_approximate=False,
              qkv_bias='qv',  # Eva's attention has no key bias.
              mlp_bias=True,
          ),
      ),
  }


@pytest.mark.slow  # Imports torch.
@pytest.mark.parametrize(
    'case', ['vit_rms_swiglu_every_norm', 'vit_map', 'eva02', 'pe_core']
)
def test_timm_computes_the_same_logits(case):
  torch = pytest.importorskip('torch')
  pytest.importorskip('timm')
  constructor, timm_kwargs, options = _timm_cases()[case]
  torch.manual_seed(0)
  timm_model = constructor(**timm_kwargs).eval().double()
  with torch.no_grad():
    for tensor in timm_model.state_dict().values():
      if tensor.dtype.is_floating_point:  # Random weights, the buffers too.
        tensor.copy_(torch.randn_like(tensor) * 0.2)
    expected = timm_model(
        torch.from_numpy(IMAGES.transpose(0, 3, 1, 2)).double()
    ).numpy()
  params = _from_timm(timm_model.state_dict(), HEADS)
  if case == 'pe_core':  # The MAP head's own head count.
    params = _from_timm_map_heads(timm_model.state_dict(), params, 2)
  model = _model(**options)
  want = _flat(_params(model))
  assert set(params) == set(want)
  for k, v in params.items():
    assert v.shape == want[k].shape, k
  logits = model.apply(
      {'params': checkpoint.unflatten(params)}, IMAGES, train=False
  )
  difference = float(np.abs(np.asarray(logits) - expected).max())
  print(f'{case}: max |ours - timm| = {difference:.2e}')
  assert np.abs(expected).max() > 0.1
  assert difference < 1e-4


def _from_timm_map_heads(state, params, heads):
  """The MAP head's attention re-read with its own head count."""
  s = {k: v.detach().double().numpy() for k, v in state.items()}
  d = s['patch_embed.proj.weight'].shape[0]
  hd = d // heads
  a = 'MAPHead_0/MultiHeadDotProductAttention_0/'
  params[a + 'query/kernel'] = s['attn_pool.q.weight'].T.reshape(d, heads, hd)
  params[a + 'query/bias'] = s['attn_pool.q.bias'].reshape(heads, hd)
  kv = s['attn_pool.kv.weight'].reshape(2, heads, hd, d)
  kv_bias = s['attn_pool.kv.bias'].reshape(2, heads, hd)
  for j, name in enumerate(('key', 'value')):
    params[a + name + '/kernel'] = kv[j].transpose(2, 0, 1)
    params[a + name + '/bias'] = kv_bias[j]
  params[a + 'out/kernel'] = s['attn_pool.proj.weight'].T.reshape(heads, hd, d)
  return params


def test_flops_count_the_options():
  """SwiGLU's second input layer, a class token that is not pooled and the
  MAP head's own MLP width, in `vit_jax.flops`' closed form."""
  tokens, layers, hidden, mlp = 1 + 14 * 14, 12, 192, 768
  parts = flops.forward_flops_breakdown(
      'ViT-Ti_16',
      224,
      num_classes=0,
      mlp='swiglu',
      class_token=True,
      classifier='map',
      map_mlp_dim=100,
  )
  assert parts['mlp'] == layers * 3 * 2 * tokens * hidden * mlp
  assert parts['attention_scores'] == layers * 2 * tokens * hidden * tokens
  map_mlp = 2 * 2 * hidden * 100
  assert parts['map_head'] == (
      2 * 2 * hidden * hidden
      + 2 * 2 * tokens * hidden * hidden
      + 2 * hidden * tokens * 2
      + map_mlp
  )


@pytest.mark.slow  # Draws the figures.
def test_analysis_reads_a_class_token_without_a_position(tmp_path):
  """A class token with 'gap' pooling and no table entry: the 16 rows of
  the table are the 4x4 grid's own."""
  # pylint: disable-next=g-import-not-at-top
  from vit_jax import analysis

  model = _model(class_token=True, classifier='gap', posemb_class_token=False)
  params = _params(model)
  results = analysis.analyze(model, params, IMAGES, str(tmp_path))
  assert results['grid'] == [GRID, GRID]
  # Attention distances over the 16 patches, the class token left out.
  assert np.array(results['mean_attention_distance_px']).shape == (
      LAYERS,
      HEADS,
  )
