"""Tests of `vit_jax.checkpoint`: layouts, round trips, surgery, errors."""

import os
import pickle

import jax
import numpy as np
import pytest
import scipy.ndimage

from helpers import init_params
from helpers import PickleExploit
from helpers import random_images
from helpers import randomize
from helpers import tiny_model
from helpers import write_published_npz
import numpy_reference
from vit_jax import checkpoint
from vit_jax.models import vit


def _flat(tree):
  return checkpoint.flatten(tree)


def _assert_trees_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    np.testing.assert_array_equal(
        np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key
    )


def _random_model_params(kind, **extra):
  model, size = tiny_model(kind, **extra)
  x = random_images((2, size, size, 3), seed=1)
  return model, x, randomize(init_params(model, x))


# ----------------------------------------------------------------------------
# Layouts and round trips.
# ----------------------------------------------------------------------------


def test_save_writes_the_published_layout(tmp_path):
  _, _, params = _random_model_params('vit')
  path = str(tmp_path / 'vit.npz')
  checkpoint.save(params, path)
  keys = set(np.load(path).files)
  block = 'Transformer/encoderblock_1/'
  for key in (
      'cls',
      'embedding/kernel',
      'Transformer/posembed_input/pos_embedding',
      block + 'LayerNorm_0/scale',
      block + 'LayerNorm_2/bias',
      block + 'MultiHeadDotProductAttention_1/query/kernel',
      block + 'MultiHeadDotProductAttention_1/out/bias',
      block + 'MlpBlock_3/Dense_0/kernel',
      block + 'MlpBlock_3/Dense_1/bias',
      'Transformer/encoder_norm/scale',
      'head/kernel',
  ):
    assert key in keys, key
  assert not any('MlpBlock_0' in k or 'LayerNorm_1' in k for k in keys)
  assert not any(
      f.startswith(os.path.basename(path) + '.tmp')
      for f in os.listdir(tmp_path)
  )


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['vit', 'vit_rep', 'hybrid', 'mixer'])
def test_save_load_round_trip_is_bit_exact(tmp_path, kind):
  _, _, params = _random_model_params(kind)
  path = str(tmp_path / 'params.npz')
  checkpoint.save(params, path)
  _assert_trees_equal(checkpoint.load(path), params)


@pytest.mark.slow
@pytest.mark.parametrize(
    'prefix,old_groupnorm',
    [('', False), ('', True), ('opt/target/', True), ('params/', False)],
)
def test_load_published_layout_is_bit_exact(tmp_path, prefix, old_groupnorm):
  _, _, params = _random_model_params('hybrid')
  path = str(tmp_path / 'published.npz')
  raw = write_published_npz(
      params, path, prefix=prefix, old_groupnorm=old_groupnorm
  )
  if old_groupnorm:
    assert raw['gn_root/scale'].shape == (1, 1, 1, 32)
  assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in raw
  _assert_trees_equal(checkpoint.load(path), params)


@pytest.mark.parametrize('prefix', ['', 'params/'])
def test_load_linen_numbered_layout_is_bit_exact(tmp_path, prefix):
  _, _, params = _random_model_params('vit')
  path = str(tmp_path / 'linen.npz')
  np.savez(
      path, **{prefix + k: np.asarray(v) for k, v in _flat(params).items()}
  )
  assert (
      prefix + 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'
      in np.load(path).files
  )
  _assert_trees_equal(checkpoint.load(path), params)


def test_linen_renumbering_is_numeric_not_lexicographic():
  tree = {f'encoderblock_{i}': {'MlpBlock_3': i} for i in range(12)}
  renamed = checkpoint.to_linen_names(tree)
  assert renamed['encoderblock_10'] == {'MlpBlock_0': 10}
  assert renamed['encoderblock_2'] == {'MlpBlock_0': 2}


