"""Opt-in: converted models against transformers and timm themselves.

Skipped unless torch, transformers and timm import (pip install
'vit_jax[interop]'). Every comparison prints its largest logit difference
(`pytest -s` shows them); the bound is 1e-4.
"""

import os

import jax
import numpy as np
import pytest

import helpers
from vit_jax import convert
import vit_jax.models

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
timm = pytest.importorskip('timm')

IMAGE = 32
# (gelu_approximate, LayerNorm epsilon): the paper code's and transformers'
# google/vit-* configs'.
NUMERICS = [(True, 1e-6), (False, 1e-12)]
LOGIT_SCALE = 20.0


def small_vit(
    classifier='token',
    num_classes=7,
    gelu_approximate=True,
    eps=1e-6,
    seed=0,
    **extra,
):
  """D=64, 4 heads, 3 blocks, 8x8 patches at 32 px, random weights."""
  model = vit_jax.models.get_model(
      'testing',
      num_classes=num_classes,
      patches={'size': (8, 8)},
      hidden_size=64,
      transformer={'num_layers': 3, 'num_heads': 4, 'mlp_dim': 96},
      classifier=classifier,
      gelu_approximate=gelu_approximate,
      layer_norm_epsilon=eps,
      **extra,
  )
  params = helpers.init_params(
      model, np.zeros((1, IMAGE, IMAGE, 3), np.float32)
  )
  params = helpers.randomize(params, seed=seed, scale=0.3)
  if num_classes:
    # Logits up to LOGIT_SCALE: float32 rounding stays far below the 1e-4
    # bound while the wrong GELU kind would exceed it (report checks).
    scale = (
        LOGIT_SCALE
        / np.abs(
            ours(model, params, helpers.random_images((4, IMAGE, IMAGE, 3)))
        ).max()
    )
    params['head'] = {k: v * scale for k, v in params['head'].items()}
  return model, params


def ours(model, params, images):
  return np.asarray(
      jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
          params, images
      )
  )


def scale_head(head, model):
  """Rescales a torch model's head so its logits reach LOGIT_SCALE."""
  logits = model(torch_nchw(helpers.random_images((4, IMAGE, IMAGE, 3))))
  logits = getattr(logits, 'logits', logits)
  scale = LOGIT_SCALE / float(logits.abs().max())
  head.weight.mul_(scale)
  head.bias.mul_(scale)


