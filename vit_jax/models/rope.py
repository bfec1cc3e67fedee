"""Rotary position embeddings (RoPE) over the 2-D patch grid.

The block option `rope` of `vit_jax.models.VisionTransformer` rotates the
queries and keys of the patch tokens (never the class token or registers)
by angles that depend on each patch's (row, column), before any attention
implementation runs, so that the fused kernels see rotated q and k:

  'axial': fixed frequencies, half of each head's pairs turning with the
           row and half with the column (EVA-02's, Perception Encoder's and
           DINOv3's, each with its own frequency convention, set by
           `rope_options`);
  'mixed': learned frequencies per layer and head that mix rows and columns
           (RoPE-Mixed, Heo et al., 2024), held in each attention layer's
           `rope/freqs` [2, heads, head_dim // 2] (row 0 multiplies the first
           coordinate, row 1 the second).

Each head's `head_dim` channels form `head_dim // 2` pairs, each turned by
one angle. The rotation is computed in float32 and cast back to the compute
dtype, as timm does.

`rope_options` (a mapping or (name, value) pairs; every key optional):

  'convention'    ('axial' only) 'eva': angles `coordinate * f_i` with
                  frequencies `f_i = temperature ** (-i / n)` (i < n =
                  head_dim // 4) over patch indices (timm's
                  `RotaryEmbeddingCat`: EVA-02, Perception Encoder);
                  'dinov3': angles `2 pi * coordinate / temperature ** (i /
                  n)` over coordinates normalised to [-1, 1] (patch centres;
                  timm's `RotaryEmbeddingDinoV3`). Default 'eva'.
  'temperature'   The frequencies' base. Defaults: 10000 ('eva'), 100
                  ('dinov3'), 10 ('mixed', the initial frequencies).
  'ref_grid'      ('eva' only) (rows, columns): coordinates are rescaled so
                  that the grid spans this one (`index / rows * ref_rows`;
                  timm's `ref_feat_shape`, the pretraining grid); None (the
                  default): patch indices as they are.
  'grid_offset'   ('axial' only) Added to each patch index before any
                  scaling. Default 0.
  'grid_indexing' 'ij': the first half of the frequencies turn with the row,
                  the second with the column; 'xy': column first. Defaults:
                  'ij' ('axial'), 'xy' ('mixed'), as timm's.
  'rotate_half'   ('axial' only) Pairs channel i with channel i + head_dim
                  // 2 (True) instead of channels 2i and 2i + 1 (False).
                  Defaults: False ('eva'), True ('dinov3').

The settings of timm's models are `EVA02`, `PE` (add the model's
'ref_grid'), `DINOV3` and `MIXED`. `Rope` is the module the attention calls
(see `MultiHeadDotProductAttention`).
"""

from collections.abc import Mapping
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROPE_KINDS = ('axial', 'mixed')
AXIAL_CONVENTIONS = ('eva', 'dinov3')
GRID_INDEXINGS = ('ij', 'xy')

# Each convention's options and their defaults (the keys it accepts).
_DEFAULTS: dict[str, dict[str, Any]] = {
    'eva': {
        'temperature': 10000.0,
        'ref_grid': None,
        'grid_offset': 0.0,
        'grid_indexing': 'ij',
        'rotate_half': False,
    },
    'dinov3': {
        'temperature': 100.0,
        'grid_offset': 0.0,
        'grid_indexing': 'ij',
        'rotate_half': True,
    },
    'mixed': {'temperature': 10.0, 'grid_indexing': 'xy'},
}
# timm's train-time coordinate augmentations (DINOv3's), not built here.
_COORDINATE_AUGMENTATIONS = ('shift_coords', 'jitter_coords', 'rescale_coords')

# timm's EVA-02 (`eva02_*`: ref_feat_shape (16, 16), interleaved pairs).
EVA02 = {
    'convention': 'eva',
    'temperature': 10000.0,
    'ref_grid': (16, 16),
    'grid_offset': 0.0,
    'grid_indexing': 'ij',
    'rotate_half': False,
}
# timm's Perception Encoder (`vit_pe_core_*`); each model adds its own
# 'ref_grid' (timm's ref_feat_shape: (14, 14) for B/16, (24, 24) for L/14).
PE = {
    'convention': 'eva',
    'temperature': 10000.0,
    'grid_offset': 1.0,
    'grid_indexing': 'xy',
    'rotate_half': False,
}
# timm's DINOv3 (`vit_*_dinov3`; at evaluation, no coordinate augmentation).
DINOV3 = {
    'convention': 'dinov3',
    'temperature': 100.0,
    'grid_offset': 0.0,
    'grid_indexing': 'ij',
    'rotate_half': True,
}
# timm's RoPE-Mixed ViTs (`vit_*_patch16_rope_mixed_224`), with rope='mixed'.
MIXED = {'temperature': 10.0, 'grid_indexing': 'xy'}


