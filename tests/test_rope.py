"""Rotary position embeddings (`vit_jax.models.rope`) on the ViT.

The angles of each convention and the rotation are compared with NumPy
references written here from the formulas (loops over patches, pairs and
heads); the module rotates the patch tokens only, in both layouts the
attention uses. A tiny ViT with RoPE gives einsum's logits and gradients in
every attention implementation, with scan, remat, on a data x model mesh,
and in bfloat16; the grid follows the input with `dynamic_image_size`.
Bad settings are refused in one line, at config parse too. Opt-in: the
tables and rotations equal timm's own functions (skipped without torch and
timm).
"""

from flax import traverse_util
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
import numpy_reference
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import sharding
import vit_jax.models
from vit_jax.models import rope
from vit_jax.models import vit

# ---------------------------------------------------------------------------
# NumPy references, from the formulas (float64, loops).
# ---------------------------------------------------------------------------


AXIAL_CASES = {
    # name: (rope_options, reference's arguments)
    'eva02': (rope.EVA02, ('eva', 10000.0, 0.0, 'ij', (16, 16))),
    'pe': (
        {**rope.PE, 'ref_grid': (14, 14)},
        ('eva', 10000.0, 1.0, 'xy', (14, 14)),
    ),
    'eva_plain': ({}, ('eva', 10000.0, 0.0, 'ij', None)),
    'dinov3': (rope.DINOV3, ('dinov3', 100.0, 0.0, 'ij', None)),
    'dinov3_offset_xy': (
        {**rope.DINOV3, 'grid_offset': 0.25, 'grid_indexing': 'xy'},
        ('dinov3', 100.0, 0.25, 'xy', None),
    ),
}


@pytest.mark.parametrize('case', list(AXIAL_CASES))
def test_axial_angles_follow_the_formulas(case):
  options, (convention, temperature, offset, indexing, ref) = AXIAL_CASES[case]
  grid, head_dim = (5, 7), 16
  resolved = rope.resolve_options('axial', options)
  angles = rope.axial_angles(grid, head_dim, resolved)
  expected = numpy_reference.rope_angles(
      grid, head_dim, convention, temperature, offset, indexing, ref
  )
  assert angles.dtype == np.float32 and angles.shape == expected.shape
  np.testing.assert_allclose(angles, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('rotate_half', [False, True])
def test_rotation_is_a_2x2_rotation_of_each_pair(rotate_half):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 6, 8)).astype(np.float32)
  angles = rng.uniform(-20, 20, size=(3, 6, 4)).astype(np.float32)
  out = rope.rotate(jnp.asarray(x), jnp.asarray(angles), rotate_half)
  np.testing.assert_allclose(
      out,
      numpy_reference.rope_rotation(x, angles, rotate_half),
      rtol=1e-5,
      atol=1e-5,
  )


def _module_case(kind, options, token_axis, start=1, registers=2):
  """Rope's q and k for [B, H, T, D] or [B, T, H, D], with a class token
  before (start=1) and registers after the 3x4 patches."""
  grid, heads, head_dim = (3, 4), 2, 8
  tokens = start + grid[0] * grid[1] + registers
  shape = (2, heads, tokens, head_dim)
  if token_axis == 1:
    shape = (2, tokens, heads, head_dim)
  rng = np.random.default_rng(1)
  q, k = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
  module = rope.Rope(
      kind=kind,
      options=rope.canonical_options(options),
      grid=grid,
      num_heads=heads,
      head_dim=head_dim,
      start=start,
  )
  variables = module.init(jax.random.key(0), q, k, token_axis)
  rotated = module.apply(variables, q, k, token_axis)
  return (q, k), rotated, variables, grid


