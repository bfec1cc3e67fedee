"""Training and evaluation: the sharded train step and the main loop.

`train_and_evaluate(config, workdir)` is the main job; `vit_jax.main` is only
a command-line shell around it. The same code runs on one CPU, a TPU VM and a
pod: parameters are initialised straight into their shardings, batches are
global `jax.Array`s, and the step is one `jax.jit` with explicit in/out
shardings and a donated state.
"""

from collections.abc import Callable, Collection, Mapping, Sequence
import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, NamedTuple

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf

from vit_jax import attention_choice
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import fileio
from vit_jax import input_pipeline
from vit_jax import loading
from vit_jax import objectives
from vit_jax import optim
from vit_jax import run_checkpoints
from vit_jax import runtime
from vit_jax import sharding
from vit_jax import workdir as workdir_lib
from vit_jax import writers as writers_lib
from vit_jax.evaluators import fewshot as fewshot_lib
from vit_jax.evaluators import imagenet_variants
import vit_jax.models
from vit_jax.objectives import protocol

METRICS_FILE = workdir_lib.METRICS_FILE


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class TrainState(flax.struct.PyTreeNode):
  """Everything a training step reads and writes.

  Attributes:
    step: Number of updates applied.
    params: Model parameters.
    opt_state: Optimizer state.
    ema_params: Polyak (exponential moving) average of the parameters, or
      None when `config.ema_decay` is unset.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


def build_model(
    model: config_lib.ModelSection,
    objective: protocol.Objective,
    num_classes: int,
) -> flax.linen.Module:
  """The module a run trains: its objective around the model.

  The backbone is `vit_jax.models.get_model(**model.model_args())` with the
  head the objective asks for (none for masked patch prediction); the
  objective wraps it (`vit_jax.objectives`).

  Args:
    model: The run's model section (`config_lib.parse(config).model`).
    objective: The run's objective (`objectives.get(run.objective)`).
    num_classes: Classes of the dataset.

  Returns:
    A flax module.
  """
  backbone = vit_jax.models.get_model(
      num_classes=objective.num_classes(num_classes), **model.model_args()
  )
  return objective.wrap(backbone)


def accumulate_gradients(
    grad_fn: Callable[..., tuple[tuple[jax.Array, Any], Any]],
    params: Any,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    accum_steps: int,
    micro_batch_sharding: Any = None,
) -> tuple[tuple[jax.Array, Any], Any]:
  """`grad_fn` on a batch as the mean over `accum_steps` micro-batches.

  The micro-batches run one after the other in a `lax.scan`, so the
  activations of only one are alive at a time: the result equals one call on
  the whole batch (for a loss that is a mean over examples) with a fraction
  of the activation memory. Micro-batch k takes every `accum_steps`-th
  example starting at k, so each one is spread over all devices, and its
  random key is `fold_in(rng, k)`, never a function of the sharding.

  Args:
    grad_fn: `(params, batch, rng) -> ((loss, {name: scalar}), grads)`, e.g.
      `jax.value_and_grad(loss_fn, has_aux=True)`.
    params: Parameters, passed to every call.
    batch: Arrays with a leading batch axis divisible by `accum_steps`.
    rng: Key of the whole batch (used as it is when `accum_steps` is 1).
    accum_steps: Micro-batches.
    micro_batch_sharding: Sharding of the stacked micro-batches
      `[accum_steps, B / accum_steps, ...]` (None outside a mesh).

  Returns:
    `((loss, extra metrics), grads)`, each the mean over the micro-batches.
  """
  if accum_steps == 1:
    return grad_fn(params, batch, rng)

  def split(x):
    x = x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1)
    if micro_batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, micro_batch_sharding)
    return x

  micro = jax.tree_util.tree_map(split, dict(batch))

  def body(carry, inputs):
    k, micro_batch = inputs
    (value, extra), grads = grad_fn(
        params, micro_batch, jax.random.fold_in(rng, k)
    )
    return jax.tree_util.tree_map(jnp.add, carry, (value, extra, grads)), None

  (_, extra_shapes), _ = jax.eval_shape(
      grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro), rng
  )
  zeros = jax.tree_util.tree_map(
      lambda x: jnp.zeros(x.shape, x.dtype),
      (jax.ShapeDtypeStruct((), jnp.float32), extra_shapes, params),
  )
  (loss_value, extra, grads), _ = jax.lax.scan(
      body, zeros, (jnp.arange(accum_steps), micro)
  )
  loss_value, extra, grads = jax.tree_util.tree_map(
      lambda g: g / accum_steps, (loss_value, extra, grads)
  )
  return (loss_value, extra), grads


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    loss: str = 'softmax_xent',
    label_smoothing: float = 0.0,
    accum_steps: int = 1,
    ema_decay: float | None = None,
    micro_batch_sharding: Any = None,
    loss_fn: Callable[..., Any] | None = None,
    frozen: Callable[[Any], Any] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on a global batch; pure.

  With `accum_steps` > 1 the gradient is the mean over micro-batches
  (`accumulate_gradients`), which equals one update on the whole batch with
  a fraction of the activation memory. Dropout keys derive from (rng, step,
  micro-batch), never from the sharding.

  Frozen parameters are constants of the loss: no gradient is computed for
  them (a linear probe does not run the backbone's backward pass), they and
  their Polyak average are carried over unchanged, and `grad_norm` is that
  of the trainable ones.

  Args:
    state: Current state.
    batch: {'image': [B, H, W, 3], 'labels': [B, K]}.
    rng: Run key; folded with the step number.
    model: The flax module.
    tx: The optimizer.
    loss: 'softmax_xent' or 'sigmoid_xent' (without `loss_fn`).
    label_smoothing: Label-smoothing factor (without `loss_fn`).
    accum_steps: Micro-batches per update.
    ema_decay: Polyak averaging decay in [0, 1) (0: the average is the
      current parameters), or None for no average.
    micro_batch_sharding: Sharding of the stacked micro-batches
      [accum, B / accum, ...] (None outside a mesh).
    loss_fn: `(params, batch, rng) -> (loss, {name: scalar})`, an
      objective's `loss_fn(model)` (`vit_jax.objectives`); by default the
      classification loss of `loss` and `label_smoothing`.
    frozen: `params -> {leaf: frozen?}` (`optim.frozen_mask`), or None when
      every parameter trains.

  Returns:
    (new state, {'loss', 'grad_norm', the objective's extra metrics})
    replicated scalars.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  if loss_fn is None:
    loss_fn = objectives.classification.loss_fn(
        model, loss=loss, label_smoothing=label_smoothing
    )
  # Python bools, fixed when traced; all False without frozen groups.
  mask = (
      jax.tree_util.tree_map(lambda _: False, state.params)
      if frozen is None
      else frozen(state.params)
  )

  def select(frozen_values, trainable_values):
    return jax.tree_util.tree_map(
        lambda f, a, b: a if f else b, mask, frozen_values, trainable_values
    )

  # Differentiated with respect to the trainable leaves only (None where
  # frozen): the frozen ones enter the loss as constants.
  trainable = jax.tree_util.tree_map(
      lambda f, p: None if f else p, mask, state.params
  )
  grad_fn = jax.value_and_grad(
      lambda t, b, r: loss_fn(select(state.params, t), b, r), has_aux=True
  )
  (loss_value, extra), grads = accumulate_gradients(
      grad_fn, trainable, batch, step_rng, accum_steps, micro_batch_sharding
  )
  grad_norm = optax.tree.norm(grads)
  grads = select(jax.tree_util.tree_map(jnp.zeros_like, state.params), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = select(state.params, optax.apply_updates(state.params, updates))
  ema_params = state.ema_params
  if ema_decay is not None:  # 0.0 is a decay too: EMA = current parameters.
    ema_params = select(
        ema_params,
        optax.incremental_update(params, ema_params, step_size=1.0 - ema_decay),
    )
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      ema_params=ema_params,
  )
  return new_state, {'loss': loss_value, 'grad_norm': grad_norm, **extra}


# ----------------------------------------------------------------------------
# Setting up a run.
# ----------------------------------------------------------------------------


def check_batches(run: config_lib.Run, mesh: jax.sharding.Mesh) -> None:
  """Checks the batch sizes and accumulation against the mesh.

  The one check of the config that needs the devices (the rest ran in
  `config_lib.parse`); called before anything is written, so a bad config
  leaves an existing workdir untouched.

  Raises:
    ValueError: naming the field and the fix.
  """
  accum = run.loop.accum_steps
  batch = run.data.batch
  # The batch is split over the data-like axes only (a model axis holds
  # copies); on data/fsdp meshes that is every device.
  devices = sharding.batch_shards(mesh)
  if batch % accum:
    fits = [
        a
        for a in range(1, batch + 1)
        if batch % a == 0 and (batch // a) % devices == 0
    ]
    raise ValueError(
        f'config.accum_steps={accum} does not divide config.batch={batch}; '
        f'with {devices} devices use one of {fits[:8]}.'
    )
  if (batch // accum) % devices:
    multiple = devices * accum
    cpu_hint = ''
    if mesh.devices.flat[0].platform == 'cpu':
      cpu_hint = (
          ' (On CPU, python -m vit_jax.main splits the host into one '
          f'device per core; {runtime.CPU_DEVICES_VARIABLE}=1 runs on '
          'one.)'
      )
    raise ValueError(
        f'config.batch={batch} is not divisible by devices x accum_steps = '
        f'{devices} x {accum}: each micro-batch of {batch // accum} must '
        f'split evenly over the {devices} devices. Use a multiple of '
        f'{multiple} (e.g. config.batch='
        f'{max(1, round(batch / multiple)) * multiple}).{cpu_hint}'
    )
  sharding.check_batch_size(run.data.batch_eval, mesh, what='config.batch_eval')


def init_fn(
    run: config_lib.Run,
    objective: protocol.Objective,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    *,
    naflex_seq_len: int = 1,
) -> Callable[[jax.Array], TrainState]:
  """`init(rng) -> TrainState` of a run (step 0, fresh optimizer state).

  Under `jax.eval_shape` it gives the state's shapes without computing it
  (`vit_jax.aot` compiles steps from them).

  Args:
    run: The parsed config (model, image size, EMA).
    objective: The run's objective (initialises the parameters).
    model: `build_model`'s module.
    tx: The optimizer.
    naflex_seq_len: Tokens per example initialising a NaFlex model
      (`ModelSection.init_inputs`).

  Returns:
    `init(rng) -> TrainState`.
  """
  use_ema = run.loop.use_ema

  def init(rng):
    inputs = run.model.init_inputs(
        run.data.image_size, naflex_seq_len=naflex_seq_len
    )
    params = objective.init(model, rng, inputs)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=params if use_ema else None,
    )

  return init


def create_train_state(
    run: config_lib.Run,
    objective: protocol.Objective,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
) -> tuple[TrainState, Any, Any]:
  """Initialises the state directly into its shardings.

  `jax.eval_shape` gives the shapes, the sharding rules give a sharding per
  leaf, and `jax.jit(init, out_shardings=...)` materialises every shard on
  its device: no full copy of the parameters ever exists on one device.

  Args:
    run: The parsed config (image size, EMA, sharding rules).
    objective: The run's objective (initialises the parameters).
    model: `build_model`'s module.
    tx: The optimizer.
    mesh: Device mesh.
    rng: Initialisation key.

  Returns:
    (state, its shardings, its abstract shapes).
  """
  init = init_fn(run, objective, model, tx)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.shardings_from_config(abstract, mesh, run.mesh)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings, abstract


def state_size_mib(abstract: Any, shardings: Any) -> tuple[float, float]:
  """(MiB on each device, MiB in all) of a train state under its shardings.

  Parameters, optimizer state and EMA together: what the memory of a mesh
  has to hold before any activation. Leaves split evenly (NamedSharding), so
  every device holds the same bytes.

  Args:
    abstract: The state's shapes (`jax.eval_shape`) or arrays.
    shardings: A sharding per leaf (same tree structure).

  Returns:
    (per-device MiB, total MiB).
  """
  per_device = total = 0
  for x, s in zip(
      jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)
  ):
    itemsize = jnp.dtype(x.dtype).itemsize
    total += int(np.prod(x.shape)) * itemsize
    per_device += int(np.prod(s.shard_shape(x.shape))) * itemsize
  return per_device / 2**20, total / 2**20


def state_from_params(
    params: Any, tx: optax.GradientTransformation, shardings: Any, use_ema: bool
) -> TrainState:
  """A fresh state (step 0, new optimizer state) around given parameters."""
  params = sharding.put_global(params, shardings.params)

  def make(params):
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=params if use_ema else None,
    )

  return jax.jit(make, out_shardings=shardings)(params)


def make_train_step(
    loop: config_lib.LoopSection,
    objective: protocol.Objective,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
    *,
    frozen: Callable[[Any], Any] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, Any]]]:
  """`train_step` jitted once with explicit shardings and a donated state.

  Args:
    loop: The run's loop section (accumulation, EMA).
    objective: The run's objective (its loss).
    model: `build_model`'s module.
    tx: The optimizer.
    mesh: Device mesh.
    state_shardings: Shardings of the train state.
    frozen: The frozen parameters (`optim.frozen_mask(run.optim)`), or None.

  Returns:
    `step(state, batch, rng) -> (state, metrics)`.
  """
  batch_sharding = sharding.batch_sharding(mesh)
  accum = loop.accum_steps
  micro = sharding.micro_batch_sharding(mesh)
  step = functools.partial(
      train_step,
      model=model,
      tx=tx,
      loss_fn=objective.loss_fn(model),
      accum_steps=accum,
      ema_decay=loop.ema_decay,
      micro_batch_sharding=micro if accum > 1 else None,
      frozen=frozen,
  )
  replicated = sharding.replicated(mesh)
  # On the mesh: the model's activation constraints (block boundaries)
  # resolve, and the TPU kernels run per shard.
  return jax.jit(
      sharding.on_mesh(step, mesh),
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
  )


def flexi_patch_size(seed: int, step: int, sizes: Sequence[int]) -> int:
  """The patch size FlexiViT training step `step` cuts its images into.

  Uniform over `sizes` (FlexiViT's recipe), drawn from a generator seeded
  by (seed, step) alone, so a resumed run draws the sizes it would have
  drawn without the interruption.

  Args:
    seed: The run's seed (`config.seed`).
    step: The step (1-based).
    sizes: `config.model.flexi_patch_sizes`.

  Returns:
    One of `sizes`.
  """
  draw = int(np.random.default_rng((seed, step)).integers(len(sizes)))
  return int(sizes[draw])


class FlexiTrainSteps:
  """A FlexiViT run's train steps: one jitted step per patch size.

  Calling it with a step number gives that step's function (`flexi_patch_size`
  draws the size); each size's step is built, and compiled, the first time
  it is drawn, with the model cut at that size (`run_patch_size`).
  """

  def __init__(
      self,
      sizes: Sequence[int],
      seed: int,
      make_step: Callable[[flax.linen.Module], Callable[..., Any]],
      model: flax.linen.Module,
  ):
    """Prepares the steps.

    Args:
      sizes: The patch sizes to draw from.
      seed: The run's seed.
      make_step: `model -> jitted step` (`make_train_step` with the rest of
        its arguments bound).
      model: The run's model (a `VisionTransformer`).
    """
    self._sizes = tuple(sizes)
    self._seed = seed
    self._make_step = make_step
    self._model = model
    self._steps: dict[int, Callable[..., Any]] = {}

  def __call__(self, step: int) -> Callable[..., Any]:
    """The train step function of step `step`."""
    size = flexi_patch_size(self._seed, step, self._sizes)
    if size not in self._steps:
      logging.info(
          'FlexiViT: step %d is the first at patch size %d (compiling).',
          step,
          size,
      )
      self._steps[size] = self._make_step(
          self._model.clone(run_patch_size=(size, size))
      )
    return self._steps[size]


def check_jax_flags() -> None:
  """Refuses global JAX settings under which runs are not reproducible.

  The library sets no global flags itself (the program does: `vit_jax.main`).
  `jax_threefry_partitionable` (the default since jax 0.5) makes random bits
  independent of how arrays are sharded, so dropout and the run's numbers are
  the same on 1 or 256 devices and after a resume on another mesh.

  Raises:
    RuntimeError: naming the flag, when it has been turned off.
  """
  if not jax.config.values['jax_threefry_partitionable']:
    raise RuntimeError(
        'jax_threefry_partitionable is off (JAX_THREEFRY_PARTITIONABLE=0 or '
        "jax.config.update('jax_threefry_partitionable', False)): random "
        'numbers would depend on the sharding, so runs on different meshes '
        'would differ. Turn it back on (its default since jax 0.5).'
    )


def _check_writable(workdir: str) -> None:
  probe = os.path.join(workdir, f'.write_test.{os.getpid()}')
  try:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(probe, 'w') as f:
      f.write('ok')
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    reason = getattr(e, 'strerror', None) or getattr(e, 'message', str(e))
    raise PermissionError(
        f'Cannot write to --workdir={workdir} ({reason}). Choose a '
        'directory you can write to, or fix its permissions.'
    ) from e


def _pretrained_file(path: str) -> str:
  """The .npz a `pretrained_path` names; a finished run's directory names
  its `final_params.npz`."""
  if not tf.io.gfile.isdir(path):
    return path
  final = os.path.join(path, run_checkpoints.FINAL_PARAMS_FILE)
  if tf.io.gfile.exists(final):
    logging.info(
        'config.pretrained_path=%s is a training run: fine-tuning ' 'its %s.',
        path,
        run_checkpoints.FINAL_PARAMS_FILE,
    )
    return final
  raise FileNotFoundError(
      f'config.pretrained_path={path} is a directory without '
      f'{run_checkpoints.FINAL_PARAMS_FILE}: give an .npz file, or a finished '
      'training run (python -m vit_jax.convert --input=<run> '
      '--output=<file>.npz exports an unfinished one).'
  )


def load_pretrained_checked(
    run: config_lib.Run, model: flax.linen.Module, abstract_params: Any
) -> tuple[Any, set[int]]:
  """Reads and checks `config.pretrained_path` before any state exists.

  The file is read and matched against the model's parameter shapes
  (`checkpoint.load_pretrained`) with zero-cost placeholders instead of
  initialised parameters, so a missing, corrupt or mismatched checkpoint is
  refused before the (possibly minutes-long) initialisation.

  Args:
    run: The parsed config.
    model: The module being trained.
    abstract_params: The parameters' shapes (`jax.eval_shape`).

  Returns:
    (parameters as host arrays, ids of the leaves that are placeholders
    for freshly initialised values: the head), for `_with_fresh_leaves`.
  """
  placeholders = jax.tree_util.tree_map(
      lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract_params
  )
  fresh = {id(x) for x in jax.tree_util.tree_leaves(placeholders)}
  path = _pretrained_file(run.model.pretrained_path)
  restored = None
  if run.model.timm_model and path.endswith('.safetensors'):
    logging.info('Fine-tuning from %s (timm %s)', path, run.model.timm_model)
    restored = loading.load_model(path, timm_model=run.model.timm_model).params
  else:
    logging.info('Fine-tuning from %s', path)
  params = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=placeholders,
      model_config=model,
      patch_shape=getattr(model, 'total_stride', None),
      restored=restored,
  )
  return params, fresh


def _with_fresh_leaves(loaded: Any, fresh: set[int], initialised: Any) -> Any:
  """`loaded` with its placeholder leaves taken from `initialised`."""
  initialised = checkpoint.flatten(flax.core.unfreeze(initialised))
  return checkpoint.unflatten(
      {
          k: initialised[k] if id(v) in fresh else v
          for k, v in checkpoint.flatten(loaded).items()
      }
  )


def checked_dataset_info(
    data: config_lib.DataSection, source: Any
) -> input_pipeline.DatasetInfo:
  """The dataset's description, refusing an empty evaluation split.

  Args:
    data: The run's data section.
    source: Its source (`input_pipeline.get_source`).

  Returns:
    `input_pipeline.get_dataset_info`'s description.

  Raises:
    ValueError: the evaluation split has no examples (naming the fields).
  """
  info = input_pipeline.get_dataset_info(data, source)
  if not info.num_eval_examples:
    raise ValueError(
        f'The evaluation split {info.eval_split!r} of {info.name!r} is empty '
        '(config.eval_split): choose a split with examples, or give an image '
        'folder more images per class (config.image_folder_test_percent).'
    )
  return info


def finished_run(workdir: str, step: int, total_steps: int) -> dict[str, float]:
  """Says that the run in `workdir` is finished; what it returns then.

  Args:
    workdir: The run directory.
    step: Its latest checkpoint's step.
    total_steps: The config's `total_steps`.

  Returns:
    The last evaluation in `metrics.jsonl` plus `finished_at_step`.
  """
  logging.info(
      'The run in %s is finished (checkpoint step %d, total_steps=%d): '
      'nothing to train, nothing written. Evaluate it with python -m '
      'vit_jax.evaluate --workdir=%s, or raise --config.total_steps to '
      'train it further.',
      workdir,
      step,
      total_steps,
      workdir,
  )
  return {
      **workdir_lib.last_evaluation(workdir),
      'finished_at_step': float(step),
  }


def make_fewshot(
    run: config_lib.Run,
    objective: protocol.Objective,
    model: flax.linen.Module,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
) -> fewshot_lib.FewShotEvaluator | None:
  """The run's few-shot evaluator, or None (`config.evals.fewshot.every`).

  The linear probe reads the backbone's features (pre-logits); building it
  checks that the dataset has enough images per class.
  """
  if run.evals.fewshot.every <= 0:
    return None
  return fewshot_lib.FewShotEvaluator(
      run.evals.fewshot,
      run.data,
      objective.backbone(model),
      mesh,
      param_shardings,
  )


def make_variant_evaluators(
    run: config_lib.Run,
    objective: protocol.Objective,
    num_classes: int,
    model: flax.linen.Module,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
) -> dict[str, imagenet_variants.VariantEvaluator]:
  """The run's ImageNet-variant evaluators (`config.evals.<name>.every`).

  Building them checks that the head is ImageNet's (1000 classes) and that
  their datasets are prepared.
  """
  return imagenet_variants.make_evaluators(
      run.evals.variants,
      run.data,
      model,
      mesh,
      param_shardings,
      head_classes=objective.num_classes(num_classes),
  )


def log_model(
    model_name: str, mesh: jax.sharding.Mesh, abstract: Any, shardings: Any
) -> None:
  """Logs the model's parameter count, the mesh and the state's memory.

  Args:
    model_name: The model's name (`config.model_name`).
    mesh: Device mesh.
    abstract: The train state's shapes.
    shardings: Its shardings.
  """
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))
  logging.info(
      'Model %s: %s parameters; mesh %s',
      model_name,
      f'{num_params:,}',
      dict(mesh.shape),
  )
  # One line to grep on any mesh (parameters + optimizer state + EMA).
  logging.info(
      'train state: %.1f MiB per device of %.1f MiB',
      *state_size_mib(abstract, shardings),
  )


def initial_state(
    init: Callable[[jax.Array], TrainState],
    rng: jax.Array,
    shardings: Any,
    tx: optax.GradientTransformation,
    use_ema: bool,
    pretrained: tuple[Any, set[int]] | None = None,
) -> TrainState:
  """The state at step 0, initialised straight into its shardings.

  Args:
    init: `init_fn`'s function.
    rng: Initialisation key.
    shardings: The state's shardings.
    tx: The optimizer.
    use_ema: Whether the state keeps a Polyak average.
    pretrained: `load_pretrained_checked`'s parameters, whose placeholder
      leaves (the head) take the initialised values; None to train from
      scratch.

  Returns:
    The state.
  """
  state = jax.jit(init, out_shardings=shardings)(rng)
  if pretrained is None:
    return state
  params = _with_fresh_leaves(*pretrained, state.params)
  return state_from_params(params, tx, shardings, use_ema)


def write_run_files(
    workdir: str,
    config: ml_collections.ConfigDict,
    info: input_pipeline.DatasetInfo,
    start: int,
    changes: Mapping[str, tuple[Any, Any]],
    resumed: bool,
) -> None:
  """Writes what describes the run (process 0 calls it).

  A new run writes `class_names.json` and `config.json`; a resumed run
  keeps them as they are and appends the fields it changes to
  `config_changes.jsonl`.

  Args:
    workdir: The run directory.
    config: The run's config.
    info: The dataset's description (class names).
    start: The step the run starts from.
    changes: The allowed changes of a resumed run
      (`workdir.decide(...).changes`).
    resumed: Whether the run resumes from a checkpoint.
  """
  if resumed:
    workdir_lib.record_changes(workdir, start, changes)
    return
  input_pipeline.write_class_names(workdir, info)
  fileio.write_text_atomic(
      os.path.join(workdir, config_lib.CONFIG_FILE),
      config.to_json_best_effort(indent=1),
  )


def make_writer(
    workdir: str,
    start: int,
    extra_writers: Sequence[metric_writers.MetricWriter],
    is_writer: bool,
) -> metric_writers.MetricWriter:
  """Where the run's scalars go.

  Process 0 writes TensorBoard summaries and `metrics.jsonl` (continued
  from `start`); the others only log. Every process also writes to
  `extra_writers`.
  """
  all_writers = [
      metric_writers.create_default_writer(
          workdir, just_logging=not is_writer, asynchronous=False
      )
  ]
  if is_writer:
    all_writers.append(
        writers_lib.JsonlWriter(
            os.path.join(workdir, METRICS_FILE), resume_step=start
        )
    )
  return metric_writers.MultiWriter(all_writers + list(extra_writers))


def make_hooks(
    writer: metric_writers.MetricWriter,
    total_steps: int,
    workdir: str,
    profile: bool,
) -> list[periodic_actions.PeriodicAction]:
  """The loop's periodic actions: progress, and a profile if asked."""
  hooks = [
      periodic_actions.ReportProgress(
          num_train_steps=total_steps, writer=writer, every_secs=30
      )
  ]
  if profile:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
  return hooks


