r"""FlexiViT on ImageNet-1k: one model for every patch size (Beyer et al. 2023).

Each training step cuts its batch into patches of one size drawn from
48, 40, 30, 24, 20, 16, 15, 12, 10 and 8 pixels (uniformly, seeded by the
run's seed and the step, so a resumed run draws the same sizes); the model
keeps a 32x32 patch-embedding kernel and a 7x7 grid of position embeddings,
resampled to each size in the forward pass (big_vision's FlexiViT). 240 px
images, Adam, batch 4096, base LR 1e-3, 10k warm-up steps then cosine decay,
weight decay 1e-4, clipping at 1, RandAugment(2, 10), 90 epochs. Evaluations
run at `model.run_patch_size` (16); any other size with
`python -m vit_jax.evaluate --workdir=... --config.model.run_patch_size=8,8`.

  python -m vit_jax.main --config=configs/flexivit.py:b \
      --workdir=gs://bucket/flexivit_b_i1k --config.tfds_data_dir=gs://bucket/tfds

`configs/flexivit.py:runlocal` is a seconds-long smoke run on digits with
patch sizes 2, 4 and 8 on 16 px images.
"""

from vit_jax import config_lib
from vit_jax.models import vit

IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 90
# FlexiViT-S, -B and -L are ViT-S, -B and -L with other patches.
_VARIANTS = {'s': 'ViT-S_16', 'b': 'ViT-B_16', 'l': 'ViT-L_16'}


def get_config(arg='b'):
  """Returns the config for `<s|b|l>[,runlocal]`."""
  args, runlocal = config_lib.parse_args(arg)
  variant = args[0] if args else 'b'
  if variant not in _VARIANTS:
    raise ValueError(
        f'configs/flexivit.py:{arg}: unknown variant {variant!r}; use one '
        f'of {sorted(_VARIANTS)} (e.g. configs/flexivit.py:b).'
    )
  c = config_lib.get_base()
  c.model_name = _VARIANTS[variant]
  c.model = {
      'patches': {'size': (32, 32)},  # The stored kernel.
      'posemb_grid_size': (7, 7),  # The stored position embeddings.
      'posemb_resize': 'linear',
      'flexi_patch_sizes': vit.FLEXIVIT_PATCH_SIZES,
      'run_patch_size': (16, 16),  # Evaluation (and initialisation).
      'transformer': {'dropout_rate': 0.0},
  }
  c.dataset = 'imagenet2012'
  c.image_size = 240
  c.pp = {'randaugment': (2, 10)}
  c.optimizer = 'adam'
  c.batch = 4096
  c.batch_eval = 4096
  c.base_lr = 1e-3
  c.warmup_steps = 10_000
  c.decay_type = 'cosine'
  c.weight_decay = 1e-4
  c.grad_clip_norm = 1.0
  c.mu_dtype = 'bfloat16'
  c.total_steps = EPOCHS * IMAGENET_TRAIN_IMAGES // c.batch
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  if runlocal:
    config_lib.set_runlocal(c)
    c.model = {
        **c.model,
        'patches': {'size': (8, 8)},
        'posemb_grid_size': (2, 2),
        'posemb_resize': 'linear',
        'flexi_patch_sizes': (2, 4, 8),
        'run_patch_size': (4, 4),
    }
  return c