@pytest.mark.parametrize('token_axis', [1, 2])
@pytest.mark.parametrize('case', ['eva02', 'dinov3'])
def test_axial_module_rotates_the_patch_tokens_only(case, token_axis):
  options, (convention, temperature, offset, indexing, ref) = AXIAL_CASES[case]
  start, registers = 1, 2
  (q, k), (rq, rk), _, grid = _module_case(
      'axial', options, token_axis, start, registers
  )
  angles = numpy_reference.rope_angles(
      grid, 8, convention, temperature, offset, indexing, ref
  )
  n = grid[0] * grid[1]
  patches = slice(start, start + n)
  for x, rx in ((q, rq), (k, rk)):
    x, rx = np.asarray(x), np.asarray(rx)
    if token_axis == 1:  # Compare heads-major.
      x, rx = x.transpose(0, 2, 1, 3), rx.transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(rx[:, :, :start], x[:, :, :start])
    np.testing.assert_array_equal(rx[:, :, start + n :], x[:, :, start + n :])
    np.testing.assert_allclose(
        rx[:, :, patches],
        numpy_reference.rope_rotation(
            x[:, :, patches], angles, options['rotate_half']
        ),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize('token_axis', [1, 2])
def test_mixed_module_turns_each_head_by_its_learned_frequencies(token_axis):
  start, registers = 0, 1
  (q, _), (rq, _), variables, (h, w) = _module_case(
      'mixed', rope.MIXED, token_axis, start, registers
  )
  freqs = np.asarray(variables['params']['freqs'], np.float64)
  assert freqs.shape == (2, 2, 4)  # [coordinate, heads, head_dim // 2]
  angles = np.zeros((2, h * w, 4))
  for head in range(2):
    for r in range(h):
      for c in range(w):
        # 'xy': the first frequencies multiply the column.
        angles[head, r * w + c] = c * freqs[0, head] + r * freqs[1, head]
  q, rq = np.asarray(q), np.asarray(rq)
  if token_axis == 1:
    q, rq = q.transpose(0, 2, 1, 3), rq.transpose(0, 2, 1, 3)
  np.testing.assert_allclose(
      rq[:, :, : h * w],
      numpy_reference.rope_rotation(q[:, :, : h * w], angles, False),
      rtol=1e-5,
      atol=1e-5,
  )
  np.testing.assert_array_equal(rq[:, :, h * w :], q[:, :, h * w :])


def test_mixed_frequencies_start_as_timms_random_rotations():
  """Per head: magnitudes temperature ** (-4i / head_dim), the second half
  of the pairs at right angles to the first, a random direction per head."""
  heads, head_dim, temperature = 5, 16, 10.0
  freqs = np.asarray(
      rope.init_mixed_freqs(jax.random.key(3), heads, head_dim, temperature),
      np.float64,
  )
  assert freqs.shape == (2, heads, head_dim // 2)
  n = head_dim // 4
  magnitudes = temperature ** (-4 * np.arange(n) / head_dim)
  length = np.hypot(freqs[0], freqs[1])
  np.testing.assert_allclose(
      length[:, :n], magnitudes[None].repeat(heads, 0), rtol=1e-6
  )
  np.testing.assert_allclose(length[:, n:], length[:, :n], rtol=1e-6)
  dot = freqs[0, :, :n] * freqs[0, :, n:] + freqs[1, :, :n] * freqs[1, :, n:]
  np.testing.assert_allclose(dot, 0.0, atol=1e-6)
  # All pairs of a head share its direction; heads differ.
  direction = np.arctan2(freqs[1, :, 0], freqs[0, :, 0])
  np.testing.assert_allclose(
      np.arctan2(freqs[1, :, :n], freqs[0, :, :n]),
      direction[:, None].repeat(n, 1),
      atol=1e-6,
  )
  assert len(set(np.round(direction, 4))) == heads


# ---------------------------------------------------------------------------
# A tiny ViT with RoPE.
# ---------------------------------------------------------------------------

IMAGES = random_images((2, 16, 16, 3))
LABELS = np.eye(7, dtype=np.float32)[[0, 3]]
MODEL_CASES = {
    # A class token (not rotated) and a register after the patches.
    'dinov3': dict(rope='axial', rope_options=rope.DINOV3, num_registers=1),
    'mixed': dict(rope='mixed', rope_options=rope.MIXED),
}


def _model(case, **extra):
  return vit_jax.models.get_model(
      'testing',
      num_classes=7,
      hidden_size=16,  # Two heads of 8.
      patches={'size': (4, 4)},
      transformer={
          'num_layers': 2,
          'attention_dropout_rate': 0.0,
          'dropout_rate': 0.0,
      },
      **{**MODEL_CASES[case], **extra},
  )


def _params(case):
  model = _model(case, attention_impl='einsum')
  variables = jax.jit(
      lambda: model.init(jax.random.key(0), IMAGES, train=False)
  )()
  return randomize(variables['params'], scale=0.5)


def _logits_and_grads(model, params, images=IMAGES, labels=LABELS):
  def loss(p):
    logits = model.apply({'params': p}, images, train=False)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, -1)), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logits), jax.tree_util.tree_map(np.asarray, grads)