def canonical_options(options: Any) -> tuple[tuple[str, Any], ...]:
  """`rope_options` as sorted (name, value) pairs with hashable values.

  Args:
    options: A mapping (a dict, a `ConfigDict`), (name, value) pairs, or
      None / () for the defaults.

  Returns:
    ((name, value), ...) sorted by name; list values become tuples.

  Raises:
    ValueError: `options` is neither a mapping nor (name, value) pairs.
  """
  if not options:
    return ()
  if isinstance(options, Mapping) or hasattr(options, 'items'):
    pairs = list(options.items())
  else:
    pairs = list(options)
    if not all(
        isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
        for p in pairs
    ):
      raise ValueError(
          f'rope_options={options!r}: a mapping or (name, value) pairs, e.g. '
          "{'convention': 'dinov3'}."
      )
  return tuple(
      sorted(
          (name, tuple(v) if isinstance(v, list) else v) for name, v in pairs
      )
  )


def resolve_options(kind: str | None, options: Any) -> dict[str, Any]:
  """Every setting of `kind`'s convention: `options` over the defaults.

  Args:
    kind: One of `ROPE_KINDS`, or None (no RoPE: `options` are ignored).
    options: `rope_options` (see the module docstring).

  Returns:
    {'convention': 'eva' | 'dinov3' | 'mixed', and that convention's keys}.

  Raises:
    ValueError: in one line naming the field and what to do: an unknown
      kind, key or value.
  """
  given = dict(canonical_options(options))
  if kind is None:  # No RoPE: its settings are not read.
    return {}
  if kind not in ROPE_KINDS:
    raise ValueError(f'rope={kind!r}: use one of {ROPE_KINDS} (or None).')
  if kind == 'mixed':
    convention = given.pop('convention', 'mixed')
    if convention != 'mixed':
      raise ValueError(
          f"rope_options convention={convention!r} is for rope='axial'; "
          "rope='mixed' takes no convention."
      )
  else:
    convention = given.pop('convention', 'eva')
    if convention not in AXIAL_CONVENTIONS:
      raise ValueError(
          f'rope_options convention={convention!r}: use one of '
          f'{AXIAL_CONVENTIONS}.'
      )
  defaults = _DEFAULTS[convention]
  for name in given:
    if name in _COORDINATE_AUGMENTATIONS:
      raise ValueError(
          f'rope_options {name} (train-time coordinate augmentation) is not '
          'supported: remove it (timm applies it only in training).'
      )
    if name not in defaults:
      raise ValueError(
          f'rope_options has no {name!r} for rope={kind!r} (convention '
          f'{convention!r}): use {sorted(["convention", *defaults])}.'
      )
  resolved = {'convention': convention, **defaults, **given}
  _check_values(resolved)
  return resolved


def check_model_options(
    rope: str | None,
    rope_options: Any,
    *,
    naflex: bool = False,
    head_dim: int | None = None,
) -> None:
  """Refuses a model's RoPE settings that cannot run, before any work.

  Args:
    rope: `VisionTransformer.rope`.
    rope_options: `VisionTransformer.rope_options`.
    naflex: `VisionTransformer.naflex` (patch sequences of many grids).
    head_dim: Width of each attention head, if known (a multiple of 4).

  Raises:
    ValueError: in one line, naming the field and what to do.
  """
  resolve_options(rope, rope_options)
  if rope is not None and naflex:
    raise ValueError(
        f'rope={rope!r} with naflex=True is not supported: NaFlex images '
        'have patch grids of their own; set rope=None or naflex=False.'
    )
  if rope is not None and head_dim is not None and head_dim % 4:
    raise ValueError(
        f'rope={rope!r} needs a head width (hidden_size / num_heads) '
        f'divisible by 4, for the row and column pairs; this model has '
        f'{head_dim}.'
    )


