"""vit_jax.export: StableHLO and SavedModel artefacts give the logits."""

import json
import os

from absl import logging as absl_logging
import jax
import numpy as np
import pytest

import helpers
import numpy_reference as ref
from vit_jax import checkpoint
from vit_jax import export
import vit_jax.models

IMAGE = 16


@pytest.fixture(scope='module')
def vit(tmp_path_factory):
  """A tiny ViT with random weights, its logits and the NumPy reference's."""
  model = vit_jax.models.get_model(
      'testing',
      num_classes=5,
      patches={'size': (4, 4)},
      transformer={'num_layers': 2, 'mlp_dim': 12},
  )
  params = helpers.randomize(
      helpers.init_params(model, np.zeros((1, IMAGE, IMAGE, 3), np.float32)),
      scale=0.5,
  )
  images = helpers.random_images((3, IMAGE, IMAGE, 3))
  path = tmp_path_factory.mktemp('vit') / 'p.npz'
  checkpoint.save(params, path)
  with np.load(path) as f:
    expected = ref.vit_logits(dict(f), images, num_heads=2)
  logits = np.asarray(model.apply({'params': params}, images, train=False))
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  return model, params, images, logits


@pytest.mark.slow
def test_stablehlo_reloads_and_runs_at_two_batch_sizes(vit, tmp_path):
  model, params, images, logits = vit
  path = export.export_stablehlo(
      model, params, (IMAGE, IMAGE), tmp_path, class_names=list('abcde')
  )
  # A fresh deserialisation: nothing of the exporting process is used.
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert exported.platforms == ('cpu', 'cuda', 'tpu')
  assert not isinstance(exported.in_avals[0].shape[0], int)  # Symbolic.
  for n in (1, 3):
    np.testing.assert_allclose(
        np.asarray(exported.call(images[:n])), logits[:n], atol=1e-5, rtol=0
    )
  info = json.loads((tmp_path / export.SERVING_FILE).read_text())
  assert info['inputs']['images']['shape'] == [None, IMAGE, IMAGE, 3]
  assert info['outputs']['logits']['shape'] == [None, 5]
  assert (tmp_path / export.LABELS_FILE).read_text() == 'a\nb\nc\nd\ne\n'


@pytest.mark.slow
def test_savedmodel_serves_logits_in_tensorflow(vit, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  model, params, images, logits = vit
  absl_level = absl_logging.get_absl_logger().level
  export.export_savedmodel(
      model, params, (IMAGE, IMAGE), tmp_path / 'sm', platforms=('cpu',)
  )
  # TensorFlow's save must not leave the caller's absl logging silenced.
  assert absl_logging.get_absl_logger().level == absl_level
  loaded = tf.saved_model.load(str(tmp_path / 'sm'))
  serve = loaded.signatures['serving_default']
  for n in (2, 3):
    got = serve(images=tf.constant(images[:n]))['logits'].numpy()
    np.testing.assert_allclose(got, logits[:n], atol=1e-4, rtol=0)
  # Raw uint8 images at the model's size: only the value range changes.
  raw = np.random.default_rng(1).integers(
      0, 256, (2, IMAGE, IMAGE, 3), dtype=np.uint8
  )
  want = np.asarray(
      model.apply(
          {'params': params}, raw.astype(np.float32) / 127.5 - 1, train=False
      )
  )
  got = loaded.signatures['serving_uint8'](images=tf.constant(raw))['logits']
  np.testing.assert_allclose(got.numpy(), want, atol=1e-4, rtol=0)
  # Any input size is resized to the model's.
  big = np.repeat(np.repeat(raw, 2, axis=1), 2, axis=2)
  got = loaded.signatures['serving_uint8'](images=tf.constant(big))['logits']
  assert got.shape == (2, 5)


def test_export_refuses_an_unknown_format(vit, tmp_path):
  model, params, _, _ = vit

  class Loaded:  # pylint: disable=too-few-public-methods
    pass

  loaded = Loaded()
  loaded.model, loaded.params, loaded.image_size = model, params, (16, 16)
  loaded.class_names = None
  with pytest.raises(ValueError, match="--format='onnx'"):
    export.export(loaded, 'onnx', os.fspath(tmp_path))
