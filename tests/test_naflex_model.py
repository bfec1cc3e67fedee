"""NaFlex ViT (`naflex=True`): images of any aspect ratio as patch sequences.

Checked against NumPy (tests/numpy_reference.py), never against the model's
own code path: the position embeddings against an antialiased linear resize
written from its definition, and whole forward passes of a file in
big_vision's NaFlex layout (SigLIP 2's `file.npz:img`) against a NumPy
forward pass over each image's real patches only. The batches are padded, so
a mask missing anywhere (any attention implementation, GAP / MAP pooling)
shows as a mismatch; other padding (contents, length) must give the same
outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
import numpy_reference
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import objectives
from vit_jax import sharding
from vit_jax import train
import vit_jax.models
from vit_jax.models import vit

_PATCH = 4
_WIDTH = 16  # 2 heads of 8 (cuDNN's head sizes are multiples of 8).
# A non-square table, so that rows and columns cannot be swapped unseen.
_TABLE_GRID = (4, 5)
# Patch grids (rows, columns) of the images of one batch: wide, tall, and
# one smaller than the table along both axes (an antialiased shrink).
_GRIDS = ((3, 7), (6, 2), (2, 3))


def naflex_batch(grids, seq_len, *, seed=0, pad_seed=1):
  """NaFlex tuples for images of the given patch grids, padded to seq_len.

  Padding patches hold random values (from `pad_seed`), ptype 0 and
  coordinates 0, as the NaFlex input contract has it.
  """
  rng = np.random.default_rng(seed)
  pad_rng = np.random.default_rng(pad_seed)
  features = _PATCH * _PATCH * 3
  patches = pad_rng.uniform(-1, 1, (len(grids), seq_len, features))
  ptype = np.zeros((len(grids), seq_len), np.int32)
  rows = np.zeros((len(grids), seq_len), np.int32)
  cols = np.zeros((len(grids), seq_len), np.int32)
  for b, (h, w) in enumerate(grids):
    n = h * w
    patches[b, :n] = rng.uniform(-1, 1, (n, features))
    ptype[b, :n] = 1
    rows[b, :n], cols[b, :n] = (a.ravel() for a in np.mgrid[:h, :w])
  return patches.astype(np.float32), ptype, rows, cols


def _model(pool='map', num_classes=5, **overrides):
  return vit_jax.models.get_model(
      'testing',
      num_classes=num_classes,
      classifier=pool,
      naflex=True,
      hidden_size=_WIDTH,
      patches={'size': (_PATCH, _PATCH)},
      transformer={
          'num_layers': 2,
          'mlp_dim': 16,
          'num_heads': 2,
          'dropout_rate': 0.0,
          'attention_dropout_rate': 0.0,
      },
      **overrides,
  )


def _big_vision_naflex_flat(pool, *, stacked, num_classes=0, seed=0):
  """Random weights as big_vision's NaFlex ViT names them (flat keys)."""
  model = _model(pool, num_classes, posemb_grid_size=_TABLE_GRID)
  ours = checkpoint.flatten(
      helpers.randomize(
          helpers.init_params(model, naflex_batch(((1, 1),), 1)), seed=seed
      )
  )
  # big_vision's names are vit_jax's, except the 2-D table at the top.
  flat = {k: np.asarray(v) for k, v in ours.items()}
  flat['pos_embedding'] = flat.pop('Transformer/posembed_input/pos_embedding')
  assert flat['pos_embedding'].shape == (*_TABLE_GRID, _WIDTH)
  if stacked:
    for key in [k for k in flat if k.startswith('Transformer/encoderblock_0/')]:
      rest = key.split('/', 2)[2]
      flat['Transformer/encoderblock/' + rest] = np.stack(
          [flat.pop(f'Transformer/encoderblock_{i}/{rest}') for i in (0, 1)]
      )
  return flat


def _write_siglip2_naflex(path, flat):
  """A two-tower file (image tower `img/`, a text tower, t, b)."""
  arrays = {'params/img/' + k: v for k, v in flat.items()}
  arrays['params/txt/Embed_0/embedding'] = np.ones((11, _WIDTH), np.float32)
  arrays['params/t'] = np.array([2.3], np.float32)
  arrays['params/b'] = np.array([-10.0], np.float32)
  np.savez(path, **arrays)


