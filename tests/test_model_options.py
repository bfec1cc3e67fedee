"""The ViT options of today's lineage: position-embedding kinds, the MAP head,
registers, stochastic depth, headless models, GELU / LayerNorm variants and
the So400m size.

Expected values are computed here from their definitions (numpy tables,
hand-written MAP pooling, closed-form parameter counts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_params
from helpers import random_images
from helpers import randomize
from helpers import tiny_model
from vit_jax import checkpoint
import vit_jax.models
from vit_jax.models import vit


def _apply(model, params, x, **kwargs):
  return model.apply({'params': params}, x, train=False, **kwargs)


def _vit_param_count(
    hidden,
    mlp,
    layers,
    tokens,
    classes,
    *,
    cls=True,
    patch=16,
    map_head=False,
    registers=0,
):
  """Parameters of a plain ViT, counted from its definition."""
  d = hidden
  block = 2 * 2 * d + (4 * d * d + 4 * d) + (2 * d * mlp + mlp + d)
  count = patch * patch * 3 * d + d + tokens * d + layers * block + 2 * d
  count += d if cls else 0
  count += registers * d
  if map_head:
    count += d + (4 * d * d + 4 * d) + 2 * d + (2 * d * mlp + mlp + d)
  return count + (d * classes + classes if classes else 0)


@pytest.mark.parametrize(
    'name,hidden,mlp,layers',
    [('ViT-B_16', 768, 3072, 12), ('ViT-L_16', 1024, 4096, 24)],
)
def test_the_count_formula_agrees_with_the_published_counts(
    name, hidden, mlp, layers
):
  # The formula itself is checked on counts the original code gives
  # (tests/test_models.py EXPECTED_PARAM_COUNTS).
  from test_models import EXPECTED_PARAM_COUNTS  # pylint: disable=g-import-not-at-top

  assert _vit_param_count(hidden, mlp, layers, 197, 1000) == (
      EXPECTED_PARAM_COUNTS[name]
  )


def _count(model, size):
  params = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False
      )
  )
  return sum(
      int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params['params'])
  )


@pytest.mark.slow
def test_so400m_size_and_parameter_count():
  model = vit_jax.models.get_model('ViT-So400m_14', num_classes=1000)
  assert model.hidden_size == 1152 and model.classifier == 'map'
  assert model.transformer['num_layers'] == 27
  assert model.transformer['mlp_dim'] == 4304
  assert model.transformer['num_heads'] == 16
  # 224 px / 14 = 16x16 patches, no class token (MAP pooling).
  expected = _vit_param_count(
      1152, 4304, 27, 256, 1000, cls=False, patch=14, map_head=True
  )
  assert expected == 428_833_704
  assert _count(model, 224) == expected
  # SigLIP's image tower: no head (the pooled embedding is the output).
  tower = vit_jax.models.get_model('ViT-So400m_14', num_classes=0)
  assert _count(tower, 224) == expected - (1152 * 1000 + 1000)


@pytest.mark.parametrize(
    'overrides,extra',
    [
        (dict(classifier='map'), 'map'),
        (dict(posemb='learn2d'), 'learn2d'),
        (dict(posemb='sincos2d'), 'sincos2d'),
        (dict(posemb='none'), 'none'),
        (dict(num_registers=3), 'registers'),
    ],
)
def test_parameter_counts_of_the_options(overrides, extra):
  model = vit_jax.models.get_model('ViT-B_16', num_classes=10, **overrides)
  d, mlp, grid = 768, 3072, 14 * 14
  base = _vit_param_count(d, mlp, 12, grid + 1, 10)
  expected = {
      # No class token, and its position slot goes too; a MAP head instead.
      'map': _vit_param_count(d, mlp, 12, grid, 10, cls=False, map_head=True),
      'learn2d': base - (grid + 1) * d + (14 + 14) * d // 2,
      'sincos2d': base - (grid + 1) * d,
      'none': base - (grid + 1) * d,
      'registers': base + 3 * d,
  }[extra]
  assert _count(model, 224) == expected


@pytest.mark.slow
@pytest.mark.parametrize(
    'overrides,shape',
    [
        (dict(classifier='map'), (2, 5)),
        (dict(classifier='map', num_classes=0), (2, 12)),
        (dict(classifier='gap', num_classes=0), (2, 12)),
        (dict(num_registers=2), (2, 5)),
        (dict(num_registers=2, classifier='unpooled'), (2, 16, 5)),
        (dict(posemb='learn2d'), (2, 5)),
        (dict(posemb='sincos2d'), (2, 5)),
        (dict(posemb='none', classifier='gap'), (2, 5)),
        (dict(stochastic_depth=0.2), (2, 5)),
    ],
)
def test_output_shapes_of_the_options(overrides, shape):
  # Width 12: the sine-cosine table needs a multiple of 4.
  overrides = {'num_classes': 5, 'hidden_size': 12, **overrides}
  model, size = tiny_model('vit', **overrides)
  x = random_images((2, size, size, 3))
  params = init_params(model, x)
  assert _apply(model, params, x).shape == shape
  tokens = _apply(model, params, x, output='tokens')
  has_cls = model.classifier in ('token', 'token_unpooled')
  assert tokens.shape == (2, 16 + has_cls, 12)  # Registers never leave.


def _sincos_reference(h, w, width):
  """big_vision's table, entry by entry: [sin x w, cos x w, sin y w, cos y w]
  with w_k = 10000 ** -(k / (width / 4 - 1))."""
  quarter = width // 4
  omega = np.array([10000.0 ** -(k / (quarter - 1)) for k in range(quarter)])
  rows = []
  for y in range(h):
    for x in range(w):
      rows.append(
          np.concatenate(
              [
                  np.sin(x * omega),
                  np.cos(x * omega),
                  np.sin(y * omega),
                  np.cos(y * omega),
              ]
          )
      )
  return np.stack(rows)


def test_sincos2d_table_is_big_visions():
  table = vit.posemb_sincos_2d(2, 3, 8)
  assert table.shape == (1, 6, 8)
  np.testing.assert_allclose(table[0], _sincos_reference(2, 3, 8), rtol=1e-12)
  # Row-major: token 4 is row 1, column 1; width 8: omega = [1, 1e-4].
  np.testing.assert_allclose(
      table[0, 4],
      [
          np.sin(1),
          np.sin(1e-4),
          np.cos(1),
          np.cos(1e-4),
          np.sin(1),
          np.sin(1e-4),
          np.cos(1),
          np.cos(1e-4),
      ],
  )
  with pytest.raises(ValueError, match='divisible by 4'):
    vit.posemb_sincos_2d(2, 2, 10)


def _encoder_input(model, params, x):
  """The tokens `model`'s encoder receives (its first argument)."""
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.Encoder) and (
        context.method_name == '__call__'
    ):
      seen.append(args[0])
    return next_fun(*args, **kwargs)

  with vit_jax.models.vit.nn.intercept_methods(interceptor):
    _apply(model, params, x)
  return np.asarray(seen[0])


