r"""Fine-tuning recipe of the paper (§3.2, §4.1, Appendix B.1.1).

SGD momentum 0.9, batch 512, cosine decay, no weight decay, gradient
clipping at global norm 1, resolution 384, steps per dataset as in the
paper; the pre-trained head is replaced by a zero-initialised one and the
position embeddings are interpolated to the new resolution.

  python -m vit_jax.main --config=configs/finetune.py:b16,cifar10 \
      --workdir=/tmp/b16_cifar10 \
      --config.pretrained_path=gs://vit_models/imagenet21k/ViT-B_16.npz

Argument: `<model>,<dataset>[,<preset>][,runlocal]`; model is a registry
name, a short name (ti16, s16, b16, b32, l16, l32, h14, r50_b16,
mixer_b16, ...) or a timm model name of `vit_jax.timm_models.TIMM_MODELS`
(e.g. vit_small_patch14_reg4_dinov2: the registry model with timm's
options, its weights' resolution and mean/std normalisation, and
`config.timm_model`, so that `config.pretrained_path` can be its
`.safetensors` file), dataset one of cifar10, cifar100, imagenet2012 (imagenet),
pets, flowers, digits or a tfds name. The paper sweeps base_lr over {0.001,
0.003, 0.01, 0.03} on a held-out slice: add `--config.eval_split=holdout`.

A preset trains only part of the model (docs/finetuning.md): `head_only`
(the head, with its representation layer and MAP pooling if any) or
`linear_probe` (the final linear layer on the frozen pre-logits); the other
parameters are frozen and hold no optimizer state:

  python -m vit_jax.main --config=configs/finetune.py:b16,cifar10,head_only \
      --workdir=/tmp/b16_cifar10_head \
      --config.pretrained_path=gs://vit_models/imagenet21k/ViT-B_16.npz
"""

from vit_jax import config_lib
from vit_jax import optim
from vit_jax import timm_models

DATASETS = {
    'imagenet': 'imagenet2012',
    'pets': 'oxford_iiit_pet',
    'flowers': 'oxford_flowers102',
}
# Fine-tuning steps (paper Table 4).
STEPS = {
    'imagenet2012': 20_000,
    'cifar10': 10_000,
    'cifar100': 10_000,
    'oxford_iiit_pet': 500,
    'oxford_flowers102': 500,
    'digits': 500,
}


def get_config(arg='b16,cifar10'):
  """Returns the config for `<model>,<dataset>[,<preset>][,runlocal]`."""
  args, runlocal = config_lib.parse_args(arg)
  presets = optim.PARAM_GROUP_PRESETS
  if len(args) not in (2, 3) or (len(args) == 3 and args[2] not in presets):
    raise ValueError(
        'finetune.py takes "<model>,<dataset>[,<preset>][,runlocal]" with '
        f'<preset> one of {sorted(presets)}, got {arg!r}.'
    )
  c = config_lib.get_base()
  timm_model = args[0] if args[0] in timm_models.TIMM_MODELS else None
  if timm_model is None:
    c.model_name = config_lib.resolve_model(args[0])
  else:
    c.model_name = timm_models.TIMM_MODELS[timm_model].registry
  c.dataset = DATASETS.get(args[1], args[1])
  c.image_size = 384
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.batch = 512
  c.batch_eval = 512
  c.base_lr = 0.03
  c.decay_type = 'cosine'
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.total_steps = STEPS.get(c.dataset, 10_000)
  c.warmup_steps = min(500, c.total_steps // 10)
  c.eval_every = max(c.total_steps // 10, 1)
  c.checkpoint_every = c.eval_every
  if len(args) == 3:
    c.param_groups = presets[args[2]]
  if runlocal:
    config_lib.set_runlocal(c)
  if timm_model is not None:
    # After runlocal (which keeps its small patches and depth), so that the
    # family's options and preprocessing are the run's.
    config_lib.use_timm_model(c, timm_model, image_size=not runlocal)
  return c
