"""python -m vit_jax.predict (and the run-directory paths of convert and
export): a short digits run, and a folder of images."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import helpers
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import convert
from vit_jax import export
from vit_jax import predict
from vit_jax import run_checkpoints
import vit_jax.models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}


def run_module(module, *args):
  return subprocess.run(
      [sys.executable, '-m', module, *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env=ENV,
  )


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope='module')
def digits_images(digits_run, tmp_path_factory):
  """The shared digits run (conftest), and 16x16 digit PNGs."""
  import sklearn.datasets  # pylint: disable=g-import-not-at-top

  digits = sklearn.datasets.load_digits()
  folder = tmp_path_factory.mktemp('digit_images')
  paths = []
  for i in range(5):
    # 8x8 values 0..16 -> 16x16 grey PNGs: the model's own size, so the
    # bilinear resize is the identity and the input is known exactly.
    pixels = np.kron(digits.images[i], np.ones((2, 2))) * 255 / 16
    path = str(folder / f'digit_{i}_is_{digits.target[i]}.png')
    Image.fromarray(np.round(pixels).astype(np.uint8), mode='L').save(path)
    paths.append(path)
  return digits_run.workdir, str(folder), paths


def run_model(workdir):
  """The run's model and final parameters, built here from its config."""
  run = config_lib.parse(config_lib.load_run_config(workdir))
  params = checkpoint.load(
      os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE)
  )
  model = vit_jax.models.get_model(num_classes=10, **run.model.model_args())
  return model, params


@pytest.mark.slow
def test_predict_on_a_digits_run(digits_images):
  workdir, folder, paths = digits_images
  result = run_module(
      'vit_jax.predict',
      f'--workdir={workdir}',
      f'--images={folder}',
      '--top_k=3',
      '--json',
  )
  assert result.returncode == 0, result.stderr[-4000:]
  out = json.loads(result.stdout)
  assert [p['image'] for p in out['predictions']] == paths  # Sorted.
  model, params = run_model(workdir)
  images = np.stack(
      [
          np.repeat(np.asarray(Image.open(p), np.float32)[..., None], 3, -1)
          / 127.5
          - 1
          for p in paths
      ]
  )
  probs = softmax(
      np.asarray(
          model.apply({'params': params}, images, train=False), np.float64
      )
  )
  for prediction, p in zip(out['predictions'], probs):
    top = prediction['top_k']
    assert [t['rank'] for t in top] == [1, 2, 3]
    assert [t['index'] for t in top] == list(np.argsort(-p)[:3])
    # The run's class names are the digits themselves.
    assert [t['label'] for t in top] == [str(t['index']) for t in top]
    np.testing.assert_allclose(
        [t['probability'] for t in top], np.sort(p)[::-1][:3], atol=1e-5
    )
  # The table: one block per image, rank / probability / index / label.
  result = run_module(
      'vit_jax.predict', f'--workdir={workdir}', paths[0], '--top_k=2'
  )
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0] == paths[0] and len(lines) == 3
  first = out['predictions'][0]['top_k'][0]
  assert lines[1].split() == [
      '1',
      f"{first['probability']:.4f}",
      str(first['index']),
      first['label'],
  ]