def test_scan_layouts_convert_both_ways(tmp_path):
  _, _, params = _random_model_params('vit', transformer={'num_layers': 3})
  stacked = checkpoint.stack_encoder_blocks(params)
  assert checkpoint.is_scanned(stacked) and not checkpoint.is_scanned(params)
  assert stacked['Transformer']['encoderblock'][
      'MultiHeadDotProductAttention_0'
  ]['query']['kernel'].shape == (3, 10, 2, 5)
  _assert_trees_equal(checkpoint.unstack_encoder_blocks(stacked), params)
  # Saving scanned parameters writes the published (unscanned) layout.
  path = str(tmp_path / 'scanned.npz')
  checkpoint.save(stacked, path)
  assert (
      'Transformer/encoderblock_2/MlpBlock_3/Dense_1/bias'
      in np.load(path).files
  )
  _assert_trees_equal(checkpoint.load(path), params)
  # A file stored in the scanned layout loads into the loop layout.
  np.savez(
      str(tmp_path / 'stacked.npz'),
      **{k: np.asarray(v) for k, v in _flat(stacked).items()},
  )
  _assert_trees_equal(checkpoint.load(str(tmp_path / 'stacked.npz')), params)


def test_bfloat16_params_are_saved_as_float32(tmp_path):
  _, _, params = _random_model_params('vit')
  bf16 = jax.tree_util.tree_map(
      lambda x: jax.numpy.asarray(x, jax.numpy.bfloat16), params
  )
  path = str(tmp_path / 'bf16.npz')
  checkpoint.save(bf16, path)
  loaded = checkpoint.load(path)
  assert all(x.dtype == np.float32 for x in _flat(loaded).values())
  np.testing.assert_array_equal(
      loaded['cls'], np.asarray(bf16['cls'], np.float32)
  )


# ----------------------------------------------------------------------------
# Logits from a published-layout file equal an independent NumPy reference.
# ----------------------------------------------------------------------------

_MAX_ABS_DIFF = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    'kind', ['vit', 'vit_rep', 'vit_gap', 'hybrid', 'hybrid_root', 'mixer']
)
def test_logits_of_a_published_file_match_numpy_reference(tmp_path, kind):
  model, x, params = _random_model_params(kind)
  path = str(tmp_path / 'published.npz')
  raw = write_published_npz(
      params, path, old_groupnorm=kind.startswith('hybrid')
  )
  logits = np.asarray(
      jax.jit(lambda p: model.apply({'params': p}, x, train=False))(
          checkpoint.load(path)
      )
  )
  if kind == 'mixer':
    expected = numpy_reference.mixer_logits(raw, x)
  else:
    resnet = None
    if model.resnet is not None:
      resnet = {
          'num_layers': tuple(model.resnet['num_layers']),
          'width_factor': model.resnet['width_factor'],
      }
    expected = numpy_reference.vit_logits(
        raw, x, num_heads=2, classifier=model.classifier, resnet=resnet
    )
  assert np.abs(logits).max() > 0.1  # A meaningful comparison.
  np.testing.assert_allclose(logits, expected, atol=_MAX_ABS_DIFF, rtol=0)


# ----------------------------------------------------------------------------
# Position-embedding interpolation.
# ----------------------------------------------------------------------------


def test_interpolate_posembed_identity_at_the_same_grid():
  posemb = np.random.default_rng(0).normal(size=(1, 17, 8)).astype(np.float32)
  out = checkpoint.interpolate_posembed(posemb, 17, has_class_token=True)
  np.testing.assert_array_equal(out, posemb)


def test_interpolate_posembed_known_small_case():
  # A 2x2 grid zoomed to 3x3 with corner-aligned bilinear interpolation
  # (scipy.ndimage.zoom(order=1), the original code's method): corners are
  # kept, edge midpoints average two corners, the centre averages all four.
  grid = np.array([[0.0, 2.0], [4.0, 10.0]])
  posemb = np.concatenate([[[[-7.0]]], grid.reshape(1, 4, 1)], axis=1)
  out = checkpoint.interpolate_posembed(posemb, 10, has_class_token=True)
  assert out[0, 0, 0] == -7.0  # Class token untouched.
  np.testing.assert_allclose(
      out[0, 1:, 0].reshape(3, 3),
      [[0.0, 1.0, 2.0], [2.0, 4.0, 6.0], [4.0, 7.0, 10.0]],
      atol=1e-12,
  )