def torch_nchw(images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def report(what, got, want, model=None, params=None, images=None):
  """Prints and checks max |got - want|; with the model, also how far the
  other GELU kind is (the bound must be able to see a wrong one)."""
  diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
  line = (
      f'{what}: max |logit difference| = {diff:.2e} (logits up to '
      f'{np.abs(want).max():.2f}'
  )
  if model is not None:
    other = model.clone(gelu_approximate=not model.gelu_approximate)
    wrong = float(np.abs(ours(other, params, images) - want).max())
    line += f'; the other GELU would differ by {wrong:.2e}'
    assert wrong > 1e-4, what  # A wrong GELU kind would fail.
  print(line + ')')
  assert np.abs(want).max() > 0.1  # Not trivially small.
  assert diff < 1e-4, what
  return diff


@pytest.mark.parametrize('gelu_approximate,eps', NUMERICS)
def test_to_transformers_loads_in_transformers(tmp_path, gelu_approximate, eps):
  model, params = small_vit(gelu_approximate=gelu_approximate, eps=eps)
  images = helpers.random_images((4, IMAGE, IMAGE, 3))
  convert.to_transformers(model, params, tmp_path / 'hf')
  hf = transformers.ViTForImageClassification.from_pretrained(
      tmp_path / 'hf'
  ).eval()
  with torch.no_grad():
    got = hf(pixel_values=torch_nchw(images)).logits.numpy()
  report(
      f'vit_jax -> transformers {transformers.__version__} '
      f'(gelu_approximate={gelu_approximate}, eps={eps})',
      got,
      ours(model, params, images),
      model,
      params,
      images,
  )


@pytest.mark.parametrize(
    'hidden_act,eps', [('gelu', 1e-12), ('gelu_pytorch_tanh', 1e-6)]
)
def test_from_transformers_reads_what_transformers_writes(
    tmp_path, hidden_act, eps
):
  torch.manual_seed(0)
  hf_config = transformers.ViTConfig(
      hidden_size=64,
      num_hidden_layers=3,
      num_attention_heads=4,
      intermediate_size=96,
      hidden_act=hidden_act,
      layer_norm_eps=eps,
      image_size=IMAGE,
      patch_size=8,
      num_labels=7,
  )
  hf = transformers.ViTForImageClassification(hf_config).eval()
  with torch.no_grad():  # Larger weights than the init: a harder test.
    for p in hf.parameters():
      p.add_(torch.randn_like(p) * 0.1)
    scale_head(hf.classifier, hf)
  hf.save_pretrained(tmp_path / 'hf')
  assert 'model.safetensors' in os.listdir(tmp_path / 'hf')
  model, params = convert.from_transformers(tmp_path / 'hf')
  assert model.gelu_approximate is (hidden_act != 'gelu')
  images = helpers.random_images((4, IMAGE, IMAGE, 3))
  with torch.no_grad():
    want = hf(pixel_values=torch_nchw(images)).logits.numpy()
  report(
      f'transformers {transformers.__version__} -> vit_jax '
      f'({hidden_act}, eps={eps})',
      ours(model, params, images),
      want,
      model,
      params,
      images,
  )


def test_vit_model_pooler_both_ways(tmp_path):
  model, params = small_vit(num_classes=0, representation_size=48)
  convert.to_transformers(model, params, tmp_path / 'hf')
  hf = transformers.ViTModel.from_pretrained(tmp_path / 'hf').eval()
  images = helpers.random_images((3, IMAGE, IMAGE, 3))
  with torch.no_grad():
    got = hf(pixel_values=torch_nchw(images)).pooler_output.numpy()
  report(
      'vit_jax -> transformers ViTModel pooler',
      got,
      ours(model, params, images),
  )


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
@pytest.mark.parametrize('gelu_approximate,eps', NUMERICS)
def test_to_timm_loads_in_timm(tmp_path, classifier, gelu_approximate, eps):
  model, params = small_vit(
      classifier=classifier, gelu_approximate=gelu_approximate, eps=eps
  )
  images = helpers.random_images((4, IMAGE, IMAGE, 3))
  convert.to_timm(model, params, tmp_path / 'timm.safetensors')
  timm_model = convert.create_timm_model(tmp_path / 'timm.safetensors')
  with torch.no_grad():
    got = timm_model(torch_nchw(images)).numpy()
  report(
      f'vit_jax -> timm {timm.__version__} ({classifier}, '
      f'gelu_approximate={gelu_approximate}, eps={eps})',
      got,
      ours(model, params, images),
      model,
      params,
      images,
  )


@pytest.mark.parametrize('act_layer', ['gelu', 'gelu_tanh'])
def test_from_timm_reads_a_timm_state_dict(tmp_path, act_layer):
  # pylint: disable=g-import-not-at-top
  import safetensors.torch
  from timm.models import vision_transformer
  # pylint: enable=g-import-not-at-top
  torch.manual_seed(0)
  timm_model = vision_transformer.VisionTransformer(
      img_size=IMAGE,
      patch_size=8,
      embed_dim=64,
      depth=3,
      num_heads=4,
      mlp_ratio=1.5,
      num_classes=7,
      act_layer=act_layer,
  ).eval()
  with torch.no_grad():
    for p in timm_model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
    scale_head(timm_model.head, timm_model)
  safetensors.torch.save_file(
      timm_model.state_dict(), str(tmp_path / 'timm.safetensors')
  )
  model, params = convert.from_timm(
      tmp_path / 'timm.safetensors',
      num_heads=4,
      gelu_approximate=act_layer == 'gelu_tanh',
  )
  images = helpers.random_images((4, IMAGE, IMAGE, 3))
  with torch.no_grad():
    want = timm_model(torch_nchw(images)).numpy()
  report(
      f'timm {timm.__version__} -> vit_jax ({act_layer})',
      ours(model, params, images),
      want,
      model,
      params,
      images,
  )
