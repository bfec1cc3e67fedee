"""Named model configurations and `get_model`.

Every config uses the field names of the official vit_jax model configs, so a
config printed here can be passed to the original code and vice versa. Adding
a model means adding an entry to `_CONFIGS` *and* its exact parameter count to
the tests (a test fails otherwise).
"""

from collections.abc import Mapping
import copy
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import config_errors
from vit_jax import timm_models
from vit_jax.models import mixer
from vit_jax.models import resnet
from vit_jax.models import rope
from vit_jax.models import vit


def _vit(hidden, mlp, heads, layers, patch, dropout=0.0, **extra):
  config = {
      'patches': {'size': (patch, patch)},
      'hidden_size': hidden,
      'transformer': {
          'mlp_dim': mlp,
          'num_heads': heads,
          'num_layers': layers,
          'attention_dropout_rate': 0.0,
          'dropout_rate': dropout,
      },
      'classifier': 'token',
      'representation_size': None,
  }
  config.update(extra)
  return config


def _hybrid(base, num_layers, patch):
  config = copy.deepcopy(base)
  config['patches'] = {'size': (patch, patch)}
  config['resnet'] = {'num_layers': tuple(num_layers), 'width_factor': 1}
  return config


def _mixer(hidden, blocks, tokens_mlp, channels_mlp, patch):
  return {
      'patches': {'size': (patch, patch)},
      'hidden_dim': hidden,
      'num_blocks': blocks,
      'tokens_mlp_dim': tokens_mlp,
      'channels_mlp_dim': channels_mlp,
  }


_TI = dict(hidden=192, mlp=768, heads=3, layers=12)
_S = dict(hidden=384, mlp=1536, heads=6, layers=12)
_B = dict(hidden=768, mlp=3072, heads=12, layers=12)
_L = dict(hidden=1024, mlp=4096, heads=16, layers=24)
_SO400M = dict(hidden=1152, mlp=4304, heads=16, layers=27)


def _dinov2(hidden, mlp, heads, layers, swiglu=False):
  config = _vit(
      hidden,
      mlp,
      heads,
      layers,
      patch=14,
      layer_scale=1e-5,
      gelu_approximate=False,
  )
  if swiglu:  # `mlp` is _vit's MLP width: the kind is set apart.
    config['mlp'] = 'swiglu'
  return config


def _siglip2(hidden, mlp, heads, layers, patch, gelu_approximate=False):
  return _vit(
      hidden,
      mlp,
      heads,
      layers,
      patch,
      classifier='map',
      gelu_approximate=gelu_approximate,
  )


def _aimv2(hidden, mlp, heads, layers):
  config = _vit(
      hidden,
      mlp,
      heads,
      layers,
      patch=14,
      classifier='gap',
      norm='rmsnorm',
      layer_norm_epsilon=1e-5,
      qkv_bias=False,
      proj_bias=False,
      mlp_bias=False,
      embed_norm=True,
  )
  config['mlp'] = 'swiglu'  # `mlp` is _vit's MLP width.
  return config


def _eva02(hidden, mlp, heads, layers, mlp_norm):
  # timm's eva02_*_patch14_224 (the MIM-pretrained towers): mean of the
  # patch tokens then fc_norm, a class token with a learned position, EVA's
  # q/v biases, SwiGLU (mlp = int(hidden * 8 / 3) per branch), RoPE.
  config = _vit(
      hidden,
      mlp,
      heads,
      layers,
      patch=14,
      classifier='gap',
      class_token=True,
      fc_norm=True,
      mlp_norm=mlp_norm,
      qkv_bias='qv',
      gelu_approximate=False,
      rope='axial',
      rope_options=dict(rope.EVA02),
  )
  config['mlp'] = 'swiglu'  # `mlp` is _vit's MLP width.
  return config


