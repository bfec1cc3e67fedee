"""Tests of the training loop's parts (`vit_jax.train`), one at a time."""

import dataclasses
import json
import logging
import os
import types

from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vit_jax import config_lib
from vit_jax import input_pipeline
from vit_jax import train
from vit_jax import writers


def _loop(**fields):
  loop = config_lib.parse(config_lib.get_base()).loop
  return dataclasses.replace(loop, **fields)


class FakeCheckpointer:
  directory = '/run/checkpoints'

  def __init__(self, latest=None):
    self.latest = latest
    self.waited = 0

  def wait(self):
    self.waited += 1

  def latest_step(self):
    return self.latest


class RecordingWriter:

  def __init__(self):
    self.written = []

  def write_scalars(self, step, scalars):
    self.written.append((step, scalars))


# ----------------------------------------------------------------------------
# plan_step.
# ----------------------------------------------------------------------------


def _steps_where(field, loop, fewshot_every=0, preempt_at=()):
  return [
      step
      for step in range(1, loop.total_steps + 1)
      if getattr(
          train.plan_step(step, loop, fewshot_every, step in preempt_at), field
      )
  ]


def test_plan_step_follows_the_periods_and_ends_with_everything():
  loop = _loop(total_steps=10, log_every=3, eval_every=4, checkpoint_every=5)
  assert _steps_where('last', loop) == [10]
  assert _steps_where('checkpoint', loop) == [5, 10]
  assert _steps_where('evaluate', loop) == [4, 8, 10]
  assert _steps_where('fewshot', loop) == []
  # Metrics are fetched (and the loss checked) before every checkpoint and
  # evaluation, besides every `log_every` steps.
  assert _steps_where('flush', loop) == [3, 4, 5, 6, 8, 9, 10]
  assert _steps_where('preempted', loop) == []


def test_plan_step_runs_the_few_shot_probe_with_an_evaluation():
  loop = _loop(
      total_steps=10, log_every=100, eval_every=4, checkpoint_every=100
  )
  assert _steps_where('fewshot', loop, fewshot_every=3) == [3, 6, 9, 10]
  assert _steps_where('evaluate', loop, fewshot_every=3) == [3, 4, 6, 8, 9, 10]
  assert _steps_where('flush', loop, fewshot_every=3) == [3, 4, 6, 8, 9, 10]


def test_plan_step_a_preemption_checkpoints_and_stops_except_at_the_end():
  loop = _loop(
      total_steps=10, log_every=100, eval_every=100, checkpoint_every=100
  )
  preempt_at = (3, 10)
  assert _steps_where('preempted', loop, preempt_at=preempt_at) == [3]
  assert _steps_where('checkpoint', loop, preempt_at=preempt_at) == [3, 10]
  assert _steps_where('flush', loop, preempt_at=preempt_at) == [3, 10]


# ----------------------------------------------------------------------------
# TrainMetricsBuffer.
# ----------------------------------------------------------------------------


def test_train_metrics_are_written_once_as_means_at_the_newest_step():
  buffer, writer = train.TrainMetricsBuffer(), RecordingWriter()
  for step, loss in [(4, 1.0), (5, 2.0), (6, 6.0)]:
    buffer.add(
        step, {'loss': jnp.float32(loss), 'grad_norm': jnp.float32(step)}
    )
  buffer.flush(writer, lambda count: 0.5 * count, FakeCheckpointer())
  assert writer.written == [
      (
          6,
          {
              'train/loss': 3.0,
              'train/grad_norm': 5.0,
              # The lr of step 6's update (count 5).
              'train/lr': 2.5,
          },
      )
  ]
  buffer.flush(writer, lambda count: 0.5 * count, FakeCheckpointer())
  assert len(writer.written) == 1  # Emptied: nothing written twice.


@pytest.mark.parametrize(
    'latest, says',
    [
        (4, 'the last good checkpoint is step 4 in /run/checkpoints'),
        (None, 'no checkpoint had been saved yet'),
    ],
)
def test_a_non_finite_loss_names_its_step_and_the_last_checkpoint(latest, says):
  buffer, writer = train.TrainMetricsBuffer(), RecordingWriter()
  ckpt = FakeCheckpointer(latest)
  for step, loss in [(5, 1.0), (6, np.nan), (7, np.inf)]:
    buffer.add(step, {'loss': jnp.float32(loss)})
  with pytest.raises(
      train.NonFiniteLossError, match=rf'\(nan\) at step 6\. Stopped; {says} '
  ):
    buffer.flush(writer, lambda count: 0.0, ckpt)
  assert ckpt.waited == 1  # A save in flight completes before it is named.
  assert not writer.written