def _assert_same(result, expected, rtol=1e-5):
  (logits, grads), (ref_logits, ref_grads) = result, expected
  assert np.abs(ref_logits).max() > 0.1  # Random heads: not trivially equal.
  np.testing.assert_allclose(
      logits, ref_logits, atol=rtol * np.abs(ref_logits).max()
  )
  flat = jax.tree_util.tree_leaves_with_path(grads)
  ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  assert [p for p, _ in flat] == [p for p, _ in ref]
  largest = max(np.abs(r).max() for _, r in ref)
  for (path, g), (_, r) in zip(flat, ref):
    scale = max(np.abs(r).max(), 1e-3 * largest)
    assert np.abs(g - r).max() <= rtol * scale, path


def _use_kernel_references(monkeypatch):
  """jax's references of the TPU kernels in their place (as
  test_attention does), so their code paths run on CPU."""

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
@pytest.mark.parametrize('case', list(MODEL_CASES))
def test_rope_changes_the_logits_and_mixed_frequencies_learn(case):
  params = _params(case)
  logits, grads = _logits_and_grads(
      _model(case, attention_impl='einsum'), params
  )
  flat = traverse_util.flatten_dict(params, sep='/')
  without_rope = traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if '/rope/' not in k}, sep='/'
  )
  plain_logits, _ = _logits_and_grads(
      _model(case, attention_impl='einsum', rope=None), without_rope
  )
  assert np.abs(logits - plain_logits).max() > 1e-3
  if case == 'mixed':
    freqs = grads['Transformer']['encoderblock_0'][
        'MultiHeadDotProductAttention_0'
    ]['rope']['freqs']
    assert freqs.shape == (2, 2, 4) and np.abs(freqs).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['xla', 'flash', 'splash'])
@pytest.mark.parametrize('case', list(MODEL_CASES))
def test_every_attention_impl_gives_einsums_logits_and_gradients(
    monkeypatch, case, impl
):
  params = _params(case)
  expected = _logits_and_grads(_model(case, attention_impl='einsum'), params)
  if impl in ('flash', 'splash'):
    _use_kernel_references(monkeypatch)
  # The kernels' references pad the tokens to 128: other rounding.
  _assert_same(
      _logits_and_grads(_model(case, attention_impl=impl), params),
      expected,
      rtol=1e-5 if impl == 'xla' else 1e-4,
  )