def test_interpolate_posembed_matches_scipy_zoom_and_keeps_class_token():
  posemb = np.random.default_rng(1).normal(size=(1, 1 + 14 * 14, 6))
  out = checkpoint.interpolate_posembed(posemb, 1 + 24 * 24, True)
  np.testing.assert_array_equal(out[:, :1], posemb[:, :1])
  expected = scipy.ndimage.zoom(
      posemb[0, 1:].reshape(14, 14, 6), (24 / 14, 24 / 14, 1), order=1
  )
  np.testing.assert_array_equal(out[0, 1:], expected.reshape(576, 6))


def test_interpolate_posembed_rectangular_and_without_class_token():
  grid = np.arange(6, dtype=np.float64).reshape(1, 6, 1)  # 2x3 grid.
  out = checkpoint.interpolate_posembed(
      grid, 4 * 6, has_class_token=False, grid_size=(2, 3), new_grid_size=(4, 6)
  )
  assert out.shape == (1, 24, 1)
  corners = out[0, :, 0].reshape(4, 6)[[0, 0, -1, -1], [0, -1, 0, -1]]
  np.testing.assert_allclose(corners, [0, 2, 3, 5])


def test_interpolate_posembed_bicubic_option():
  posemb = (
      np.random.default_rng(2).normal(size=(1, 1 + 16, 4)).astype(np.float32)
  )
  bicubic = checkpoint.interpolate_posembed(
      posemb, 1 + 36, True, method='bicubic'
  )
  bilinear = checkpoint.interpolate_posembed(posemb, 1 + 36, True)
  assert bicubic.shape == bilinear.shape == (1, 37, 4)
  np.testing.assert_array_equal(bicubic[:, 0], posemb[:, 0])
  assert not np.allclose(bicubic, bilinear)
  constant = np.ones((1, 17, 4), np.float32)
  np.testing.assert_allclose(
      checkpoint.interpolate_posembed(constant, 37, True, method='bicubic'),
      1.0,
      atol=1e-6,
  )


def test_interpolate_posembed_non_square_grid_needs_its_shape():
  with pytest.raises(
      checkpoint.CheckpointError, match='not a square.*grid_size'
  ):
    checkpoint.interpolate_posembed(np.zeros((1, 1 + 6, 4)), 1 + 9, True)
  with pytest.raises(checkpoint.CheckpointError, match='not a square'):
    checkpoint.interpolate_posembed(np.zeros((1, 1 + 9, 4)), 1 + 8, True)
  with pytest.raises(checkpoint.CheckpointError, match='method'):
    checkpoint.interpolate_posembed(
        np.zeros((1, 5, 4)), 10, True, method='nearest'
    )


