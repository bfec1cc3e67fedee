"""Masked patch prediction: the paper's self-supervised objective (§4.6, B.1.2).

Half of the patch embeddings of each image are corrupted, BERT-style: of the
corrupted ones, 80% are replaced by a learnable [mask] embedding, 10% by the
embedding of a random other patch (from anywhere in the batch) and 10% are
left as they are. From each corrupted patch's output token a linear head
predicts a target of the original patch, and the loss is averaged over the
corrupted patches only. Targets (`MppConfig.target`):

  '3bit': the patch's mean colour, 3 bits per RGB channel: one of 512
          classes (the paper's main choice);
  '4x4':  the 3-bit colours of the patch downsized to 4x4: 16 predictions of
          512 classes;
  'l2':   the full patch in [-1, 1], regressed with a squared error.

The model is `MaskedPatchPredictor(vit, num_outputs)`: the ViT's own
parameters (same names, at the top level) plus `mpp_mask_token` and
`mpp_head`, which `checkpoint.load_pretrained` drops when fine-tuning. The
ViT itself knows nothing of the objective: it only offers a hook on its patch
embeddings and its encoder's output tokens.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax import sharding
from vit_jax.evaluators import classification
from vit_jax.objectives import protocol

NAME = 'mpp'

TARGETS = ('3bit', '4x4', 'l2')


@dataclasses.dataclass(frozen=True)
class MppConfig:
  """The objective's settings (config fields `mpp.*`).

  Attributes:
    target: '3bit', '4x4' or 'l2'.
    corruption_rate: Fraction of the patches corrupted per image.
    mask_prob: Of the corrupted patches, the fraction given the [mask]
      embedding.
    random_prob: Of the corrupted patches, the fraction given a random other
      patch's embedding (the rest keep their own).
    bits: Bits per colour channel of the '3bit' / '4x4' targets.
  """

  target: str = '3bit'
  corruption_rate: float = 0.5
  mask_prob: float = 0.8
  random_prob: float = 0.1
  bits: int = 3

  def __post_init__(self):
    if self.target not in TARGETS:
      raise ValueError(
          f'config.mpp.target={self.target!r}; use one of ' f'{TARGETS}.'
      )
    if not 0 < self.corruption_rate <= 1:
      raise ValueError(
          f'config.mpp.corruption_rate={self.corruption_rate} '
          'must be in (0, 1].'
      )
    if (
        min(self.mask_prob, self.random_prob) < 0
        or self.mask_prob + self.random_prob > 1
    ):
      raise ValueError(
          f'config.mpp.mask_prob={self.mask_prob} and random_prob='
          f'{self.random_prob} must be >= 0 and sum to at most 1 (the rest '
          'of the corrupted patches are kept).'
      )
    if not 1 <= self.bits <= 8:
      raise ValueError(f'config.mpp.bits={self.bits} must be in 1..8.')

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> 'MppConfig':
    """From the `config.mpp` fields (missing ones: the dataclass defaults).

    Raises:
      ValueError: naming fields the objective does not have.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(
          f'Unknown config.mpp field(s) {unknown}; known: ' f'{sorted(known)}.'
      )
    return cls(**fields)

  @property
  def num_colours(self) -> int:
    return 2 ** (3 * self.bits)

  def num_outputs(self, patch_px: tuple[int, int]) -> int:
    """Width of the prediction head for patches of `patch_px` pixels."""
    if self.target == '3bit':
      return self.num_colours
    if self.target == '4x4':
      return 16 * self.num_colours
    return patch_px[0] * patch_px[1] * 3