@pytest.mark.parametrize('posemb', ['sincos2d', 'learn2d'])
def test_2d_embeddings_are_added_to_the_patches_only(posemb):
  # Against the same model without position embeddings: the difference is
  # the table on the 4x4 patches, and nothing on the class token.
  tiny = dict(hidden_size=8, transformer={'num_heads': 2})
  model, size = tiny_model('vit', posemb=posemb, **tiny)
  plain, _ = tiny_model('vit', posemb='none', **tiny)
  x = random_images((2, size, size, 3))
  params = randomize(init_params(model, x))
  plain_params = {k: v for k, v in params.items() if k != 'posembed_2d'}
  added = _encoder_input(model, params, x) - _encoder_input(
      plain, plain_params, x
  )
  if posemb == 'sincos2d':
    expected = _sincos_reference(4, 4, 8)
  else:
    rows = np.asarray(params['posembed_2d']['row'])
    cols = np.asarray(params['posembed_2d']['column'])
    assert rows.shape == (4, 4) and cols.shape == (4, 4)  # h or w, D/2.
    expected = np.stack(
        [np.concatenate([rows[i], cols[j]]) for i in range(4) for j in range(4)]
    )
  np.testing.assert_allclose(added[:, 0], 0, atol=1e-6)  # Class token.
  np.testing.assert_allclose(
      added[:, 1:], np.broadcast_to(expected, (2, 16, 8)), atol=1e-5
  )


def test_drop_path_rates_rise_linearly_over_depth():
  encoder = vit.Encoder(
      num_layers=5, mlp_dim=4, num_heads=1, stochastic_depth=0.4
  )
  np.testing.assert_allclose(
      encoder.drop_path_rates(), [0.0, 0.1, 0.2, 0.3, 0.4]
  )


def test_drop_path_drops_whole_examples_and_rescales_the_rest():
  x = jnp.ones((4000, 2, 3))
  block = vit.Encoder1DBlock(mlp_dim=4, num_heads=1, deterministic=False)
  out = block.apply(
      {},
      x,
      0.25,
      method=lambda m, x, r: m._drop_path(x, r),  # pylint: disable=protected-access
      rngs={'dropout': jax.random.key(3)},
  )
  out = np.asarray(out)
  dropped = np.all(out == 0, axis=(1, 2))
  assert abs(dropped.mean() - 0.25) < 0.03  # Binomial sd 0.007.
  np.testing.assert_allclose(out[~dropped], 1 / 0.75, rtol=1e-6)
  evaluation = vit.Encoder1DBlock(mlp_dim=4, num_heads=1, deterministic=True)
  np.testing.assert_array_equal(
      evaluation.apply({}, x, 0.25, method=lambda m, x, r: m._drop_path(x, r)),
      x,
  )  # pylint: disable=protected-access


