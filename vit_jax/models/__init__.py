"""Public model API: `import vit_jax.models` (imports only jax, flax, numpy).

Example:
  import jax, jax.numpy as jnp
  import vit_jax.models
  model = vit_jax.models.get_model('ViT-B_16', num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                         train=False)
  logits = model.apply(variables, images, train=False)  # (batch, 10)

Images are NHWC float32 in [-1, 1]. Named intermediates (`pre_logits`,
`block_output`, `attention_weights`) are sown into the `intermediates`
collection when it is mutable: `model.apply(..., mutable=['intermediates'])`.
"""

from vit_jax.models.mixer import MixerBlock
from vit_jax.models.mixer import MlpMixer
from vit_jax.models.registry import get_config
from vit_jax.models.registry import get_model
from vit_jax.models.registry import model_class
from vit_jax.models.registry import model_fields
from vit_jax.models.registry import MODEL_NAMES
from vit_jax.models.registry import UnknownModelError
from vit_jax.models.resnet import ResNetStage
from vit_jax.models.resnet import StdConv
from vit_jax.models.vit import compiling_for
from vit_jax.models.vit import Encoder
from vit_jax.models.vit import Encoder1DBlock
from vit_jax.models.vit import MultiHeadDotProductAttention

# Logical axes of the parameters tensor parallelism splits (ViT's blocks;
# the Mixer and ResNet parameters have none): see vit_jax.sharding.
from vit_jax.models.vit import PARAM_AXES
from vit_jax.models.vit import VisionTransformer


def __getattr__(name):
  # MODEL_CONFIGS is computed on access so callers always get fresh copies.
  if name == 'MODEL_CONFIGS':
    return {n: get_config(n) for n in MODEL_NAMES}
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'Encoder',
    'Encoder1DBlock',
    'MODEL_CONFIGS',
    'MODEL_NAMES',
    'MixerBlock',
    'MlpMixer',
    'MultiHeadDotProductAttention',
    'PARAM_AXES',
    'ResNetStage',
    'StdConv',
    'UnknownModelError',
    'VisionTransformer',
    'compiling_for',
    'get_config',
    'get_model',
    'model_class',
    'model_fields',
]
