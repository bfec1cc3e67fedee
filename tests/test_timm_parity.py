"""Opt-in: timm's own DINOv2, SigLIP 2 and AIMv2 models against ours.

Skipped unless torch and timm import. Each family's timm model (smaller
depth and width, the family's head size, random weights everywhere) is
saved with `safetensors.torch.save_file(model.state_dict())`, read by
`vit_jax.timm_interop.load_timm`, and both models see the same images:
pooled features (`forward_head(..., pre_logits=True)`) and logits agree
within 1e-4. Run with

  python -m pytest -q -s tests/test_timm_parity.py
"""

import numpy as np
import pytest

from vit_jax import timm_interop
from vit_jax import timm_models

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_torch = pytest.importorskip('safetensors.torch')

TOLERANCE = 1e-4
NUM_CLASSES = 7
# timm model name -> (width, image size): 2 blocks, width // head size heads.
MODELS = {
    'vit_small_patch14_dinov2': (128, 28),
    'vit_base_patch14_reg4_dinov2': (128, 28),
    'vit_giant_patch14_reg4_dinov2': (128, 28),
    'vit_base_patch16_siglip_256': (128, 32),
    'vit_so400m_patch14_siglip_378': (144, 28),
    'vit_so400m_patch16_siglip_384': (144, 32),
    'vit_giantopt_patch16_siglip_256': (192, 32),
    'vit_large_patch16_siglip_512': (128, 32),
    'vit_large_patch16_siglip_gap_512': (128, 32),
    'aimv2_large_patch14_224': (256, 28),
    'aimv2_huge_patch14_448': (256, 28),
    'vit_large_patch14_dinov2': (128, 28),
}


def _timm_model(name, width, size):
  torch.manual_seed(0)
  model = timm.create_model(
      name,
      pretrained=False,
      depth=2,
      embed_dim=width,
      num_heads=width // timm_models.TIMM_MODELS[name].head_dim,
      num_classes=NUM_CLASSES,
      img_size=size,
  )
  # Random values in every tensor: LayerScale, biases and norms too (their
  # initial ones would hide a tensor read into the wrong place).
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for param in model.parameters():
      noise = torch.randn(param.shape, generator=generator) * 0.2
      if param.ndim == 1:
        noise += 1.0
      param.copy_(noise)
  return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(MODELS))
def test_timm_model_features_and_logits(name, tmp_path):
  width, size = MODELS[name]
  theirs = _timm_model(name, width, size)
  path = str(tmp_path / f'{name}.safetensors')
  safetensors_torch.save_file(
      {k: v.contiguous() for k, v in theirs.state_dict().items()}, path
  )
  model, params = timm_interop.load_timm(path, name)
  images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3))
  images = images.astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    tokens = theirs.forward_features(x)
    want_features = theirs.forward_head(tokens, pre_logits=True).numpy()
    want_logits = theirs.forward_head(tokens).numpy()
  got_logits, state = model.apply(
      {'params': params},
      images,
      train=False,
      mutable=['intermediates'],
  )
  got_features = np.asarray(state['intermediates']['pre_logits'][0])
  features_diff = float(np.max(np.abs(got_features - want_features)))
  logits_diff = float(np.max(np.abs(np.asarray(got_logits) - want_logits)))
  print(
      f'\n{name} ({model.model_name}): max |features diff| '
      f'{features_diff:.2e}, max |logits diff| {logits_diff:.2e}'
  )
  assert features_diff < TOLERANCE
  assert logits_diff < TOLERANCE


@pytest.mark.slow
def test_our_timm_file_strict_loads_in_timm(tmp_path):
  name, (width, size) = (
      'vit_giant_patch14_reg4_dinov2',
      MODELS['vit_giant_patch14_reg4_dinov2'],
  )
  theirs = _timm_model(name, width, size)
  path = str(tmp_path / 'theirs.safetensors')
  safetensors_torch.save_file(
      {k: v.contiguous() for k, v in theirs.state_dict().items()}, path
  )
  model, params = timm_interop.load_timm(path, name)
  ours = str(tmp_path / 'ours.safetensors')
  timm_interop.to_timm(model, params, ours, timm_model=name)
  fresh = timm.create_model(
      name,
      pretrained=False,
      depth=2,
      embed_dim=width,
      num_heads=width // timm_models.TIMM_MODELS[name].head_dim,
      num_classes=NUM_CLASSES,
      img_size=size,
  )
  fresh.load_state_dict(safetensors_torch.load_file(ours), strict=True)
  for key, value in theirs.state_dict().items():
    assert torch.equal(fresh.state_dict()[key], value), key