def _numpy_outputs(flat, batch, pool):
  patches, ptype, rows, cols = batch
  outputs = []
  for b in range(len(patches)):
    n = int(ptype[b].sum())
    outputs.append(
        numpy_reference.big_vision_naflex_embedding(
            flat, patches[b, :n], rows[b, :n], cols[b, :n], pool=pool
        )
    )
  return np.stack(outputs)


def test_position_embeddings_match_an_antialiased_linear_resize():
  table = np.random.default_rng(0).normal(size=(4, 6, 3)).astype(np.float32)
  # The table's own grid, shrinking, growing, and mixed.
  grids = ((4, 6), (2, 3), (7, 9), (1, 8), (5, 2))
  _, _, rows, cols = naflex_batch(grids, 64)
  got = np.asarray(jax.jit(vit.naflex_position_embeddings)(table, rows, cols))
  assert got.shape == (len(grids), 64, 3)
  for b, (h, w) in enumerate(grids):
    want = numpy_reference.naflex_posemb_grid(table, h, w)
    n = h * w
    np.testing.assert_allclose(
        got[b, :n], want[rows[b, :n], cols[b, :n]], atol=1e-5
    )
  # On the table's own grid every patch gets its entry.
  np.testing.assert_allclose(
      got[0, :24], table[rows[0, :24], cols[0, :24]], atol=1e-6
  )


@pytest.mark.slow
@pytest.mark.parametrize(
    'pool,impl,scan',
    [
        ('map', 'einsum', False),
        ('gap', 'einsum', True),
        ('map', 'xla', True),
        ('gap', 'xla', False),
    ],
)
def test_siglip2_naflex_file_gives_the_numpy_outputs_whatever_the_padding(
    tmp_path, pool, impl, scan
):
  flat = _big_vision_naflex_flat(pool, stacked=scan, seed=len(pool) + scan)
  path = str(tmp_path / 'siglip2_naflex.npz')
  _write_siglip2_naflex(path, flat)
  params = checkpoint.load(path + ':img')
  if scan:
    params = checkpoint.stack_encoder_blocks(params)
  model = _model(pool, 0, attention_impl=impl, scan=scan, remat=scan)
  apply = jax.jit(lambda x: model.apply({'params': params}, x, train=False))
  batch = naflex_batch(_GRIDS, 24)
  got = np.asarray(apply(batch))
  want = _numpy_outputs(flat, batch, pool)
  assert np.abs(want).max() > 0.1  # Random weights: not trivially equal.
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Other padding contents, and more of it: the same outputs.
  for other in (
      naflex_batch(_GRIDS, 24, pad_seed=2),
      naflex_batch(_GRIDS, 37, pad_seed=3),
  ):
    np.testing.assert_allclose(apply(other), got, atol=1e-6, rtol=1e-6)


def _flash_reference(q, k, v, segment_ids, sm_scale):
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import flash_attention

  return flash_attention.mha_reference(
      q,
      k,
      v,
      None,
      flash_attention.SegmentIds(q=segment_ids, kv=segment_ids),
      sm_scale=sm_scale,
  )


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['flash', 'splash'])
def test_tpu_kernel_paths_mask_padding_by_segment_ids(monkeypatch, impl):
  """The flash kernel's jax reference (segment ids honoured) in place of the
  TPU kernels, which need a TPU (test_tpu_compile compiles them)."""
  calls = []

  def kernel(q, k, v, segment_ids, *args):
    del args  # Flash's scale: 1 here, q is scaled already.
    jax.debug.callback(lambda ids: calls.append(np.asarray(ids)), segment_ids)
    return _flash_reference(q, k, v, segment_ids, 1.0)

  flat = _big_vision_naflex_flat('map', stacked=False)
  params = _params_from_flat(flat)
  monkeypatch.setattr(vit, '_tpu_flash_attention', kernel)
  monkeypatch.setattr(vit, '_tpu_splash_attention', kernel)
  monkeypatch.setattr(vit, '_backend', lambda: 'tpu')
  batch = naflex_batch(_GRIDS, 24)
  model = _model('map', 0, attention_impl=impl)
  got = jax.jit(lambda x: model.apply({'params': params}, x, train=False))(
      batch
  )
  np.testing.assert_allclose(
      got, _numpy_outputs(flat, batch, 'map'), atol=1e-5, rtol=1e-5
  )
  # Real patches are segment 0; NaFlex padding and the kernel's block
  # padding (24 tokens -> 128) segment 1.
  want_ids = np.ones((len(_GRIDS), 128), np.int32)
  want_ids[:, :24] = 1 - batch[1]
  np.testing.assert_array_equal(calls[0], want_ids)