def _dinov3(hidden, mlp, heads, layers, swiglu=False):
  # timm's vit_*_patch16_dinov3: no position embeddings but RoPE, a class
  # token and 4 registers, LayerScale, no qkv bias, LayerNorm eps 1e-5 and
  # timm's default pooling, the mean of the normalised patch tokens.
  config = _vit(
      hidden,
      mlp,
      heads,
      layers,
      patch=16,
      classifier='gap',
      class_token=True,
      num_registers=4,
      posemb='none',
      layer_scale=1e-5,
      qkv_bias=False,
      layer_norm_epsilon=1e-5,
      gelu_approximate=False,
      rope='axial',
      rope_options=dict(rope.DINOV3),
  )
  if swiglu:  # `mlp` is _vit's MLP width: the kind is set apart.
    config['mlp'] = 'swiglu'
  return config


def _pe_core(hidden, mlp, heads, layers, patch, ref_grid):
  # timm's vit_pe_core_*: a norm before the blocks (and no patch bias), a
  # class token with a learned position, RoPE on a grid offset by one in
  # 'xy' order, a MAP head of 8 heads over every token, LayerNorm eps 1e-5.
  return _vit(
      hidden,
      mlp,
      heads,
      layers,
      patch,
      classifier='map',
      class_token=True,
      pre_norm=True,
      map_num_heads=8,
      map_mlp_dim=4 * hidden,
      layer_norm_epsilon=1e-5,
      gelu_approximate=False,
      rope='axial',
      rope_options={**rope.PE, 'ref_grid': ref_grid},
  )


