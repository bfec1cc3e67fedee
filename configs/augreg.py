r"""The AugReg recipe ("How to train your ViT?", Steiner et al., 2021).

`configs/augreg.py:<model>,<dataset>[,<aug>][,runlocal]`, dataset `i21k`
(ImageNet-21k pre-training) or `i1k` (ImageNet-1k from scratch):

  python -m vit_jax.main --config=configs/augreg.py:b16,i21k \
      --workdir=gs://bucket/b16_augreg --config.image_folder=/data/i21k \
      --distributed
  python -m vit_jax.main --config=configs/augreg.py:s16,i1k,medium2 \
      --workdir=gs://bucket/s16_i1k --config.tfds_data_dir=gs://bucket/tfds
  python -m vit_jax.main --config=configs/augreg.py:ti16,i1k,runlocal \
      --workdir=/tmp/augreg_smoke        # seconds on a CPU, digits

Shared by both rows (paper §3 and Appendix; big_vision's
`configs/vit_i21k.py` / `vit_i1k.py`, which reproduce the paper): Adam
(β1 0.9, β2 0.999), batch 4096, base learning rate 1e-3, 10k linear warm-up
steps then cosine decay, gradient clipping at global norm 1, 300 epochs,
224 px, sigmoid cross-entropy with the head bias initialised to -10 (i21k)
or -6.9 (i1k), Inception crop and flips.

Augmentation levels (RandAugment (layers, magnitude), Mixup alpha), the
paper's names: none (-, 0), light1 ((2, 0), 0), light2 ((2, 10), 0.2),
medium1 ((2, 15), 0.2), medium2 ((2, 15), 0.5), strong1 ((2, 20), 0.5),
strong2 ((2, 20), 0.8). The default level per model is big_vision's choice
for 30-300 epochs (i21k: Ti/16 none, S/32 none, S/16 light1, B/32 and B/16
light2, L/16 medium2; i1k: Ti/16 light1, S/32 medium1, the others medium2).

Regularisation: i21k pre-training uses no dropout and no stochastic depth
(the paper found them not to help with that much data), weight decay 0.03
for Ti and S/16 and 0.1 otherwise (the published recommended checkpoints);
ImageNet-1k from scratch uses dropout 0.1 and stochastic depth 0.1 with
weight decay 0.1 (the published i1k checkpoints' `do_0.1-sd_0.1-wd_0.1`).
The paper's weight decay multiplies the learning rate, as `optax.adamw`'s
does here (big_vision writes the same decay as wd=1e-4 without the rate).

Models: the paper's i21k models pool by global average ('gap', big_vision's
`pool_type='gap'`) with learned position embeddings and no representation
layer; the i1k ones use the class token with a representation layer.
"""

from vit_jax import config_lib

IMAGES = {'i21k': 14_197_122, 'i1k': 1_281_167}
EPOCHS = 300
AUGMENTATIONS = {  # level: (RandAugment (layers, magnitude), Mixup alpha)
    'none': ((), 0.0),
    'light1': ((2, 0), 0.0),
    'light2': ((2, 10), 0.2),
    'medium1': ((2, 15), 0.2),
    'medium2': ((2, 15), 0.5),
    'strong1': ((2, 20), 0.5),
    'strong2': ((2, 20), 0.8),
}
DEFAULT_AUGMENTATION = {
    'i21k': {
        'ViT-Ti_16': 'none',
        'ViT-S_32': 'none',
        'ViT-S_16': 'light1',
        'ViT-B_32': 'light2',
        'ViT-B_16': 'light2',
        'ViT-L_16': 'medium2',
    },
    'i1k': {'ViT-Ti_16': 'light1', 'ViT-S_32': 'medium1'},
}
_SMALL_DECAY_I21K = ('ViT-Ti_16', 'ViT-S_16')


def get_config(arg='b16,i21k'):
  """Returns the config for `<model>,<dataset>[,<aug>][,runlocal]`."""
  args, runlocal = config_lib.parse_args(arg)
  if len(args) not in (2, 3) or args[1] not in IMAGES:
    raise ValueError(
        f'configs/augreg.py:{arg}: use <model>,<dataset>[,<aug>] with '
        f'dataset one of {sorted(IMAGES)} and aug one of '
        f'{sorted(AUGMENTATIONS)} (e.g. configs/augreg.py:b16,i21k).'
    )
  model = config_lib.resolve_model(args[0])
  dataset = args[1]
  aug = (
      args[2]
      if len(args) == 3
      else DEFAULT_AUGMENTATION[dataset].get(model, 'medium2')
  )
  if aug not in AUGMENTATIONS:
    raise ValueError(
        f'configs/augreg.py:{arg}: unknown augmentation level '
        f'{aug!r}; use one of {sorted(AUGMENTATIONS)}.'
    )
  randaugment, mixup_alpha = AUGMENTATIONS[aug]
  scratch = dataset == 'i1k'
  regularisation = 0.1 if scratch else 0.0

  c = config_lib.pretraining_base(model, dropout=regularisation)
  c.model = {
      'transformer': {'dropout_rate': regularisation},
      'stochastic_depth': regularisation,
      'classifier': 'token' if scratch else 'gap',
      'head_bias_init': -6.9 if scratch else -10.0,
  }
  if scratch:
    c.model['representation_size'] = _width(model)
    c.dataset = 'imagenet2012'
  else:
    c.dataset = 'image_folder'
    c.image_folder_test_percent = 1
  c.loss = 'sigmoid_xent'
  c.base_lr = 1e-3
  c.decay_type = 'cosine'
  c.weight_decay = 0.03 if (not scratch and model in _SMALL_DECAY_I21K) else 0.1
  c.mixup_alpha = mixup_alpha
  c.pp = {'randaugment': randaugment}
  c.total_steps = EPOCHS * IMAGES[dataset] // c.batch
  if runlocal:
    config_lib.set_runlocal(c)
    # Keep the recipe in the smoke run: every part of it runs for real.
    c.model = {**c.model, 'stochastic_depth': 0.1}
    c.pp = {**c.pp, 'randaugment': randaugment or (2, 10)}
    c.mixup_alpha = mixup_alpha or 0.2
  return c


def _width(model):
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  return models.get_config(model)['hidden_size']
