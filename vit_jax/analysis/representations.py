"""Layer representations of a model, and the minibatch CKA between them.

A model's layers are what it sows into `intermediates` (ViT and Mixer block
outputs, BiT ResNet unit outputs, pre-logits) and the inputs of those
blocks, which the models do not sow: while the representations are taken,
an interceptor (`flax.linen.intercept_methods`) sows each block's input
into the block's own `intermediates` (`block_input`, `unit_input`), so they
come out in every layout (loop, scan, remat) without a change to the
models. Names are the `intermediates` paths, e.g.
`Transformer/encoderblock_3/block_output` or `block2/unit1/unit_output`;
scanned encoders get the names of the unrolled layout, so a layer has one
name whatever the layout.

`depth_layers` lists, in depth order, the input of each stack's first block
(the ViT's encoder input, the ResNet's root-block output) and every block's
output: the rows of the CKA heatmaps. The layer before a block's output in
that list is the block's input, so CKA with the previous layer is how much
of its input a block passes on.
"""

from collections.abc import Callable, Sequence
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import sharding
from vit_jax.analysis import cka
from vit_jax.models import mixer
from vit_jax.models import resnet
from vit_jax.models import vit

POOLINGS = ('flatten', 'mean')
# Block class -> the name its input is sown under (the models sow the
# outputs: `block_output`, `unit_output`).
_INPUTS = (
    (vit.Encoder1DBlock, 'block_input'),
    (mixer.MixerBlock, 'block_input'),
    (resnet.ResidualUnit, 'unit_input'),
)
# Sown names that are representations (attention weights are not).
_SOWN = (
    'block_input',
    'block_output',
    'unit_input',
    'unit_output',
    'pre_logits',
)
_SCANNED = 'Transformer/encoderblock/'


def _sow_block_inputs(next_fun, args, kwargs, context):
  """Interceptor: a block's call first sows its input into its own scope.

  The block sows as if it did so itself, so under `nn.scan` the inputs are
  stacked over the layers like the block outputs, and nothing is stored
  unless `intermediates` is mutable.
  """
  if context.method_name == '__call__':
    for cls, name in _INPUTS:
      # isinstance: `nn.remat` / `nn.scan` wrap the block in a subclass.
      if isinstance(context.module, cls):
        context.module.sow('intermediates', name, args[0])
        break
  return next_fun(*args, **kwargs)


def _layers_of(intermediates: Any) -> dict[str, jax.Array]:
  """{layer name: `[batch, ...]`} from an `intermediates` collection."""
  flat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(intermediates), sep='/'
  )
  layers = {}
  for path, value in flat.items():
    if path.rsplit('/', 1)[-1] not in _SOWN:
      continue
    value = value[0]
    if path.startswith(_SCANNED):  # Stacked: [layers, batch, ...].
      for i in range(value.shape[0]):
        layers[path.replace('encoderblock/', f'encoderblock_{i}/')] = value[i]
    else:
      layers[path] = value
  return layers


def _is_input(name: str) -> bool:
  return name.endswith(('block_input', 'unit_input'))


def _group(name: str) -> int:
  if name.endswith('pre_logits'):
    return 2
  if name.startswith(('Transformer', 'MixerBlock')):
    return 1
  return 0  # The ResNet's stages.


def depth_key(name: str) -> tuple[Any, ...]:
  """Sorts layer names by depth: ResNet stages, then blocks, then pre-logits.

  (Alphabetical order would put `encoderblock_10` before `encoderblock_2`
  and the hybrid's `Transformer` before its ResNet `block1`.)
  """
  # The numbers in the path, and a block's input before its output.
  return (
      _group(name),
      tuple(int(n) for n in re.findall(r'\d+', name)),
      0 if _is_input(name) else 1,
  )


def _apply(
    model: flax.linen.Module, params: Any, images: jax.Array
) -> dict[str, jax.Array]:
  with nn.intercept_methods(_sow_block_inputs):
    _, state = model.apply(
        {'params': params}, images, train=False, mutable=['intermediates']
    )
  return _layers_of(state['intermediates'])


