r"""JFT-300M-style pre-training (paper Table 3, first rows).

Adam, batch 4096, 10k warm-up steps then linear decay, weight decay 0.1, no
dropout, representation layer, 224 px, sigmoid cross-entropy (JFT is
multi-label), 7 epochs (14 for L/16 and H/14 in the paper's best runs); base
LR by model: B 8e-4, L/32 6e-4, L/16 4e-4, H/14 3e-4. JFT is private: point
`image_folder` (or `dataset`) at your own large labelled collection.

  python -m vit_jax.main --config=configs/pretrain_jft.py:l16 \
      --workdir=gs://bucket/l16_jft --config.image_folder=/data/jft \
      --distributed
"""

from vit_jax import config_lib

JFT_IMAGES = 303_000_000
BASE_LR = {
    'ViT-B_16': 8e-4,
    'ViT-B_32': 8e-4,
    'ViT-L_32': 6e-4,
    'ViT-L_16': 4e-4,
    'ViT-H_14': 3e-4,
}
EPOCHS = {'ViT-L_16': 7, 'ViT-H_14': 14}


def get_config(arg='l16'):
  """Returns the config for `<model>[,runlocal]`."""
  args, runlocal = config_lib.parse_args(arg)
  c = config_lib.pretraining_base(args[0] if args else 'l16', dropout=0.0)
  c.dataset = 'image_folder'
  c.image_folder_test_percent = 1
  c.loss = 'sigmoid_xent'
  c.base_lr = BASE_LR.get(c.model_name, 8e-4)
  c.decay_type = 'linear'
  c.weight_decay = 0.1
  c.total_steps = EPOCHS.get(c.model_name, 7) * JFT_IMAGES // c.batch
  if runlocal:
    config_lib.set_runlocal(c)
  return c