@pytest.mark.slow
def test_convert_and_export_read_a_run(digits_images, tmp_path):
  workdir, _, paths = digits_images
  convert.convert(workdir, str(tmp_path / 'hf'))
  hf = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert hf['id2label'] == {str(d): str(d) for d in range(10)}
  assert hf['image_size'] == 16 and hf['patch_size'] == 4
  result = run_module(
      'vit_jax.export',
      f'--workdir={workdir}',
      '--format=stablehlo',
      f'--out={tmp_path}/hlo',
      '--platforms=cpu',
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'stablehlo, 16x16 inputs' in result.stdout
  exported = export.load_stablehlo(str(tmp_path / 'hlo'))
  model, params = run_model(workdir)
  images = helpers.random_images((3, 16, 16, 3))
  np.testing.assert_allclose(
      np.asarray(exported.call(images)),
      np.asarray(model.apply({'params': params}, images, train=False)),
      atol=1e-5,
      rtol=0,
  )
  assert (tmp_path / 'hlo' / 'labels.txt').read_text().split() == [
      str(d) for d in range(10)
  ]


@pytest.fixture(scope='module')
def folder_model(tmp_path_factory):
  """A 3-class 'testing' ViT at 32 px saved as an .npz, and a label file."""
  root = tmp_path_factory.mktemp('folder_model')
  model, params = helpers.write_testing_npz(root / 'model.npz')
  (root / 'labels.txt').write_text('cat\ndog\nfox\n')
  return model, params, root


@pytest.mark.slow
def test_predict_on_a_folder_of_images(folder_model, tmp_path):
  model, params, root = folder_model
  paths = helpers.make_image_folder(str(tmp_path / 'images'), per_class=2)
  # Plus two with spatial structure (non-square, a gradient one way, stripes
  # the other), so that a transposed or mis-aligned resize shows.
  y, x = np.mgrid[:20, :28]
  for i, image in enumerate(
      [
          np.stack([x * 9, (y // 4 % 2) * 255, 255 - x * 9], -1),
          np.stack([(x // 3 % 2) * 255, y * 12, 255 - y * 12], -1),
      ]
  ):
    path = str(tmp_path / 'images' / 'fox' / f'structured_{i}.png')
    Image.fromarray(image.astype(np.uint8)).save(path)
    paths.append(path)
  result = run_module(
      'vit_jax.predict',
      f'--pretrained_path={root}/model.npz',
      '--model=testing',
      f'--labels={root}/labels.txt',
      f'--images={tmp_path}/images',
      '--json',
  )
  assert result.returncode == 0, result.stderr[-4000:]
  predictions = json.loads(result.stdout)['predictions']
  assert sorted(p['image'] for p in predictions) == sorted(paths)
  checked = 0
  for prediction in predictions:
    top = prediction['top_k']
    assert len(top) == 3  # top_k=5 capped at the 3 classes.
    assert sorted(t['label'] for t in top) == ['cat', 'dog', 'fox']
    probs = [t['probability'] for t in top]
    assert probs == sorted(probs, reverse=True)
    assert abs(sum(probs) - 1) < 1e-5
    if not prediction['image'].lower().endswith('.png'):
      continue  # JPEG decoders differ in their last bits.
    # An independent resize: PIL's bilinear upsampling (20x24 -> 32x32),
    # per channel in float, equals TF's half-pixel bilinear.
    image = Image.open(prediction['image']).convert('RGB')
    x = (
        np.stack(
            [
                np.asarray(c.resize((32, 32), Image.BILINEAR))
                for c in (band.convert('F') for band in image.split())
            ],
            axis=-1,
        )
        / 127.5
        - 1
    )
    p = softmax(
        np.asarray(
            model.apply({'params': params}, x[None], train=False), np.float64
        )
    )[0]
    np.testing.assert_allclose(
        [t['probability'] for t in top], p[[t['index'] for t in top]], atol=1e-4
    )
    checked += 1
  assert checked >= 4


def test_predict_errors_name_the_problem(folder_model, tmp_path):
  model, _, root = folder_model
  loaded = convert.load_model(str(root / 'model.npz'), model_name='testing')
  assert loaded.image_size == (32, 32)
  good = helpers.make_image_folder(str(tmp_path / 'ok'), per_class=1)[:1]
  bad = tmp_path / 'broken.png'
  bad.write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  with pytest.raises(predict.PredictError, match=f'Cannot read image {bad}'):
    predict.predict(loaded, good + [str(bad)])
  with pytest.raises(
      predict.PredictError,
      match=r"has 1000 names but the model's head has 3 " 'classes',
  ):
    predict.predict(loaded, good, class_names=predict.read_labels('imagenet1k'))
  with pytest.raises(predict.PredictError, match='does not exist'):
    predict.list_images([str(tmp_path / 'nope')])
  with pytest.raises(predict.PredictError, match='no such file'):
    predict.read_labels('imagenet5k')
  headless = convert.Loaded(
      model.clone(num_classes=0), loaded.params, (32, 32), None, 'headless'
  )
  with pytest.raises(predict.PredictError, match='no classification head'):
    predict.predict(headless, good)


@pytest.mark.slow
def test_predict_at_each_images_own_size(folder_model, tmp_path):
  """`dynamic_image_size`: each image at the nearest multiple of the 16 px
  patches, equal to the 32 px checkpoint loaded at that size."""
  model, _, root = folder_model
  loaded = convert.load_model(str(root / 'model.npz'), model_name='testing')
  y, x = np.mgrid[:50, :28]
  paths, sizes = [], {}
  for i, (height, width, grid) in enumerate(
      [(20, 28, (1, 2)), (50, 20, (3, 1))]
  ):
    image = np.stack([x * 9, (y // 4 % 2) * 255, 255 - y * 5], -1)
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image[:height, :width].astype(np.uint8)).save(paths[-1])
    sizes[paths[-1]] = grid
  results = predict.predict(loaded, paths, dynamic_image_size=True)
  assert [r['image'] for r in results] == paths
  for result in results:
    grid = sizes[result['image']]
    size = (16 * grid[0], 16 * grid[1])
    assert predict.own_size(result['image'], (16, 16)) == size
    image = predict.load_image(result['image'], size)[None]
    params = checkpoint.load_pretrained(
        pretrained_path=str(root / 'model.npz'),
        init_params=helpers.init_params(model, image),
        model_config=model,
        new_grid_size=grid,
    )
    params['head'] = loaded.params['head']
    p = softmax(
        np.asarray(
            model.apply({'params': params}, image, train=False), np.float64
        )
    )[0]
    top = result['top_k']
    np.testing.assert_allclose(
        [t['probability'] for t in top], p[[t['index'] for t in top]], atol=1e-5
    )
  mixer = convert.Loaded(
      vit_jax.models.get_model('Mixer-B_16', num_classes=3),
      {},
      (32, 32),
      None,
      'a mixer',
  )
  with pytest.raises(predict.PredictError, match='no dynamic_image_size'):
    predict.predict(mixer, paths, dynamic_image_size=True)


def test_shipped_label_lists():
  imagenet1k = predict.read_labels('imagenet1k')
  imagenet21k = predict.read_labels('imagenet21k')
  # The heads of the published imagenet2012 and imagenet21k checkpoints.
  assert (len(imagenet1k), len(imagenet21k)) == (1000, 21843)
  assert imagenet1k[0] == 'tench, Tinca tinca'
  assert imagenet1k[281] == 'tabby, tabby cat'
  assert imagenet1k[999].startswith('toilet tissue')
  assert len(set(imagenet21k)) > 21000


def test_load_image_normalises_with_mean_and_std(tmp_path):
  """predict's preprocessing: (pixels / 255 - mean) / std at the model's
  size, or [-1, 1] without them."""
  pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
  path = str(tmp_path / 'image.png')
  Image.fromarray(pixels).save(path)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  got = predict.load_image(path, (8, 8), 1.0, mean, std)
  want = (pixels / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(
      predict.load_image(path, (8, 8)), pixels / 127.5 - 1.0, atol=1e-6
  )


def test_loaded_normalization_is_the_runs_or_the_timm_models():
  from vit_jax import loading  # pylint: disable=g-import-not-at-top
  from vit_jax import timm_models  # pylint: disable=g-import-not-at-top

  run = config_lib.parse(
      {'pp': {'mean': (0.1, 0.2, 0.3), 'std': (0.4, 0.5, 0.6)}}
  )
  loaded = loading.Loaded(None, {}, (8, 8), None, 'run', run=run)
  assert tuple(map(tuple, loaded.normalization)) == (
      (0.1, 0.2, 0.3),
      (0.4, 0.5, 0.6),
  )
  name = 'vit_small_patch14_dinov2'
  loaded = loading.Loaded(None, {}, (8, 8), None, 'f', timm_model=name)
  preprocessing = timm_models.TIMM_MODELS[name].preprocessing
  assert loaded.normalization == (preprocessing['mean'], preprocessing['std'])
  assert tuple(preprocessing['mean']) == (0.485, 0.456, 0.406)  # ImageNet's.
  assert loading.Loaded(None, {}, (8, 8), None, 'x').normalization == (
      None,
      None,
  )
