"""EVA-02, DINOv3 and Perception Encoder against timm's own Eva (opt-in).

Skipped unless torch and timm import. For every timm model of layout 'eva'
in `vit_jax.timm_models`: timm's model of that name, at a smaller depth and
width (its head size kept) with a 7-class head, every parameter random, is
saved as `.safetensors` and loaded with `load_timm`; the pooled features
(`forward_head(forward_features(x), pre_logits=True)`) and the logits must
be within 1e-4 of timm's at the model's input size (and at another one for
DINOv3, whose timm models take any size). `to_timm` writes the file back
and timm strict-loads it. Run with
`PYTHONPATH=$PWD:/path/to/torch_and_timm python -m pytest -q -s
tests/test_timm_parity_eva.py` to see the differences.
"""

import jax
import numpy as np
import pytest

from helpers import random_images
from vit_jax import timm_interop
from vit_jax import timm_models

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_torch = pytest.importorskip('safetensors.torch')

TOLERANCE = 1e-4
DEPTH = 2
HEADS = 2

EVA_MODELS = sorted(
    name
    for name, entry in timm_models.TIMM_MODELS.items()
    if entry.layout == 'eva'
)


def _timm_model(name):
  """timm's model at DEPTH blocks of HEADS heads of its own head size."""
  head_dim = timm_models.TIMM_MODELS[name].head_dim
  torch.manual_seed(0)
  model = timm.create_model(
      name,
      pretrained=False,
      depth=DEPTH,
      embed_dim=HEADS * head_dim,
      num_heads=HEADS,
      num_classes=7,
  )
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for tensor in model.parameters():
      noise = torch.randn(tensor.shape, generator=generator) * 0.2
      # Norm weights and LayerScales near 1, so every block matters.
      tensor.copy_(noise + (1.0 if tensor.ndim == 1 else 0.0))
  return model.eval()


def _sizes(name):
  side = timm_models.TIMM_MODELS[name].preprocessing['image_size']
  sizes = [(side, side)]
  if 'dinov3' in name:  # timm's DINOv3 takes any size (dynamic_img_size).
    sizes.append((160, 224))
  return sizes


def _ours(model, params, images):
  """Our pooled features (`pre_logits`) and logits."""
  logits, state = model.apply(
      {'params': params}, images, train=False, mutable=['intermediates']
  )
  return state['intermediates']['pre_logits'][0], logits


def _theirs(model, images):
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    logits = model(x)
  return features.numpy(), logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize('name', EVA_MODELS)
def test_features_and_logits_match_timm(name, tmp_path):
  theirs_model = _timm_model(name)
  path = str(tmp_path / f'{name}.safetensors')
  safetensors_torch.save_file(theirs_model.state_dict(), path)
  model, params = timm_interop.load_timm(path, name)
  # An epsilon moves the outputs of random weights by less than the bound
  # (1e-6 for 1e-5: ~4e-5 here), so it is compared as a setting.
  assert theirs_model.blocks[0].norm1.eps == model.layer_norm_epsilon
  apply = jax.jit(lambda p, x: _ours(model, p, x))
  for h, w in _sizes(name):
    images = random_images((2, h, w, 3), seed=h + w)
    want_features, want_logits = _theirs(theirs_model, images)
    got_features, got_logits = (np.asarray(a) for a in apply(params, images))
    features_diff = float(np.max(np.abs(got_features - want_features)))
    logits_diff = float(np.max(np.abs(got_logits - want_logits)))
    print(
        f'{name} {h}x{w}: features max abs diff {features_diff:.2e}, '
        f'logits max abs diff {logits_diff:.2e}'
    )
    assert features_diff < TOLERANCE
    assert logits_diff < TOLERANCE

  # Back to timm: the same timm model strict-loads what to_timm writes.
  back = str(tmp_path / 'back.safetensors')
  timm_interop.to_timm(model, params, back, timm_model=name)
  again = timm.create_model(
      name,
      pretrained=False,
      depth=DEPTH,
      embed_dim=HEADS * timm_models.TIMM_MODELS[name].head_dim,
      num_heads=HEADS,
      num_classes=7,
  )
  again.load_state_dict(safetensors_torch.load_file(back), strict=True)
  for key, value in theirs_model.state_dict().items():
    assert torch.equal(again.state_dict()[key], value), key
