"""Known-answer tests of the numerics the published ViT and Mixer models fix.

The original google-research vision_transformer code uses flax defaults:
`nn.LayerNorm()` (epsilon 1e-6), `nn.gelu` (approximate=True: the tanh
approximation, not erf) and `nn.MultiHeadDotProductAttention` (logits scaled
by 1/sqrt(head_dim)). Published checkpoints were trained with exactly these,
so each is pinned here against float64 NumPy (tests/numpy_reference.py, or
the closed-form formulas), on inputs chosen so that the alternative (epsilon
1e-5, erf GELU, 1/sqrt(hidden) or no scale) is off by far more than the
tolerance:

* LayerNorm on tokens with variance ~1e-6, where epsilon is not negligible:
  1e-5 instead of 1e-6 scales the output by sqrt(2e-6 / 1.1e-5) ~ 0.43.
* GELU on pre-activations spanning [-5, 5], where tanh and erf differ by up
  to 4.7e-4 (tolerance 2e-6).
* Attention with head_dim 4 and hidden 8, so 1/sqrt(head_dim) = 0.5 differs
  from 1/sqrt(hidden) = 0.35 and from 1.
"""

import flax
import jax
import numpy as np
import pytest
from scipy import special

import numpy_reference
from vit_jax.models import mixer
from vit_jax.models import vit

_EPS = 1e-6  # flax.linen.LayerNorm's default, used by the published models.
_ATOL = 1e-5


def _random_params(module, x, seed=0, tiny=(), **kwargs):
  """Module parameters as float32 random numbers, plus their flat dict.

  LayerNorm scales are 1 + N(0, 0.1^2); other leaves N(0, 0.3^2). Leaves whose
  path contains an entry of `tiny` are multiplied by 1e-3 (keeps the residual
  stream's variance ~1e-6 after that layer).
  """
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, **kwargs))[
      'params'
  ]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes), sep='/')
  rng = np.random.default_rng(seed)
  out = {}
  for key, leaf in sorted(flat.items()):
    value = rng.normal(size=leaf.shape)
    if key.endswith('scale'):
      value = 1 + 0.1 * value
    else:
      value = 0.3 * value
    if any(t in key for t in tiny):
      value = 1e-3 * value
    out[key] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(out, sep='/'), out


def _tiny_variance_tokens(shape, seed=1):
  """Tokens with per-token variance ~1e-6 (and small means)."""
  return (1e-3 * np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32
  )


def _apply(module, params, x):
  return np.asarray(
      jax.jit(lambda p, x: module.apply({'params': p}, x))(params, x)
  )


def _apply_capturing(module, params, x, **kwargs):
  """Output and every submodule's output (`capture_intermediates`)."""
  out, state = jax.jit(
      lambda p, x: module.apply(
          {'params': p},
          x,
          capture_intermediates=True,
          mutable=['intermediates'],
          **kwargs,
      )
  )(params, x)
  return out, state['intermediates']


def _assert_layer_norm(actual, x, p, prefix):
  """`actual` is float64 LayerNorm `prefix` of `x` with epsilon 1e-6, on an
  input where epsilon 1e-5 would differ by far more than the tolerance.

  Returns:
    The expected (numpy) output.
  """
  expected = numpy_reference.layer_norm(x, p, prefix, eps=_EPS)
  np.testing.assert_allclose(actual, expected, atol=_ATOL, rtol=0)
  with_1e5 = numpy_reference.layer_norm(x, p, prefix, eps=1e-5)
  assert np.abs(expected - with_1e5).max() > 1000 * _ATOL
  return expected


def _f64(flat):
  return {k: np.asarray(v, np.float64) for k, v in flat.items()}


