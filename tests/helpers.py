"""Helpers shared by the tests: random weights, tiny models, test files."""

import glob
import hashlib
import os
import re
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from vit_jax import checkpoint
import vit_jax.models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, timeout=600):
  """`python -m module *args` from the repository, on the real devices.

  XLA_FLAGS is left out, so the 8 simulated devices of the test process do
  not leak into the program (it runs as a user would).
  """
  return subprocess.run(
      [sys.executable, '-m', module, *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
  )


def randomize(params, seed=0, scale=0.2):
  """Replaces every leaf by random values (zero-initialised heads make
  logits trivially equal; random weights make comparisons meaningful)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  new = []
  for leaf in leaves:
    value = rng.normal(size=leaf.shape) * scale
    if leaf.ndim == 1 and leaf.shape[0] > 0:
      value = value + 1.0 * (rng.random() < 0.5)  # Some scales near 1.
    new.append(np.asarray(value, dtype=np.float32))
  return jax.tree_util.tree_unflatten(treedef, new)


def random_images(shape, seed=0):
  return (
      np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)
  )


# name -> (registered base model, overrides, image size). Tiny versions of each
# model family with the real structure (class token, hybrid stages, Mixer
# token mixing), small enough for fast CPU tests.
TINY_MODELS = {
    'vit': (
        'testing',
        dict(patches={'size': (4, 4)}, transformer={'num_layers': 2}),
        16,
    ),
    'vit_rep': (
        'testing',
        dict(
            patches={'size': (4, 4)},
            representation_size=6,
            transformer={'num_layers': 2},
        ),
        16,
    ),
    'vit_gap': (
        'testing',
        dict(
            patches={'size': (4, 4)},
            classifier='gap',
            transformer={'num_layers': 2},
        ),
        16,
    ),
    'hybrid': (
        'R50+ViT-B_16',
        dict(
            hidden_size=16,
            resnet={'num_layers': (1, 1), 'width_factor': 0.5},
            transformer={'num_layers': 2, 'mlp_dim': 32, 'num_heads': 2},
        ),
        32,
    ),
    'hybrid_root': (
        'R+ViT-Ti_16',
        dict(
            hidden_size=16,
            patches={'size': (2, 2)},
            resnet={'num_layers': (), 'width_factor': 0.5},
            transformer={'num_layers': 1, 'mlp_dim': 32, 'num_heads': 2},
        ),
        16,
    ),
    'mixer': (
        'Mixer-B_16',
        dict(
            patches={'size': (4, 4)},
            hidden_dim=16,
            num_blocks=2,
            tokens_mlp_dim=8,
            channels_mlp_dim=32,
        ),
        16,
    ),
}


def tiny_model(kind, num_classes=7, **extra):
  """Returns (model, image_size) for a TINY_MODELS entry."""
  base, overrides, size = TINY_MODELS[kind]
  return (
      vit_jax.models.get_model(
          base, num_classes=num_classes, **{**overrides, **extra}
      ),
      size,
  )


def init_params(model, images, seed=0):
  """Jitted `model.init(...)['params']` (eager init compiles op by op)."""
  return jax.jit(lambda x: model.init(jax.random.key(seed), x, train=False))(
      images
  )['params']


def write_published_npz(params, path, *, prefix='', old_groupnorm=False):
  """Writes an npz in the gs://vit_models layout, independently of `save`.

  The renaming is spelled out here (pre-Linen numbering inside encoder
  blocks; old hybrids' GroupNorm parameters as (1, 1, 1, C)).
  """
  renames = {
      '/MultiHeadDotProductAttention_0/': '/MultiHeadDotProductAttention_1/',
      '/LayerNorm_1/': '/LayerNorm_2/',
      '/MlpBlock_0/': '/MlpBlock_3/',
  }
  flat = {}
  for key, value in checkpoint.flatten(params).items():
    value = np.asarray(value)
    if '/encoderblock_' in key:
      for old, new in renames.items():
        key = key.replace(old, new)
    if old_groupnorm and '/gn' in '/' + key.rsplit('/', 1)[0]:
      value = value.reshape(1, 1, 1, -1)
    flat[prefix + key] = value
  np.savez(path, **flat)
  return {k[len(prefix) :]: v for k, v in flat.items()}


def make_image_folder(
    root,
    *,
    classes=('cat', 'dog', 'fox'),
    per_class=7,
    split_dirs=False,
    seed=0,
):
  """Writes small, distinct PNG and JPEG images (mixed-case extensions).

  Each class has its own colour, so a tiny model can learn them.
  """
  rng = np.random.default_rng(seed)
  extensions = ('.png', '.PNG', '.jpg', '.JPEG', '.jpeg')
  colours = [(220, 40, 40), (40, 200, 60), (50, 60, 230), (200, 200, 30)]
  paths = []
  for c, name in enumerate(classes):
    for i in range(per_class):
      split = ('test' if i % 4 == 0 else 'train') if split_dirs else ''
      folder = os.path.join(root, split, name)
      os.makedirs(folder, exist_ok=True)
      h, w = (20, 24) if i % 2 else (24, 20)
      noise = rng.integers(-25, 25, size=(h, w, 3))
      image = np.clip(np.array(colours[c]) + noise, 0, 255).astype(np.uint8)
      ext = extensions[(c + i) % len(extensions)]
      path = os.path.join(folder, f'img_{i:03d}{ext}')
      Image.fromarray(image).save(
          path, format='PNG' if ext.lower() == '.png' else 'JPEG', quality=95
      )
      paths.append(path)
  return paths


class PickleExploit:
  """Unpickling this would create a marker file (for the object-array test)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def snapshot(directory):
  """{relative path: sha256} of every file below `directory`."""
  out = {}
  for path in glob.glob(os.path.join(directory, '**'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(
            f.read()
        ).hexdigest()
  return out


def write_testing_npz(path, num_classes=3, size=32):
  """A 'testing' ViT with random parameters, saved as an .npz at `path`.

  Returns:
    (the model, its parameters).
  """
  model = vit_jax.models.get_model('testing', num_classes=num_classes)
  params = randomize(
      init_params(model, np.zeros((1, size, size, 3), np.float32)), scale=0.5
  )
  checkpoint.save(params, path)
  return model, params


# absl's log lines, and the banner C++ absl logging prints once (TensorFlow's
# runtime, started by reading a checkpoint, logs through it).
_LOG_LINE = re.compile(
    r'^([IWEF]\d{4} \d\d:\d\d:\d\d'
    r'|WARNING: All log messages before absl::InitializeLog\(\) is called)'
)


def unlogged_lines(stderr):
  """The lines of `stderr` that are not log lines (`_LOG_LINE`)."""
  return [
      l for l in stderr.splitlines() if l.strip() and not _LOG_LINE.match(l)
  ]


def assert_refused(result, *expected):
  """A CLI refusal: one `error:` line (and at most one hint line) besides
  log lines, exit 2, no traceback; each `expected` text in the error line.

  Returns:
    The non-log lines of stderr.
  """
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.returncode == 2, result.stderr[-3000:]
  lines = unlogged_lines(result.stderr)
  assert 1 <= len(lines) <= 2, result.stderr[-3000:]
  assert lines[0].startswith('error: '), lines
  for text in expected:
    assert text in lines[0], lines
  return lines


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def doc_files():
  """README.md and the documentation site's pages (docs/*.md), as paths."""
  return [os.path.join(_REPO, 'README.md')] + sorted(
      glob.glob(os.path.join(_REPO, 'docs', '*.md'))
  )


def doc_text():
  """The text of README.md and every documentation page, joined."""
  return '\n'.join(open(f, encoding='utf-8').read() for f in doc_files())
