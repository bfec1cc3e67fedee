"""timm's ViT families, by timm model name: what each one is here.

`TIMM_MODELS` maps a timm model name (e.g. 'vit_small_patch14_reg4_dinov2',
'eva02_base_patch14_224') to this library's registry name, the options that
make the registry's model behave as timm's model of that name does by
default (pooling, epsilon, GELU kind, RoPE convention), the layout of its
state dict (which table of tensor rules reads it) and its preprocessing.
`vit_jax.convert.load_model(file, timm_model=NAME)` and `python -m
vit_jax.convert --input=FILE --timm_model=NAME` read a timm `.safetensors`
of any model listed here.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

# The state-dict layouts: timm's `vision_transformer.VisionTransformer` and
# timm's `eva.Eva` (EVA-02, DINOv3, Perception Encoder).
LAYOUTS = ('vision_transformer', 'eva')


class TimmModel(NamedTuple):
  """One timm model, in this library's terms.

  Attributes:
    registry: The `vit_jax.models` registry name of the same architecture.
    layout: Its state dict's layout, one of `LAYOUTS`.
    options: `get_model` overrides beyond the registry entry's (as timm's
      model of that name builds it by default).
    head_dim: The width of each attention head: a file of smaller width
      (tests) has `width // head_dim` heads.
    preprocessing: How its images are prepared: 'image_size' (the
      resolution of its published weights), 'mean' and 'std' (per channel,
      on [0, 1] pixels), as timm's pretrained config gives them.
  """

  registry: str
  layout: str
  options: Mapping[str, Any]
  head_dim: int
  preprocessing: Mapping[str, Any]


# ----------------------------------------------------------------------------
# timm's vision_transformer.py: DINOv2, SigLIP 2, AIMv2.
# ----------------------------------------------------------------------------

_VISION_TRANSFORMER_MODELS: dict[str, TimmModel] = {}

# ----------------------------------------------------------------------------
# timm's eva.py: EVA-02, DINOv3, Perception Encoder.
# ----------------------------------------------------------------------------

_EVA_MODELS: dict[str, TimmModel] = {}

# ----------------------------------------------------------------------------

TIMM_MODELS: dict[str, TimmModel] = {
    **_VISION_TRANSFORMER_MODELS,
    **_EVA_MODELS,
}

__all__ = ['LAYOUTS', 'TIMM_MODELS', 'TimmModel']