# name -> (module class, config). Sizes: paper Table 1 (B, L, H), DeiT (Ti, S),
# "Scaling Vision Transformers" Table 2 (g, G); dropout as in the official
# configs (0.1 for L/16, H/14 and R50+B/16, else 0).
_CONFIGS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    'testing': (
        vit.VisionTransformer,
        _vit(hidden=10, mlp=10, heads=2, layers=1, patch=16, dropout=0.1),
    ),
    'ViT-Ti_16': (vit.VisionTransformer, _vit(**_TI, patch=16)),
    'ViT-S_16': (vit.VisionTransformer, _vit(**_S, patch=16)),
    'ViT-S_32': (vit.VisionTransformer, _vit(**_S, patch=32)),
    'ViT-B_8': (vit.VisionTransformer, _vit(**_B, patch=8)),
    'ViT-B_16': (vit.VisionTransformer, _vit(**_B, patch=16)),
    'ViT-B_32': (vit.VisionTransformer, _vit(**_B, patch=32)),
    'ViT-L_16': (vit.VisionTransformer, _vit(**_L, patch=16, dropout=0.1)),
    'ViT-L_32': (vit.VisionTransformer, _vit(**_L, patch=32)),
    'ViT-H_14': (
        vit.VisionTransformer,
        _vit(hidden=1280, mlp=5120, heads=16, layers=32, patch=14, dropout=0.1),
    ),
    'ViT-g_14': (
        vit.VisionTransformer,
        _vit(hidden=1408, mlp=6144, heads=16, layers=40, patch=14),
    ),
    'ViT-G_14': (
        vit.VisionTransformer,
        _vit(hidden=1664, mlp=8192, heads=16, layers=48, patch=14),
    ),
    # The shape-optimised ViT of "Getting ViT in Shape" (Alabdulmohsin et
    # al., 2023; big_vision's 'So400m'), SigLIP's largest image tower, which
    # pools with a MAP head.
    'ViT-So400m_14': (
        vit.VisionTransformer,
        _vit(
            hidden=1152,
            mlp=4304,
            heads=16,
            layers=27,
            patch=14,
            classifier='map',
        ),
    ),
    # ------------------------------------------------------------------------
    # Today's families with timm's vision_transformer.py layout: DINOv2,
    # SigLIP 2, AIMv2 (see vit_jax.timm_models).
    # ------------------------------------------------------------------------
    # DINOv2 (Oquab et al., 2023): class token, LayerScale, exact GELU; g/14
    # has a SwiGLU MLP of 4096 per branch (timm's packed `fc1`).
    'DINOv2-S_14': (vit.VisionTransformer, _dinov2(**_S)),
    'DINOv2-B_14': (vit.VisionTransformer, _dinov2(**_B)),
    'DINOv2-L_14': (
        vit.VisionTransformer,
        _dinov2(hidden=1024, mlp=4096, heads=16, layers=24),
    ),
    'DINOv2-g_14': (
        vit.VisionTransformer,
        _dinov2(hidden=1536, mlp=4096, heads=24, layers=40, swiglu=True),
    ),
    # SigLIP 2's image towers (Tschannen et al., 2025): MAP head, no class
    # token; the GELU kind is timm's for these names (`vit_jax.timm_models`
    # gives it for each timm model).
    'SigLIP2-B_16': (vit.VisionTransformer, _siglip2(**_B, patch=16)),
    'SigLIP2-L_16': (
        vit.VisionTransformer,
        _siglip2(hidden=1024, mlp=4096, heads=16, layers=24, patch=16),
    ),
    'SigLIP2-So400m_14': (vit.VisionTransformer, _siglip2(**_SO400M, patch=14)),
    'SigLIP2-So400m_16': (
        vit.VisionTransformer,
        _siglip2(**_SO400M, patch=16, gelu_approximate=True),
    ),
    # SigLIP 2's g-opt/16 tower ("Getting ViT in Shape"'s giant, opt-imised).
    'ViT-gopt_16': (
        vit.VisionTransformer,
        _siglip2(
            hidden=1536,
            mlp=6144,
            heads=16,
            layers=40,
            patch=16,
            gelu_approximate=True,
        ),
    ),
    # AIMv2 (Fini et al., 2024): RMSNorm everywhere (the patch embeddings'
    # too), SwiGLU, no biases in the blocks, mean of the tokens.
    'AIMv2-L_14': (
        vit.VisionTransformer,
        _aimv2(hidden=1024, mlp=2816, heads=8, layers=24),
    ),
    'AIMv2-H_14': (
        vit.VisionTransformer,
        _aimv2(hidden=1536, mlp=4096, heads=12, layers=24),
    ),
    # ------------------------------------------------------------------------
    # Today's families with timm's eva.py layout: EVA-02, DINOv3, Perception
    # Encoder (see vit_jax.timm_models).
    # ------------------------------------------------------------------------
    # EVA-02 (Fang et al., 2023), masked-image-modelling towers.
    'EVA02-S_14': (
        vit.VisionTransformer,
        _eva02(hidden=384, mlp=1024, heads=6, layers=12, mlp_norm=False),
    ),
    'EVA02-B_14': (
        vit.VisionTransformer,
        _eva02(hidden=768, mlp=2048, heads=12, layers=12, mlp_norm=True),
    ),
    'EVA02-L_14': (
        vit.VisionTransformer,
        _eva02(hidden=1024, mlp=2730, heads=16, layers=24, mlp_norm=True),
    ),
    # DINOv3 (Simeoni et al., 2025); S+ and H+ have a SwiGLU MLP.
    'DINOv3-S_16': (vit.VisionTransformer, _dinov3(**_S)),
    'DINOv3-S+_16': (vit.VisionTransformer, _dinov3(**_S, swiglu=True)),
    'DINOv3-B_16': (vit.VisionTransformer, _dinov3(**_B)),
    'DINOv3-L_16': (vit.VisionTransformer, _dinov3(**_L)),
    'DINOv3-H+_16': (
        vit.VisionTransformer,
        _dinov3(hidden=1280, mlp=5120, heads=20, layers=32, swiglu=True),
    ),
    'DINOv3-7B_16': (
        vit.VisionTransformer,
        _dinov3(hidden=4096, mlp=8192, heads=32, layers=40, swiglu=True),
    ),
    # Perception Encoder's core image towers (Bolya et al., 2025).
    'PE-core-B_16': (
        vit.VisionTransformer,
        _pe_core(**_B, patch=16, ref_grid=(14, 14)),
    ),
    'PE-core-L_14': (
        vit.VisionTransformer,
        _pe_core(**_L, patch=14, ref_grid=(24, 24)),
    ),
    # Hybrids: total stride = 4 (root) * 2**(stages - 1) * patch.
    'R+ViT-Ti_16': (
        vit.VisionTransformer,
        _hybrid(_vit(**_TI, patch=16), num_layers=(), patch=8),
    ),
    'R26+ViT-S_32': (
        vit.VisionTransformer,
        _hybrid(_vit(**_S, patch=32), num_layers=(2, 2, 2, 2), patch=1),
    ),
    'R50+ViT-B_16': (
        vit.VisionTransformer,
        _hybrid(
            _vit(**_B, patch=16, dropout=0.1), num_layers=(3, 4, 9), patch=1
        ),
    ),
    'R50+ViT-L_32': (
        vit.VisionTransformer,
        _hybrid(
            _vit(**_L, patch=32, dropout=0.1), num_layers=(3, 4, 6, 3), patch=1
        ),
    ),
    'Mixer-B_16': (mixer.MlpMixer, _mixer(768, 12, 384, 3072, patch=16)),
    'Mixer-B_32': (mixer.MlpMixer, _mixer(768, 12, 384, 3072, patch=32)),
    'Mixer-L_16': (mixer.MlpMixer, _mixer(1024, 24, 512, 4096, patch=16)),
}

