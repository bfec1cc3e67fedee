"""Local tensorflow-datasets builders shipped with vit_jax.

Importing this package registers them with tfds, so `tfds.builder('digits')`
works like any catalogue dataset.
"""

from vit_jax.datasets.digits import Digits
from vit_jax.datasets.digits import prepare_local_builder

LOCAL_BUILDERS = ('digits',)

__all__ = ['Digits', 'LOCAL_BUILDERS', 'prepare_local_builder']