def _params_from_flat(flat):
  """vit_jax's tree of a big_vision NaFlex flat dict, spelled out here."""
  ours = dict(flat)
  ours['Transformer/posembed_input/pos_embedding'] = ours.pop('pos_embedding')
  return checkpoint.unflatten(ours)


@pytest.mark.slow
def test_cudnn_path_masks_padding_by_key_lengths(monkeypatch):
  """cuDNN needs a GPU: jax's XLA attention, given the same arguments
  (key_value_seq_lengths included), stands in for it."""
  original = jax.nn.dot_product_attention
  lengths = []

  def attention(*args, implementation=None, **kwargs):
    if implementation == 'cudnn':
      jax.debug.callback(
          lambda n: lengths.append(np.asarray(n)),
          kwargs['key_value_seq_lengths'],
      )
    return original(*args, implementation='xla', **kwargs)

  flat = _big_vision_naflex_flat('gap', stacked=False)
  params = _params_from_flat(flat)
  monkeypatch.setattr(jax.nn, 'dot_product_attention', attention)
  monkeypatch.setattr(vit, '_backend', lambda: 'gpu')
  batch = naflex_batch(_GRIDS, 24)
  outputs = {
      impl: np.asarray(
          jax.jit(
              _model('gap', 0, attention_impl=impl, dtype=jnp.bfloat16).apply,
              static_argnames='train',
          )({'params': params}, batch, train=False),
          np.float32,
      )
      for impl in ('cudnn', 'xla')
  }
  np.testing.assert_array_equal(lengths[0], [h * w for h, w in _GRIDS])
  # bfloat16 compute: compared with the NumPy float64 outputs loosely, and
  # with the masked XLA path (same dtype) tightly.
  np.testing.assert_allclose(
      outputs['cudnn'], _numpy_outputs(flat, batch, 'gap'), atol=0.05
  )
  np.testing.assert_allclose(outputs['cudnn'], outputs['xla'], atol=1e-2)


@pytest.mark.parametrize(
    'overrides,message',
    [
        (dict(classifier='token'), "classifier='token'"),
        (dict(classifier='token_unpooled'), "classifier='token_unpooled'"),
        (dict(num_registers=2), 'num_registers=2'),
        (dict(posemb='sincos2d'), "posemb='sincos2d'"),
        (dict(posemb='learn2d'), "posemb='learn2d'"),
        (dict(dynamic_image_size=True), 'dynamic_image_size=True'),
        (dict(posemb_resize='bicubic'), "posemb_resize='bicubic'"),
    ],
)
def test_what_naflex_cannot_take_is_refused_in_one_line(overrides, message):
  pool = overrides.pop('classifier', 'map')
  model = _model(pool, **overrides)
  with pytest.raises(ValueError, match=f'naflex=True does not take {message}'):
    model.init(jax.random.key(0), naflex_batch(((2, 2),), 4), train=False)


def test_inputs_that_are_not_naflex_tuples_are_named():
  model = _model()
  init = lambda x: model.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=r'naflex=True takes the tuple'):
    init(np.zeros((1, 16, 16, 3), np.float32))
  patches, ptype, rows, cols = naflex_batch(((2, 2),), 4)
  with pytest.raises(ValueError, match=r'not \[batch, tokens, 4\*4\*channels'):
    init((patches[..., :47], ptype, rows, cols))
  with pytest.raises(ValueError, match=r'NaFlex rows \(1, 3\)'):
    init((patches, ptype, rows[:, :3], cols))