@pytest.mark.slow
@pytest.mark.parametrize('case', list(MODEL_CASES))
def test_scan_and_remat_give_the_loops_numbers(case):
  params = _params(case)
  expected = _logits_and_grads(_model(case, attention_impl='einsum'), params)
  stacked = checkpoint.stack_encoder_blocks(jax.device_get(params))
  if case == 'mixed':  # The frequencies stack per layer, like the weights.
    freqs = stacked['Transformer']['encoderblock'][
        'MultiHeadDotProductAttention_0'
    ]['rope']['freqs']
    assert freqs.shape == (2, 2, 2, 4)
  logits, grads = _logits_and_grads(
      _model(case, attention_impl='einsum', scan=True), stacked
  )
  _assert_same(
      (logits, checkpoint.unstack_encoder_blocks(grads)), expected, 1e-4
  )
  _assert_same(
      _logits_and_grads(
          _model(case, attention_impl='einsum', remat_policy='full'), params
      ),
      expected,
  )


@pytest.mark.slow
def test_bfloat16_compute_keeps_the_dtype_and_the_numbers_roughly():
  params = _params('dinov3')
  expected, _ = _logits_and_grads(_model('dinov3'), params)
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, rope.Rope):
      seen.append((args[0].dtype, out[0].dtype))
    return out

  with nn_intercept(interceptor):
    logits = _model('dinov3', dtype=jnp.bfloat16).apply(
        {'params': params}, IMAGES, train=False
    )
  bfloat16 = jnp.dtype(jnp.bfloat16)
  assert seen and set(seen) == {(bfloat16, bfloat16)}
  np.testing.assert_allclose(
      np.asarray(logits, np.float32),
      expected,
      atol=0.05 * np.abs(expected).max(),
  )


def nn_intercept(interceptor):
  return vit.nn.intercept_methods(interceptor)


@pytest.mark.slow
@pytest.mark.parametrize('case', list(MODEL_CASES))
def test_a_data_x_model_mesh_gives_one_devices_numbers(case):
  params = _params(case)
  images = random_images((8, 16, 16, 3), seed=1)
  labels = np.eye(7, dtype=np.float32)[np.arange(8) % 7]
  model = _model(case, attention_impl='einsum')
  expected = _logits_and_grads(model, params, images, labels)
  mesh = sharding.make_mesh((('data', 4), ('model', 2)))
  shardings = sharding.tree_shardings(
      params,
      mesh,
      rules=(('.*', 'auto'),),
      param_axes=vit_jax.models.PARAM_AXES,
  )
  if case == 'mixed':  # Each device keeps its heads' frequencies.
    spec = shardings['Transformer']['encoderblock_0'][
        'MultiHeadDotProductAttention_0'
    ]['rope']['freqs'].spec
    assert tuple(spec) == (None, 'model', None)

  def loss(p, x):
    with sharding.activation_sharding(mesh):
      logits = model.apply({'params': p}, x, train=False)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, -1)), logits

  step = jax.jit(
      jax.value_and_grad(loss, has_aux=True),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
  )
  (_, logits), grads = step(params, images)
  _assert_same(
      (np.asarray(logits), jax.tree_util.tree_map(np.asarray, grads)),
      expected,
  )


def test_the_grid_follows_the_input_and_skips_class_token_and_registers():
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, rope.Rope):
      seen.append((context.module.grid, context.module.start, args[0].shape))
    return next_fun(*args, **kwargs)

  model = _model('dinov3', dynamic_image_size=True, attention_impl='einsum')
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), IMAGES, train=False)
  )
  with nn_intercept(interceptor):
    for size in (16, 24):  # Traced only: the shapes are what is asked.
      jax.eval_shape(
          lambda p, x: model.apply(p, x, train=False),
          params,
          random_images((1, size, 12, 3)),
      )
  # [B, H, T, D]: class token, the (size/4 x 3) patches, one register.
  assert seen == [
      ((4, 3), 1, (1, 2, 1 + 12 + 1, 8)),
      ((4, 3), 1, (1, 2, 1 + 12 + 1, 8)),
      ((6, 3), 1, (1, 2, 1 + 18 + 1, 8)),
      ((6, 3), 1, (1, 2, 1 + 18 + 1, 8)),
  ]


# ---------------------------------------------------------------------------
# Refusals, one line each: in the model and at config parse.
# ---------------------------------------------------------------------------