def available_layers(
    model: flax.linen.Module, params: Any, image_size: int | Sequence[int]
) -> dict[str, tuple[int, ...]]:
  """{layer name: shape of one example's representation}, in depth order.

  Nothing is computed (`jax.eval_shape`). `image_size`: the side of a
  square image, or (height, width).
  """
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  shapes = jax.eval_shape(lambda p, x: _apply(model, p, x), params, images)
  return {
      name: tuple(shapes[name].shape[1:])
      for name in sorted(shapes, key=depth_key)
  }


def depth_layers(names: Sequence[str]) -> list[str]:
  """The rows of the CKA heatmaps, in depth order.

  Every block's output, and the input of each stack's first block (the
  ViT's encoder input, the ResNet's root-block output); the other blocks'
  inputs are the previous blocks' outputs.
  """
  names = sorted(names, key=depth_key)
  keep = []
  for i, name in enumerate(names):
    if name.endswith(('block_output', 'unit_output')):
      keep.append(name)
    elif _is_input(name) and not (
        i
        and names[i - 1].endswith(('block_output', 'unit_output'))
        and _group(names[i - 1]) == _group(name)
    ):
      keep.append(name)
  return keep


def check_layers(
    requested: Sequence[str] | None,
    available: Sequence[str],
    what: str = 'layers',
) -> list[str]:
  """The requested layers (default: `depth_layers`), checked.

  Args:
    requested: Layer names, or None / empty for the default.
    available: The model's layers (`available_layers`).
    what: The argument or flag they came from, for the error.

  Returns:
    The layer names.

  Raises:
    ValueError: a name is not a layer of the model (naming `what`, the
      argument or flag it came from, and the layers there are).
  """
  if not requested:
    return depth_layers(available)
  unknown = [name for name in requested if name not in available]
  if unknown:
    raise ValueError(
        f'{what}: {", ".join(map(repr, unknown))} is not a layer of the '
        f'model; its layers are: {", ".join(available)}.'
    )
  return list(requested)


def short_label(name: str) -> str:
  """A short tick label for a layer name.

  'emb' (the encoder input), 'b3' (block 3), 'stem' (the ResNet root
  block's output), 's2u1' (stage 2, unit 1), 'pre' (pre-logits).
  """
  numbers = [int(n) for n in re.findall(r'\d+', name)]
  leaf = name.rsplit('/', 1)[-1]
  if leaf == 'pre_logits':
    return 'pre'
  if leaf in ('unit_input', 'unit_output'):
    if leaf == 'unit_input' and numbers == [1, 1]:
      return 'stem'
    return f's{numbers[0]}u{numbers[1]}' + (
        'in' if leaf == 'unit_input' else ''
    )
  if leaf in ('block_input', 'block_output'):
    block = numbers[-1] + 1
    if leaf == 'block_input':
      return 'emb' if block == 1 else f'b{block}in'
    return f'b{block}'
  return name


def pool(x: jax.Array, pooling: str) -> jax.Array:
  """`[batch, ...]` -> `[batch, features]`.

  Args:
    x: Tokens `[batch, tokens, d]` or a feature map `[batch, h, w, c]`.
    pooling: 'flatten' (every token's features: positions stay apart) or
      'mean' (averaged over tokens / positions, the class token included).

  Returns:
    float32 `[batch, features]`.
  """
  if pooling == 'flatten':
    return x.reshape(x.shape[0], -1).astype(jnp.float32)
  if pooling == 'mean':
    if x.ndim > 2:
      x = x.astype(jnp.float32).mean(axis=tuple(range(1, x.ndim - 1)))
    return x.astype(jnp.float32)
  raise ValueError(f'Unknown pooling {pooling!r}; use one of {POOLINGS}.')


def representation_fn(
    model: flax.linen.Module, layers: Sequence[str], pooling: str = 'flatten'
) -> Callable[[Any, jax.Array], list[jax.Array]]:
  """`fn(params, images) -> [[batch, features] per layer]` (not jitted)."""
  if pooling not in POOLINGS:
    raise ValueError(f'Unknown pooling {pooling!r}; use one of {POOLINGS}.')
  layers = list(layers)

  def fn(params, images):
    found = _apply(model, params, images)
    return [pool(found[name], pooling) for name in layers]

  return fn


