"""Analytic forward-pass FLOPs per image of the registered models.

Example:
  from vit_jax import flops
  flops.forward_flops('ViT-B_16')             # 35_127_656_448 (224 px)
  flops.train_flops('ViT-B_16', 384)          # 3 x forward at 384 px
  flops.forward_flops_breakdown('R50+ViT-B_16')
  # {'resnet': ..., 'patch_embedding': ..., 'attention_projections': ..., ...}

Conventions:
  * A multiply-add counts 2 FLOPs; all figures are per image.
  * Counted: matmuls and convolutions, i.e. the patch embedding, the hybrids'
    ResNet convolutions, the attention q/k/v/out projections, the attention
    scores (q.k) and the attention-weighted sum of the values, the MLPs, the
    Mixer token- and channel-mixing MLPs, the pre-logits layer and the head.
  * Not counted: elementwise and normalisation work (biases, residual adds,
    LayerNorm, GroupNorm, softmax, GELU, tanh, ReLU, max-pool, average
    pooling, the query scaling and StdConv's kernel standardisation). XLA's
    cost analysis puts it at 0.5-2% of the total for the registered models
    (more for toy widths such as 'testing').
  * A convolution counts its whole kernel at every output position, padding
    included (the usual convention). XLA's cost analysis skips the padded
    taps, so it reads a little lower for the hybrids' SAME-padded convs.
  * Images have 3 channels; batch size, dtype, dropout, `remat` and `scan` do
    not change the count.
  * Training FLOPs are 3 x forward: the backward pass does one matmul for the
    gradient of the activations and one for that of the weights per forward
    matmul (the convention of the ViT paper's compute figures).
"""

from typing import Any

from vit_jax.models import mixer
from vit_jax.models import registry
from vit_jax.models import vit

_IMAGE_CHANNELS = 3


def _dense(positions: int, fan_in: int, fan_out: int) -> int:
  """FLOPs of a dense layer (or convolution) applied at `positions` places."""
  return 2 * positions * fan_in * fan_out


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  height, width = (int(s) for s in image_size)
  if height <= 0 or width <= 0:
    raise ValueError(f'Image size must be positive, got {image_size!r}.')
  return height, width


def _check_divisible(
    model_name: str, height: int, width: int, stride: tuple[int, int]
) -> None:
  # The models themselves refuse such images; failing here too keeps the
  # count from silently describing a model that cannot run.
  if height % stride[0] or width % stride[1]:
    raise ValueError(
        f'Image size {height}x{width} is not divisible by the total stride '
        f'{stride[0]}x{stride[1]} of {model_name}.'
    )


def _resnet_flops(
    config: Any, height: int, width: int
) -> tuple[int, int, int, int]:
  """Convolution FLOPs of the BiT stem and stages (mirrors resnet.py).

  Returns:
    (flops, feature map height, feature map width, feature channels).
  """
  num_layers = tuple(vit.config_value(config, 'num_layers', ()))
  channels = int(64 * vit.config_value(config, 'width_factor', 1))
  # Root: 7x7 stride-2 conv, then a stride-2 max-pool (not counted); both
  # are SAME-padded, hence the rounding up.
  height, width = _ceil_div(height, 2), _ceil_div(width, 2)
  flops = _dense(height * width, 7 * 7 * _IMAGE_CHANNELS, channels)
  height, width = _ceil_div(height, 2), _ceil_div(width, 2)
  in_channels = channels
  for stage, units in enumerate(num_layers):
    bottleneck = channels * 2**stage
    out_channels = 4 * bottleneck
    for unit in range(units):
      stride = 2 if stage > 0 and unit == 0 else 1
      out_h, out_w = _ceil_div(height, stride), _ceil_div(width, stride)
      out_positions = out_h * out_w
      if in_channels != out_channels or stride != 1:
        flops += _dense(out_positions, in_channels, out_channels)  # conv_proj
      flops += _dense(height * width, in_channels, bottleneck)  # conv1, 1x1
      flops += _dense(out_positions, 3 * 3 * bottleneck, bottleneck)  # conv2
      flops += _dense(out_positions, bottleneck, out_channels)  # conv3, 1x1
      height, width, in_channels = out_h, out_w, out_channels
  return flops, height, width, in_channels


def _head_positions(classifier: str, shape: tuple[int, ...]) -> int:
  """Vectors the head sees, for tokens of `shape` (without the batch axis)."""
  size = 1
  for s in shape[1:] if classifier == 'token' else shape:
    size *= s
  # 'token' keeps index 0 of the first axis, 'gap' averages all positions
  # and 'map' pools them into one, the unpooled classifiers keep every
  # position.
  return 1 if classifier in ('gap', 'map') else size


