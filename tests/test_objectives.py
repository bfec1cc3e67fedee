"""Objectives as a family: one interface, picked once by name, and neither
the training loop nor the classifier knows any of them by name."""

import inspect
import os
import re

import pytest

from vit_jax import config_lib
from vit_jax import objectives
from vit_jax.objectives import protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERFACE = tuple(
    name
    for name, _ in inspect.getmembers(protocol.Objective, inspect.isfunction)
    if not name.startswith('_')
)


def _source(path):
  with open(os.path.join(REPO, path)) as f:
    return f.read()


@pytest.mark.parametrize('name', objectives.NAMES)
def test_every_objective_offers_what_the_loop_needs(name):
  config = config_lib.get_base()
  config.objective = name
  objective = objectives.get(config_lib.parse(config).objective)
  assert objective.name == name
  assert isinstance(objective, protocol.Objective)
  for method in INTERFACE:
    assert callable(getattr(objective, method)), (name, method)


def test_the_protocol_names_exactly_what_the_loop_uses():
  used = set(re.findall(r'\bobjective\.(\w+)', _source('vit_jax/train.py')))
  assert used == set(INTERFACE)


def test_unknown_objective_and_its_fields_are_refused():
  config = config_lib.get_base()
  config.objective = 'contrastive'
  with pytest.raises(
      ValueError,
      match=r"config.objective='contrastive'; "
      r"use one of \('classification', 'mpp'\)",
  ):
    config_lib.parse(config)
  config.objective = 'classification'
  config.loss = 'hinge'
  with pytest.raises(ValueError, match=r"config.loss='hinge'"):
    config_lib.parse(config)


def test_the_loop_and_the_classifier_name_no_objective():
  names = '|'.join(objectives.NAMES[1:])
  assert not re.search(rf"['\"]({names})['\"]", _source('vit_jax/train.py'))
  assert 'mpp' not in _source('vit_jax/models/vit.py').lower()
