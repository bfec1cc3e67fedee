"""The installed package contains every module of the source tree."""

import importlib.metadata
import os
import runpy

from packaging import requirements
from packaging import utils
import pytest
import setuptools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_source_folder_is_a_package_setup_py_finds():
  found = set(setuptools.find_packages(REPO, include=['vit_jax', 'vit_jax.*']))
  folders = set()
  for root, _, files in os.walk(os.path.join(REPO, 'vit_jax')):
    if any(f.endswith('.py') for f in files) and '__pycache__' not in root:
      folders.add(os.path.relpath(root, REPO).replace(os.sep, '.'))
  assert folders == found, folders ^ found


def _setup_kwargs(monkeypatch):
  """What setup.py passes to setuptools.setup (nothing is built)."""
  kwargs = {}
  monkeypatch.setattr(setuptools, 'setup', lambda **kw: kwargs.update(kw))
  monkeypatch.chdir(REPO)  # setup.py reads README.md.
  runpy.run_path(os.path.join(REPO, 'setup.py'))
  return kwargs


def _constraints():
  with open(os.path.join(REPO, 'constraints.txt')) as f:
    pins = [l.strip().split('==') for l in f if l.strip()[:1].isalnum()]
  return {utils.canonicalize_name(name): version for name, version in pins}


def test_the_tpu_extra_is_jax_tpu_over_the_tested_jax_range(monkeypatch):
  kwargs = _setup_kwargs(monkeypatch)
  (jax,) = [
      r
      for r in map(requirements.Requirement, kwargs['install_requires'])
      if r.name == 'jax'
  ]
  (tpu,) = map(requirements.Requirement, kwargs['extras_require']['tpu'])
  assert (tpu.name, tpu.extras, tpu.specifier) == (
      'jax',
      {'tpu'},
      jax.specifier,
  )


def test_constraints_pin_what_jaxs_tpu_extra_installs():
  # The TPU VM install (launch/tpu_setup.sh) is `-c constraints.txt`: jax's
  # tpu extra must find its libtpu (and jaxlib) pinned to versions it accepts.
  pins = _constraints()
  wanted = [
      requirements.Requirement(r)
      for r in importlib.metadata.requires('jax')
      if 'extra == "tpu"' in r
  ]
  assert {r.name for r in wanted} >= {'jaxlib', 'libtpu'}
  for requirement in wanted:
    pin = pins.get(utils.canonicalize_name(requirement.name))
    assert pin and requirement.specifier.contains(pin), (requirement, pin)


@pytest.mark.parametrize(
    'extra, names',
    [
        ('docs', {'sphinx', 'myst-parser'}),
        ('lint', {'pyink', 'ruff', 'mypy'}),
    ],
)
def test_constraints_pin_the_ci_extras_within_their_ranges(
    monkeypatch, extra, names
):
  # .ci/run builds the site from `pip install -e ".[docs]" -c constraints.txt`
  # and checks the code with the `lint` extra's tools, installed the same
  # way: each requirement pinned, the pin inside setup.py's tested range.
  pins = _constraints()
  wanted = list(
      map(
          requirements.Requirement,
          _setup_kwargs(monkeypatch)['extras_require'][extra],
      )
  )
  assert {r.name for r in wanted} >= names
  for requirement in wanted:
    pin = pins.get(utils.canonicalize_name(requirement.name))
    assert pin and requirement.specifier.contains(pin), (requirement, pin)