REFUSED = [
    (dict(rope='spiral'), "rope='spiral': use one of ('axial', 'mixed')"),
    (
        dict(rope='axial', rope_options={'temprature': 5}),
        "rope_options has no 'temprature'",
    ),
    (
        dict(rope='axial', rope_options={'convention': 'rope2d'}),
        "convention='rope2d': use one of ('eva', 'dinov3')",
    ),
    (
        dict(rope='mixed', rope_options={'ref_grid': (4, 4)}),
        "rope_options has no 'ref_grid' for rope='mixed'",
    ),
    (
        dict(rope='axial', rope_options={**rope.DINOV3, 'ref_grid': (4, 4)}),
        "rope_options has no 'ref_grid' for rope='axial' (convention "
        "'dinov3')",
    ),
    (
        dict(rope='axial', rope_options={'grid_indexing': 'yx'}),
        "grid_indexing='yx': use one of ('ij', 'xy')",
    ),
    (
        dict(rope='axial', rope_options={'temperature': -1.0}),
        'temperature=-1.0: a positive number',
    ),
    (
        dict(rope='axial', rope_options={'ref_grid': (16,)}),
        'ref_grid=(16,): (rows, columns)',
    ),
    (
        dict(rope='axial', rope_options={'rotate_half': 'yes'}),
        "rotate_half='yes': True or False",
    ),
    (
        dict(rope='axial', rope_options=(('rescale_coords', 2.0),)),
        'rescale_coords (train-time coordinate augmentation) is not supported',
    ),
    (dict(rope='axial', rope_options='eva'), "rope_options='eva': a mapping"),
    (
        dict(rope='axial', hidden_size=20),
        'needs a head width (hidden_size / num_heads) divisible by 4',
    ),
]


@pytest.mark.parametrize('fields,message', REFUSED)
def test_bad_settings_are_refused_in_one_line(fields, message):
  fields = {'hidden_size': 16, **fields}
  model = vit_jax.models.get_model(
      'testing', num_classes=3, patches={'size': (4, 4)}, **fields
  )
  with pytest.raises(ValueError) as e:
    model.init(jax.random.key(0), IMAGES, train=False)
  assert message in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(ValueError) as e:
    config_lib.parse({'model_name': 'testing', 'model': fields})
  assert str(e.value).startswith('config.model.rope')
  assert message in str(e.value) and '\n' not in str(e.value)


def test_naflex_with_rope_is_refused_in_one_line():
  fields = dict(
      rope='axial',
      naflex=True,
      classifier='gap',
      hidden_size=16,
  )
  message = "rope='axial' with naflex=True is not supported"
  with pytest.raises(ValueError, match=message):
    config_lib.parse({'model_name': 'testing', 'model': fields})
  model = vit_jax.models.get_model('testing', num_classes=3, **fields)
  with pytest.raises(ValueError, match=message):
    model.init(jax.random.key(0), vit.naflex_init_inputs((16, 16)), train=False)


def test_command_line_sets_rope_and_its_options():
  config = config_lib.get_base()
  config.model_name = 'testing'
  config_lib.apply_overrides(
      config,
      [
          ('model.rope', 'axial'),
          ('model.hidden_size', '16'),
          ('model.rope_options', "(('convention', 'dinov3'),)"),
      ],
  )
  run = config_lib.parse(config)
  model = vit_jax.models.get_model(num_classes=0, **run.model.model_args())
  assert model.block_options.rope == 'axial'
  assert model.block_options.rope_options == (('convention', 'dinov3'),)
  config_lib.apply_overrides(
      config, [('model.rope_options', "(('convention', 'rope2d'),)")]
  )
  with pytest.raises(ValueError, match='config.model.rope_options conv'):
    config_lib.parse(config)


# ---------------------------------------------------------------------------
# Opt-in: timm's own functions (random weights, no network).
# ---------------------------------------------------------------------------