def _run_meta(
    run: config_lib.Run, objective: protocol.Objective, num_classes: int
) -> dict[str, Any]:
  return {
      'model_name': run.model.model_name,
      'num_classes': int(num_classes),
      'model': dict(run.model.model),
      'image_size': run.data.image_size,
      'scan': bool(run.model.scan),
      'ema': run.loop.use_ema,
      **objective.run_meta(),
  }


# ----------------------------------------------------------------------------
# The loop's parts.
# ----------------------------------------------------------------------------


class StepPlan(NamedTuple):
  """What the loop does after a train step (`plan_step`).

  Attributes:
    last: The step is the run's last.
    flush: Fetch the buffered train metrics, check the loss, write them.
    checkpoint: Save a checkpoint.
    evaluate: Evaluate (the objective's evaluation).
    fewshot: With `evaluate`: run the few-shot probe too.
    preempted: Stop after the checkpoint: a preemption was requested.
    evaluators: With `evaluate`: the other evaluators (names in
      `config.evals`) due too.
  """

  last: bool
  flush: bool
  checkpoint: bool
  evaluate: bool
  fewshot: bool
  preempted: bool
  evaluators: tuple[str, ...] = ()


def plan_step(
    step: int,
    loop: config_lib.LoopSection,
    fewshot_every: int,
    preemption_requested: bool,
    evaluators_every: Mapping[str, int] | None = None,
) -> StepPlan:
  """What follows train step `step`: metrics, checkpoint, evaluations, stop.

  The last step evaluates (few-shot included) and checkpoints; a requested
  preemption checkpoints and stops, except at the last step, which ends the
  run anyway. Metrics are fetched before every checkpoint and evaluation, so
  that no state with a non-finite loss is saved.

  Args:
    step: The step just dispatched (1-based: updates applied).
    loop: The run's loop section (total steps, the `*_every` periods).
    fewshot_every: Steps between few-shot probes; 0 for none.
    preemption_requested: `PreemptionWatcher.reached(step)`.
    evaluators_every: {name: steps between its evaluations (0: none)} of
      the other evaluators, e.g. the ImageNet variants.

  Returns:
    The plan.
  """
  last = step == loop.total_steps
  preempted = preemption_requested and not last
  fewshot = fewshot_every > 0 and (last or step % fewshot_every == 0)
  evaluators = tuple(
      name
      for name, every in (evaluators_every or {}).items()
      if every > 0 and (last or step % every == 0)
  )
  evaluate = step % loop.eval_every == 0 or last or fewshot or bool(evaluators)
  save = step % loop.checkpoint_every == 0 or last or preempted
  return StepPlan(
      last=last,
      flush=step % loop.log_every == 0 or evaluate or save,
      checkpoint=save,
      evaluate=evaluate,
      fewshot=fewshot,
      preempted=preempted,
      evaluators=evaluators,
  )


