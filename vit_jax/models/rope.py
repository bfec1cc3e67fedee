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
           (RoPE-Mixed, Heo et al., 2024).

`Rope` is the module the attention calls (see `MultiHeadDotProductAttention`).
"""

from typing import Any

import flax.linen as nn
import jax

ROPE_KINDS = ('axial', 'mixed')


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
    raise NotImplementedError(f'rope={self.kind!r} is not implemented yet.')


__all__ = ['ROPE_KINDS', 'Rope']