def _vit_breakdown(
    model: vit.VisionTransformer, height: int, width: int
) -> dict[str, int]:
  """Breakdown of a VisionTransformer (pure or hybrid), mirrors vit.py."""
  counts = {}
  channels = _IMAGE_CHANNELS
  if model.resnet is not None:
    counts['resnet'], height, width, channels = _resnet_flops(
        model.resnet, height, width
    )
  ph, pw = vit.patch_size_of(model.patches)
  grid_h, grid_w = height // ph, width // pw
  hidden = model.hidden_size
  counts['patch_embedding'] = _dense(
      grid_h * grid_w, ph * pw * channels, hidden
  )
  shape: tuple[int, ...] = (grid_h, grid_w)
  if model.transformer is not None:
    with_token = model.has_class_token
    # Registers run through every block but leave before pooling.
    tokens = grid_h * grid_w + int(with_token) + model.num_registers
    layers = vit.config_value(model.transformer, 'num_layers')
    mlp_dim = vit.config_value(model.transformer, 'mlp_dim')
    # Per layer: q, k, v and out are D x D maps of every token; the scores and
    # the weighted sum are each T x T x D multiply-adds, however many heads.
    counts['attention_projections'] = (
        layers * 4 * _dense(tokens, hidden, hidden)
    )
    counts['attention_scores'] = layers * _dense(tokens, hidden, tokens)
    counts['attention_values'] = layers * _dense(tokens, tokens, hidden)
    # Two input layers with SwiGLU (`mlp='swiglu'`), then the output layer.
    mlp_layers = 3 if model.mlp == 'swiglu' else 2
    counts['mlp'] = layers * mlp_layers * _dense(tokens, hidden, mlp_dim)
    shape = (tokens - model.num_registers,)
    if model.classifier == 'map':
      # One probe query attends over the tokens (their keys and values are
      # projected), then the residual MLP of the probe.
      pooled = shape[0]
      counts['map_head'] = (
          2 * _dense(1, hidden, hidden)
          + 2 * _dense(pooled, hidden, hidden)
          + _dense(1, hidden, pooled)
          + _dense(1, pooled, hidden)
          + 2 * _dense(1, hidden, model.map_mlp_dim or mlp_dim)
      )
  positions = _head_positions(model.classifier, shape)
  features = hidden
  if model.representation_size is not None:
    counts['pre_logits'] = _dense(
        positions, features, model.representation_size
    )
    features = model.representation_size
  if model.num_classes:
    counts['head'] = _dense(positions, features, model.num_classes)
  return counts


def _mixer_breakdown(
    model: mixer.MlpMixer, height: int, width: int
) -> dict[str, int]:
  """Breakdown of an MlpMixer, mirrors mixer.py."""
  ph, pw = vit.patch_size_of(model.patches)
  tokens = (height // ph) * (width // pw)
  hidden = model.hidden_dim
  # Token mixing is a two-layer MLP over the token axis for every channel;
  # channel mixing one over the channel axis for every token.
  counts = {
      'patch_embedding': _dense(tokens, ph * pw * _IMAGE_CHANNELS, hidden),
      'token_mixing': model.num_blocks
      * 2
      * _dense(hidden, tokens, model.tokens_mlp_dim),
      'channel_mixing': model.num_blocks
      * 2
      * _dense(tokens, hidden, model.channels_mlp_dim),
  }
  if model.num_classes:
    counts['head'] = _dense(1, hidden, model.num_classes)
  return counts


def forward_flops_breakdown(
    model_name: str,
    image_size: int | tuple[int, int] = 224,
    *,
    num_classes: int | None = 1000,
    **overrides: Any,
) -> dict[str, int]:
  """Forward FLOPs per image of each component of a registered model.

  Args:
    model_name: A name from `vit_jax.models.MODEL_NAMES`.
    image_size: Input resolution, an int (square) or (height, width).
    num_classes: Width of the head; None or 0 for no head.
    **overrides: Config changes, as for `vit_jax.models.get_model` (e.g.
      `patches={'size': (4, 4)}`, `representation_size=768`,
      `transformer={'num_layers': 2}`).

  Returns:
    FLOPs keyed by component; only the components the model has appear.
    ViT: 'resnet' (hybrids), 'patch_embedding', 'attention_projections',
    'attention_scores' (q.k), 'attention_values' (weights times v), 'mlp',
    'pre_logits' (with a representation size), 'head'. Mixer:
    'patch_embedding', 'token_mixing', 'channel_mixing', 'head'.

  Raises:
    UnknownModelError: `model_name` is not registered.
    TypeError: an override is not a field of the model.
    ValueError: the image size is not divisible by the model's total stride
      (patch size times the ResNet's downsampling for hybrids).
  """
  # Building the (parameter-free) module applies and validates the overrides
  # exactly as for the real model.
  model = registry.get_model(model_name, num_classes=num_classes, **overrides)
  height, width = _image_hw(image_size)
  if isinstance(model, vit.VisionTransformer):
    _check_divisible(model_name, height, width, model.total_stride)
    return _vit_breakdown(model, height, width)
  if isinstance(model, mixer.MlpMixer):
    _check_divisible(
        model_name, height, width, vit.patch_size_of(model.patches)
    )
    return _mixer_breakdown(model, height, width)
  raise TypeError(f'No FLOP count for {type(model).__name__} ({model_name}).')


def forward_flops(
    model_name: str,
    image_size: int | tuple[int, int] = 224,
    *,
    num_classes: int | None = 1000,
    **overrides: Any,
) -> int:
  """Forward-pass FLOPs per image (sum of `forward_flops_breakdown`).

  Args:
    model_name: A name from `vit_jax.models.MODEL_NAMES`.
    image_size: Input resolution, an int (square) or (height, width).
    num_classes: Width of the head; None or 0 for no head.
    **overrides: Config changes, as for `vit_jax.models.get_model`.

  Returns:
    FLOPs (a multiply-add is 2) of the matmuls and convolutions.

  Raises:
    UnknownModelError: `model_name` is not registered.
    TypeError: an override is not a field of the model.
    ValueError: the image size is not divisible by the model's total stride.
  """
  return sum(
      forward_flops_breakdown(
          model_name, image_size, num_classes=num_classes, **overrides
      ).values()
  )


def train_flops(
    model_name: str,
    image_size: int | tuple[int, int] = 224,
    *,
    num_classes: int | None = 1000,
    **overrides: Any,
) -> int:
  """Training FLOPs per image: 3 x `forward_flops` (forward plus backward).

  Args and Raises: as for `forward_flops`.
  """
  return 3 * forward_flops(
      model_name, image_size, num_classes=num_classes, **overrides
  )


__all__ = ['forward_flops', 'forward_flops_breakdown', 'train_flops']