def _check_values(options: dict[str, Any]) -> None:
  """Refuses a value of the wrong kind (one line naming the key)."""
  temperature = options['temperature']
  if isinstance(temperature, bool) or not (
      isinstance(temperature, (int, float)) and temperature > 0
  ):
    raise ValueError(
        f'rope_options temperature={temperature!r}: a positive number.'
    )
  if options['grid_indexing'] not in GRID_INDEXINGS:
    raise ValueError(
        f"rope_options grid_indexing={options['grid_indexing']!r}: use one of "
        f'{GRID_INDEXINGS}.'
    )
  offset = options.get('grid_offset', 0.0)
  if isinstance(offset, bool) or not isinstance(offset, (int, float)):
    raise ValueError(f'rope_options grid_offset={offset!r}: a number.')
  if not isinstance(options.get('rotate_half', False), bool):
    raise ValueError(
        f"rope_options rotate_half={options['rotate_half']!r}: True or False."
    )
  ref_grid = options.get('ref_grid')
  if ref_grid is not None and not (
      isinstance(ref_grid, tuple)
      and len(ref_grid) == 2
      and all(
          isinstance(s, int) and not isinstance(s, bool) and s > 0
          for s in ref_grid
      )
  ):
    raise ValueError(
        f'rope_options ref_grid={ref_grid!r}: (rows, columns), two positive '
        'integers (the pretraining patch grid), or None.'
    )


def _patch_coordinates(
    grid: tuple[int, int], options: dict[str, Any]
) -> np.ndarray:
  """[h * w, 2] float32 coordinates of the patches (row-major order).

  'dinov3': patch centres scaled to [-1, 1]; otherwise ('eva', 'mixed')
  patch indices plus 'grid_offset', rescaled to 'ref_grid' if given.
  Channel 0 is the row ('ij') or the column ('xy'), channel 1 the other.
  """
  h, w = grid
  offset = options.get('grid_offset', 0.0)
  if options['convention'] == 'dinov3':
    # Patch centres over [0, 1] per axis, then mapped to [-1, 1].
    rows = (np.arange(0.5, h, dtype=np.float32) + offset) / np.float32(h)
    cols = (np.arange(0.5, w, dtype=np.float32) + offset) / np.float32(w)
  else:
    rows = np.arange(h, dtype=np.float32) + np.float32(offset)
    cols = np.arange(w, dtype=np.float32) + np.float32(offset)
    if options.get('ref_grid') is not None:
      ref_h, ref_w = options['ref_grid']
      rows = rows / np.float32(h) * np.float32(ref_h)
      cols = cols / np.float32(w) * np.float32(ref_w)
  row, col = np.meshgrid(rows, cols, indexing='ij')
  first, second = (row, col) if options['grid_indexing'] == 'ij' else (col, row)
  coords = np.stack([first, second], axis=-1).reshape(h * w, 2)
  if options['convention'] == 'dinov3':
    coords = np.float32(2.0) * coords - np.float32(1.0)
  return coords.astype(np.float32)


def axial_angles(
    grid: tuple[int, int], head_dim: int, options: dict[str, Any]
) -> np.ndarray:
  """The fixed angles of rope='axial': [h * w, head_dim // 2] float32.

  Pair j < head_dim // 4 turns with the first coordinate (`grid_indexing`),
  pair head_dim // 4 + j with the second, both at frequency j.

  Args:
    grid: The patch grid (rows, columns).
    head_dim: Width of each head (a multiple of 4).
    options: `resolve_options('axial', ...)`.

  Returns:
    Angles in radians, patches in row-major order.
  """
  n = head_dim // 4
  coords = _patch_coordinates(grid, options)[:, :, None]  # [N, 2, 1]
  exponents = np.arange(n, dtype=np.float32) / np.float32(n)
  temperature = np.float32(options['temperature'])
  if options['convention'] == 'dinov3':
    periods = temperature**exponents
    angles = np.float32(2 * math.pi) * coords / periods
  else:
    angles = coords * (np.float32(1.0) / temperature**exponents)
  return angles.reshape(coords.shape[0], 2 * n).astype(np.float32)


def init_mixed_freqs(
    key: jax.Array, num_heads: int, head_dim: int, temperature: float
) -> jax.Array:
  """RoPE-Mixed's initial frequencies of one layer, [2, num_heads, hd // 2].

  As timm's `init_random_2d_freqs`: magnitudes `temperature ** (-4 i /
  head_dim)` (i < head_dim // 4) along a random direction per head (angle a
  uniform in [0, 2 pi)) and along the direction a + pi / 2; row 0 holds
  the first coordinate's components (cos), row 1 the second's (sin).

  Args:
    key: PRNG key.
    num_heads: Attention heads.
    head_dim: Width of each head (a multiple of 4).
    temperature: The magnitudes' base.

  Returns:
    float32 frequencies.
  """
  magnitudes = 1.0 / (
      temperature ** (jnp.arange(0, head_dim, 4, dtype=jnp.float32) / head_dim)
  )
  angle = jax.random.uniform(key, (num_heads, 1), jnp.float32) * 2 * jnp.pi
  first = jnp.concatenate(
      [magnitudes * jnp.cos(angle), magnitudes * jnp.cos(angle + jnp.pi / 2)],
      axis=-1,
  )
  second = jnp.concatenate(
      [magnitudes * jnp.sin(angle), magnitudes * jnp.sin(angle + jnp.pi / 2)],
      axis=-1,
  )
  return jnp.stack([first, second])