def sample_corruption(
    rng: jax.Array, batch: int, num_patches: int, cfg: MppConfig
) -> dict[str, jax.Array]:
  """Which patches to corrupt, and how.

  Exactly `round(corruption_rate * num_patches)` patches per image are
  corrupted; each corrupted patch independently gets the [mask] embedding
  (probability `mask_prob`), a random patch's embedding (`random_prob`) or
  keeps its own.

  Returns:
    {'corrupted', 'replace_mask', 'replace_random': bool [batch, patches],
     'random_source': int32 [batch, patches] (index into the batch's
     flattened patches)}.
  """
  order_rng, kind_rng, source_rng = jax.random.split(rng, 3)
  count = int(round(cfg.corruption_rate * num_patches))
  scores = jax.random.uniform(order_rng, (batch, num_patches))
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  corrupted = rank < count
  kind = jax.random.uniform(kind_rng, (batch, num_patches))
  replace_mask = corrupted & (kind < cfg.mask_prob)
  replace_random = (
      corrupted
      & (kind >= cfg.mask_prob)
      & (kind < cfg.mask_prob + cfg.random_prob)
  )
  source = jax.random.randint(
      source_rng, (batch, num_patches), 0, batch * num_patches
  )
  return {
      'corrupted': corrupted,
      'replace_mask': replace_mask,
      'replace_random': replace_random,
      'random_source': source.astype(jnp.int32),
  }


