"""Shared test setup: 8 simulated CPU devices, no network, tiny models."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Compiling for TPU slices (libtpu) in several test processes at once: no
# process needs libtpu's lock on the host's (absent) TPU.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# XLA:CPU compiles threefry (jax's default PRNG) slowly: initialising even the
# tiny test models takes seconds per shape. The tests never depend on the
# particular random numbers, so they use the faster-compiling 'rbg' PRNG.
os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')