# ----------------------------------------------------------------------------
# load_pretrained.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_load_pretrained_resets_head_drops_pre_logits_and_resizes(tmp_path):
  _, _, pretrained = _random_model_params('vit_rep')
  path = str(tmp_path / 'pretrained.npz')
  raw = write_published_npz(pretrained, path)
  # Fine-tune: no representation layer, 3 classes, 2x the resolution.
  model, size = tiny_model('vit', num_classes=3)
  x = random_images((2, 2 * size, 2 * size, 3), seed=3)
  init = init_params(model, x)
  params = checkpoint.load_pretrained(
      pretrained_path=path, init_params=init, model_config=model
  )
  assert 'pre_logits' not in params
  np.testing.assert_array_equal(params['head']['kernel'], 0)
  assert params['head']['kernel'].shape == (10, 3)
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 1 + 8 * 8, 10)
  np.testing.assert_array_equal(
      posemb[:, 0],
      pretrained['Transformer']['posembed_input']['pos_embedding'][:, 0],
  )
  np.testing.assert_array_equal(
      params['Transformer']['encoderblock_1']['MlpBlock_0']['Dense_0'][
          'kernel'
      ],
      pretrained['Transformer']['encoderblock_1']['MlpBlock_0']['Dense_0'][
          'kernel'
      ],
  )
  # Logits at the new resolution equal the NumPy reference given the same
  # surgery spelled out by hand (scipy zoom order=1 of the 4x4 grid to 8x8).
  params['head'] = randomize(params['head'], seed=5)
  logits = jax.jit(lambda p: model.apply({'params': p}, x, train=False))(params)
  ref = {k: v for k, v in raw.items() if not k.startswith(('head', 'pre_'))}
  old = raw['Transformer/posembed_input/pos_embedding']
  grid = scipy.ndimage.zoom(old[0, 1:].reshape(4, 4, 10), (2, 2, 1), order=1)
  ref['Transformer/posembed_input/pos_embedding'] = np.concatenate(
      [old[:, :1], grid.reshape(1, 64, 10)], axis=1
  )
  ref['head/kernel'] = np.asarray(params['head']['kernel'])
  ref['head/bias'] = np.asarray(params['head']['bias'])
  expected = numpy_reference.vit_logits(ref, x, num_heads=2)
  np.testing.assert_allclose(logits, expected, atol=_MAX_ABS_DIFF, rtol=0)


@pytest.mark.slow
def test_load_pretrained_keeps_a_matching_representation_layer(tmp_path):
  _, _, pretrained = _random_model_params('vit_rep')
  path = str(tmp_path / 'pretrained.npz')
  checkpoint.save(pretrained, path)
  model, size = tiny_model('vit_rep', num_classes=4)
  init = init_params(model, random_images((1, size, size, 3)))
  params = checkpoint.load_pretrained(
      pretrained_path=path, init_params=init, model_config=model
  )
  np.testing.assert_array_equal(
      params['pre_logits']['kernel'], pretrained['pre_logits']['kernel']
  )
  np.testing.assert_array_equal(params['head']['kernel'], 0)


@pytest.mark.slow
def test_load_pretrained_into_scanned_model(tmp_path):
  _, _, pretrained = _random_model_params('vit')
  path = str(tmp_path / 'pretrained.npz')
  checkpoint.save(pretrained, path)
  model, size = tiny_model('vit', scan=True)
  init = init_params(model, random_images((1, size, size, 3)))
  params = checkpoint.load_pretrained(
      pretrained_path=path, init_params=init, model_config=model
  )
  assert checkpoint.is_scanned(params)
  np.testing.assert_array_equal(
      params['Transformer']['encoderblock']['LayerNorm_1']['scale'][1],
      pretrained['Transformer']['encoderblock_1']['LayerNorm_1']['scale'],
  )


@pytest.mark.slow
def test_load_pretrained_from_another_architecture_lists_keys(tmp_path):
  _, _, deeper = _random_model_params('vit', transformer={'num_layers': 3})
  path = str(tmp_path / 'deeper.npz')
  checkpoint.save(deeper, path)
  model, size = tiny_model('vit')
  init = init_params(model, random_images((1, size, size, 3)))
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.load_pretrained(
        pretrained_path=path, init_params=init, model_config=model
    )
  assert 'deeper.npz' in str(e.value)
  assert 'unexpected keys' in str(e.value)
  assert 'Transformer/encoderblock_2/MlpBlock_0/Dense_0/kernel' in str(e.value)

  _, _, wider = _random_model_params('vit', hidden_size=12)
  checkpoint.save(wider, path)
  with pytest.raises(
      checkpoint.CheckpointError,
      match=r'pos_embedding: found \(1, 17, 12\), expected ' r'\(1, 17, 10\)',
  ):
    checkpoint.load_pretrained(
        pretrained_path=path, init_params=init, model_config=model
    )


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_inspect_params_names_missing_extra_and_mis_shaped_keys():
  expected = {'a': {'kernel': np.zeros((2, 3))}, 'b': {'bias': np.zeros(3)}}
  params = {'a': {'kernel': np.zeros((3, 2))}, 'c': {'bias': np.zeros(3)}}
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.inspect_params(params, expected)
  message = str(e.value)
  assert 'missing keys [b/bias]' in message
  assert 'unexpected keys [c/bias]' in message
  assert 'a/kernel: found (3, 2), expected (2, 3)' in message
  assert (
      checkpoint.inspect_params(
          params,
          expected,
          fail_if_extra=False,
          fail_if_missing=False,
          fail_if_shape_mismatch=False,
      )
      is params
  )


