"""Tests of the training loop's parts (`vit_jax.train`), one at a time."""

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import config_lib
from vit_jax import train


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
  return [step for step in range(1, loop.total_steps + 1)
          if getattr(train.plan_step(step, loop, fewshot_every,
                                     step in preempt_at), field)]


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
  loop = _loop(total_steps=10, log_every=100, eval_every=4,
               checkpoint_every=100)
  assert _steps_where('fewshot', loop, fewshot_every=3) == [3, 6, 9, 10]
  assert _steps_where('evaluate', loop, fewshot_every=3) == [3, 4, 6, 8, 9,
                                                             10]
  assert _steps_where('flush', loop, fewshot_every=3) == [3, 4, 6, 8, 9, 10]


def test_plan_step_a_preemption_checkpoints_and_stops_except_at_the_end():
  loop = _loop(total_steps=10, log_every=100, eval_every=100,
               checkpoint_every=100)
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
    buffer.add(step, {'loss': jnp.float32(loss),
                      'grad_norm': jnp.float32(step)})
  buffer.flush(writer, lambda count: 0.5 * count, FakeCheckpointer())
  assert writer.written == [(6, {'train/loss': 3.0, 'train/grad_norm': 5.0,
                                 # The lr of step 6's update (count 5).
                                 'train/lr': 2.5})]
  buffer.flush(writer, lambda count: 0.5 * count, FakeCheckpointer())
  assert len(writer.written) == 1  # Emptied: nothing written twice.


@pytest.mark.parametrize('latest, says', [
    (4, 'the last good checkpoint is step 4 in /run/checkpoints'),
    (None, 'no checkpoint had been saved yet')])
def test_a_non_finite_loss_names_its_step_and_the_last_checkpoint(latest,
                                                                  says):
  buffer, writer = train.TrainMetricsBuffer(), RecordingWriter()
  ckpt = FakeCheckpointer(latest)
  for step, loss in [(5, 1.0), (6, np.nan), (7, np.inf)]:
    buffer.add(step, {'loss': jnp.float32(loss)})
  with pytest.raises(train.NonFiniteLossError,
                     match=rf'\(nan\) at step 6\. Stopped; {says} '):
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
      objective, eval_fn=lambda params, dataset, sharding: params + dataset,
      dataset=0.25, batch_sharding=None, fewshot=fewshot,
      ckpt=ckpt or FakeCheckpointer(), final_params_path='/run/final.npz',
      workdir='/run')


def test_evaluations_run_the_objective_and_the_few_shot_probe_when_asked():
  with_fewshot = _evaluations(FakeObjective(), FakeFewShot())
  assert with_fewshot(0.5, 10, fewshot=False, last=False) == {
      'eval/accuracy': 0.75}
  assert with_fewshot(0.5, 10, fewshot=True, last=False) == {
      'eval/accuracy': 0.75, 'fewshot/digits_1shot': 0.5}
  without = _evaluations(FakeObjective())
  assert without(0.5, 10, fewshot=True, last=True) == {'eval/accuracy': 0.75}


@pytest.mark.parametrize('last', [False, True])
def test_a_failed_evaluation_completes_the_checkpoint_and_says_what_is_saved(
    last, caplog):
  ckpt = FakeCheckpointer()
  evaluate = _evaluations(FakeObjective(RuntimeError('evaluator broke')),
                          ckpt=ckpt)
  with caplog.at_level(logging.ERROR):
    with pytest.raises(RuntimeError, match='evaluator broke'):
      evaluate(0.5, 30, fewshot=False, last=last)
  assert ckpt.waited == 1
  said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  if last:
    assert said == [
        'The final evaluation failed; training finished and its parameters '
        'are saved in /run/final.npz (and the checkpoint of step 30). '
        'Evaluate them again with python -m vit_jax.evaluate --workdir=/run.']
  else:
    assert not said


@pytest.mark.parametrize('use_ema, expected', [(True, 'ema'),
                                               (False, 'params')])
def test_eval_params_are_the_average_when_the_run_keeps_one(use_ema,
                                                            expected):
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params='params',
                           opt_state=None, ema_params='ema')
  assert train.eval_params(state, use_ema) == expected