class TrainMetricsBuffer:
  """Train-step metrics held on the devices until they are written.

  The loop adds each step's metrics without waiting for the step; `flush`
  fetches all of them in one transfer, stops the run at a non-finite loss
  and writes their means at the newest step.
  """

  def __init__(self):
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Buffers `train_step`'s metrics of `step` (device arrays)."""
    self._pending.append((step, metrics))

  def flush(
      self,
      writer: metric_writers.MetricWriter,
      schedule: Callable[[int], Any],
      ckpt: run_checkpoints.Checkpointer,
  ) -> None:
    """Fetches the buffered metrics, checks the loss, writes the means.

    Writes `train/<name>` (the mean over the buffered steps) and `train/lr`
    (the learning rate of the newest step's update) at the newest step.

    Args:
      writer: Receives the scalars.
      schedule: The learning-rate schedule (`optim.make_optimizer`).
      ckpt: The run's checkpointer, named in the error.

    Raises:
      NonFiniteLossError: naming the first step with a non-finite loss and
        the last checkpoint saved (after any save in flight completes).
    """
    if not self._pending:
      return
    values = jax.device_get([m for _, m in self._pending])
    for (step, _), m in zip(self._pending, values):
      if not np.isfinite(m['loss']):
        ckpt.wait()
        good = ckpt.latest_step()
        last_good = (
            f'the last good checkpoint is step {good} in ' f'{ckpt.directory}'
            if good is not None
            else 'no checkpoint had been saved yet'
        )
        raise NonFiniteLossError(
            f'Non-finite training loss ({m["loss"]}) at step {step}. '
            f'Stopped; {last_good} (nothing newer was written). Lower '
            'base_lr, set grad_clip_norm, or check the data.'
        )
    last = self._pending[-1][0]
    writer.write_scalars(
        last,
        {
            **{
                f'train/{k}': float(np.mean([m[k] for m in values]))
                for k in values[0]
            },
            'train/lr': float(schedule(last - 1)),
        },
    )
    self._pending.clear()