MODEL_NAMES: tuple[str, ...] = tuple(_CONFIGS)


class UnknownModelError(KeyError):
  """Raised for a model name that is not in the registry."""

  def __str__(self):  # KeyError would print the message with quotes.
    return str(self.args[0])


def _check_name(name: str) -> None:
  if name not in _CONFIGS:
    raise UnknownModelError(
        f'Unknown model {name!r}. Known models: {", ".join(MODEL_NAMES)}. '
        'Pass one of these names (case and separators matter), or build '
        'VisionTransformer / MlpMixer directly for a custom size.'
    )


def get_config(name: str, **overrides: Any) -> dict[str, Any]:
  """Returns a fresh copy of the named model's config (official field names).

  Args:
    name: A name from `MODEL_NAMES`.
    **overrides: Fields to change; a dict value is merged into the config's
      dict of the same name (`patches`, `transformer`, `resnet`).

  Raises:
    UnknownModelError: `name` is not registered (the message lists the names).
  """
  _check_name(name)
  config = copy.deepcopy(_CONFIGS[name][1])
  _merge(config, overrides)
  return config


def model_class(name: str) -> type[nn.Module]:
  """Returns the module class (VisionTransformer or MlpMixer) of a name."""
  _check_name(name)
  return _CONFIGS[name][0]


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> None:
  for key, value in overrides.items():
    if isinstance(value, Mapping) and isinstance(base.get(key), dict):
      _merge(base[key], value)
    else:
      base[key] = copy.deepcopy(value) if isinstance(value, Mapping) else value


# Keys a dict-valued field reads (`VisionTransformer.__call__`,
# `resnet.ResNetStage`), with the value used when a config omits one.
_NESTED_FIELDS: dict[str, dict[str, Any]] = {
    'patches': {'size': None},
    'transformer': {
        'num_layers': None,
        'mlp_dim': None,
        'num_heads': None,
        'dropout_rate': 0.1,
        'attention_dropout_rate': 0.1,
        'add_position_embedding': True,
    },
    'resnet': {'num_layers': (), 'width_factor': 1},
}
# Fields a run sets through its own config fields, not through overrides.
_NOT_OVERRIDES = frozenset({'parent', 'name', 'num_classes', 'model_name'})


def model_fields(name: str) -> dict[str, Any]:
  """Every field `get_model(name, **overrides)` accepts, with its value.

  The values are the named model's (its registry config, else the module's
  default); dict-valued fields (`patches`, `transformer`, `resnet`) list
  every key they read (`resnet` is None for a plain ViT). Command lines use
  this to check and type an override such as
  `model.transformer.dropout_rate=0.1` before building anything.

  Args:
    name: A name from `MODEL_NAMES`.

  Returns:
    {field: value, or {key: value} for dict-valued fields}.

  Raises:
    UnknownModelError: `name` is not registered.
  """
  cls = model_class(name)
  config = get_config(name)
  fields = {}
  for f in dataclasses.fields(cls):
    if f.name in _NOT_OVERRIDES:
      continue
    default = None if f.default is dataclasses.MISSING else f.default
    value = config.get(f.name, default)
    if f.name in _NESTED_FIELDS and value is not None:
      value = {**_NESTED_FIELDS[f.name], **value}
    fields[f.name] = value
  return fields


