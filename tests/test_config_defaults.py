"""One source of defaults: a field a config omits means what get_base() says.

Modules read config fields through `config_lib.get`, which falls back to
`get_base()`; no module may keep a default of its own (the source scan), and
the modules whose own defaults once disagreed with `get_base()` (optimizer,
schedule, clipping, loop intervals, evaluation batch) behave with a partial
config exactly as with the full one.
"""

import ast
import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import config_lib
from vit_jax.objectives import mpp
from vit_jax import optim
from vit_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_fields(config=None, prefix=''):
  """{dotted path: value} of every field of get_base(), nested ones too."""
  config = config_lib.get_base() if config is None else config
  out = {}
  for name in config.keys():
    value = config[name]
    out[prefix + name] = value
    if isinstance(value, ml_collections.ConfigDict):
      out.update(base_fields(value, prefix + name + '.'))
  return out


def test_every_field_a_config_omits_reads_as_get_base_declares():
  fields = base_fields()
  assert len(fields) > 60  # The walk found the whole base config.
  for path, value in fields.items():
    for empty in (ml_collections.ConfigDict(), {}):
      got = config_lib.get(empty, path)
      if isinstance(value, ml_collections.ConfigDict):
        assert got.to_dict() == value.to_dict(), path
      else:
        assert got == value, path
  # A field present in the config wins, even when falsy.
  assert config_lib.get({'grad_clip_norm': 0.0}, 'grad_clip_norm') == 0.0
  assert config_lib.get({'evals': {'fewshot': {'every': 7}}},
                        'evals.fewshot.every') == 7
  with pytest.raises(KeyError, match="'no_such_field' is not a config field"):
    config_lib.get({}, 'no_such_field')


def _config_lib_get_calls():
  """(file, line, field, has own default) of each config_lib.get call."""
  calls = []
  for path in sorted(glob.glob(os.path.join(REPO, 'vit_jax', '**', '*.py'),
                               recursive=True)):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call)
          and isinstance(node.func, ast.Attribute)
          and node.func.attr == 'get'
          and isinstance(node.func.value, ast.Name)
          and node.func.value.id == 'config_lib'):
        field = node.args[1]
        calls.append((os.path.relpath(path, REPO), node.lineno,
                      field.value if isinstance(field, ast.Constant) else None,
                      len(node.args) > 2 or bool(node.keywords)))
  return calls


def test_no_module_keeps_a_default_of_its_own():
  fields = base_fields()
  calls = _config_lib_get_calls()
  assert len(calls) > 40  # The scan sees the modules' reads.
  for path, line, field, own_default in calls:
    where = f'{path}:{line}'
    if field is None:
      continue  # A field name computed in a loop over literal names.
    assert field in fields, f'{where}: {field!r} is not in get_base()'
    if own_default:
      # Only fields get_base() leaves unset (None: derived, e.g. from a
      # dataset preset) may say how they are derived.
      assert fields[field] is None, (
          f'{where}: config_lib.get(..., {field!r}, <default>) keeps its own '
          f'default; get_base() declares {fields[field]!r}.')


def test_typed_sections_default_to_get_base():
  """MppConfig's dataclass defaults are get_base().mpp's values."""
  base = config_lib.get_base().mpp.to_dict()
  defaults = {f.name: f.default for f in dataclasses.fields(mpp.MppConfig)}
  assert base == {name: defaults[name] for name in base}
  assert mpp.MppConfig.from_config({}) == mpp.MppConfig(**base)


def test_sharding_constants_are_get_base_values():
  base = config_lib.get_base()
  assert tuple(map(tuple, base.mesh)) == sharding.DEFAULT_MESH
  assert tuple(map(tuple, base.sharding_rules)) == sharding.DEFAULT_RULES
  assert base.fsdp_min_size == sharding.DEFAULT_FSDP_MIN_SIZE


def test_optimizer_of_a_partial_config_is_that_of_get_base():
  """Only the required fields given: SGD with momentum, warm-up 500, cosine,
  clipping at 1 -- the updates of the full base config, step by step."""
  partial = ml_collections.ConfigDict({'base_lr': 0.1, 'total_steps': 2000})
  full = config_lib.get_base()
  full.base_lr, full.total_steps = 0.1, 2000
  (tx_partial, sched_partial), (tx_full, sched_full) = (
      optim.make_optimizer(partial), optim.make_optimizer(full))
  for step in (0, 250, 500, 1200, 1999):
    assert float(sched_partial(step)) == float(sched_full(step)), step
  # The base's warm-up (500 steps) and cosine decay, not the old 0 / linear.
  np.testing.assert_allclose(float(sched_partial(250)), 0.05, rtol=1e-6)
  params = {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))}
  grads = {'kernel': jnp.full((3, 2), 3.0), 'bias': jnp.full((2,), 3.0)}
  states = [tx.init(params) for tx in (tx_partial, tx_full)]
  for _ in range(3):
    updates = []
    for i, tx in enumerate((tx_partial, tx_full)):
      u, states[i] = tx.update(grads, states[i], params)
      updates.append(u)
    for a, b in zip(jax.tree_util.tree_leaves(updates[0]),
                    jax.tree_util.tree_leaves(updates[1])):
      np.testing.assert_array_equal(a, b)
  # SGD momentum on clipped gradients (global norm 3 * sqrt(8) -> 1): at the
  # first warm-up step the rate is 0, at the second 0.1 / 500.
  tx = tx_partial
  state = tx.init(params)
  for _ in range(2):
    update, state = tx.update(grads, state, params)
  unit = 1 / np.sqrt(8)
  np.testing.assert_allclose(update['kernel'], -(0.1 / 500) * unit * 1.9,
                             rtol=1e-4)