def rotate(x: jax.Array, angles: jax.Array, rotate_half: bool) -> jax.Array:
  """x [..., D] with each channel pair turned by its angle [..., D // 2].

  Computed in float32 (`angles`' dtype at least) and cast back to x's dtype.

  Args:
    x: Vectors, the pairs on the last axis.
    angles: One angle per pair, broadcasting against x's leading axes.
    rotate_half: Pairs (i, i + D // 2) if True, else (2i, 2i + 1).

  Returns:
    The rotated vectors, x's shape and dtype.
  """
  dtype = x.dtype
  x = x.astype(jnp.promote_types(jnp.float32, angles.dtype))
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if rotate_half:
    a, b = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
  else:
    a, b = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
    out = out.reshape(x.shape)
  return out.astype(dtype)


class Rope(nn.Module):
  """Rotates the patch tokens' queries and keys of one attention layer.

  Attributes:
    kind: One of `ROPE_KINDS`.
    options: The convention's settings (`VisionTransformer.rope_options`),
      a tuple of (name, value) pairs.
    grid: The patch grid (rows, columns) of the tokens being rotated.
    num_heads: Attention heads.
    head_dim: Width of each head.
    start: Index of the first patch token in the sequence (1 after a class
      token, else 0); the `grid[0] * grid[1]` tokens from there are rotated,
      the others (class token, registers after the patches) are not.
  """

  kind: str
  options: tuple[tuple[str, Any], ...]
  grid: tuple[int, int]
  num_heads: int
  head_dim: int
  start: int = 0

  @nn.compact
  def __call__(
      self, q: jax.Array, k: jax.Array, token_axis: int
  ) -> tuple[jax.Array, jax.Array]:
    """q and k with the patch tokens rotated.

    Args:
      q: Queries, heads-major [B, H, T, Dh] (`token_axis=2`) or [B, T, H, Dh]
        (`token_axis=1`).
      k: Keys, in the same layout.
      token_axis: The tokens' axis of `q` and `k`.

    Returns:
      (q, k), same shapes and dtypes.
    """
    check_model_options(self.kind, self.options, head_dim=self.head_dim)
    options = resolve_options(self.kind, self.options)
    num_patches = self.grid[0] * self.grid[1]
    if self.kind == 'mixed':
      freqs = self.param(
          'freqs',
          lambda key: init_mixed_freqs(
              key, self.num_heads, self.head_dim, options['temperature']
          ),
      )
      coords = jnp.asarray(_patch_coordinates(self.grid, options))
      # [heads, N, D // 2]: each head's own mix of the two coordinates.
      angles = coords[None, :, 0:1] * freqs[0][:, None, :].astype(
          jnp.float32
      ) + coords[None, :, 1:2] * freqs[1][:, None, :].astype(jnp.float32)
      if token_axis == 1:
        angles = jnp.swapaxes(angles, 0, 1)  # [N, heads, D // 2]
    else:
      angles = jnp.asarray(axial_angles(self.grid, self.head_dim, options))
      if token_axis == 2:
        angles = angles[None]  # [1, N, D // 2] against [heads, N, D].
      else:
        angles = angles[:, None]  # [N, 1, D // 2] against [N, heads, D].
    rotate_half = options.get('rotate_half', False)

    def rotated(x: jax.Array) -> jax.Array:
      before, patches, after = jnp.split(
          x, [self.start, self.start + num_patches], axis=token_axis
      )
      patches = rotate(patches, angles, rotate_half)
      return jnp.concatenate([before, patches, after], axis=token_axis)

    return rotated(q), rotated(k)


__all__ = [
    'AXIAL_CONVENTIONS',
    'DINOV3',
    'EVA02',
    'GRID_INDEXINGS',
    'MIXED',
    'PE',
    'ROPE_KINDS',
    'Rope',
    'axial_angles',
    'canonical_options',
    'check_model_options',
    'init_mixed_freqs',
    'resolve_options',
    'rotate',
]