@pytest.mark.slow
@pytest.mark.parametrize('scan', [False, True])
def test_stochastic_depth_skips_each_block_at_its_rate(scan):
  # Rates 0, 0.4, 0.8 over 3 blocks; a block whose two branches are both
  # dropped (probability rate**2, independent masks) outputs its input
  # exactly. Dropout off, so nothing else perturbs the tokens.
  model, size = tiny_model(
      'vit',
      scan=scan,
      stochastic_depth=0.8,
      transformer={
          'num_layers': 3,
          'dropout_rate': 0.0,
          'attention_dropout_rate': 0.0,
      },
  )
  x = random_images((600, size, size, 3))
  params = randomize(init_params(model, x[:1]))
  if scan:
    params = checkpoint.stack_encoder_blocks(params)
  _, state = model.apply(
      {'params': params},
      x,
      train=True,
      rngs={'dropout': jax.random.key(0)},
      mutable=['intermediates'],
  )
  blocks = state['intermediates']['Transformer']
  outputs = (
      blocks['encoderblock']['block_output'][0]
      if scan
      else [blocks[f'encoderblock_{i}']['block_output'][0] for i in range(3)]
  )
  outputs = [np.asarray(o) for o in outputs]
  for layer, rate in ((1, 0.4), (2, 0.8)):
    skipped = np.all(outputs[layer] == outputs[layer - 1], axis=(1, 2))
    assert abs(skipped.mean() - rate**2) < 0.07, (layer, skipped.mean())
  # At evaluation every block runs, and scan equals the loop.
  loop, _ = tiny_model(
      'vit', stochastic_depth=0.8, transformer={'num_layers': 3}
  )
  loop_params = checkpoint.unstack_encoder_blocks(params)
  np.testing.assert_allclose(
      _apply(model, params, x[:4]),
      _apply(loop, loop_params, x[:4]),
      atol=1e-5,
      rtol=1e-5,
  )


def test_registers_join_attention_but_no_pooling():
  model, size = tiny_model('vit', classifier='gap', num_registers=3)
  x = random_images((2, size, size, 3))
  params = randomize(init_params(model, x))
  assert params['registers'].shape == (1, 3, 10)
  tokens = _apply(model, params, x, output='tokens')
  _, state = model.apply(
      {'params': params}, x, train=False, mutable=['intermediates']
  )
  pooled = state['intermediates']['pre_logits'][0]
  np.testing.assert_allclose(pooled, np.asarray(tokens).mean(axis=1), atol=1e-6)
  # They take part in attention: other registers change the patch tokens.
  # (LayerNorm would cancel a constant shift: move them at random.)
  moved = dict(
      params,
      registers=params['registers']
      + random_images(params['registers'].shape, seed=9),
  )
  assert not np.allclose(
      _apply(model, moved, x, output='tokens'), tokens, atol=1e-3
  )


@pytest.mark.slow
def test_exact_gelu_and_layer_norm_epsilon_reach_every_layer():
  import scipy.special  # pylint: disable=g-import-not-at-top

  mlp = vit.MlpBlock(mlp_dim=6, gelu_approximate=False)
  x = random_images((3, 5))
  params = mlp.init(jax.random.key(0), x)['params']
  h = x @ params['Dense_0']['kernel'] + params['Dense_0']['bias']
  h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
  np.testing.assert_allclose(
      mlp.apply({'params': params}, x),
      h @ params['Dense_1']['kernel'] + params['Dense_1']['bias'],
      atol=1e-6,
  )
  model, size = tiny_model(
      'vit', classifier='map', layer_norm_epsilon=1e-12, gelu_approximate=False
  )
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, vit.nn.LayerNorm):
      seen.append(('norm', module.epsilon))
    if isinstance(module, vit.MlpBlock):
      seen.append(('mlp', module.gelu_approximate))
    return next_fun(*args, **kwargs)

  with vit.nn.intercept_methods(interceptor):
    init_params(model, random_images((1, size, size, 3)))
  # Two per block, the encoder's, the MAP head's; an MLP per block + MAP.
  assert sorted(seen).count(('norm', 1e-12)) == 2 * 2 + 1 + 1
  assert sorted(seen).count(('mlp', False)) == 2 + 1
  assert len(seen) == 9


@pytest.mark.slow
@pytest.mark.parametrize(
    'overrides',
    [
        dict(classifier='map'),
        dict(posemb='learn2d'),
        dict(posemb='sincos2d'),
        dict(num_registers=2, classifier='gap'),
        dict(stochastic_depth=0.3),
        dict(layer_norm_epsilon=1e-12, gelu_approximate=False),
    ],
)
def test_scan_gives_the_loops_logits_with_the_options(overrides):
  tiny = dict(
      hidden_size=12,
      transformer={'num_layers': 3, 'num_heads': 2, 'mlp_dim': 16},
  )
  loop, size = tiny_model('vit', **tiny, **overrides)
  scanned, _ = tiny_model('vit', scan=True, **tiny, **overrides)
  x = random_images((2, size, size, 3))
  params = randomize(init_params(loop, x))
  np.testing.assert_allclose(
      _apply(scanned, checkpoint.stack_encoder_blocks(params), x),
      _apply(loop, params, x),
      atol=1e-5,
      rtol=1e-5,
  )