def get_model(
    name: str, *, num_classes: int | None, **overrides: Any
) -> nn.Module:
  """Builds a registered model.

  Example:
    model = get_model('ViT-B_16', num_classes=10, dtype=jnp.bfloat16,
                      transformer={'dropout_rate': 0.1})

  Args:
    name: A name from `MODEL_NAMES` (e.g. 'ViT-B_16', 'R50+ViT-B_16',
      'Mixer-B_16', 'testing').
    num_classes: Size of the zero-initialised head; None or 0 for no head.
    **overrides: Module fields to change (e.g. `classifier='gap'`,
      `representation_size=768`, `dtype`, `remat`, `scan`). A dict value is
      merged into the config's dict of the same name (`transformer`, ...).

  Returns:
    A flax.linen Module: `model.init(rng, images, train=False)`,
    `model.apply(variables, images, train=False)` -> logits.

  Raises:
    UnknownModelError: `name` is not registered.
    TypeError: an override is not a field of the model class.
  """
  cls = model_class(name)
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(
        f'{cls.__name__} ({name}) has no field(s) {unknown}; valid fields: '
        f'{sorted(fields - {"num_classes", "model_name"})}.'
    )
  return cls(
      num_classes=num_classes, model_name=name, **get_config(name, **overrides)
  )


# ----------------------------------------------------------------------------
# The model section of a run's config (composed by `vit_jax.config_lib`).
# ----------------------------------------------------------------------------

