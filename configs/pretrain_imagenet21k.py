r"""Pre-training on ImageNet-21k (paper Table 3, Appendix B.1).

Adam (β1 0.9, β2 0.999), batch 4096, base LR 1e-3, 10k warm-up steps then
linear decay, weight decay 0.03, dropout 0.1, gradient clipping at 1, a tanh
representation (pre-logits) layer, 224 px, 90 epochs (30 for some L runs).
ImageNet-21k is not in the tfds catalogue: point `image_folder` at a copy with
one folder per class (or set `dataset` to a tfds dataset you have).

  python -m vit_jax.main --config=configs/pretrain_imagenet21k.py:b16 \
      --workdir=gs://bucket/b16_i21k --config.image_folder=/data/imagenet21k \
      --distributed        # on every worker of a TPU pod (see launch/)
"""

from vit_jax import config_lib

IMAGENET21K_IMAGES = 14_197_122
EPOCHS = 90


def get_config(arg='b16'):
  """Returns the config for `<model>[,runlocal]`."""
  args, runlocal = config_lib.parse_args(arg)
  c = config_lib.pretraining_base(args[0] if args else 'b16', dropout=0.1)
  c.dataset = 'image_folder'
  c.image_folder_test_percent = 1
  c.base_lr = 1e-3
  c.decay_type = 'linear'
  c.weight_decay = 0.03
  c.total_steps = EPOCHS * IMAGENET21K_IMAGES // c.batch
  if runlocal:
    config_lib.set_runlocal(c)
  return c
