"""Packaging for vit_jax: Vision Transformers in JAX/Flax, from one CPU to a pod."""

import setuptools

# Runtime dependencies only. `vit_jax.models` itself needs just jax, flax and
# numpy; the rest serve training, input pipelines and checkpoints.
INSTALL_REQUIRES = [
    'absl-py',
    'clu',
    'flax>=0.10',
    # tensorflow-datasets needs it for local builders but does not declare it.
    'importlib_resources',
    'jax>=0.5',
    'ml-collections',
    'numpy',
    'optax',
    'orbax-checkpoint',
    'pillow',  # Checks image-folder files and names the unreadable ones.
    'scikit-learn',  # Ships the bundled `digits` dataset.
    'scipy',
    'tensorboard',  # clu's summary writer; tensorflow-cpu no longer brings it.
    'tensorflow-cpu',
    'tensorflow-datasets',
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
]

setuptools.setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformers (ViT, hybrids, MLP-Mixer) in JAX/Flax: '
    'published checkpoints, sharded training from one CPU to a TPU pod.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache 2.0',
    packages=setuptools.find_packages(include=['vit_jax', 'vit_jax.*']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'dev': DEV_REQUIRES,
        'test': DEV_REQUIRES,
        'plot': ['matplotlib'],
    },
)
