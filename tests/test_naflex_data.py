"""NaFlex preprocessing and pipelines against NumPy references.

The chosen patch grid is checked against a brute force over every grid
(exact fractions), patchify and padding against NumPy slicing, and the
pipelines for the batch contract (`batch['image']` = (patches, ptype, yabs,
xabs)), the bucket batch sizes, the shared example stream and exact resume.
"""

from fractions import Fraction
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax import loading
from vit_jax import predict
from vit_jax import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 4x4 patches: small images give several tokens.
TINY_MODEL = {'model_name': 'testing', 'model': {'patches': {'size': (4, 4)}}}
NAFLEX_MODEL = {
    'model_name': 'testing',
    'model': {'patches': {'size': (4, 4)}, 'naflex': True, 'classifier': 'gap'},
}
PATCH = 4
# (height, width) of the folder's images: wide, tall, square, very wide.
SHAPES = ((20, 40), (40, 20), (30, 30), (12, 50))


def reference_grid(height, width, max_tokens):
  """The NaFlex grid by brute force over every grid of <= max_tokens.

  Grid (a, b) is what scaling by s gives when max(1, ceil(height * s)) = a
  and max(1, ceil(width * s)) = b, i.e. s lies in both intervals
  ((a - 1) / height, a / height] and ((b - 1) / width, b / width]. Grids
  grow with s, so the one of the largest s is the largest reachable grid.
  """
  best = None
  for a in range(1, max_tokens + 1):
    for b in range(1, max_tokens // a + 1):
      low = max(Fraction(a - 1, height), Fraction(b - 1, width))
      high = min(Fraction(a, height), Fraction(b, width))
      if low < high and (best is None or (a, b) > best):
        best = (a, b)
  return best


def numpy_patchify(image, patch):
  """[rows * P, cols * P, C] -> [rows * cols, P * P * C] by slicing."""
  rows, cols = image.shape[0] // patch, image.shape[1] // patch
  patches, yabs, xabs = [], [], []
  for y in range(rows):
    for x in range(cols):
      block = image[y * patch : (y + 1) * patch, x * patch : (x + 1) * patch]
      patches.append(block.reshape(-1))  # (row, column, channel) order.
      yabs.append(y)
      xabs.append(x)
  return np.stack(patches), np.array(yabs), np.array(xabs)


# ----------------------------------------------------------------------------
# The ops.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'height,width,max_tokens',
    [
        (100, 200, 256),
        (224, 224, 256),
        (480, 640, 576),
        (640, 480, 784),
        (37, 1000, 256),
        (1000, 13, 64),
        (333, 777, 196),
        (1, 1, 64),
        (3, 500, 16),
        (17, 19, 1),
    ],
)
def test_grid_is_the_largest_within_the_budget(height, width, max_tokens):
  got = tuple(preprocess.naflex_grid(height, width, max_tokens).numpy())
  assert got == reference_grid(height, width, max_tokens)


def test_grid_closed_forms():
  # 2:1 at 256 tokens: 11 x 22 = 242 (12 x 24 = 288 would not fit).
  assert tuple(preprocess.naflex_grid(100, 200, 256).numpy()) == (11, 22)
  # Square: the whole budget.
  assert tuple(preprocess.naflex_grid(50, 50, 576).numpy()) == (24, 24)


def test_resize_to_sequence_gives_whole_patches_within_the_budget():
  rng = np.random.default_rng(0)
  for height, width in SHAPES:
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    out = preprocess.resize_to_sequence(image, PATCH, 32).numpy()
    rows, cols = reference_grid(height, width, 32)
    assert out.shape == (rows * PATCH, cols * PATCH, 3)
    assert out.dtype == np.float32


