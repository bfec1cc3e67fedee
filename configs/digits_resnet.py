r"""A small BiT ResNet classifier trained from scratch on the bundled digits.

The convolutional counterpart of configs/digits.py for comparing what the
two learn (`python -m vit_jax.analysis cka`, benchmarks/cka_digits.py): the
same images, preprocessing, optimiser and schedule; the model is the BiT
ResNet of the hybrids (weight-standardised convs, GroupNorm) without a
Transformer: root block, three stages of two bottleneck units, a 1x1
projection, global average pooling and the head. A few minutes on a 2-core
CPU, no download.

  python -m vit_jax.main --config=configs/digits_resnet.py \
      --workdir=/tmp/resnet_digits

`configs/digits_resnet.py:runlocal` is a seconds-long smoke run.
"""

from vit_jax import config_lib

# The registry has no ResNet-only entry: a hybrid's config with the
# Transformer removed (`transformer=None`: ResNet features only) is one.
_RESNET = {
    # Widths 32 / 64 / 128 (bottleneck), outputs 4x that; GroupNorm needs
    # multiples of its 32 groups.
    'resnet': {'num_layers': (2, 2, 2), 'width_factor': 0.5},
    'transformer': None,
    # 1x1 "patches": the projection of the last stage's 512 channels.
    'patches': {'size': (1, 1)},
    'hidden_size': 512,
    'classifier': 'gap',
}


def get_config(arg=None):
  """Returns the config; arg 'runlocal' makes it tiny."""
  _, runlocal = config_lib.parse_args(arg)
  c = config_lib.get_base()
  c.dataset = 'digits'
  c.model_name = 'R26+ViT-S_32'
  c.model = dict(_RESNET)
  # 16 px like the ViT: the root block's stride 4 gives stage 1 the ViT's
  # 4x4 grid (each position 4x4 pixels), then 2x2 and 1x1.
  c.image_size = 16
  c.pp = {'inception_crop': True, 'crop_area_range': (0.7, 1.0),
          'flip': False}
  c.shuffle_buffer = 2000
  c.batch = 128
  c.batch_eval = 300
  c.optimizer = 'adam'
  c.base_lr = 1e-3
  c.weight_decay = 0.05
  c.warmup_steps = 50
  c.total_steps = 1200
  c.decay_type = 'cosine'
  c.label_smoothing = 0.1
  c.ema_decay = 0.99  # Evaluate (and export) the Polyak average.
  c.log_every = 20
  c.eval_every = 300
  c.checkpoint_every = 300
  if runlocal:
    config_lib.set_runlocal(c)
    # set_runlocal makes a hybrid of a hybrid's name: keep the ResNet only,
    # with one unit per stage.
    c.model = dict(_RESNET, resnet={'num_layers': (1, 1),
                                    'width_factor': 0.5})
  return c