def _timm_layers():
  pytest.importorskip('torch')
  pytest.importorskip('timm')
  from timm.layers import pos_embed_sincos  # pylint: disable=g-import-not-at-top

  return pos_embed_sincos


TIMM_AXIAL = {
    # name: (our options, timm's module built from (layers, head_dim))
    'eva02': (
        rope.EVA02,
        lambda t, d: t.RotaryEmbeddingCat(
            d, in_pixels=False, ref_feat_shape=(16, 16)
        ),
    ),
    'pe_core_l': (
        {**rope.PE, 'ref_grid': (24, 24)},
        lambda t, d: t.RotaryEmbeddingCat(
            d,
            in_pixels=False,
            ref_feat_shape=(24, 24),
            grid_offset=1.0,
            grid_indexing='xy',
        ),
    ),
    'dinov3': (
        rope.DINOV3,
        lambda t, d: t.RotaryEmbeddingDinoV3(
            d, temperature=100, rotate_half=True
        ),
    ),
}


@pytest.mark.parametrize('case', list(TIMM_AXIAL))
def test_axial_rotation_equals_timms(case):
  t = _timm_layers()
  import torch  # pylint: disable=g-import-not-at-top

  options, make = TIMM_AXIAL[case]
  grid, head_dim = (5, 7), 32
  resolved = rope.resolve_options('axial', options)
  embed = make(t, head_dim).get_embed(list(grid))
  sin, cos = np.split(embed.numpy(), 2, axis=-1)
  angles = rope.axial_angles(grid, head_dim, resolved)
  # timm's table: sin and cos of our angles, in the pair layout.
  layout = (
      np.concatenate([angles, angles], -1)
      if resolved['rotate_half']
      else np.repeat(angles, 2, -1)
  )
  table_diff = max(
      np.abs(np.sin(layout) - sin).max(), np.abs(np.cos(layout) - cos).max()
  )
  x = np.random.default_rng(0).normal(size=(2, 3, 35, head_dim))
  x = x.astype(np.float32)
  theirs = t.apply_rot_embed_cat(
      torch.from_numpy(x), embed, half=resolved['rotate_half']
  ).numpy()
  ours = np.asarray(
      rope.rotate(
          jnp.asarray(x), jnp.asarray(angles)[None], resolved['rotate_half']
      )
  )
  rotation_diff = np.abs(ours - theirs).max()
  print(
      f'{case}: table max abs diff {table_diff:.2e}, rotation '
      f'{rotation_diff:.2e}'
  )
  assert table_diff < 1e-6 and rotation_diff < 1e-6


def test_mixed_rotation_equals_timms():
  t = _timm_layers()
  import torch  # pylint: disable=g-import-not-at-top

  heads, head_dim, grid = 3, 16, (4, 5)
  timm_rope = t.RotaryEmbeddingMixed(
      heads * head_dim, depth=2, num_heads=heads, temperature=10.0
  )
  embed = timm_rope.get_embed(list(grid)).detach()  # [depth, H, N, 2 D]
  x = np.random.default_rng(0).normal(size=(2, heads, 20, head_dim))
  x = x.astype(np.float32)
  worst = 0.0
  for layer in range(2):
    freqs = timm_rope.freqs.detach().numpy()[:, layer]  # [2, H, D / 2]
    theirs = t.apply_rot_embed_cat(torch.from_numpy(x), embed[layer]).numpy()
    ours = rope.Rope(
        kind='mixed',
        options=rope.canonical_options(rope.MIXED),
        grid=grid,
        num_heads=heads,
        head_dim=head_dim,
    ).apply({'params': {'freqs': jnp.asarray(freqs)}}, x, x, 2)[0]
    worst = max(worst, float(np.abs(np.asarray(ours) - theirs).max()))
  print(f'mixed: rotation max abs diff {worst:.2e}')
  assert worst < 1e-6
