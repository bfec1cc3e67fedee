r"""A small BiT ResNet classifier trained from scratch on the bundled digits.

The convolutional counterpart of configs/digits.py for comparing what the
two learn (`python -m vit_jax.analysis cka`, benchmarks/cka_digits.py): its
config with another model (the same images, preprocessing, optimiser and
schedule; no few-shot probe). The model is the BiT
ResNet of the hybrids (weight-standardised convs, GroupNorm) without a
Transformer: root block, three stages of two bottleneck units, a 1x1
projection, global average pooling and the head. A few minutes on a 2-core
CPU, no download.

  python -m vit_jax.main --config=configs/digits_resnet.py \
      --workdir=/tmp/resnet_digits

`configs/digits_resnet.py:runlocal` is a seconds-long smoke run.
"""

import importlib.util
import os

from vit_jax import config_lib

# configs/ is not a package: digits.py is loaded from beside this file.
_SPEC = importlib.util.spec_from_file_location(
    'digits_config',
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'digits.py'),
)
digits = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(digits)

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
  # digits.py's data, preprocessing, optimiser, schedule and runlocal sizes
  # (16 px like the ViT: the root block's stride 4 gives stage 1 the ViT's
  # 4x4 grid, each position 4x4 pixels, then 2x2 and 1x1).
  _, runlocal = config_lib.parse_args(arg)
  c = digits.get_config(arg)
  c.model_name = 'R26+ViT-S_32'
  c.model = dict(_RESNET)
  if runlocal:  # One unit per stage.
    c.model = dict(_RESNET, resnet={'num_layers': (1, 1), 'width_factor': 0.5})
  c.evals.fewshot.every = 0  # No few-shot probe.
  return c