def test_missing_file(tmp_path):
  path = str(tmp_path / 'nope.npz')
  with pytest.raises(FileNotFoundError, match='nope.npz does not exist'):
    checkpoint.load(path)


def test_not_an_npz(tmp_path):
  path = tmp_path / 'notes.npz'
  path.write_text('these are not the weights you are looking for\n' * 10)
  with pytest.raises(
      checkpoint.CheckpointError, match='notes.npz is not a readable .npz'
  ):
    checkpoint.load(str(path))


def test_single_npy_array_is_not_a_checkpoint(tmp_path):
  path = tmp_path / 'array.npz'
  with open(path, 'wb') as f:
    np.save(f, np.zeros(3))
  with pytest.raises(checkpoint.CheckpointError, match='single array'):
    checkpoint.load(str(path))


def test_truncated_npz(tmp_path):
  _, _, params = _random_model_params('vit')
  good = str(tmp_path / 'good.npz')
  checkpoint.save(params, good)
  data = open(good, 'rb').read()
  for cut in (len(data) // 2, len(data) - 10):
    bad = tmp_path / f'truncated_{cut}.npz'
    bad.write_bytes(data[:cut])
    with pytest.raises(
        checkpoint.CheckpointError, match='truncated or corrupt.*Re-download'
    ):
      checkpoint.load(str(bad))


def test_empty_npz(tmp_path):
  path = str(tmp_path / 'empty.npz')
  np.savez(path)
  with pytest.raises(checkpoint.CheckpointError, match='contains no arrays'):
    checkpoint.load(path)


def test_object_arrays_are_refused_and_never_unpickled(tmp_path):
  marker = str(tmp_path / 'pwned')
  path = str(tmp_path / 'evil.npz')
  payload = np.empty(1, dtype=object)
  payload[0] = PickleExploit(marker)
  np.savez(path, **{'embedding/kernel': np.zeros((2, 2)), 'head/bias': payload})
  assert not os.path.exists(marker)
  pickle.dumps(payload)  # The payload is a real pickle exploit...
  with pytest.raises(
      checkpoint.CheckpointError, match="'head/bias' holds Python objects"
  ):
    checkpoint.load(path)
  assert not os.path.exists(marker)  # ...that was never executed.


@pytest.mark.slow
def test_failed_save_keeps_the_existing_file(tmp_path, monkeypatch):
  _, _, params = _random_model_params('vit')
  path = str(tmp_path / 'model.npz')
  checkpoint.save(params, path)
  before = open(path, 'rb').read()

  def broken_savez(*args, **kwargs):
    del args, kwargs
    raise OSError('disk full')

  monkeypatch.setattr(np, 'savez', broken_savez)
  with pytest.raises(OSError, match='disk full'):
    checkpoint.save(params, path)
  assert open(path, 'rb').read() == before
  assert os.listdir(tmp_path) == ['model.npz']


def test_config_value_reads_dicts_and_objects():
  class Obj:
    size = (2, 2)

  assert vit.config_value({'size': 3}, 'size') == 3
  assert vit.config_value(Obj(), 'size') == (2, 2)
  assert vit.config_value(None, 'size', 5) == 5


@pytest.mark.slow
def test_load_pretrained_class_token_checkpoint_into_gap_model(tmp_path):
  _, _, pretrained = _random_model_params('vit')
  path = str(tmp_path / 'token.npz')
  checkpoint.save(pretrained, path)
  model, size = tiny_model('vit_gap')
  init = init_params(model, random_images((1, 2 * size, 2 * size, 3)))
  params = checkpoint.load_pretrained(
      pretrained_path=path, init_params=init, model_config=model
  )
  assert 'cls' not in params
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  old = pretrained['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 64, 10)
  np.testing.assert_array_equal(posemb[0, 0], old[0, 1])  # Corner patch.

  # The reverse has no class-token embedding to start from.
  gap_path = str(tmp_path / 'gap.npz')
  checkpoint.save(params, gap_path)
  token_model, _ = tiny_model('vit')
  token_init = init_params(token_model, random_images((1, size, size, 3)))
  with pytest.raises(checkpoint.CheckpointError, match="classifier='gap'"):
    checkpoint.load_pretrained(
        pretrained_path=gap_path,
        init_params=token_init,
        model_config=token_model,
    )


@pytest.mark.slow
def test_load_from_url_downloads_once_into_the_cache(tmp_path, monkeypatch):
  import functools  # pylint: disable=g-import-not-at-top
  import http.server  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  served = tmp_path / 'served'
  served.mkdir()
  model, size = tiny_model('vit')
  params = randomize(init_params(model, random_images((1, size, size, 3))))
  write_published_npz(params, str(served / 'ViT-T.npz'))
  handler = functools.partial(
      http.server.SimpleHTTPRequestHandler, directory=str(served)
  )
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  base = f'http://127.0.0.1:{server.server_address[1]}'
  monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path / 'cache'))
  try:
    _assert_trees_equal(checkpoint.load(f'{base}/ViT-T.npz'), params)
    with pytest.raises(FileNotFoundError, match='ViT-X.npz.*local path'):
      checkpoint.load(f'{base}/ViT-X.npz')
  finally:
    server.shutdown()
    server.server_close()
  # Served from the cache now that the server is gone; no partial files.
  _assert_trees_equal(checkpoint.load(f'{base}/ViT-T.npz'), params)
  assert [p.name for p in (tmp_path / 'cache').iterdir()] == [
      f'127.0.0.1_{server.server_address[1]}_ViT-T.npz'
  ]