def eval_params(state: TrainState, use_ema: bool) -> Any:
  """The parameters a run evaluates and exports: the EMA if it keeps one."""
  return state.ema_params if use_ema else state.params


@dataclasses.dataclass(frozen=True)
class Evaluations:
  """A run's evaluations: the objective's, and the few-shot probe.

  Attributes:
    objective: The run's objective (its evaluation).
    eval_fn: `objective.make_eval_fn`'s step.
    dataset: The evaluation split (`input_pipeline.eval_dataset`).
    batch_sharding: Sharding of a global batch.
    fewshot: The few-shot evaluator, or None.
    ckpt: The run's checkpointer (completed when an evaluation fails).
    final_params_path: Where the run's final parameters are saved (named
      when the final evaluation fails).
    workdir: The run directory (named in the same message).
    evaluators: {name: evaluator} of the others (the ImageNet variants),
      each with `run(params) -> metrics`.
  """

  objective: protocol.Objective
  eval_fn: Callable[..., Any]
  dataset: Any
  batch_sharding: Any
  fewshot: fewshot_lib.FewShotEvaluator | None
  ckpt: run_checkpoints.Checkpointer
  final_params_path: str
  workdir: str
  evaluators: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __call__(
      self,
      params: Any,
      step: int,
      *,
      fewshot: bool,
      last: bool,
      evaluators: Collection[str] = (),
  ) -> dict[str, float]:
    """Evaluates `params` after `step`.

    Args:
      params: Parameters to evaluate (`eval_params`).
      step: The step they are of.
      fewshot: Whether to run the few-shot probe too (if the run has one).
      evaluators: Which of the other evaluators to run too (those the run
        has).
      last: The final evaluation: its failure says that training finished
        and where its parameters are.

    Returns:
      {`eval/<name>`, `fewshot/<name>`, `<evaluator>/<name>`: value}.

    Raises:
      Whatever an evaluator raises, once any checkpoint being written has
      completed.
    """
    try:
      metrics = self.objective.evaluate(
          params, self.eval_fn, self.dataset, self.batch_sharding
      )
      if self.fewshot and fewshot:
        metrics.update(self.fewshot.run(params))
      for name in evaluators:
        if name in self.evaluators:
          metrics.update(self.evaluators[name].run(params))
    except Exception:
      self.ckpt.wait()  # Whatever checkpoint is being written completes.
      if last:
        logging.error(
            'The final evaluation failed; training finished and its '
            'parameters are saved in %s (and the checkpoint of step %d). '
            'Evaluate them again with python -m vit_jax.evaluate '
            '--workdir=%s.',
            self.final_params_path,
            step,
            self.workdir,
        )
      raise
    return metrics


