"""The installed package contains every module of the source tree."""

import os

import setuptools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_source_folder_is_a_package_setup_py_finds():
  found = set(setuptools.find_packages(REPO, include=['vit_jax', 'vit_jax.*']))
  folders = set()
  for root, _, files in os.walk(os.path.join(REPO, 'vit_jax')):
    if any(f.endswith('.py') for f in files) and '__pycache__' not in root:
      folders.add(os.path.relpath(root, REPO).replace(os.sep, '.'))
  assert folders == found, folders ^ found