# ----------------------------------------------------------------------------
# Known answers for position-embedding resizing on non-square grids.
# ----------------------------------------------------------------------------


def _ramp_posemb(height, width, cls_value=-3.5):
  """(1, 1 + h*w, 2): channel 0 = 10*row + col, channel 1 = row*col.

  Tokens are row-major over (height, width), as the model flattens patches.
  Both channels are bilinear in (row, col), so corner-aligned bilinear
  interpolation reproduces them exactly at the fractional source position.
  """
  rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
  grid = np.stack([10 * rows + cols, rows * cols], axis=-1)
  cls = np.full((1, 1, 2), cls_value)
  return np.concatenate([cls, grid.reshape(1, height * width, 2)], axis=1)


def _ramp_after_zoom(old, new):
  """Closed form of `_ramp_posemb` zoomed corner-aligned from `old` to `new`.

  scipy.ndimage.zoom(order=1) maps output index k to input k*(n-1)/(n'-1).
  """
  rows = np.arange(new[0]) * (old[0] - 1) / (new[0] - 1)
  cols = np.arange(new[1]) * (old[1] - 1) / (new[1] - 1)
  r, c = np.meshgrid(rows, cols, indexing='ij')
  return np.stack([10 * r + c, r * c], axis=-1).reshape(new[0] * new[1], 2)