# ----------------------------------------------------------------------------
# Evaluations and eval_params.
# ----------------------------------------------------------------------------


class FakeObjective:

  def __init__(self, error=None):
    self.error = error

  def evaluate(self, params, eval_fn, dataset, batch_sharding):
    if self.error:
      raise self.error
    return {'eval/accuracy': eval_fn(params, dataset, batch_sharding)}


class FakeFewShot:

  def run(self, params):
    return {'fewshot/digits_1shot': params}


def _evaluations(objective, fewshot=None, ckpt=None):
  return train.Evaluations(
      objective,
      eval_fn=lambda params, dataset, sharding: params + dataset,
      dataset=0.25,
      batch_sharding=None,
      fewshot=fewshot,
      ckpt=ckpt or FakeCheckpointer(),
      final_params_path='/run/final.npz',
      workdir='/run',
  )


def test_evaluations_run_the_objective_and_the_few_shot_probe_when_asked():
  with_fewshot = _evaluations(FakeObjective(), FakeFewShot())
  assert with_fewshot(0.5, 10, fewshot=False, last=False) == {
      'eval/accuracy': 0.75
  }
  assert with_fewshot(0.5, 10, fewshot=True, last=False) == {
      'eval/accuracy': 0.75,
      'fewshot/digits_1shot': 0.5,
  }
  without = _evaluations(FakeObjective())
  assert without(0.5, 10, fewshot=True, last=True) == {'eval/accuracy': 0.75}


@pytest.mark.parametrize('last', [False, True])
def test_a_failed_evaluation_completes_the_checkpoint_and_says_what_is_saved(
    last, caplog
):
  ckpt = FakeCheckpointer()
  evaluate = _evaluations(
      FakeObjective(RuntimeError('evaluator broke')), ckpt=ckpt
  )
  with caplog.at_level(logging.ERROR):
    with pytest.raises(RuntimeError, match='evaluator broke'):
      evaluate(0.5, 30, fewshot=False, last=last)
  assert ckpt.waited == 1
  said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  if last:
    assert said == [
        'The final evaluation failed; training finished and its parameters '
        'are saved in /run/final.npz (and the checkpoint of step 30). '
        'Evaluate them again with python -m vit_jax.evaluate --workdir=/run.'
    ]
  else:
    assert not said


@pytest.mark.parametrize(
    'use_ema, expected', [(True, 'ema'), (False, 'params')]
)
def test_eval_params_are_the_average_when_the_run_keeps_one(use_ema, expected):
  state = train.TrainState(
      step=jnp.zeros((), jnp.int32),
      params='params',
      opt_state=None,
      ema_params='ema',
  )
  assert train.eval_params(state, use_ema) == expected


# ----------------------------------------------------------------------------
# Setting up a run.
# ----------------------------------------------------------------------------


def _info(num_eval_examples=10):
  return types.SimpleNamespace(
      name='digits',
      num_classes=2,
      class_names=('zero', 'one'),
      eval_split='test',
      num_eval_examples=num_eval_examples,
  )


def test_an_empty_evaluation_split_is_refused(monkeypatch):
  info = _info(num_eval_examples=0)
  monkeypatch.setattr(
      input_pipeline, 'get_dataset_info', lambda data, source: info
  )
  with pytest.raises(
      ValueError,
      match=r"The evaluation split 'test' of "
      r"'digits' is empty \(config.eval_split\)",
  ):
    train.checked_dataset_info(None, None)
  info.num_eval_examples = 1
  assert train.checked_dataset_info(None, None) is info


def test_a_finished_run_returns_its_last_evaluation(tmp_path, caplog):
  with open(tmp_path / train.METRICS_FILE, 'w') as f:
    for record in [
        {'step': 4, 'eval/accuracy': 0.5},
        {'step': 8, 'train/loss': 1.0},
        {'step': 8, 'eval/accuracy': 0.75},
    ]:
      f.write(json.dumps(record) + '\n')
  with caplog.at_level(logging.INFO, logger='absl'):
    result = train.finished_run(str(tmp_path), 8, 6)
  assert result == {'step': 8, 'eval/accuracy': 0.75, 'finished_at_step': 8.0}
  assert [r.getMessage() for r in caplog.records] == [
      f'The run in {tmp_path} is finished (checkpoint step 8, '
      'total_steps=6): nothing to train, nothing written. Evaluate it with '
      f'python -m vit_jax.evaluate --workdir={tmp_path}, or raise '
      '--config.total_steps to train it further.'
  ]