def test_patchify_and_padding_match_numpy_slicing():
  rng = np.random.default_rng(1)
  image = rng.normal(size=(3 * PATCH, 5 * PATCH, 3)).astype(np.float32)
  patches, yabs, xabs = preprocess.patchify(tf.constant(image), PATCH)
  want_patches, want_y, want_x = numpy_patchify(image, PATCH)
  np.testing.assert_array_equal(patches.numpy(), want_patches)
  np.testing.assert_array_equal(yabs.numpy(), want_y)
  np.testing.assert_array_equal(xabs.numpy(), want_x)
  # The order of tf.image.extract_patches (and of a conv kernel reshaped
  # from [P, P, C, D] to [P * P * C, D]).
  extracted = tf.image.extract_patches(
      image[None],
      sizes=[1, PATCH, PATCH, 1],
      strides=[1, PATCH, PATCH, 1],
      rates=[1, 1, 1, 1],
      padding='VALID',
  ).numpy()
  np.testing.assert_array_equal(
      patches.numpy(), extracted.reshape(15, PATCH * PATCH * 3)
  )
  padded = preprocess.pad_to_sequence(patches, yabs, xabs, 20)
  got_patches, ptype, got_y, got_x = (t.numpy() for t in padded)
  assert got_patches.shape == (20, PATCH * PATCH * 3)
  np.testing.assert_array_equal(got_patches[:15], want_patches)
  np.testing.assert_array_equal(got_patches[15:], 0)
  np.testing.assert_array_equal(ptype, [1] * 15 + [0] * 5)
  np.testing.assert_array_equal(got_y, list(want_y) + [0] * 5)
  np.testing.assert_array_equal(got_x, list(want_x) + [0] * 5)
  assert [t.dtype for t in padded[1:]] == [tf.int32] * 3


def test_eval_preprocessing_is_the_resized_image_in_patches(tmp_path):
  """Decode, resize at the aspect ratio, [-1, 1], patches, padding."""
  rng = np.random.default_rng(2)
  pixels = rng.integers(0, 256, (12, 50, 3)).astype(np.uint8)
  path = tmp_path / 'wide.png'
  Image.fromarray(pixels).save(path)
  pp = preprocess.PreprocessConfig(image_size=16, num_classes=3)
  fn = preprocess.make_preprocess_fn(
      pp, train=False, naflex=preprocess.NaflexShape(PATCH, 32)
  )
  out = fn({'image': tf.io.read_file(str(path)), 'label': tf.constant(2)})
  patches, ptype, yabs, xabs = (t.numpy() for t in out['image'])
  rows, cols = reference_grid(12, 50, 32)  # 2 x 8
  resized = tf.image.resize(
      pixels.astype(np.float32),
      (rows * PATCH, cols * PATCH),
      antialias=True,
  ).numpy()
  want, want_y, want_x = numpy_patchify(resized / 127.5 - 1, PATCH)
  n = rows * cols
  np.testing.assert_allclose(patches[:n], want, atol=1e-6)
  np.testing.assert_array_equal(patches[n:], 0)
  np.testing.assert_array_equal(ptype, [1] * n + [0] * (32 - n))
  np.testing.assert_array_equal(yabs[:n], want_y)
  np.testing.assert_array_equal(xabs[:n], want_x)
  np.testing.assert_array_equal(out['labels'].numpy(), [0, 0, 1])


# ----------------------------------------------------------------------------
# Buckets.
# ----------------------------------------------------------------------------


def test_bucket_batches_keep_tokens_per_step():
  # 256 tokens x 64 images; shorter buckets get more images.
  assert input_pipeline.bucket_batch_sizes(64, (64, 128, 256), 8) == (
      256,
      128,
      64,
  )
  # Rounded to the multiple: 16 * 784 / 256 = 49 -> 48; / 576 = 21.8 -> 24.
  assert input_pipeline.bucket_batch_sizes(16, (256, 576, 784), 8) == (
      48,
      24,
      16,
  )
  with pytest.raises(ValueError, match=r'config.batch=12 .* 8 devices'):
    input_pipeline.bucket_batch_sizes(12, (256, 576), 8)


def test_bucket_draws_depend_on_seed_and_step_only():
  draws = [input_pipeline.bucket_of_step(3, s, 3) for s in range(600)]
  assert draws == [input_pipeline.bucket_of_step(3, s, 3) for s in range(600)]
  assert draws != [input_pipeline.bucket_of_step(4, s, 3) for s in range(600)]
  counts = np.bincount(draws, minlength=3)
  assert counts.min() > 150, counts  # Uniform: about 200 each.
  assert {input_pipeline.bucket_of_step(3, s, 1) for s in range(20)} == {0}


