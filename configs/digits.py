r"""A small ViT trained from scratch on the bundled digits dataset.

The main job: a few minutes on a 2-core CPU, no download.

  python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/vit_digits

`configs/digits.py:runlocal` is a seconds-long smoke run.
"""

from vit_jax import config_lib

# Options declared with their defaults so that the command line can change
# them (`--config.model.posemb=sincos2d`, `--config.pp.randaugment='(2, 10)'`;
# only declared fields can be overridden): the position-embedding study and
# the AugReg recipe of benchmarks/augreg_digits.py.
_SWITCHES = {
    'model': {'posemb': 'learn', 'stochastic_depth': 0.0},
    'pp': {'randaugment': ()},
}


def get_config(arg=None):
  """Returns the config; arg 'runlocal' makes it tiny."""
  _, runlocal = config_lib.parse_args(arg)
  c = config_lib.get_base()
  c.dataset = 'digits'
  c.model_name = 'ViT-Ti_16'
  # Ti width (192, 3 heads) with 4x4 patches on 16x16 upsampled digits: each
  # patch sees 2x2 original pixels. Two blocks trained twice as long beat
  # four blocks in the same time (docs/results.md).
  c.model = {
      'patches': {'size': (4, 4)},
      'transformer': {'num_layers': 2, 'dropout_rate': 0.1},
      **_SWITCHES['model'],
  }
  c.image_size = 16
  c.pp = {
      'inception_crop': True,
      'crop_area_range': (0.7, 1.0),
      'flip': False,
      **_SWITCHES['pp'],
  }
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
  # Few-shot linear probe of the pre-logits (paper §4.1) at 600 and 1200.
  c.evals.fewshot.every = 600
  if runlocal:
    config_lib.set_runlocal(c)
    c.model = {**c.model, **_SWITCHES['model']}
    c.pp = {**c.pp, **_SWITCHES['pp']}
  return c
