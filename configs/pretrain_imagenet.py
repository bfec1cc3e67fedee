r"""Pre-training on ImageNet-1k from scratch (paper Table 3, last row).

Adam, batch 4096, base LR 3e-3, 10k warm-up steps then cosine decay, weight
decay 0.3, dropout 0.1, gradient clipping at 1, representation layer, 224 px,
300 epochs.

  python -m vit_jax.main --config=configs/pretrain_imagenet.py:b16 \
      --workdir=gs://bucket/b16_i1k --config.tfds_data_dir=gs://bucket/tfds \
      --distributed
"""

from vit_jax import config_lib

IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 300


def get_config(arg='b16'):
  """Returns the config for `<model>[,runlocal]`."""
  args, runlocal = config_lib.parse_args(arg)
  c = config_lib.pretraining_base(args[0] if args else 'b16', dropout=0.1)
  c.dataset = 'imagenet2012'
  c.base_lr = 3e-3
  c.decay_type = 'cosine'
  c.weight_decay = 0.3
  c.total_steps = EPOCHS * IMAGENET_TRAIN_IMAGES // c.batch
  c.eval_every = 5_000
  if runlocal:
    config_lib.set_runlocal(c)
  return c
