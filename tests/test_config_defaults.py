"""One source of defaults, read once: `get_base()` and `config_lib.parse`.

Every field is declared once, in `get_base()`; `parse` reads a config into
typed, frozen sections whose attributes are base fields (a field a config
omits means the base's value), refuses fields the base does not declare, and
is the only reader of configs below the top of a run: no module keeps a
default of its own or receives the whole ConfigDict (the source scans).
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
from vit_jax import optim
from vit_jax import sharding
from vit_jax.evaluators import imagenet_variants
from vit_jax.objectives import mpp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The top of a run: the only modules that hold a whole config.
TOP = (
    'vit_jax/config_lib.py',
    'vit_jax/train.py',
    'vit_jax/main.py',
    'vit_jax/evaluate.py',
    'vit_jax/analysis/__main__.py',
)


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


def section_paths(cls, prefix=''):
  """{config path: dataclass field} of a section, nested sections too."""
  out = {}
  for f in dataclasses.fields(cls):
    if 'section' in f.metadata:
      out.update(section_paths(f.metadata['section'], prefix + f.name + '.'))
    else:
      out[prefix + f.name] = f
  return out


def _expected(value):
  """A base value as a section holds it: plain dicts, tuples for lists."""
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  if isinstance(value, list):
    return tuple(_expected(v) for v in value)
  if isinstance(value, tuple):
    return tuple(_expected(v) for v in value)
  return value


def test_every_section_attribute_is_a_base_field_with_its_value():
  fields = base_fields()
  assert len(fields) > 60  # The walk found the whole base config.
  run = config_lib.parse({})
  seen = set()
  for name, (cls, prefix) in config_lib._SECTIONS.items():  # pylint: disable=protected-access
    section = getattr(run, name)
    for path, f in section_paths(cls, prefix).items():
      assert path in fields, f'{cls.__name__}: {path!r} is not in get_base()'
      # The base is the one source of defaults: sections declare none.
      assert f.default is dataclasses.MISSING, path
      value = section
      for part in path[len(prefix) :].split('.'):
        value = getattr(value, part)
      if path == 'mpp':  # Typed by the objective itself.
        assert dataclasses.asdict(value) == fields[path].to_dict()
      else:
        assert value == _expected(fields[path]), path
      seen.add(path)
  # Every base field is read by some section (nested containers aside).
  containers = {'evals', 'evals.fewshot', 'naflex', 'adafactor', 'muon'} | {
      p for p in fields if p.startswith('mpp.')
  }
  containers |= {f'evals.{name}' for name in imagenet_variants.VARIANTS}
  assert set(fields) - containers == seen


def test_a_field_the_config_sets_wins_even_when_falsy():
  run = config_lib.parse(
      {
          'grad_clip_norm': 0.0,
          'evals': {'fewshot': {'every': 7}},
          'model': {'patches': {'size': [4, 4]}},
          'model_name': 'testing',
          'image_size': 8,
      }
  )
  assert run.optim.grad_clip_norm == 0.0
  assert run.evals.fewshot.every == 7
  assert run.evals.fewshot.seeds == 3  # The base's, beside the given field.
  assert run.model.model == {'patches': {'size': (4, 4)}}
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.optim.base_lr = 1.0  # pytype: disable=not-writable


@pytest.mark.parametrize(
    'fields,message',
    [
        (
            {'batchsize': 8},
            r'config.batchsize is not a config field.*'
            r"\['batch', 'batch_eval'\]",
        ),
        (
            {'evals': {'fewshot': {'shot': (1,)}}},
            r"config.evals.fewshot.shot is not a config field.*\['shots'\]",
        ),
        ({'mpp': {'rate': 0.5}}, r'config.mpp.rate is not a config field'),
    ],
)
def test_fields_the_base_does_not_declare_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    config_lib.parse(fields)
  # Free-form sections are their consumers' to check.
  config_lib.section({'pp': {'anything': 1}}, 'data')


@pytest.mark.parametrize(
    'fields,message',
    [
        ({'accum_steps': 0}, r'config.accum_steps=0 must be >= 1'),
        ({'eval_every': 0}, r'config.eval_every=0 must be positive'),
        ({'ema_decay': 1.0}, r'config.ema_decay=1.0 must be in \[0, 1\)'),
        ({'warmup_steps': 10_000}, r'config.warmup_steps=10000 must be in'),
        ({'optimizer': 'lamb'}, r"config.optimizer='lamb'; use one of"),
        ({'mu_dtype': 'int8'}, r"config.mu_dtype='int8'; use one of"),
        ({'dataset': ''}, r'config.dataset is not set'),
        ({'batch_eval': -2}, r'config.batch_eval=-2 must be positive'),
        ({'model_name': 'ViT-X_1'}, r"Unknown model 'ViT-X_1'.*ViT-B_16"),
        (
            {'evals': {'fewshot': {'shots': (1, 200)}}},
            r'pool_per_class=100 is smaller than the largest shot count 200',
        ),
        (
            {'objective': 'mpp', 'mpp': {'target': 'rgb'}},
            r"config.mpp.target='rgb'",
        ),
    ],
)
def test_each_section_checks_its_fields_when_parsed(fields, message):
  # (An unknown model is the registry's UnknownModelError, a KeyError.)
  with pytest.raises((ValueError, KeyError), match=message):
    config_lib.parse(fields)


def _sources(predicate):
  for path in sorted(
      glob.glob(os.path.join(REPO, 'vit_jax', '**', '*.py'), recursive=True)
  ):
    rel = os.path.relpath(path, REPO)
    if predicate(rel):
      yield rel, ast.parse(open(path).read())


def test_no_module_reads_config_fields_with_a_default_of_its_own():
  """`config_lib.get` is gone; nothing reads a config field with a fallback
  (`getattr(config, f, d)`, `config.get(f, d)`) except the parser itself.
  (The models read their own hyperparameter dicts, not experiment configs.)
  """
  assert not hasattr(config_lib, 'get')
  modules = list(
      _sources(
          lambda rel: rel != 'vit_jax/config_lib.py'
          and not rel.startswith('vit_jax/models/')
      )
  )
  assert len(modules) > 20
  for rel, tree in modules:
    for node in ast.walk(tree):
      if not isinstance(node, ast.Call):
        continue
      func = node.func
      target = None
      if isinstance(func, ast.Attribute) and func.attr == 'get':
        target = func.value
      elif (
          isinstance(func, ast.Name)
          and func.id == 'getattr'
          and len(node.args) == 3
      ):
        target = node.args[0]
      if isinstance(target, ast.Name) and target.id in ('config', 'cfg', 'c'):
        raise AssertionError(
            f'{rel}:{node.lineno} reads a config field with its own default'
        )


def test_no_module_below_the_top_receives_the_whole_config():
  """Only the top of a run holds a ConfigDict: nothing below imports
  ml_collections, so none of it can be handed the whole config."""
  below = list(_sources(lambda rel: rel not in TOP))
  assert len(below) > 25
  for rel, tree in below:
    for node in ast.walk(tree):
      names = (
          [a.name for a in node.names]
          if isinstance(node, (ast.Import, ast.ImportFrom))
          else []
      )
      module = getattr(node, 'module', None) or ''
      assert 'ml_collections' not in [module.split('.')[0]] + [
          n.split('.')[0] for n in names
      ], f'{rel}:{node.lineno}'


# Every field's effective default, written out by hand: what a config that
# sets nothing trains (the model's fields: ViT-Ti_16's registry config).
EXPECTED_DEFAULTS = {
    'accum_steps': 1,
    'adafactor.clipping_threshold': None,
    'adafactor.decay_rate': 0.8,
    'adafactor.min_dim_size_to_factor': 32,
    'async_checkpoints': True,
    'base_lr': 0.03,
    'batch': 512,
    'batch_eval': 512,
    'beta1': 0.9,
    'beta2': 0.999,
    'checkpoint_every': 1000,
    'compute_dtype': 'float32',
    'dataset': 'digits',
    'decay_type': 'cosine',
    'ema_decay': None,
    'eval_every': 1000,
    'eval_split': None,
    'evals.fewshot.dataset': '',
    'evals.fewshot.default_l2': 1.0,
    'evals.fewshot.every': 0,
    'evals.fewshot.l2_grid': [],
    'evals.fewshot.max_test_examples': 10000,
    'evals.fewshot.pool_per_class': 100,
    'evals.fewshot.representation': 'pre_logits',
    'evals.fewshot.seeds': 3,
    'evals.fewshot.shots': [1, 5, 10, 25],
    'evals.imagenet_a.every': 0,
    'evals.imagenet_r.every': 0,
    'evals.imagenet_real.every': 0,
    'evals.imagenet_sketch.every': 0,
    'evals.imagenet_v2.every': 0,
    'fsdp_min_size': 16384,
    'grad_clip_norm': 1.0,
    'image_folder': '',
    'image_folder_test_percent': 10,
    'image_size': 224,
    'keep_checkpoints': 3,
    'label_smoothing': 0.0,
    'log_every': 50,
    'loss': 'softmax_xent',
    'mesh': [['data', -1], ['fsdp', 1]],
    'mixup_alpha': 0.0,
    'naflex.patch_size': 0,
    'naflex.seq_lens': [],
    'model_name': 'ViT-Ti_16',
    'momentum': 0.9,
    'mpp.bits': 3,
    'mpp.corruption_rate': 0.5,
    'mpp.mask_prob': 0.8,
    'mpp.random_prob': 0.1,
    'mpp.target': '3bit',
    'mu_dtype': None,
    'muon.consistent_rms': 0.2,
    'param_groups': [],
    'layer_decay': None,
    'num_classes': None,
    'objective': 'classification',
    'optimizer': 'sgd',
    'prefetch': 2,
    'pretrained_path': '',
    'profile': False,
    'remat': False,
    'scan': False,
    'seed': 0,
    'sharding_rules': [['.*', 'auto']],
    'shuffle_buffer': 50000,
    'skip_bad_images': False,
    'tfds_data_dir': None,
    'tfds_download': False,
    'total_steps': 10000,
    'train_split': None,
    'warmup_steps': 500,
    'timm_model': '',
    'weight_decay': 0.0,
    'model.patches.size': [16, 16],
    'model.transformer.num_layers': 12,
    'model.transformer.mlp_dim': 768,
    'model.transformer.num_heads': 3,
    'model.transformer.dropout_rate': 0.0,
    'model.transformer.attention_dropout_rate': 0.0,
    'model.transformer.add_position_embedding': True,
    'model.hidden_size': 192,
    'model.resnet': None,
    'model.representation_size': None,
    'model.classifier': 'token',
    'model.head_bias_init': 0.0,
    'model.remat': False,
    'model.scan': False,
    'model.attention_impl': 'auto',
    'model.remat_policy': None,
    'model.posemb': 'learn',
    'model.stochastic_depth': 0.0,
    'model.num_registers': 0,
    'model.layer_norm_epsilon': 1e-06,
    'model.gelu_approximate': True,
    'model.dynamic_image_size': False,
    'model.posemb_resize': 'bilinear',
    'model.posemb_antialias': False,
    'model.posemb_grid_size': None,
    'model.run_patch_size': None,
    'model.flexi_patch_sizes': [],
    'model.naflex': False,
    'model.layer_scale': None,
    'model.qk_norm': False,
    'model.mlp': 'gelu',
    'model.mlp_norm': False,
    'model.norm': 'layernorm',
    'model.qkv_bias': True,
    'model.proj_bias': True,
    'model.mlp_bias': True,
    'model.rope': None,
    'model.rope_options': [],
    'model.class_token': None,
    'model.posemb_class_token': True,
    'model.pre_norm': False,
    'model.embed_norm': False,
    'model.fc_norm': False,
    'model.map_num_heads': None,
    'model.map_mlp_dim': None,
    'pp.inception_crop': True,
    'pp.crop_area_range': [0.05, 1.0],
    'pp.flip': True,
    'pp.eval_crop_fraction': 1.0,
    'pp.randaugment': [],
    'pp.mean': None,
    'pp.std': None,
}
# Set through config fields of their own (compute_dtype).
_DTYPES = ('model.dtype', 'model.param_dtype')


def test_every_effective_default_has_its_value():
  """One value per field, wherever it is declared (get_base, the mpp
  objective's dataclass, the sharding constants, the preprocessing and the
  registry for the free-form groups)."""
  fields = config_lib.run_fields(config_lib.get_base())
  assert {
      k: v for k, v in fields.items() if k not in _DTYPES
  } == EXPECTED_DEFAULTS
  assert config_lib.run_fields({}) == fields  # A config that sets nothing.


def test_get_base_documents_the_defaults_declared_elsewhere():
  """get_base()'s docstring lists the values of the fields it reads from
  other modules and of the free-form preprocessing group."""
  doc = ' '.join(config_lib.get_base.__doc__.split())
  for name in (
      'target',
      'corruption_rate',
      'mask_prob',
      'random_prob',
      'bits',
      'inception_crop',
      'crop_area_range',
      'flip',
      'eval_crop_fraction',
      'randaugment',
  ):
    group = 'mpp' if f'mpp.{name}' in EXPECTED_DEFAULTS else 'pp'
    value = EXPECTED_DEFAULTS[f'{group}.{name}']
    value = tuple(value) if isinstance(value, list) else value
    assert f'{name}={value!r}' in doc, name
  for name in ('mesh', 'sharding_rules', 'fsdp_min_size'):
    value = EXPECTED_DEFAULTS[name]
    if isinstance(value, list):
      value = tuple(tuple(v) for v in value)
    assert f'{name} {"`"}' in doc and repr(value) in doc, name
  # The constructible-on-their-own types agree with what get_base lists.
  assert mpp.MppConfig() == mpp.MppConfig(
      target='3bit', corruption_rate=0.5, mask_prob=0.8, random_prob=0.1, bits=3
  )
  assert mpp.MppConfig.from_dict({}) == mpp.MppConfig()
  assert sharding.DEFAULT_MESH == (('data', -1), ('fsdp', 1))
  assert sharding.DEFAULT_RULES == (('.*', 'auto'),)


def test_optimizer_of_a_partial_config_is_that_of_get_base():
  """Only the required fields given: SGD with momentum, warm-up 500, cosine,
  clipping at 1 -- the updates of the full base config, step by step."""
  partial = ml_collections.ConfigDict({'base_lr': 0.1, 'total_steps': 2000})
  full = config_lib.get_base()
  full.base_lr, full.total_steps = 0.1, 2000
  (tx_partial, sched_partial), (tx_full, sched_full) = (
      optim.make_optimizer(config_lib.section(partial, 'optim')),
      optim.make_optimizer(config_lib.section(full, 'optim')),
  )
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
    for a, b in zip(
        jax.tree_util.tree_leaves(updates[0]),
        jax.tree_util.tree_leaves(updates[1]),
    ):
      np.testing.assert_array_equal(a, b)
  # SGD momentum on clipped gradients (global norm 3 * sqrt(8) -> 1): at the
  # first warm-up step the rate is 0, at the second 0.1 / 500.
  tx = tx_partial
  state = tx.init(params)
  for _ in range(2):
    update, state = tx.update(grads, state, params)
  unit = 1 / np.sqrt(8)
  np.testing.assert_allclose(
      update['kernel'], -(0.1 / 500) * unit * 1.9, rtol=1e-4
  )


@pytest.mark.parametrize(
    'model,expected',
    [
        (
            {'transformer': {'dropout': 0.1}},
            r'config\.model\.transformer\.dropout is not a field of '
            r'ViT-Ti_16 .*Did '
            r'you mean config\.model\.transformer\.dropout_rate',
        ),
        ({'clasifier': 'map'}, r'Did you mean config\.model\.classifier'),
        (
            {'dtype': 'bfloat16'},
            r'config\.model\.dtype is set by ' r'config\.compute_dtype',
        ),
    ],
)
def test_model_keys_a_config_file_writes_are_checked_when_parsed(
    model, expected
):
  with pytest.raises(ValueError, match=expected):
    config_lib.section({'model': model}, 'model')


def test_command_line_overrides_reach_fields_the_config_file_never_set():
  config = config_lib.load_config_file('configs/finetune.py:b16,cifar10')
  assert 'transformer' not in config.model
  config_lib.apply_overrides(
      config,
      [
          ('model.transformer.dropout_rate', '0.1'),
          ('model.classifier', 'map'),
          ('model.remat_policy', 'dots_saveable'),
          ('ema_decay', '0.99'),
          ('evals.fewshot.shots', '(1, 5)'),
          ('pp.flip', 'false'),
      ],
  )
  run = config_lib.parse(config)
  assert run.model.model == {
      'transformer': {'dropout_rate': 0.1},
      'classifier': 'map',
      'remat_policy': 'dots_saveable',
  }
  assert run.loop.ema_decay == 0.99 and run.evals.fewshot.shots == (1, 5)
  assert run.data.pp['flip'] is False
  with pytest.raises(ValueError, match=r"config\.batch='x': expected int"):
    config_lib.apply_overrides(config, [('batch', 'x')])
