"""Packaging for vit_jax: Vision Transformers in JAX/Flax, one CPU to a pod."""

import setuptools

# Runtime dependencies only. `vit_jax.models` itself needs just jax, flax and
# numpy; the rest serve training, input pipelines and checkpoints.
#
# The fast-moving ones carry tested ranges: the lower bound is the oldest
# version the test suite has passed with (today: the versions in
# constraints.txt, the only ones tested), the upper bound the next release
# allowed to break us (the next minor; TensorFlow and tensorflow-datasets
# break in minor releases too). Widen a bound only after the suite passes
# with the new version, and update constraints.txt with it.
INSTALL_REQUIRES = [
    'absl-py',
    'clu>=0.0.12,<0.1',
    'flax>=0.12.8,<0.13',
    # tensorflow-datasets needs it for local builders but does not declare it.
    'importlib_resources',
    'jax>=0.10.2,<0.11',  # Brings the matching jaxlib.
    'ml-collections',
    'numpy',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'pillow',  # Checks image-folder files and names the unreadable ones.
    'scikit-learn',  # Ships the bundled `digits` dataset.
    'scipy',
    'tensorboard',  # clu's summary writer; tensorflow-cpu no longer brings it.
    'tensorflow-cpu>=2.21,<2.22',
    'tensorflow-datasets>=4.9.10,<4.10',
    'tqdm',  # Progress bar of notebooks (vit_jax.writers.ProgressBar).
]

# Everything the tests, notebooks and figures need on top.
DEV_REQUIRES = [
    'ipywidgets',  # Notebook progress bars (tqdm.auto).
    'matplotlib',
    'nbclient',
    'nbformat',
    'ipykernel',
    'pytest',
    # Two test processes (README's `-n 2`): much of the suite is compiling and
    # process start-up, which use one core each.
    'pytest-xdist',
    # vit_jax.convert's files (the interop extra); in the tests' set so that
    # the round trips through transformers' and timm's layouts run in CI.
    'safetensors',
]

# The documentation site (docs/, built by .ci/run with warnings as errors):
# Sphinx with MyST pages (as jax, flax, optax and orbax) and autodoc, and the
# furo theme.
DOCS_REQUIRES = [
    'furo>=2025.12.19,<2027',  # Calendar versions: within a year.
    'myst-parser>=5.2,<5.3',
    'sphinx>=9.0.4,<9.1',
]

# The formatter, linter and type checker (settings in pyproject.toml), which
# .ci/run runs before the tests: `pyink --check .`, `ruff check .`, `mypy`.
# Exact versions: their output changes between releases.
LINT_REQUIRES = [
    'mypy>=2.4.1,<2.5',
    'pyink>=26.5.1,<26.6',
    'ruff>=0.17.6,<0.18',
]

# transformers / timm interchange (vit_jax.convert). torch, transformers and
# timm are needed only to load the converted files in PyTorch (and by the
# opt-in tests/test_convert_torch.py), never by vit_jax itself.
INTEROP_REQUIRES = ['safetensors', 'torch', 'transformers', 'timm']

# A Cloud TPU VM (launch/tpu_setup.sh; also what vit_jax.aot compiles with):
# jax's own `tpu` extra, which pins the libtpu built for that jax. Same range
# as jax above; constraints.txt pins the three (jax, jaxlib, libtpu).
TPU_REQUIRES = ['jax[tpu]>=0.10.2,<0.11']

setuptools.setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformers (ViT, hybrids, MLP-Mixer) in JAX/Flax: '
    'published checkpoints, sharded training from one CPU to a TPU pod.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache 2.0',
    packages=setuptools.find_packages(include=['vit_jax', 'vit_jax.*']),
    # The ImageNet label lists of `python -m vit_jax.predict --labels=...`.
    package_data={'vit_jax': ['labels/*.txt', 'labels/*.md']},
    python_requires='>=3.11',  # jax, flax and orbax-checkpoint need it.
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'dev': DEV_REQUIRES,
        'test': DEV_REQUIRES,
        'docs': DOCS_REQUIRES,
        'lint': LINT_REQUIRES,
        'plot': ['matplotlib'],
        'interop': INTEROP_REQUIRES,
        'tpu': TPU_REQUIRES,
    },
)
