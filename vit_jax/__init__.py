"""vit_jax: Vision Transformers in JAX/Flax, from one CPU to a TPU pod.

Importing the package is cheap: submodules (`vit_jax.models`,
`vit_jax.checkpoint`, ...) are imported explicitly, and `vit_jax.models` never
imports TensorFlow.
"""

__version__ = '0.1.0'