def test_a_fixed_size_tables_shape_is_refused():
  shapes = jax.eval_shape(
      lambda x: _model().init(jax.random.key(0), x, train=False),
      naflex_batch(((2, 2),), 4),
  )
  params = jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), shapes['params']
  )
  params['Transformer']['posembed_input']['pos_embedding'] = np.zeros(
      (1, 16, _WIDTH), np.float32
  )
  apply = lambda x: _model().apply({'params': params}, x, train=False)
  with pytest.raises(ValueError, match=r'not a \(rows, columns, 16\) grid'):
    jax.eval_shape(apply, naflex_batch(((2, 2),), 4))


def test_new_parameters_get_fsdp_shardings():
  params = jax.eval_shape(
      lambda: _model(pool='gap', posemb_grid_size=(16, 16)).init(
          jax.random.key(0), naflex_batch(((2, 2),), 4), train=False
      )
  )['params']
  mesh = sharding.make_mesh((('data', 1), ('fsdp', 8)))
  shardings = sharding.tree_shardings(
      params, mesh, fsdp_min_size=16, param_axes=vit_jax.models.PARAM_AXES
  )
  # The largest dimension divisible by 8: the 48 patch values of the dense
  # embedding's kernel (48, 16), the table's 16 rows (16, 16, 16).
  assert shardings['embedding']['kernel'].spec == jax.sharding.PartitionSpec(
      'fsdp', None
  )
  posemb = shardings['Transformer']['posembed_input']['pos_embedding']
  assert posemb.spec == jax.sharding.PartitionSpec('fsdp', None, None)


@pytest.mark.slow
def test_a_naflex_model_trains_through_the_train_step():
  run = config_lib.parse(
      {
          'model_name': 'testing',
          'model': {
              'naflex': True,
              'classifier': 'map',
              'hidden_size': _WIDTH,
              'patches': {'size': (_PATCH, _PATCH)},
              'transformer': {'num_layers': 2, 'mlp_dim': 16, 'num_heads': 2},
          },
          'naflex': {'seq_lens': (16,)},
      }
  )
  objective = objectives.get(run.objective)
  model = train.build_model(run.model, objective, num_classes=3)
  tx = optax.adam(1e-2)
  state = jax.jit(train.init_fn(run, objective, model, tx))(jax.random.key(0))
  assert state.params['embedding']['kernel'].shape == (48, _WIDTH)
  batch = {
      'image': naflex_batch(_GRIDS, 24),
      'labels': np.eye(3, dtype=np.float32)[[0, 2, 1]],
  }
  step = jax.jit(
      lambda s, b: train.train_step(
          s,
          b,
          jax.random.key(1),
          model=model,
          tx=tx,
          loss_fn=objective.loss_fn(model),
      )
  )
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[0] == pytest.approx(np.log(3), abs=1e-5)  # Zero head.
  assert losses[-1] < 0.5 * losses[0], losses


def test_an_image_without_patches_keeps_the_batch_finite():
  """A batch's filler (all padding) attends over its padding instead of
  nothing: finite outputs, and the other images' outputs unchanged."""
  model = _model('gap', 3)
  batch = naflex_batch(((2, 3), (2, 2)), 8)
  params = helpers.randomize(
      jax.eval_shape(lambda: model.init(jax.random.key(0), batch, train=False))[
          'params'
      ]
  )
  filler = tuple(np.array(a) for a in batch)
  filler[1][1] = 0  # The second image has no patch at all.
  apply = jax.jit(lambda x: model.apply({'params': params}, x, train=False))
  got = np.asarray(apply(filler))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got[0], apply(batch)[0], atol=1e-6)


@pytest.mark.parametrize(
    'fields,message',
    [
        (dict(objective='mpp'), "config.objective='mpp' needs image arrays"),
        (dict(mixup_alpha=0.2), 'config.mixup_alpha=0.2 mixes image arrays'),
    ],
)
def test_objectives_that_need_image_arrays_are_refused(fields, message):
  config = {'model_name': 'testing', 'model': {'naflex': True}, **fields}
  with pytest.raises(ValueError, match=message):
    config_lib.parse(config)
  del config['model']  # The same run of a fixed-size model parses.
  config_lib.parse(config)