def test_encoder_block_layer_norms_use_epsilon_1e6():
  """Both LayerNorms of an encoder block equal float64 LN with eps 1e-6."""
  block = vit.Encoder1DBlock(
      mlp_dim=16, num_heads=2, dropout_rate=0.0, attention_dropout_rate=0.0
  )
  x = _tiny_variance_tokens((2, 5, 8))
  params, flat = _random_params(
      block, x, tiny=('MultiHeadDotProductAttention_0/out',)
  )
  _, inter = _apply_capturing(block, params, x)
  p = _f64(flat)
  x64 = x.astype(np.float64)
  ln0 = _assert_layer_norm(
      inter['LayerNorm_0']['__call__'][0], x64, p, 'LayerNorm_0'
  )
  # LayerNorm_1 sees x + attention (tiny output projection: variance ~1e-6).
  x1 = x64 + numpy_reference.attention(
      ln0, p, 'MultiHeadDotProductAttention_0', num_heads=2
  )
  _assert_layer_norm(inter['LayerNorm_1']['__call__'][0], x1, p, 'LayerNorm_1')


def test_encoder_final_norm_uses_epsilon_1e6():
  """`Transformer/encoder_norm` equals float64 LayerNorm with eps 1e-6."""
  encoder = vit.Encoder(
      num_layers=0, mlp_dim=16, num_heads=2, add_position_embedding=False
  )
  x = _tiny_variance_tokens((2, 5, 8), seed=2)
  params, flat = _random_params(encoder, x)
  out = _apply(encoder, params, x)
  p = _f64(flat)
  x64 = x.astype(np.float64)
  _assert_layer_norm(out, x64, p, 'encoder_norm')


def test_mixer_layer_norms_use_epsilon_1e6():
  """Mixer block and pre-head LayerNorms equal float64 LN with eps 1e-6."""
  block = mixer.MixerBlock(tokens_mlp_dim=6, channels_mlp_dim=12)
  x = _tiny_variance_tokens((2, 4, 8), seed=3)
  params, flat = _random_params(block, x, tiny=('token_mixing/Dense_1',))
  _, inter = _apply_capturing(block, params, x)
  p = _f64(flat)
  x64 = x.astype(np.float64)
  ln0 = _assert_layer_norm(
      inter['LayerNorm_0']['__call__'][0], x64, p, 'LayerNorm_0'
  )
  y = numpy_reference.dense(
      numpy_reference.gelu(
          numpy_reference.dense(
              ln0.transpose(0, 2, 1), p, 'token_mixing/Dense_0'
          )
      ),
      p,
      'token_mixing/Dense_1',
  )
  x1 = x64 + y.transpose(0, 2, 1)
  _assert_layer_norm(inter['LayerNorm_1']['__call__'][0], x1, p, 'LayerNorm_1')

  # pre_head_layer_norm, on a patch embedding made tiny by a tiny stem.
  model = mixer.MlpMixer(
      num_classes=None,
      patches={'size': (2, 2)},
      num_blocks=0,
      hidden_dim=8,
      tokens_mlp_dim=4,
      channels_mlp_dim=8,
  )
  images = (
      np.random.default_rng(4).uniform(-1, 1, (1, 4, 4, 3)).astype(np.float32)
  )
  params, flat = _random_params(model, images, tiny=('stem',), train=False)
  _, inter = _apply_capturing(model, params, images, train=False)
  p = _f64(flat)
  w = p['stem/kernel']
  tokens = numpy_reference.conv2d(images.astype(np.float64), w, 2, 'VALID')
  tokens = (tokens + p['stem/bias']).reshape(1, 4, 8)
  _assert_layer_norm(
      inter['pre_head_layer_norm']['__call__'][0],
      tokens,
      p,
      'pre_head_layer_norm',
  )


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _gelu_erf(x):
  return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def _identity_mlp_params(width):
  eye = np.eye(width, dtype=np.float32)
  zeros = np.zeros(width, np.float32)
  return {
      'Dense_0': {'kernel': eye, 'bias': zeros},
      'Dense_1': {'kernel': eye, 'bias': zeros},
  }