# Model fields a run sets through config fields of its own (None: by the run
# itself, never by a config).
MODEL_FIELDS_SET_ELSEWHERE = {
    'dtype': 'config.compute_dtype',
    'param_dtype': None,
    'remat': 'config.remat',
    'scan': 'config.scan',
}


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """What model is trained (fields `model_name`, `model`, ...).

  Attributes:
    model_name: Registry name (`vit_jax.models.MODEL_NAMES`).
    model: `get_model` overrides (nested dict).
    compute_dtype: Activation dtype name ('float32', 'bfloat16').
    remat: Recompute encoder blocks in the backward pass.
    scan: `nn.scan` over the encoder blocks.
    pretrained_path: Checkpoint to fine-tune from ('' for none).
    timm_model: The timm model (`vit_jax.timm_models.TIMM_MODELS`) this
      model is, whose layout a `.safetensors` `pretrained_path` is read in
      ('' for none).
  """

  model_name: str
  model: Mapping[str, Any]
  compute_dtype: str
  remat: bool
  scan: bool
  pretrained_path: str
  timm_model: str

  def __post_init__(self):
    get_config(self.model_name)  # Raises with the known names.
    self._check_timm_model()
    # Override keys a config file wrote, checked here as the command line's
    # are (else get_model's TypeError would come after the data is read).
    fields = model_fields(self.model_name)
    where = f'of {self.model_name} (vit_jax.models.model_fields)'
    for key, value in self.model.items():
      if key in MODEL_FIELDS_SET_ELSEWHERE:
        raise ValueError(
            f'config.model.{key} is set by '
            f'{MODEL_FIELDS_SET_ELSEWHERE[key] or "the run"}.'
        )
      known_names = config_errors.nested_names(fields, 'model.')
      if key not in fields:
        raise config_errors.unknown_field(f'model.{key}', known_names, where)
      if isinstance(value, Mapping) and isinstance(fields[key], Mapping):
        for inner in value:
          if inner not in fields[key]:
            raise config_errors.unknown_field(
                f'model.{key}.{inner}', known_names, where
            )
    if model_class(self.model_name) is vit.VisionTransformer:
      # Bad block options are refused here, before any work, in the words
      # the model would use.
      vit.check_options(
          get_config(self.model_name, **self.model), prefix='config.model.'
      )
    for option in ('remat', 'scan'):
      if getattr(self, option) and option not in fields:
        raise ValueError(
            f'config.{option}=True: {self.model_name} '
            f'({model_class(self.model_name).__name__}) has no '
            f'{option} option; set config.{option}=False.'
        )
    sizes = self.flexi_patch_sizes()
    if sizes and not all(
        isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in sizes
    ):
      raise ValueError(
          f'config.model.flexi_patch_sizes={sizes!r}: a list of positive '
          'integers (square patch sizes), e.g. 8,16,32.'
      )
    if sizes and get_config(self.model_name, **self.model).get('resnet'):
      raise ValueError(
          f'config.model.flexi_patch_sizes: {self.model_name} has a ResNet '
          'stem; FlexiViT patch sizes need a plain ViT.'
      )

  def _check_timm_model(self) -> None:
    """Refuses a timm model name that is unknown or is another model, and
    a `.safetensors` checkpoint without one."""
    if not self.timm_model:
      if self.pretrained_path.endswith('.safetensors'):
        raise ValueError(
            f'config.pretrained_path={self.pretrained_path} is a timm '
            '.safetensors file: set config.timm_model to the timm model it '
            'holds (one of vit_jax.timm_models.TIMM_MODELS, e.g. '
            'vit_small_patch14_dinov2), or convert it first (python -m '
            'vit_jax.convert --input=FILE --timm_model=NAME --output=X.npz).'
        )
      return
    entry = timm_models.TIMM_MODELS.get(self.timm_model)
    if entry is None:
      raise config_errors.unknown_field(
          self.timm_model,
          list(timm_models.TIMM_MODELS),
          'of vit_jax.timm_models.TIMM_MODELS',
      )
    if entry.registry != self.model_name:
      raise ValueError(
          f'config.timm_model={self.timm_model} is {entry.registry}, but '
          f'config.model_name={self.model_name}: set config.model_name='
          f'{entry.registry} (configs/finetune.py:{self.timm_model},<dataset> '
          'sets both).'
      )

  def flexi_patch_sizes(self) -> tuple[int, ...]:
    """The patch sizes a FlexiViT run draws from per step (() for none)."""
    model_config = get_config(self.model_name, **self.model)
    return tuple(model_config.get('flexi_patch_sizes') or ())

  def model_args(self) -> dict[str, Any]:
    """This model as keyword arguments of `vit_jax.models.get_model`.

    `vit_jax.models.get_model(num_classes=n, **section.model_args())` is the
    model a run trains (objective-specific heads aside: see
    `train.build_model`).

    Returns:
      {'name': registry name, 'dtype': compute dtype, the `model`
      overrides, and 'remat' / 'scan' when they are on}.
    """
    args = {
        'name': self.model_name,
        'dtype': jnp.dtype(self.compute_dtype),
        **self.model,
    }
    # Only when on: families without the option (MlpMixer has neither) build
    # with the defaults, and asking them for it names the field.
    for option in ('remat', 'scan'):
      if getattr(self, option):
        args[option] = True
    return args

  def is_naflex(self) -> bool:
    """Whether the model takes NaFlex patch sequences (`naflex=True`)."""
    return bool(get_config(self.model_name, **self.model).get('naflex'))

  def init_inputs(self, image_size: int, *, naflex_seq_len: int = 1) -> Any:
    """Zeros shaped as one input of this model, to initialise it with.

    Args:
      image_size: Side of the run's square images.
      naflex_seq_len: Tokens per example of a NaFlex model (`naflex=True`);
        its parameters do not depend on it.

    Returns:
      Images [1, image_size, image_size, 3], or a NaFlex model's tuple
      (`vit.naflex_init_inputs`).
    """
    if self.is_naflex():
      patches = get_config(self.model_name, **self.model)['patches']
      return vit.naflex_init_inputs(
          vit.patch_size_of(patches), seq_len=naflex_seq_len
      )
    return jnp.zeros((1, image_size, image_size, 3), jnp.float32)

  def total_stride(self) -> tuple[int, str]:
    """(pixels per token along the height, 'patch size' or 'total stride')."""
    # The overrides (e.g. 4x4 patches) decide, not the name.
    model_config = get_config(self.model_name, **self.model)
    # A FlexiViT's stored kernel may be cut at another size: the run's.
    ph, _ = vit.patch_size_of(
        model_config.get('run_patch_size') or model_config['patches']
    )
    if model_config.get('resnet') is None:
      return ph, 'patch size'
    return ph * resnet.total_stride(model_config['resnet']), 'total stride'