def test_interpolate_posembed_non_square_known_answer_and_orientation():
  """3x5 -> 6x7 (factors 2 and 1.4) equals the hand-derived bilinear ramp."""
  posemb = _ramp_posemb(3, 5)
  out = checkpoint.interpolate_posembed(
      posemb, 1 + 6 * 7, True, grid_size=(3, 5), new_grid_size=(6, 7)
  )
  assert out.shape == (1, 43, 2)
  np.testing.assert_array_equal(out[:, 0], posemb[:, 0])
  expected = _ramp_after_zoom((3, 5), (6, 7))
  np.testing.assert_allclose(out[0, 1:], expected, rtol=0, atol=1e-12)
  # Discriminating power: reading the tokens as a (width, height) grid (a
  # transposed implementation, which the token counts cannot reveal: 15 ->
  # 42 either way) gives other numbers.
  transposed = scipy.ndimage.zoom(
      posemb[0, 1:].reshape(5, 3, 2), (7 / 5, 6 / 3, 1), order=1
  )
  assert np.abs(transposed.reshape(42, 2) - expected).max() > 1.0


def test_interpolate_posembed_non_square_matches_scipy_zoom_order_1():
  """Random 3x5 grid -> 6x7: exactly scipy.ndimage.zoom(order=1) per axis."""
  rng = np.random.default_rng(7)
  posemb = rng.normal(size=(1, 1 + 3 * 5, 4))
  out = checkpoint.interpolate_posembed(
      posemb, 1 + 6 * 7, True, grid_size=(3, 5), new_grid_size=(6, 7)
  )
  np.testing.assert_array_equal(out[:, :1], posemb[:, :1])
  expected = scipy.ndimage.zoom(
      posemb[0, 1:].reshape(3, 5, 4), (6 / 3, 7 / 5, 1), order=1
  )
  np.testing.assert_allclose(
      out[0, 1:], expected.reshape(42, 4), rtol=0, atol=1e-12
  )
  swapped = checkpoint.interpolate_posembed(
      posemb, 1 + 6 * 7, True, grid_size=(5, 3), new_grid_size=(7, 6)
  )
  assert not np.allclose(swapped, out)  # Height and width are not symmetric.


def test_interpolate_posembed_perfect_square_count_of_a_non_square_grid():
  """A 2x8 grid (16 tokens) given explicitly is not resized as 4x4."""
  posemb = _ramp_posemb(2, 8)
  out = checkpoint.interpolate_posembed(
      posemb, 1 + 3 * 12, True, grid_size=(2, 8), new_grid_size=(3, 12)
  )
  np.testing.assert_allclose(
      out[0, 1:], _ramp_after_zoom((2, 8), (3, 12)), rtol=0, atol=1e-12
  )
  assert out[0, 0, 0] == -3.5


def test_load_pretrained_resizes_a_non_square_grid_given_explicitly(tmp_path):
  """12x20 px (3x5 grid) -> 24x28 px (6x7) with the model's real grids."""
  model, _ = tiny_model('vit')

  def shapes(h, w):  # Parameter shapes without compiling an init.
    return jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), np.zeros((1, h, w, 3)), train=False
        )
    )['params']

  path = str(tmp_path / 'non_square.npz')
  raw = write_published_npz(randomize(shapes(12, 20)), path)
  init = randomize(shapes(24, 28), seed=1)  # Stands in for a fresh init.
  with pytest.raises(checkpoint.CheckpointError, match='not a square'):
    checkpoint.load_pretrained(
        pretrained_path=path, init_params=init, model_config=model
    )
  params = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init,
      model_config=model,
      grid_size=(3, 5),
      new_grid_size=(6, 7),
  )
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  old = raw['Transformer/posembed_input/pos_embedding']
  assert posemb.shape == (1, 43, 10)
  np.testing.assert_array_equal(posemb[:, 0], old[:, 0])
  expected = scipy.ndimage.zoom(
      old[0, 1:].reshape(3, 5, 10).astype(np.float64), (2, 7 / 5, 1), order=1
  )
  np.testing.assert_allclose(
      posemb[0, 1:], expected.reshape(42, 10), rtol=0, atol=1e-6
  )