@pytest.mark.parametrize('family', ['vit', 'mixer'])
def test_mlp_gelu_is_the_tanh_approximation(family):
  """With identity Dense layers the MLP returns GELU_tanh(x), not GELU_erf."""
  x = np.linspace(-5, 5, 2 * 3 * 16).reshape(2, 3, 16)
  if family == 'vit':
    mlp = vit.MlpBlock(mlp_dim=16, dropout_rate=0.0)
  else:
    mlp = mixer._MixingMlp(mlp_dim=16)  # pylint: disable=protected-access
  out = np.asarray(
      mlp.apply({'params': _identity_mlp_params(16)}, x.astype(np.float32))
  )
  np.testing.assert_allclose(out, _gelu_tanh(x), atol=2e-6, rtol=0)
  np.testing.assert_allclose(
      numpy_reference.gelu(x), _gelu_tanh(x), atol=1e-15, rtol=0
  )
  assert np.abs(_gelu_tanh(x) - _gelu_erf(x)).max() > 100 * 2e-6


def _numpy_attention(x, p, prefix, scale):
  """Multi-head self-attention in float64 with an explicit logit scale."""
  proj = lambda n: np.einsum('ntd,dhk->nhtk', x, p[f'{prefix}/{n}/kernel']) + (
      p[f'{prefix}/{n}/bias'][None, :, None]
  )
  q, k, v = proj('query'), proj('key'), proj('value')
  logits = np.einsum('nhqk,nhtk->nhqt', q, k) * scale
  weights = special.softmax(logits, axis=-1)
  out = np.einsum('nhqt,nhtk->nhqk', weights, v)
  return (
      np.einsum('nhqk,hkd->nqd', out, p[f'{prefix}/out/kernel'])
      + p[f'{prefix}/out/bias']
  )


def test_attention_scale_is_inverse_sqrt_head_dim():
  """Logits are q.k / sqrt(head_dim): head_dim 4, not hidden 8, not 1."""
  hidden, heads = 8, 2
  attention = vit.MultiHeadDotProductAttention(num_heads=heads)
  x = np.random.default_rng(5).normal(size=(2, 6, hidden)).astype(np.float32)
  params, flat = _random_params(attention, x, seed=6)
  out = _apply(attention, params, x)
  p = {f'attn/{k}': v for k, v in _f64(flat).items()}
  x64 = x.astype(np.float64)
  expected = _numpy_attention(x64, p, 'attn', (hidden // heads) ** -0.5)
  np.testing.assert_allclose(out, expected, atol=_ATOL, rtol=0)
  np.testing.assert_allclose(
      numpy_reference.attention(x64, p, 'attn', heads), expected, atol=1e-12
  )
  for wrong in (hidden**-0.5, 1.0):
    assert np.abs(_numpy_attention(x64, p, 'attn', wrong) - expected).max() > (
        100 * _ATOL
    )


def test_encoder_block_matches_float64_numpy_reference():
  """A whole pre-norm block (LN eps, attention scale, tanh GELU) in float64."""
  block = vit.Encoder1DBlock(
      mlp_dim=16, num_heads=2, dropout_rate=0.0, attention_dropout_rate=0.0
  )
  x = _tiny_variance_tokens((2, 5, 8), seed=7)
  params, flat = _random_params(
      block, x, seed=8, tiny=('MultiHeadDotProductAttention_0/out',)
  )
  out, _ = jax.jit(lambda p, x: block.apply({'params': p}, x))(params, x)
  p = _f64(flat)
  x64 = x.astype(np.float64)
  y = numpy_reference.layer_norm(x64, p, 'LayerNorm_0', eps=_EPS)
  x1 = x64 + numpy_reference.attention(
      y, p, 'MultiHeadDotProductAttention_0', num_heads=2
  )
  y = numpy_reference.layer_norm(x1, p, 'LayerNorm_1', eps=_EPS)
  y = numpy_reference.dense(
      numpy_reference.gelu(numpy_reference.dense(y, p, 'MlpBlock_0/Dense_0')),
      p,
      'MlpBlock_0/Dense_1',
  )
  np.testing.assert_allclose(out, x1 + y, atol=_ATOL, rtol=0)
  assert np.abs(y).max() > 0.1  # The MLP branch contributes.