def patch_count(image_shape: tuple[int, ...], patch_px: tuple[int, int]) -> int:
  """Patches per image of NHWC `image_shape` with `patch_px`-pixel patches."""
  return (image_shape[1] // patch_px[0]) * (image_shape[2] // patch_px[1])


def patches_of(images: jax.Array, patch_px: tuple[int, int]) -> jax.Array:
  """`[B, H, W, C]` -> `[B, patches, ph, pw, C]`, patches row-major."""
  b, h, w, c = images.shape
  ph, pw = patch_px
  x = images.reshape(b, h // ph, ph, w // pw, pw, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, ph, pw, c)


def colour_index(colours: jax.Array, bits: int) -> jax.Array:
  """Mean colours in [-1, 1] (`[..., 3]`) -> class index in [0, 2^(3 bits)).

  Each channel is quantised to `bits` bits; red is the most significant.
  """
  levels = 2**bits
  q = jnp.clip(jnp.floor((colours + 1.0) / 2.0 * levels), 0, levels - 1)
  q = q.astype(jnp.int32)
  return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]


def targets(
    images: jax.Array, patch_px: tuple[int, int], cfg: MppConfig
) -> jax.Array:
  """Prediction targets of every patch.

  Returns:
    '3bit': int32 `[B, patches]`; '4x4': int32 `[B, patches, 16]`;
    'l2': float32 `[B, patches, ph * pw * 3]`.
  """
  patches = patches_of(images.astype(jnp.float32), patch_px)
  if cfg.target == '3bit':
    return colour_index(patches.mean(axis=(2, 3)), cfg.bits)
  if cfg.target == '4x4':
    b, n, ph, pw, c = patches.shape
    if ph % 4 or pw % 4:
      raise ValueError(
          f"config.mpp.target='4x4' needs patches divisible "
          f'by 4, got {ph}x{pw}.'
      )
    cells = patches.reshape(b, n, 4, ph // 4, 4, pw // 4, c).mean(axis=(3, 5))
    return colour_index(cells.reshape(b, n, 16, c), cfg.bits)
  return patches.reshape(patches.shape[0], patches.shape[1], -1)


def loss_and_accuracy(
    predictions: jax.Array,
    target: jax.Array,
    corrupted: jax.Array,
    cfg: MppConfig,
) -> tuple[jax.Array, jax.Array]:
  """Mean loss (and accuracy) over the corrupted patches only.

  Args:
    predictions: `[B, patches, num_outputs]` from the model.
    target: From `targets`.
    corrupted: bool `[B, patches]`.
    cfg: The objective.

  Returns:
    (loss, accuracy); accuracy is the fraction of correct colour classes
    (0 for 'l2').
  """
  weight = corrupted.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  predictions = predictions.astype(jnp.float32)
  if cfg.target == 'l2':
    per_patch = jnp.mean((predictions - target) ** 2, axis=-1)
    return (per_patch * weight).sum() / count, jnp.zeros(())
  if cfg.target == '4x4':
    predictions = predictions.reshape(predictions.shape[:2] + (16, -1))
  per = optax.softmax_cross_entropy_with_integer_labels(predictions, target)
  hits = (predictions.argmax(-1) == target).astype(jnp.float32)
  if cfg.target == '4x4':
    per, hits = per.mean(-1), hits.mean(-1)
  return (per * weight).sum() / count, (hits * weight).sum() / count


class MaskedPatchPredictor(nn.Module):
  """A ViT trained to predict its corrupted patches.

  Its parameters are the ViT's, under the same names (shared scope), plus
  `mpp_mask_token` `(D,)` and `mpp_head`, so checkpoints of masked patch
  prediction hold the published layout with two extra entries.

  Attributes:
    vit: The `VisionTransformer` (built without a classification head).
    num_outputs: Width of the prediction head (`MppConfig.num_outputs`).
  """

  vit: nn.Module
  num_outputs: int

  def setup(self):
    nn.share_scope(self, self.vit)

  @property
  def total_stride(self) -> tuple[int, int]:
    return self.vit.total_stride

  @nn.compact
  def __call__(
      self, images: jax.Array, corruption: dict[str, jax.Array], *, train: bool
  ) -> jax.Array:
    """Predictions `[batch, patches, num_outputs]` of every patch.

    Args:
      images: `[batch, height, width, 3]` in [-1, 1].
      corruption: From `sample_corruption`: which patch embeddings are
        replaced by the [mask] embedding or another patch's.
      train: Enables dropout.
    """

    def corrupt(tokens):
      # Created here, between the patch embedding and the class token, as
      # the parameters' initialisation order has always been.
      mask_token = self.param(
          'mpp_mask_token',
          nn.initializers.normal(0.02),
          (tokens.shape[-1],),
          self.vit.param_dtype,
      )
      n, num, d = tokens.shape
      others = tokens.reshape(n * num, d)[corruption['random_source']]
      tokens = jnp.where(
          corruption['replace_random'][..., None], others, tokens
      )
      return jnp.where(
          corruption['replace_mask'][..., None],
          mask_token.astype(tokens.dtype),
          tokens,
      )

    x = self.vit(images, train=train, patch_transform=corrupt, output='tokens')
    num_patches = corruption['corrupted'].shape[1]
    patch_tokens = x[:, x.shape[1] - num_patches :]  # Without the class token.
    return nn.Dense(
        self.num_outputs,
        dtype=self.vit.dtype,
        param_dtype=self.vit.param_dtype,
        name='mpp_head',
    )(patch_tokens)


def objective(model: MaskedPatchPredictor, cfg: MppConfig):
  """`(params, batch, rng) -> (loss, {'mpp_accuracy'})` for `train_step`.

  The corruption and dropout keys both derive from `rng`.
  """
  patch_px = model.total_stride

  def fn(params, batch, rng):
    images = batch['image']
    corruption_rng, dropout_rng = jax.random.split(rng)
    corruption = sample_corruption(
        corruption_rng,
        images.shape[0],
        patch_count(images.shape, patch_px),
        cfg,
    )
    predictions = cast(
        jax.Array,
        model.apply(
            {'params': params},
            images,
            corruption,
            train=True,
            rngs={'dropout': dropout_rng},
        ),
    )
    loss, accuracy = loss_and_accuracy(
        predictions,
        targets(images, patch_px, cfg),
        corruption['corrupted'],
        cfg,
    )
    return loss, {'mpp_accuracy': accuracy}

  return fn


def make_eval_fn(
    model: MaskedPatchPredictor,
    cfg: MppConfig,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
    seed: int = 0,
):
  """Jitted `(params, batch) -> sums` of the MPP loss and hits.

  The corruption of an eval batch depends only on `seed` and the batch
  contents' position, so successive evaluations are comparable. Padding
  examples (`mask` 0) are left out.
  """
  patch_px = model.total_stride

  def eval_step(params, batch):
    images = batch['image']
    corruption = sample_corruption(
        jax.random.key(seed),
        images.shape[0],
        patch_count(images.shape, patch_px),
        cfg,
    )
    corrupted = corruption['corrupted'] & (batch['mask'][:, None] > 0)
    predictions = cast(
        jax.Array,
        model.apply({'params': params}, images, corruption, train=False),
    )
    loss, accuracy = loss_and_accuracy(
        predictions, targets(images, patch_px, cfg), corrupted, cfg
    )
    patches = corrupted.sum().astype(jnp.float32)
    return {
        'loss': loss * patches,
        'correct': accuracy * patches,
        'patches': patches,
        'count': batch['mask'].sum(),
    }

  return jax.jit(
      sharding.on_mesh(eval_step, mesh),
      in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
  )


def evaluate(
    params: Any, eval_fn, dataset: Any, batch_sharding: Any
) -> dict[str, float]:
  """MPP loss and accuracy over the corrupted patches of an eval split.

  Keys: `eval/mpp_loss`, `eval/mpp_accuracy`, `eval/examples`.
  """
  totals = classification.sum_over_dataset(
      params, eval_fn, dataset, batch_sharding
  )
  patches = max(totals['patches'], 1.0)
  return {
      'eval/mpp_loss': totals['loss'] / patches,
      'eval/mpp_accuracy': totals['correct'] / patches,
      'eval/examples': totals['count'],
  }


def _predictor(model: nn.Module) -> MaskedPatchPredictor:
  """`model`, the `MaskedPatchPredictor` that `MaskedPatchPrediction.wrap`
  made (the training loop passes it back as an `nn.Module`)."""
  if not isinstance(model, MaskedPatchPredictor):
    raise TypeError(
        'Masked patch prediction trains the module its wrap() '
        f'returns, a MaskedPatchPredictor, not {type(model)}.'
    )
  return model


@dataclasses.dataclass(frozen=True)
class MaskedPatchPrediction:
  """The objective as the training loop uses it (see `vit_jax.objectives`).

  Attributes:
    cfg: The typed `config.mpp` section.
  """

  cfg: MppConfig
  name: str = NAME

  def num_classes(self, dataset_classes: int) -> None:
    """No classification head: the backbone is built without one."""
    del dataset_classes
    return None

  def wrap(self, backbone: nn.Module) -> MaskedPatchPredictor:
    return MaskedPatchPredictor(
        backbone, self.cfg.num_outputs(backbone.total_stride)
    )

  def backbone(self, model: nn.Module) -> nn.Module:
    """The model without the objective's parts (for feature evaluators)."""
    return _predictor(model).vit

  def init(self, model: nn.Module, rng: jax.Array, images: jax.Array) -> Any:
    """Parameters, through the masked path (which creates the head)."""
    model = _predictor(model)
    corruption = sample_corruption(
        rng,
        images.shape[0],
        patch_count(images.shape, model.total_stride),
        self.cfg,
    )
    return model.init(rng, images, corruption, train=False)['params']

  def loss_fn(self, model: nn.Module) -> protocol.LossFn:
    return objective(_predictor(model), self.cfg)

  def make_eval_fn(
      self, model: nn.Module, mesh: jax.sharding.Mesh, param_shardings: Any
  ) -> Callable[..., Any]:
    return make_eval_fn(_predictor(model), self.cfg, mesh, param_shardings)

  def evaluate(
      self,
      params: Any,
      eval_fn: Callable[..., Any],
      dataset: Any,
      batch_sharding: Any,
  ) -> dict[str, float]:
    return evaluate(params, eval_fn, dataset, batch_sharding)

  def run_meta(self) -> dict[str, Any]:
    # Only self-supervised runs record it, so that checkpoints of
    # classification runs written before objectives existed still resume.
    return {'objective': NAME}
