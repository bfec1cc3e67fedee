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

# timm's pretrained configs' per-channel statistics.
_IMAGENET = {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}
_HALF = {'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)}
_OPENAI_CLIP = {
    'mean': (0.48145466, 0.4578275, 0.40821073),
    'std': (0.26862954, 0.26130258, 0.27577711),
}


def _vision_transformer(
    registry: str,
    head_dim: int,
    image_size: int,
    statistics: Mapping[str, Any],
    **options: Any,
) -> TimmModel:
  return TimmModel(
      registry=registry,
      layout='vision_transformer',
      options=options,
      head_dim=head_dim,
      preprocessing={'image_size': image_size, **statistics},
  )


def _dinov2(registry: str, head_dim: int, registers: bool) -> TimmModel:
  # timm's `reg4` models: 4 registers and `no_embed_class=True` (the table
  # covers the patches only).
  extra = {'num_registers': 4, 'posemb_class_token': False}
  return _vision_transformer(
      registry, head_dim, 518, _IMAGENET, **(extra if registers else {})
  )


def _siglip2(
    registry: str, head_dim: int, image_size: int, gap: bool, tanh: bool
) -> TimmModel:
  # timm builds some of SigLIP's towers with the exact GELU, others with the
  # tanh approximation (`act_layer='gelu_tanh'`); `_gap_` models average the
  # normalised tokens (`fc_norm=False`) instead of the MAP head.
  return _vision_transformer(
      registry,
      head_dim,
      image_size,
      _HALF,
      gelu_approximate=tanh,
      **({'classifier': 'gap'} if gap else {}),
  )


_VISION_TRANSFORMER_MODELS: dict[str, TimmModel] = {
    **{
        f'vit_{size}_patch14{reg}_dinov2': _dinov2(
            f'DINOv2-{letter}_14', 64, registers=bool(reg)
        )
        for size, letter in (
            ('small', 'S'),
            ('base', 'B'),
            ('large', 'L'),
            ('giant', 'g'),
        )
        for reg in ('', '_reg4')
    },
    # The towers of timm's `v2_webli` (SigLIP 2) weights, each resolution a
    # timm model of its own.
    **{
        f'vit_{size}_siglip{pool}_{res}': _siglip2(
            registry, head_dim, res, gap=bool(pool), tanh=res in tanh
        )
        # The resolutions, and those whose timm model has the tanh GELU.
        for size, registry, head_dim, resolutions, tanh in (
            (
                'base_patch16',
                'SigLIP2-B_16',
                64,
                (224, 256, 384, 512),
                (),
            ),
            ('large_patch16', 'SigLIP2-L_16', 64, (256, 384, 512), (512,)),
            (
                'so400m_patch14',
                'SigLIP2-So400m_14',
                72,
                (224, 378),
                (),
            ),
            (
                'so400m_patch16',
                'SigLIP2-So400m_16',
                72,
                (256, 384, 512),
                (256, 384, 512),
            ),
            (
                'giantopt_patch16',
                'ViT-gopt_16',
                96,
                (256, 384),
                (256, 384),
            ),
        )
        for res in resolutions
        for pool in ('', '_gap')
    },
    **{
        f'aimv2_{size}_patch14_{res}': _vision_transformer(
            registry, 128, res, _OPENAI_CLIP
        )
        for size, registry in (('large', 'AIMv2-L_14'), ('huge', 'AIMv2-H_14'))
        for res in (224, 336, 448)
    },
}

# ----------------------------------------------------------------------------
# timm's eva.py: EVA-02, DINOv3, Perception Encoder.
# ----------------------------------------------------------------------------


def _eva(
    registry: str,
    head_dim: int,
    image_size: int,
    statistics: Mapping[str, Any],
    **options: Any,
) -> TimmModel:
  return TimmModel(
      registry=registry,
      layout='eva',
      options=options,
      head_dim=head_dim,
      preprocessing={'image_size': image_size, **statistics},
  )


_EVA_MODELS: dict[str, TimmModel] = {
    # The 224 px towers of EVA-02's masked-image-modelling weights (timm's
    # `mim_in22k` / `mim_m38m`, no head).
    **{
        f'eva02_{size}_patch14_224': _eva(registry, 64, 224, _OPENAI_CLIP)
        for size, registry in (
            ('small', 'EVA02-S_14'),
            ('base', 'EVA02-B_14'),
            ('large', 'EVA02-L_14'),
        )
    },
    # DINOv3 at its `lvd1689m` weights' statistics (timm's `sat493m`
    # weights of L and 7B have their own). The `_qkvb` models have query and
    # value biases (zero in the published weights).
    **{
        f'vit_{size}_patch16_dinov3{qkvb}': _eva(
            registry,
            head_dim,
            256,
            _IMAGENET,
            **({'qkv_bias': 'qv'} if qkvb else {}),
        )
        for size, registry, head_dim in (
            ('small', 'DINOv3-S_16', 64),
            ('small_plus', 'DINOv3-S+_16', 64),
            ('base', 'DINOv3-B_16', 64),
            ('large', 'DINOv3-L_16', 64),
            ('huge_plus', 'DINOv3-H+_16', 64),
        )
        for qkvb in ('', '_qkvb')
    },
    'vit_7b_patch16_dinov3': _eva('DINOv3-7B_16', 128, 256, _IMAGENET),
    'vit_pe_core_base_patch16_224': _eva('PE-core-B_16', 64, 224, _HALF),
    'vit_pe_core_large_patch14_336': _eva('PE-core-L_14', 64, 336, _HALF),
}

# ----------------------------------------------------------------------------

TIMM_MODELS: dict[str, TimmModel] = {
    **_VISION_TRANSFORMER_MODELS,
    **_EVA_MODELS,
}

__all__ = ['LAYOUTS', 'TIMM_MODELS', 'TimmModel']