def test_no_few_shot_evaluator_unless_the_config_asks():
  run = config_lib.parse(config_lib.get_base())
  assert run.evals.fewshot.every == 0
  assert train.make_fewshot(run, None, None, None, None) is None


def _replicated(tree):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return mesh, jax.tree_util.tree_map(lambda _: replicated, tree)


def test_the_model_and_its_memory_are_logged(caplog):
  abstract = train.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params={'w': jax.ShapeDtypeStruct((1024, 512), jnp.float32)},
      opt_state={'mu': jax.ShapeDtypeStruct((1024, 512), jnp.float32)},
  )
  mesh, shardings = _replicated(abstract)
  with caplog.at_level(logging.INFO, logger='absl'):
    train.log_model('ViT-Ti_16', mesh, abstract, shardings)
  assert [r.getMessage() for r in caplog.records] == [
      "Model ViT-Ti_16: 524,288 parameters; mesh {'data': 1}",
      'train state: 4.0 MiB per device of 4.0 MiB',
  ]


def _init(rng):
  params = {'body': jax.random.normal(rng, (3,)), 'head': jnp.full((2,), 7.0)}
  return train.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optax.adam(0.1).init(params),
      ema_params=params,
  )


def test_the_initial_state_takes_the_pretrained_parameters_but_the_head():
  rng = jax.random.key(0)
  _, shardings = _replicated(jax.eval_shape(_init, rng))
  tx = optax.adam(0.1)
  scratch = train.initial_state(_init, rng, shardings, tx, use_ema=True)
  np.testing.assert_array_equal(
      scratch.params['body'], _init(rng).params['body']
  )
  head = np.zeros((2,), np.float32)  # A placeholder: initialised instead.
  pretrained = ({'body': np.ones((3,), np.float32), 'head': head}, {id(head)})
  state = train.initial_state(
      _init, rng, shardings, tx, use_ema=True, pretrained=pretrained
  )
  assert int(state.step) == 0
  np.testing.assert_array_equal(state.params['body'], np.ones(3))
  np.testing.assert_array_equal(state.params['head'], np.full(2, 7.0))
  np.testing.assert_array_equal(state.ema_params['body'], np.ones(3))
  np.testing.assert_array_equal(state.opt_state[0].mu['body'], np.zeros(3))


def test_a_new_run_describes_itself_and_a_resumed_one_appends_changes(tmp_path):
  workdir = str(tmp_path)
  config = ml_collections.ConfigDict({'total_steps': 4})
  train.write_run_files(workdir, config, _info(), 0, {}, resumed=False)
  with open(tmp_path / config_lib.CONFIG_FILE) as f:
    assert json.load(f) == {'total_steps': 4}
  with open(tmp_path / input_pipeline.CLASS_NAMES_FILE) as f:
    assert json.load(f)['class_names'] == ['zero', 'one']
  written = sorted(os.listdir(workdir))
  config.total_steps = 8
  train.write_run_files(
      workdir, config, _info(), 4, {'total_steps': (4, 8)}, resumed=True
  )
  with open(tmp_path / config_lib.CONFIG_FILE) as f:  # Never rewritten.
    assert json.load(f) == {'total_steps': 4}
  changes = [json.loads(l) for l in open(tmp_path / 'config_changes.jsonl')]
  assert [(c['step'], c['changes']) for c in changes] == [
      (4, {'total_steps': [4, 8]})
  ]
  assert sorted(os.listdir(workdir)) == sorted(
      written + ['config_changes.jsonl']
  )


@pytest.mark.parametrize('is_writer', [True, False])
def test_only_process_0_writes_metrics_and_every_process_the_extras(
    tmp_path, is_writer
):

  class Extra(writers.ScalarWriter):
    written = []

    def write_scalars(self, step, scalars):
      self.written.append((step, dict(scalars)))

  extra = Extra()
  writer = train.make_writer(str(tmp_path), 0, [extra], is_writer)
  writer.write_scalars(3, {'train/loss': 0.5})
  writer.close()
  assert extra.written == [(3, {'train/loss': 0.5})]
  path = tmp_path / train.METRICS_FILE
  if is_writer:
    assert [json.loads(l) for l in open(path)] == [
        {'step': 3, 'train/loss': 0.5}
    ]
  else:
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('profile', [False, True])
def test_hooks_report_progress_and_profile_only_when_asked(tmp_path, profile):
  hooks = train.make_hooks(RecordingWriter(), 10, str(tmp_path), profile)
  assert [type(h) for h in hooks] == (
      [periodic_actions.ReportProgress] + [periodic_actions.Profile] * profile
  )