# ----------------------------------------------------------------------------
# Pipelines.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """2 classes x 8 images of four aspect ratios; class = colour.

  The automatic test split (25 %) takes images 3 and 7 of each class:
  one tall, one very wide.
  """
  root = tmp_path_factory.mktemp('mixed')
  rng = np.random.default_rng(0)
  for c, colour in enumerate(((220, 40, 40), (40, 60, 230))):
    os.makedirs(root / f'class_{c}')
    for i in range(8):
      height, width = SHAPES[i // 2]
      noise = rng.integers(-20, 20, (height, width, 3))
      pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(root / f'class_{c}' / f'{i}.png')
  return root


def naflex_data(root, **overrides):
  config = ml_collections.ConfigDict(
      {
          **NAFLEX_MODEL,
          'dataset': 'image_folder',
          'image_folder': str(root),
          'image_size': 16,
          'batch': 2,
          'batch_eval': 4,
          'seed': 0,
          'image_folder_test_percent': 25,
          'pp': {'inception_crop': False, 'flip': False},
          'naflex': {'seq_lens': (8, 32)},
      }
  )
  config.update(overrides)
  if not config.naflex.seq_lens:  # The fixed-size pipeline: a plain model.
    config.model = ml_collections.ConfigDict(TINY_MODEL['model'])
  return config_lib.parse(config).data


def _tokens(ptype):
  return ptype.sum(axis=1)


def test_train_batches_follow_the_contract(folder):
  data = naflex_data(folder)
  assert data.naflex.patch_size == PATCH  # The model's, set by parse.
  it = input_pipeline.train_iterator(data, batch_multiple=1)
  assert it.bucket_batches == (8, 2)  # 2 images x 32 tokens = 8 x 8.
  seen = set()
  for step in range(12):
    batch = next(it)
    assert set(batch) == {'image', 'labels'}
    patches, ptype, yabs, xabs = batch['image']
    seq_len = data.naflex.seq_lens[it.bucket(step)]
    size = it.bucket_batches[it.bucket(step)]
    seen.add(seq_len)
    assert patches.shape == (size, seq_len, PATCH * PATCH * 3)
    assert patches.dtype == np.float32
    assert ptype.shape == yabs.shape == xabs.shape == (size, seq_len)
    assert ptype.dtype == yabs.dtype == xabs.dtype == np.int32
    assert batch['labels'].shape == (size, 2)
    assert -1 <= patches.min() and patches.max() <= 1
    grids = {reference_grid(h, w, seq_len) for h, w in SHAPES}
    for p, t, y, x in zip(patches, ptype, yabs, xabs):
      n = int(t.sum())
      # Patches first, then padding (zeros everywhere).
      np.testing.assert_array_equal(t, [1] * n + [0] * (seq_len - n))
      assert not p[n:].any() and not y[n:].any() and not x[n:].any()
      rows, cols = y[n - 1] + 1, x[n - 1] + 1  # Row-major: last = corner.
      assert (rows, cols) in grids and rows * cols == n
  assert seen == {8, 32}


def test_buckets_read_the_one_example_stream(folder):
  """Variable batches take consecutive examples of the fixed stream."""
  fixed = input_pipeline.train_iterator(
      naflex_data(folder, naflex={'seq_lens': ()}, batch=1)
  )
  stream = [next(fixed)['labels'].argmax(-1)[0] for _ in range(40)]
  it = input_pipeline.train_iterator(naflex_data(folder), batch_multiple=1)
  labels = []
  while len(labels) < 40:
    labels.extend(next(it)['labels'].argmax(-1))
  assert labels[:40] == stream
  assert it.position == len(labels)


def test_resume_from_a_checkpoint_state_continues_exactly(folder):
  data = naflex_data(folder)
  it = input_pipeline.train_iterator(data, batch_multiple=1)
  batches = [next(it) for _ in range(9)]
  state = it.state_after(5)  # As training saves it at step 5.
  assert state['step'] == 5
  assert state['position'] == sum(
      it.bucket_batches[it.bucket(s)] for s in range(5)
  )
  resumed = input_pipeline.train_iterator(data, state=state, batch_multiple=1)
  for want in batches[5:]:
    got = next(resumed)
    for g, w in zip(got['image'], want['image']):
      np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(got['labels'], want['labels'])
  assert resumed.get_state() == it.state_after(9)
  # Counted from where it resumed, as training counts its steps.
  assert resumed.state_after(2) == it.state_after(7)


def test_resume_without_the_step_is_refused(folder):
  with pytest.raises(ValueError, match='no NaFlex step'):
    input_pipeline.train_iterator(
        naflex_data(folder),
        state=input_pipeline.state_at(8),
        batch_multiple=1,
    )


def test_eval_yields_every_image_once_at_the_longest_length(folder):
  data = naflex_data(folder, batch_eval=3)
  ds, num_batches = input_pipeline.eval_dataset(data)
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == num_batches == 2  # 4 test images, batches of 3.
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
  ptype = np.concatenate([b['image'][1] for b in batches])
  assert ptype.shape == (6, 32)
  # Each image's tokens: its grid at 32 tokens, in the split's order.
  source = input_pipeline.get_source(data)
  want = []
  for path, _ in source.files['test']:
    with Image.open(path) as image:
      width, height = image.size
    want.append(int(np.prod(reference_grid(height, width, 32))))
  np.testing.assert_array_equal(_tokens(ptype[:4]), want)
  # Padding examples: one token, all zeros (no all-padding sequence).
  np.testing.assert_array_equal(_tokens(ptype[4:]), [1, 1])
  patches = np.concatenate([b['image'][0] for b in batches])
  assert not patches[4:].any()


def test_tfds_digits_become_naflex_tuples(tmp_path):
  config = ml_collections.ConfigDict(
      {
          **NAFLEX_MODEL,
          'dataset': 'digits',
          'tfds_data_dir': str(tmp_path),
          'image_size': 8,
          'batch': 4,
          'naflex': {'seq_lens': (16,)},
      }
  )
  data = config_lib.parse(config).data
  batch = next(input_pipeline.train_iterator(data, batch_multiple=4))
  patches, ptype, yabs, xabs = batch['image']
  # 8 x 8 digits: 4 x 4 patches of 4 px fill the 16 tokens.
  assert patches.shape == (4, 16, 48)
  np.testing.assert_array_equal(ptype, 1)
  np.testing.assert_array_equal(yabs[0], np.repeat(np.arange(4), 4))
  np.testing.assert_array_equal(xabs[0], np.tile(np.arange(4), 4))


# ----------------------------------------------------------------------------
# predict --naflex.
# ----------------------------------------------------------------------------


class MeanPatchClassifier(nn.Module):
  """A stand-in NaFlex model: a linear head on the mean of the real patches."""

  num_classes: int = 3
  naflex: bool = False
  patches: tuple[int, int] = (PATCH, PATCH)
  resnet: None = None

  @nn.compact
  def __call__(self, inputs, *, train):
    del train
    assert self.naflex, 'predict must ask for NaFlex inputs'
    patches, ptype, _, _ = inputs
    mask = jnp.asarray(ptype, jnp.float32)[..., None]
    mean = (patches * mask).sum(1) / mask.sum(1)
    return nn.Dense(self.num_classes)(mean)


def test_predict_takes_each_image_at_its_own_aspect_ratio(tmp_path):
  rng = np.random.default_rng(3)
  shapes = ((20, 40), (40, 20), (12, 50))
  paths, pixels = [], []
  for i, shape in enumerate(shapes):
    pixels.append(rng.integers(0, 256, (*shape, 3)).astype(np.uint8))
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(pixels[-1]).save(paths[-1])
  model = MeanPatchClassifier()
  blank = (
      np.zeros((1, 16, 48), np.float32),
      *(np.zeros((1, 16), np.int32) for _ in range(3)),
  )
  params = model.clone(naflex=True).init(jax.random.key(0), blank, train=False)[
      'params'
  ]
  loaded = loading.Loaded(model, params, (16, 16), None, 'stub')
  # Batches of 2 (rounded up to the devices): shapes mixed, last one padded.
  results = predict.predict(
      loaded, paths, top_k=3, batch_size=2, naflex_seq_len=16
  )
  kernel = np.asarray(params['Dense_0']['kernel'])
  bias = np.asarray(params['Dense_0']['bias'])
  for result, image in zip(results, pixels):
    rows, cols = reference_grid(*image.shape[:2], 16)
    resized = tf.image.resize(
        image.astype(np.float32), (rows * PATCH, cols * PATCH), antialias=True
    ).numpy()
    patches, _, _ = numpy_patchify(resized / 127.5 - 1, PATCH)
    logits = patches.mean(0) @ kernel + bias
    want = np.exp(logits - logits.max())
    want /= want.sum()
    got = np.zeros(3)
    for entry in result['top_k']:
      got[entry['index']] = entry['probability']
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_predict_naflex_refusals(tmp_path):
  path = str(tmp_path / 'a.png')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
  loaded = loading.Loaded(MeanPatchClassifier(), {}, (16, 16), None, 'stub')
  with pytest.raises(predict.PredictError, match='choose one'):
    predict.predict(loaded, [path], naflex_seq_len=16, dynamic_image_size=True)
  mixer = loading.Loaded(
      nn.Dense(3), {}, (16, 16), None, 'a Dense'  # No naflex field.
  )
  with pytest.raises(predict.PredictError, match='no naflex option'):
    predict.predict(mixer, [path], naflex_seq_len=16)


# ----------------------------------------------------------------------------
# End to end: train and predict (needs the NaFlex model).
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_main_trains_on_mixed_aspect_ratios_and_predicts(folder, tmp_path):
  workdir = str(tmp_path / 'run')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}

  def run(module, *args):
    return subprocess.run(
        [sys.executable, '-m', module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )

  result = run(
      'vit_jax.main',
      '--config=configs/digits.py:runlocal',
      f'--workdir={workdir}',
      '--config.dataset=image_folder',
      f'--config.image_folder={folder}',
      '--config.image_folder_test_percent=25',
      '--config.model.naflex=True',
      "--config.model.classifier='gap'",
      '--config.naflex.seq_lens=(16, 32)',
      '--config.batch=4',
      '--config.batch_eval=4',
      '--config.total_steps=6',
      '--config.checkpoint_every=3',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    metrics = [json.loads(line) for line in f]
  assert any('accuracy' in ''.join(m) for m in metrics), metrics
  result = run(
      'vit_jax.predict', f'--workdir={workdir}', f'--images={folder}', '--json'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  predictions = json.loads(result.stdout)['predictions']
  assert len(predictions) == 16


# ----------------------------------------------------------------------------
# Refusals: one line naming the field.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'overrides,match',
    [
        (
            {'naflex': {'seq_lens': (16,), 'patch_size': 8}},
            r'config.naflex.patch_size=8 differs from the patch size 4',
        ),
        (
            {'naflex': {'seq_lens': (16, 0)}},
            r'config.naflex.seq_lens=\(16, 0\) must be a tuple of positive',
        ),
        (
            {'naflex': {'seq_lens': (16, 16)}},
            r'repeats a length',
        ),
        (
            {
                'naflex': {'seq_lens': (16,)},
                'pp': {'eval_crop_fraction': 0.875},
            },
            r'config.pp.eval_crop_fraction=0.875 crops to a square',
        ),
        (
            {
                'model_name': 'R26+ViT-S_32',
                'model': {},
                'image_size': 32,
                'naflex': {'seq_lens': (16,)},
            },
            r'needs a plain ViT',
        ),
        (
            {'naflex': {'seq_lens': (16,)}},
            r'testing takes only as a NaFlex model: add '
            r'--config.model.naflex=True',
        ),
        (
            {
                'model': {
                    'patches': {'size': (4, 4)},
                    'naflex': True,
                    'classifier': 'gap',
                }
            },
            r'config.model.naflex=True takes NaFlex patch sequences: set '
            r'config.naflex.seq_lens',
        ),
    ],
)
def test_bad_naflex_configs_are_refused_naming_the_field(overrides, match):
  config = {**TINY_MODEL, 'image_size': 16, **overrides}
  with pytest.raises(ValueError, match=match):
    config_lib.parse(config)