# ----------------------------------------------------------------------------
# The main loop.
# ----------------------------------------------------------------------------


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    extra_writers: Sequence[metric_writers.MetricWriter] = (),
    overwrite: bool = False,
) -> dict[str, float]:
  """Trains (or fine-tunes, or resumes) and evaluates; the main job.

  Writes into `workdir`: TensorBoard summaries, `metrics.jsonl`, orbax
  checkpoints under `checkpoints/` (resumed automatically), `config.json`,
  `class_names.json` and, at the end, `final_params.npz` in the published
  checkpoint layout (EMA parameters when `ema_decay` is set).

  The workdir is the run's identity (`vit_jax.workdir`): a workdir that
  holds a run is continued only by a config that trains the same thing, and
  a finished run is left as it is. Every check of the config, the workdir,
  the data and the pretrained weights runs before the first write. A
  SIGTERM or SIGINT (Ctrl-C) makes the run save a checkpoint at the next
  step boundary and return early (see `run_checkpoints.PreemptionWatcher`);
  running the same call again resumes it.

  Args:
    config: Experiment config (see configs/).
    workdir: Run directory.
    extra_writers: More clu metric writers that receive every scalar the run
      writes, e.g. `writers.ProgressBar` in a notebook. They are closed when
      the run ends, also when it ends with an error.
    overwrite: Start from scratch even if `workdir` holds a run, deleting
      the files that run wrote (`workdir.clear`).

  Returns:
    The final evaluation metrics; after a SIGTERM, the last evaluation's
    metrics (if any) plus `preempted_at_step`; for a run already finished,
    its last evaluation in `metrics.jsonl` plus `finished_at_step`.

  Raises:
    NonFiniteLossError: the loss became NaN/inf; names the step and the last
      good checkpoint.
    workdir.WorkdirError: the workdir holds a run of another config.
  """
  check_jax_flags()
  run = config_lib.parse(config)  # Every field checked, once.
  # Nothing is written before every check has passed.
  held = workdir_lib.read(workdir)
  total_steps = run.loop.total_steps
  decision = workdir_lib.decide(
      held,
      config,
      total_steps=total_steps,
      checkpoint_every=run.loop.checkpoint_every,
      overwrite=overwrite,
  )
  mesh = sharding.mesh_from_config(run.mesh)
  check_batches(run, mesh)
  source = input_pipeline.get_source(run.data)
  info = checked_dataset_info(run.data, source)
  workdir_lib.check_classes(held, info.class_names, overwrite=overwrite)
  if decision.finished:
    # `workdir.decide` finishes a run only at its latest checkpoint.
    assert decision.resume_step is not None, decision
    return finished_run(workdir, decision.resume_step, total_steps)
  # 'auto' attention on a TPU: what the compiler estimates fastest.
  run = attention_choice.resolve(run, mesh)
  objective = objectives.get(run.objective)
  model = build_model(run.model, objective, info.num_classes)
  tx, schedule = optim.make_optimizer(run.optim)
  use_ema = run.loop.use_ema

  init_rng, train_rng = jax.random.split(jax.random.key(run.loop.seed))
  init = init_fn(run, objective, model, tx)
  abstract = jax.eval_shape(init, init_rng)
  shardings = sharding.shardings_from_config(abstract, mesh, run.mesh)
  fewshot = make_fewshot(run, objective, model, mesh, shardings.params)
  variants = make_variant_evaluators(
      run, objective, info.num_classes, model, mesh, shardings.params
  )
  optim.check_param_groups(run.optim, abstract.params)
  pretrained = None
  if decision.resume_step is None and run.model.pretrained_path:
    pretrained = load_pretrained_checked(run, model, abstract.params)
  # Every check has passed: from here on the workdir is written.
  _check_writable(workdir)
  if overwrite:
    workdir_lib.clear(held)
  log_model(run.model.model_name, mesh, abstract, shardings)
  if run.optim.param_groups:
    logging.info('%s', optim.describe_groups(run.optim, abstract.params))
  # Every exit, error paths included, closes the writers and then the
  # checkpointer (which first completes any save in flight).
  with contextlib.ExitStack() as stack:
    ckpt = run_checkpoints.Checkpointer(
        workdir,
        _run_meta(run, objective, info.num_classes),
        keep=run.loop.keep_checkpoints,
        async_save=bool(run.loop.async_checkpoints),
    )
    stack.callback(ckpt.close)
    restored = None
    if decision.resume_step is not None:
      restored = ckpt.restore_latest(
          run_checkpoints.abstract_with_shardings(abstract, shardings)
      )
    if restored is not None:  # Restored straight into its shardings.
      start, state, data_state = restored
    else:
      start, data_state = 0, None
      state = initial_state(init, init_rng, shardings, tx, use_ema, pretrained)
    is_writer = jax.process_index() == 0
    if is_writer:
      write_run_files(
          workdir,
          config,
          info,
          start,
          decision.changes,
          resumed=restored is not None,
      )
    writer = make_writer(workdir, start, extra_writers, is_writer)
    stack.callback(writer.close)

    train_iter = input_pipeline.train_iterator(
        run.data,
        state=data_state,
        source=source,
        batch_multiple=sharding.batch_shards(mesh) * run.loop.accum_steps,
    )
    batch_sharding = sharding.batch_sharding(mesh)
    batches = sharding.prefetch_to_device(
        train_iter, batch_sharding, size=run.loop.prefetch
    )
    frozen = optim.frozen_mask(run.optim)
    step_fn = make_train_step(
        run.loop, objective, model, tx, mesh, shardings, frozen=frozen
    )
    flexi_steps = None
    if run.model.flexi_patch_sizes():
      flexi_steps = FlexiTrainSteps(
          run.model.flexi_patch_sizes(),
          run.loop.seed,
          lambda m: make_train_step(
              run.loop, objective, m, tx, mesh, shardings, frozen=frozen
          ),
          model,
      )
    # Placed once: a key on one device would be re-sharded at every step.
    train_rng = sharding.put_global(train_rng, sharding.replicated(mesh))
    eval_ds, _ = input_pipeline.eval_dataset(run.data, source=source)
    eval_fn = objective.make_eval_fn(model, mesh, shardings.params)
    final_params_path = os.path.join(workdir, run_checkpoints.FINAL_PARAMS_FILE)
    evaluate = Evaluations(
        objective,
        eval_fn,
        eval_ds,
        batch_sharding,
        fewshot,
        ckpt,
        final_params_path,
        workdir,
        variants,
    )

    hooks = make_hooks(
        writer, total_steps, workdir, profile=is_writer and run.loop.profile
    )
    train_metrics = TrainMetricsBuffer()
    metrics = {}
    if start >= total_steps:
      logging.info(
          'Checkpoint step %d >= total_steps %d: nothing to train.',
          start,
          total_steps,
      )
    progress = writers_lib.ProgressLog(start, total_steps, run.data.batch)
    with run_checkpoints.PreemptionWatcher() as preemption:
      for step in range(start + 1, total_steps + 1):
        first_step_start = time.monotonic()
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          step_at = step_fn if flexi_steps is None else flexi_steps(step)
          state, step_metrics = step_at(state, next(batches), train_rng)
        if step == start + 1:  # Once: how long compiling took.
          jax.block_until_ready(step_metrics)
          progress.first_step(step, time.monotonic() - first_step_start)
        train_metrics.add(step, step_metrics)
        for hook in hooks:
          hook(step)
        plan = plan_step(
            step,
            run.loop,
            run.evals.fewshot.every,
            preemption.reached(step),
            {name: s.every for name, s in run.evals.variants.items()},
        )
        if plan.flush:
          # Never checkpoint an unchecked state.
          train_metrics.flush(writer, schedule, ckpt)
          progress.update(step)
        # Checkpoint (and at the end, final parameters) before evaluating: an
        # evaluator that fails must not cost the run its training.
        if plan.checkpoint:
          ckpt.save(step, state, train_iter.state_after(step - start))
        if plan.last:
          checkpoint.save(eval_params(state, use_ema), final_params_path)
        if plan.evaluate:
          metrics = evaluate(
              eval_params(state, use_ema),
              step,
              fewshot=plan.fewshot,
              last=plan.last,
              evaluators=plan.evaluators,
          )
          writer.write_scalars(step, metrics)
        if plan.preempted:
          ckpt.wait()
          logging.warning(
              '%s: saved checkpoint step %d in %s and stopped. Run the same '
              'command again to resume from it.',
              preemption.reason,
              step,
              ckpt.directory,
          )
          return {**metrics, 'preempted_at_step': float(step)}
      if start >= total_steps:  # Trained; the final evaluation is missing.
        if not tf.io.gfile.exists(final_params_path):
          checkpoint.save(eval_params(state, use_ema), final_params_path)
        metrics = evaluate(
            eval_params(state, use_ema),
            total_steps,
            fewshot=True,
            last=True,
            evaluators=tuple(variants),
        )
        writer.write_scalars(start, metrics)
      ckpt.wait()
      return metrics