def make_model_hsic_fn(
    model_a: flax.linen.Module,
    layers_a: Sequence[str],
    mesh: jax.sharding.Mesh,
    *,
    model_b: flax.linen.Module | None = None,
    layers_b: Sequence[str] | None = None,
    pooling: str = 'flatten',
    param_shardings: tuple[Any, Any] | None = None,
) -> Callable[..., dict[str, jax.Array]]:
  """One jitted forward pass + `cka.hsic_sums` per batch, on `mesh`.

  Inputs are sharded like the evaluators' (images and mask split over the
  data-like axes), the sums replicated.

  Args:
    model_a: The first model.
    layers_a: Its layers.
    mesh: Device mesh.
    model_b: The second model; None compares `model_a` with itself.
    layers_b: Its layers.
    pooling: One of `POOLINGS`.
    param_shardings: (A's, B's) parameter shardings; default replicated.

  Returns:
    `fn(params_a, params_b, images_a, images_b, mask)` -> sums over the
    layers of A then B, each against each; without `model_b`,
    `fn(params_a, images_a, mask)` -> sums over A's layers.
  """
  batch = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  shard_a, shard_b = param_shardings or (replicated, replicated)
  rep_a = representation_fn(model_a, layers_a, pooling)
  if model_b is None:
    return jax.jit(
        sharding.on_mesh(
            lambda params, images, mask: cka.hsic_sums(
                rep_a(params, images), None, mask
            ),
            mesh,
        ),
        in_shardings=(shard_a, batch, batch),
        out_shardings=replicated,
    )
  assert layers_b is not None, 'model_b needs layers_b'
  rep_b = representation_fn(model_b, layers_b, pooling)

  def fn(params_a, params_b, images_a, images_b, mask):
    # All layers of both models against all: the within-model blocks come
    # free with the between-model one (each Gram is computed once).
    return cka.hsic_sums(
        rep_a(params_a, images_a) + rep_b(params_b, images_b), None, mask
    )

  return jax.jit(
      sharding.on_mesh(fn, mesh),
      in_shardings=(shard_a, shard_b, batch, batch, batch),
      out_shardings=replicated,
  )


