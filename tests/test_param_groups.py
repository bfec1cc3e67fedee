"""Parameter groups, frozen parameters and layer-wise learning-rate decay.

Known answers: NumPy SGD and AdamW updates written here (optax's conventions,
as in test_optim.py), the closed form of the layer scales on hand-written
path tables, parameters compared bit for bit, and optimizer-state sizes
counted from the parameter shapes.
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_refused
from helpers import randomize
from helpers import run_module
from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax import objectives
from vit_jax import optim
from vit_jax import run_checkpoints
from vit_jax import sharding
from vit_jax import train
import vit_jax.models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section(**fields):
  return config_lib.section(fields, 'optim')


def _paths(tree):
  """{'/'-joined path: leaf}, written here rather than taken from optim."""
  out = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out['/'.join(str(k.key) for k in key_path)] = leaf
  return out


def _abstract_params(model_name, image_size=16, **model):
  """Parameter shapes of a registry model (`jax.eval_shape`, no compute)."""
  module = vit_jax.models.get_model(model_name, num_classes=5, **model)
  images = jnp.zeros((1, image_size, image_size, 3))
  return jax.eval_shape(
      lambda: module.init(jax.random.key(0), images, train=False)['params']
  )


# ----------------------------------------------------------------------------
# Frozen groups: no update, no optimizer state, no backward pass.
# ----------------------------------------------------------------------------

_TINY_MODEL = {'patches': {'size': (4, 4)}, 'transformer': {'num_layers': 2}}


def _tiny_config(**fields):
  config = config_lib.get_base()
  config.model_name = 'testing'
  config.model = _TINY_MODEL
  config.image_size = 16
  config.batch = 16
  config.total_steps = 10
  config.warmup_steps = 0
  for key, value in fields.items():
    setattr(config, key, value)
  return config


def _tiny_run(config):
  """(run, objective, model, tx, mesh) of a config, as the main loop."""
  run = config_lib.parse(config)
  objective = objectives.get(run.objective)
  model = train.build_model(run.model, objective, 10)
  tx, _ = optim.make_optimizer(run.optim)
  return run, objective, model, tx, sharding.mesh_from_config(run.mesh)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'image': rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32),
      'labels': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)],
  }


# Frozen by the test's groups below: a block and the patch embedding.
_FROZEN_PREFIXES = ('Transformer/encoderblock_0/', 'embedding/')


@pytest.mark.parametrize('optimizer', ['adam', 'sgd'])
def test_a_frozen_group_is_bit_identical_and_holds_no_optimizer_state(
    optimizer,
):
  config = _tiny_config(
      optimizer=optimizer,
      ema_decay=0.9,
      accum_steps=2,
      param_groups=(
          ('^Transformer/encoderblock_0/', {'frozen': True}),
          ('^embedding/', {'frozen': True}),
      ),
  )
  run, objective, model, tx, _ = _tiny_run(config)
  # Random parameters (the head starts at zero): every leaf gets gradients.
  params = randomize(
      jax.device_get(
          objective.init(model, jax.random.key(0), _batch()['image'])
      )
  )
  # Bit for bit: -0.0 + 0.0 is +0.0 (equal as numbers, not as bits).
  params['embedding']['bias'][0] = -0.0
  state = train.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=params,
  )
  step = jax.jit(
      functools.partial(
          train.train_step,
          model=model,
          tx=tx,
          loss_fn=objective.loss_fn(model),
          accum_steps=run.loop.accum_steps,
          ema_decay=run.loop.ema_decay,
          frozen=optim.frozen_mask(run.optim),
      )
  )
  for i in range(3):
    state, metrics = step(state, _batch(i), jax.random.key(1))
    assert np.isfinite(metrics['grad_norm']) and metrics['grad_norm'] > 0
  before, after = _paths(params), _paths(jax.device_get(state.params))
  ema = _paths(jax.device_get(state.ema_params))
  frozen = [p for p in before if p.startswith(_FROZEN_PREFIXES)]
  trainable = [p for p in before if p not in frozen]
  assert len(frozen) == 18 and len(trainable) == 22  # 16 + 2, 16 + 6.
  for path in frozen:
    assert after[path].tobytes() == before[path].tobytes(), path
    assert ema[path].tobytes() == before[path].tobytes(), path
  for path in trainable:
    if not path.endswith('key/bias'):  # Softmax ignores it: gradient 0.
      assert not np.array_equal(after[path], before[path]), path
  # Adam keeps two moments, SGD one momentum, of the trainable ones only.
  moments = 2 if optimizer == 'adam' else 1
  held = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
  counters = sum(
      x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim == 0
  )
  assert held - counters == moments * sum(before[p].size for p in trainable)


def _step_flops(param_groups):
  run, objective, model, tx, _ = _tiny_run(
      _tiny_config(param_groups=param_groups)
  )
  init = train.init_fn(run, objective, model, tx)
  state = jax.eval_shape(init, jax.random.key(0))
  batch = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch()
  )
  step = jax.jit(
      lambda s, b, r: train.train_step(
          s,
          b,
          r,
          model=model,
          tx=tx,
          loss_fn=objective.loss_fn(model),
          frozen=optim.frozen_mask(run.optim),
      )
  )
  compiled = step.lower(state, batch, jax.random.key(1)).compile()
  return compiled.cost_analysis()['flops']


def test_a_linear_probe_step_skips_the_backbones_backward_pass():
  """The backward pass costs about twice the forward pass: without it a
  step of a frozen backbone costs about a third of a full step."""
  full = _step_flops(())
  probe = _step_flops(optim.PARAM_GROUP_PRESETS['linear_probe'])
  assert probe < 0.55 * full, (probe, full)


# ----------------------------------------------------------------------------
# Per-group learning rate and weight decay against NumPy.
# ----------------------------------------------------------------------------

_LR, _BASE_WD, _MOMENTUM, _B1, _B2, _EPS = 0.05, 0.1, 0.9, 0.8, 0.95, 1e-8
# (path, shape, lr multiplier, weight decay, frozen): by hand, from GROUPS.
_GROUPS = (
    ('^head/', {'lr_mult': 10.0, 'weight_decay': 0.0}),
    ('/MlpBlock_0/', {'weight_decay': 0.3}),
    ('^Transformer/encoder_norm/', {'lr_mult': 0.5}),
    ('^embedding/', {'frozen': True}),
)
_LEAVES = (
    ('head/kernel', (3, 2), 10.0, 0.0, False),
    ('head/bias', (2,), 10.0, 0.0, False),
    ('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel', (2, 3), 1, 0.3, 0),
    ('Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias', (3,), 1, 0.0, 0),
    ('Transformer/encoderblock_0/LayerNorm_0/scale', (3,), 1, 0.0, 0),
    ('Transformer/encoderblock_0/Dense_9/kernel', (3, 3), 1, _BASE_WD, 0),
    ('Transformer/encoder_norm/scale', (3,), 0.5, 0.0, False),
    ('embedding/kernel', (2, 2), 0.0, 0.0, True),
)


def _numpy_updates(optimizer, params, grads_per_step):
  """Per-leaf updates of each step, SGD (trace momentum after decoupled
  decay) or AdamW (bias-corrected, decay after the moments), scaled."""
  state = {p: [0.0, 0.0] for p in params}
  params = {p: np.array(v, np.float64) for p, v in params.items()}
  out = []
  for t, grads in enumerate(grads_per_step, start=1):
    updates = {}
    for path, _, mult, wd, frozen in _LEAVES:
      p, g = params[path], np.array(grads[path], np.float64)
      if frozen:
        updates[path] = np.zeros_like(p)
        continue
      if optimizer == 'sgd':
        v = g + wd * p + _MOMENTUM * state[path][0]
        state[path][0] = v
        u = -_LR * v
      else:
        m = _B1 * state[path][0] + (1 - _B1) * g
        v = _B2 * state[path][1] + (1 - _B2) * g * g
        state[path] = [m, v]
        m_hat, v_hat = m / (1 - _B1**t), v / (1 - _B2**t)
        u = -_LR * (m_hat / (np.sqrt(v_hat) + _EPS) + wd * p)
      updates[path] = mult * u
      params[path] = p + updates[path]
    out.append(updates)
  return out


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_per_group_lr_and_weight_decay_equal_a_numpy_update(optimizer):
  section = _section(
      optimizer=optimizer,
      base_lr=_LR,
      decay_type='constant',
      warmup_steps=0,
      weight_decay=_BASE_WD,
      momentum=_MOMENTUM,
      beta1=_B1,
      beta2=_B2,
      grad_clip_norm=0.0,
      param_groups=_GROUPS,
  )
  tx, _ = optim.make_optimizer(section)
  rng = np.random.default_rng(0)
  params = {p: rng.normal(size=s).astype(np.float32) for p, s, *_ in _LEAVES}
  grads = [
      {p: rng.normal(size=s).astype(np.float32) for p, s, *_ in _LEAVES}
      for _ in range(3)
  ]
  expected = _numpy_updates(optimizer, params, grads)
  tree = checkpoint.unflatten({p: jnp.asarray(v) for p, v in params.items()})
  state = tx.init(tree)
  for t in range(3):
    updates, state = tx.update(checkpoint.unflatten(grads[t]), state, tree)
    got = _paths(updates)
    for path in params:
      np.testing.assert_allclose(
          got[path], expected[t][path], rtol=2e-5, atol=1e-7, err_msg=path
      )
    tree = jax.tree_util.tree_map(jnp.add, tree, updates)


# ----------------------------------------------------------------------------
# Layer-wise learning-rate decay: the closed form, loop and scan layouts.
# ----------------------------------------------------------------------------

_DECAY = 0.6


def _scales(section, params):
  """The factor each leaf's update gets: SGD, no momentum, lr 1, gradient 1
  (so the update is minus the scale), through `make_optimizer`."""
  tx, _ = optim.make_optimizer(section)
  params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return {p: -np.asarray(u) for p, u in _paths(updates).items()}


def _decay_section(**fields):
  return _section(
      optimizer='sgd',
      momentum=0.0,
      base_lr=1.0,
      decay_type='constant',
      warmup_steps=0,
      grad_clip_norm=0.0,
      layer_decay=_DECAY,
      **fields,
  )


def _expected_scale(path, table):
  """The one table entry whose prefix starts `path` (each path has one)."""
  hits = [scale for prefix, scale in table if path.startswith(prefix)]
  assert len(hits) == 1, (path, hits)
  return hits[0]


# ViT with 3 blocks, registers, a MAP head, a representation layer and a
# head whose learning rate is doubled: (path prefix, scale) by hand.
_D = _DECAY
_VIT_TABLE = (
    ('cls', _D**4),  # Before the blocks: decay ** (L + 1).
    ('registers', _D**4),
    ('embedding/', _D**4),
    ('Transformer/posembed_input/', _D**4),
    ('Transformer/encoderblock_0/', _D**3),  # Block i: decay ** (L - i).
    ('Transformer/encoderblock_1/', _D**2),
    ('Transformer/encoderblock_2/', _D**1),
    ('Transformer/encoder_norm/', 1.0),  # After the blocks: 1.
    ('MAPHead_0/', 1.0),
    ('pre_logits/', 1.0),
    ('head/', 2.0),  # Its group's lr_mult.
)


@pytest.mark.parametrize('classifier', ['token', 'map'])
@pytest.mark.parametrize('scan', [False, True])
def test_layer_decay_scales_equal_the_closed_form(scan, classifier):
  params = _abstract_params(
      'testing',
      patches={'size': (4, 4)},
      transformer={'num_layers': 3},
      num_registers=2,
      representation_size=4,
      classifier=classifier,
      scan=scan,
  )
  scales = _scales(
      _decay_section(param_groups=(('^head/', {'lr_mult': 2.0}),)), params
  )
  for path, got in scales.items():
    if scan and path.startswith('Transformer/encoderblock/'):
      # One scale per block along the stacked axis: block j at decay**(3-j).
      assert got.shape[0] == 3, path
      for j in range(3):
        np.testing.assert_allclose(got[j], _D ** (3 - j), rtol=1e-6)
      continue
    np.testing.assert_allclose(
        got, _expected_scale(path, _VIT_TABLE), rtol=1e-6, err_msg=path
    )
  if scan:
    assert not any('encoderblock_' in p for p in scales)
  else:
    assert any(p.startswith('Transformer/encoderblock_2/') for p in scales)


# Today's families' norms (embed_norm, pre_norm, fc_norm) and block
# options: the embedding's norm and the pre-blocks norm come before the
# blocks, the pooled features' norm after them.
_OPTIONS_TABLE = (
    ('cls', _D**3),
    ('embedding/', _D**3),
    ('embedding_norm/', _D**3),
    ('Transformer/posembed_input/', _D**3),
    ('Transformer/pre_norm/', _D**3),
    ('Transformer/encoderblock_0/', _D**2),
    ('Transformer/encoderblock_1/', _D**1),
    ('fc_norm/', 1.0),
    ('head/', 1.0),
)


def test_layer_decay_places_the_option_norms():
  params = _abstract_params(
      'testing',
      patches={'size': (4, 4)},
      transformer={'num_layers': 2},
      embed_norm=True,
      pre_norm=True,
      class_token=True,
      classifier='gap',
      fc_norm=True,
      layer_scale=0.1,
      mlp='swiglu',
      mlp_norm=True,
      qk_norm=True,
  )
  scales = _scales(_decay_section(), params)
  assert any(p.startswith('fc_norm/') for p in scales)
  for path, got in scales.items():
    np.testing.assert_allclose(
        got, _expected_scale(path, _OPTIONS_TABLE), rtol=1e-6, err_msg=path
    )


@pytest.mark.parametrize(
    'model_name,model,table',
    [
        (
            'Mixer-B_16',
            {'patches': {'size': (4, 4)}, 'num_blocks': 2},
            (
                ('stem/', _D**3),
                ('MixerBlock_0/', _D**2),
                ('MixerBlock_1/', _D),
                ('pre_head_layer_norm/', 1.0),
                ('head/', 1.0),
            ),
        ),
        (
            'R+ViT-Ti_16',
            {
                'resnet': {'num_layers': (1,), 'width_factor': 0.5},
                'patches': {'size': (1, 1)},
                'transformer': {'num_layers': 1},
            },
            (
                ('conv_root/', _D**2),  # The ResNet stem comes first.
                ('gn_root/', _D**2),
                ('block1/', _D**2),
                ('cls', _D**2),
                ('embedding/', _D**2),
                ('Transformer/posembed_input/', _D**2),
                ('Transformer/encoderblock_0/', _D),
                ('Transformer/encoder_norm/', 1.0),
                ('head/', 1.0),
            ),
        ),
    ],
)
def test_layer_decay_of_mixer_and_hybrid_models(model_name, model, table):
  scales = _scales(_decay_section(), _abstract_params(model_name, **model))
  for path, got in scales.items():
    np.testing.assert_allclose(
        got, _expected_scale(path, table), rtol=1e-6, err_msg=path
    )


# ----------------------------------------------------------------------------
# Refusals: one line naming the field, before anything runs.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'fields,message',
    [
        (
            {'param_groups': (('^head/', {'lr': 10.0}),)},
            r"config.param_groups\[0\] \('\^head/'\): unknown option\(s\) "
            r"\['lr'\]; use lr_mult, weight_decay, frozen.",
        ),
        (
            {'param_groups': (('^head/(', {'frozen': True}),)},
            r"config.param_groups\[0\] \('\^head/\('\) is not a regular "
            'expression',
        ),
        (
            {'param_groups': (('^head/', {'lr_mult': 0.0}),)},
            r'lr_mult=0.0 must be > 0; to stop the group training set '
            r"\{'frozen': True\}",
        ),
        (
            {'param_groups': (('^head/', {'weight_decay': -1.0}),)},
            r'weight_decay=-1.0 must be >= 0',
        ),
        (
            {'param_groups': (('^head/', {'frozen': 'yes'}),)},
            r"frozen='yes' must be True or False",
        ),
        (
            {'param_groups': (('^head/', {'frozen': True, 'lr_mult': 2}),)},
            r"is frozen, so \['lr_mult'\] would do nothing",
        ),
        (
            {'param_groups': (('^head/', {}),)},
            'sets no option',
        ),
        (
            {'param_groups': ('^head/',)},
            r'each group is a \(pattern, options\) pair',
        ),
        ({'layer_decay': 0.0}, r'config.layer_decay=0.0 must be in \(0, 1\]'),
        ({'layer_decay': 1.5}, r'config.layer_decay=1.5 must be in \(0, 1\]'),
    ],
)
def test_bad_groups_are_refused_when_the_config_is_parsed(fields, message):
  with pytest.raises(ValueError, match=message) as error:
    config_lib.parse(fields)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize(
    'fields,scan,message',
    [
        (
            {
                'param_groups': (
                    ('^Transformer/encoderblock_0/', {'lr_mult': 3}),
                )
            },
            True,
            # With scan the blocks are one stacked module: named in the list.
            r"pattern '\^Transformer/encoderblock_0/' matches no parameter "
            r'of this model; its paths start with .*Transformer/encoderblock,',
        ),
        (
            {
                'param_groups': (
                    ('MlpBlock', {'lr_mult': 2.0}),
                    ('encoderblock_1/', {'frozen': True}),
                )
            },
            False,
            r"patterns 'MlpBlock' and 'encoderblock_1/' both match "
            r"'Transformer/encoderblock_1/MlpBlock_0/Dense_0/bias': make them "
            'disjoint',
        ),
        (
            {'param_groups': (('.', {'frozen': True}),)},
            False,
            'config.param_groups freezes every parameter',
        ),
    ],
)
def test_groups_that_do_not_fit_the_model_are_refused(fields, scan, message):
  section = _section(**fields)
  params = _abstract_params(
      'testing',
      patches={'size': (4, 4)},
      transformer={'num_layers': 2},
      scan=scan,
  )
  with pytest.raises(ValueError, match=message) as error:
    optim.check_param_groups(section, params)
  assert '\n' not in str(error.value)


def test_layer_decay_is_refused_for_a_model_without_blocks():
  params = {'conv_root': {'kernel': np.zeros((3, 3, 3, 4))}, 'head': {}}
  with pytest.raises(
      ValueError, match=r'config.layer_decay=0.75 needs a model with'
  ):
    optim.check_param_groups(_section(layer_decay=0.75), params)


def test_a_pattern_matching_nothing_is_refused_before_the_workdir_is_written(
    tmp_path,
):
  config = _tiny_config(
      tfds_data_dir=str(tmp_path / 'tfds'),
      param_groups=(('^heads/', {'frozen': True}),),
  )
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match=r"pattern '\^heads/' matches no"):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


# ----------------------------------------------------------------------------
# Configs: the command line and the fine-tuning presets.
# ----------------------------------------------------------------------------


def test_the_command_line_form_parses():
  argv = [
      'vit_jax.main',
      '--config=configs/finetune.py:ti16,digits',
      "--config.param_groups=(('^head/', {'lr_mult': 10.0}), "
      "('^Transformer/encoderblock_[01]/', {'frozen': True}))",
      '--config.layer_decay=0.75',
  ]
  rest, overrides = cli.split_overrides(argv, 'config')
  assert rest == argv[:2]
  config = config_lib.load_config_file(
      os.path.join(REPO, 'configs/finetune.py:ti16,digits')
  )
  config_lib.apply_overrides(config, overrides)
  section = config_lib.parse(config).optim
  assert section.param_groups == (
      ('^head/', {'lr_mult': 10.0}),
      ('^Transformer/encoderblock_[01]/', {'frozen': True}),
  )
  assert section.layer_decay == 0.75
  config_lib.apply_overrides(config, [('layer_decay', 'None')])
  assert config_lib.parse(config).optim.layer_decay is None


@pytest.mark.parametrize(
    'preset,trained',
    [
        ('linear_probe', ('head/',)),
        ('head_only', ('head/', 'pre_logits/', 'MAPHead_0/')),
    ],
)
def test_finetune_presets_train_what_they_say(preset, trained):
  config = config_lib.load_config_file(
      os.path.join(REPO, f'configs/finetune.py:ti16,digits,{preset}')
  )
  section = config_lib.parse(config).optim
  params = _abstract_params(
      'testing',
      patches={'size': (4, 4)},
      classifier='map',
      representation_size=4,
  )
  optim.check_param_groups(section, params)
  mask = _paths(optim.frozen_mask(section)(params))
  assert {p for p, frozen in mask.items() if not frozen} == {
      p for p in mask if p.startswith(trained)
  }
  assert {'head/kernel', 'pre_logits/kernel', 'MAPHead_0/probe'} <= set(mask)


def test_finetune_refuses_an_unknown_preset():
  with pytest.raises(ValueError, match=r"one of \['head_only', 'linear_pro"):
    config_lib.load_config_file(
        os.path.join(REPO, 'configs/finetune.py:ti16,digits,head_first')
    )


# ----------------------------------------------------------------------------
# End to end: a head-only fine-tune of an .npz, resumed; a CLI refusal.
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_head_only_finetune_of_an_npz_through_the_cli_resumes(tmp_path):
  model = vit_jax.models.get_model('ViT-Ti_16', num_classes=3, **_TINY_MODEL)
  images = np.zeros((1, 16, 16, 3), np.float32)
  params = randomize(
      jax.device_get(
          model.init(jax.random.key(0), images, train=False)['params']
      )
  )
  pretrained = str(tmp_path / 'pretrained.npz')
  checkpoint.save(params, pretrained)
  workdir = str(tmp_path / 'run')
  common = [
      '--config=configs/finetune.py:ti16,digits,head_only,runlocal',
      f'--workdir={workdir}',
      f'--config.tfds_data_dir={tmp_path / "tfds"}',
      f'--config.pretrained_path={pretrained}',
      '--config.model.transformer.num_layers=2',
  ]
  result = run_module('vit_jax.main', *common)
  assert result.returncode == 0, result.stderr[-4000:]
  # Parameters (one copy, no EMA) and SGD momentum of the head alone (a
  # full fine-tune holds twice the parameters).
  tuned = _paths(
      checkpoint.load(os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE))
  )
  head = tuned['head/kernel'].size + tuned['head/bias'].size
  total = sum(v.size for v in tuned.values())
  size = re.search(
      r'train state: ([\d.]+) MiB per device of ([\d.]+)', result.stderr
  )
  assert size, result.stderr[-4000:]
  assert float(size.group(2)) == pytest.approx(
      4 * (total + head) / 2**20, abs=0.051
  )
  for path, value in _paths(params).items():
    if not path.startswith('head/'):
      assert np.array_equal(tuned[path], value), path
  assert np.abs(tuned['head/kernel']).max() > 0  # The zero head trained.
  # Two more steps resume from the checkpoint (its optimizer state holds
  # the head's momentum only).
  result = run_module('vit_jax.main', *common, '--config.total_steps=6')
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'Restoring checkpoint step 4' in result.stderr, result.stderr[-4000:]
  resumed = _paths(
      checkpoint.load(os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE))
  )
  assert not np.array_equal(resumed['head/kernel'], tuned['head/kernel'])
  assert np.array_equal(
      resumed['embedding/kernel'], params['embedding']['kernel']
  )


@pytest.mark.slow
def test_a_pattern_matching_nothing_is_one_cli_line(tmp_path):
  # The digits written here first: the command's only output is the refusal.
  data = config_lib.section({'tfds_data_dir': str(tmp_path / 'tfds')}, 'data')
  input_pipeline.get_dataset_info(data, input_pipeline.get_source(data))
  result = run_module(
      'vit_jax.main',
      '--config=configs/digits.py:runlocal',
      f'--workdir={tmp_path / "run"}',
      f'--config.tfds_data_dir={tmp_path / "tfds"}',
      "--config.param_groups=(('^encoderblock_0/', {'frozen': True}),)",
  )
  assert_refused(result, "pattern '^encoderblock_0/' matches no parameter")
  assert not os.path.exists(tmp_path / 'run')