def minibatch_cka(
    model_a: flax.linen.Module,
    params_a: Any,
    images_a: np.ndarray,
    *,
    model_b: flax.linen.Module | None = None,
    params_b: Any = None,
    images_b: np.ndarray | None = None,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    pooling: str = 'flatten',
    batch_size: int = 64,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
  """Minibatch CKA between the layers of one model or of two.

  The images go through the model(s) `batch_size` at a time; a short last
  batch is padded and masked. Each batch adds its HSIC_1 sums
  (`cka.MinibatchCKA`), so memory never holds more than a batch.

  Args:
    model_a: A model that sows its representations (ViT, hybrid, BiT ResNet
      classifier, Mixer).
    params_a: Its parameters.
    images_a: `[n, size, size, 3]` in [-1, 1] at model A's resolution.
    model_b: A second model (None: `model_a` against itself).
    params_b: Its parameters.
    images_b: The same `n` images at model B's resolution (default
      `images_a`).
    layers_a: Layer names (default: `depth_layers`).
    layers_b: Model B's (default: its `depth_layers`).
    pooling: 'flatten' or 'mean' (see `pool`).
    batch_size: Examples per minibatch (at least `cka.MIN_BATCH`; a
      multiple of the mesh's batch shards). Larger batches lower the
      estimator's variance; any size is unbiased.
    mesh: Devices to shard the batch over (default: all, data parallel).

  Returns:
    {'layers_a', 'layers_b': names, 'matrix': `[len(layers_a),
    len(layers_b)]` CKA (float64 numpy), 'within_a', 'within_b': each
    model's layers against themselves (the same matrix without `model_b`),
    'num_images', 'batch_size'}.

  Raises:
    ValueError: mismatched image counts, unknown layers or pooling, or a
      batch size the mesh cannot split (each naming the argument).
  """
  if pooling not in POOLINGS:
    raise ValueError(f'pooling={pooling!r}; use one of {POOLINGS}.')
  if images_b is None:
    images_b = images_a
  n = len(images_a)
  if model_b is not None and len(images_b) != n:
    raise ValueError(
        f'images_a has {n} images and images_b has {len(images_b)}: CKA '
        'compares two representations of the same images.'
    )
  if model_b is not None and params_b is None:
    raise ValueError('model_b needs params_b.')
  if n < cka.MIN_BATCH:
    raise ValueError(
        f'Minibatch CKA needs at least {cka.MIN_BATCH} images; ' f'got {n}.'
    )
  mesh = mesh or sharding.make_mesh()
  shards = sharding.batch_shards(mesh)
  # No batch larger than the data (rounded up to split over the mesh).
  batch_size = min(int(batch_size), -(-n // shards) * shards)
  if batch_size < cka.MIN_BATCH:
    raise ValueError(
        f'batch_size={batch_size}: the unbiased HSIC needs at '
        f'least {cka.MIN_BATCH} examples per batch.'
    )
  sharding.check_batch_size(batch_size, mesh, what='batch_size')
  size_a = images_a.shape[1:3]
  names_a = check_layers(
      layers_a, list(available_layers(model_a, params_a, size_a)), 'layers_a'
  )
  if model_b is None:
    names_b = names_a
    if layers_b:
      raise ValueError('layers_b is only for a second model (model_b).')
  else:
    names_b = check_layers(
        layers_b,
        list(available_layers(model_b, params_b, images_b.shape[1:3])),
        'layers_b',
    )
  fn = make_model_hsic_fn(
      model_a, names_a, mesh, model_b=model_b, layers_b=names_b, pooling=pooling
  )
  replicated = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  params_a = sharding.put_global(params_a, replicated)
  if model_b is not None:
    params_b = sharding.put_global(params_b, replicated)
  accumulator = cka.MinibatchCKA()
  for start in range(0, n, batch_size):
    real = min(batch_size, n - start)
    mask = np.zeros((batch_size,), np.float32)
    mask[:real] = 1.0

    def padded(images, start=start, real=real):
      out = np.zeros((batch_size,) + images.shape[1:], np.float32)
      out[:real] = images[start : start + real]
      return out

    inputs = sharding.put_global(
        {'a': padded(images_a), 'b': padded(images_b), 'mask': mask},
        batch_sharding,
    )
    if model_b is None:
      sums = fn(params_a, inputs['a'], inputs['mask'])
    else:
      sums = fn(params_a, params_b, inputs['a'], inputs['b'], inputs['mask'])
    accumulator.add(sums)
  joint = accumulator.result()
  if model_b is None:
    within_a = within_b = matrix = joint
  else:
    k = len(names_a)
    within_a, within_b, matrix = joint[:k, :k], joint[k:, k:], joint[:k, k:]
  return {
      'layers_a': names_a,
      'layers_b': names_b,
      'matrix': matrix,
      'within_a': within_a,
      'within_b': within_b,
      'num_images': int(n),
      'batch_size': int(batch_size),
  }


def cka_with_previous(
    matrix: np.ndarray, layers: Sequence[str]
) -> list[dict[str, Any]]:
  """CKA of each block's output with the layer before it (its input).

  Args:
    matrix: A model's CKA with itself over `layers`.
    layers: Its layer names in depth order (`depth_layers`).

  Returns:
    [{'layer', 'input', 'cka'}] for each block or unit output that has a
    layer before it.
  """
  rows = []
  for i, name in enumerate(layers):
    if i and name.endswith(('block_output', 'unit_output')):
      rows.append(
          {
              'layer': name,
              'input': layers[i - 1],
              'cka': float(matrix[i, i - 1]),
          }
      )
  return rows


__all__ = [
    'POOLINGS',
    'available_layers',
    'check_layers',
    'cka_with_previous',
    'depth_key',
    'depth_layers',
    'make_model_hsic_fn',
    'minibatch_cka',
    'pool',
    'representation_fn',
    'short_label',
]
