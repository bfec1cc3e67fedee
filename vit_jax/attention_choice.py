"""`attention_impl='auto'` for a run: what its attention is compiled with.

On a CPU or GPU the model's own rule decides
(`vit_jax.models.vit.resolve_attention_impl`: einsum on CPU, cuDNN's fused
kernel on a GPU where it applies). On a TPU several implementations compile
and the fastest depends on the shapes, so the run's attention layer (its
batch per step, tokens, heads and dtype, sharded over the run's mesh) is
compiled with each candidate, forward and backward, and the one with the
smallest compiler estimate (`cost_analysis()['optimal_seconds']`) is used.
That is the TPU compiler's own figure, not a measurement; the Pallas kernels
enter it through the FLOPs and bytes they declare (a roofline), not through
a simulation of their code.
"""

import dataclasses
from typing import Any, cast

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import config_lib
from vit_jax import hlo
from vit_jax import sharding
import vit_jax.models
from vit_jax.models import vit

TPU_CANDIDATES = ('flash', 'splash', 'xla')
# Custom calls libtpu's cost model gives a cost (the others count -1).
COSTED_CUSTOM_CALLS = (
    'tpu_custom_call',
    'AsyncCollectiveStart',
    'AsyncCollectiveDone',
)


@dataclasses.dataclass(frozen=True)
class Choice:
  """An attention implementation for a run, and why.

  Attributes:
    impl: One of `vit_jax.models.vit.ATTENTION_IMPLS` other than 'auto'
      ('' for a model without attention).
    reason: Why, in words (logged, and reported by `vit_jax.aot`).
    estimates: {candidate: the compiler's estimated seconds of one attention
      layer forward and backward, or None where it gave none}; empty when no
      estimate was used.
  """

  impl: str
  reason: str
  estimates: dict[str, float | None] = dataclasses.field(default_factory=dict)


def estimated_seconds(compiled: Any) -> float | None:
  """The compiler's estimated run time of a compiled program, or None.

  libtpu's cost model counts -1 for each custom call it does not cost (the
  `optimal_seconds` of a ViT is minus the number of its `ConcatBitcast`
  calls, plus the time; `X64Combine`, from the 'rbg' PRNG, does the same),
  so those are added back. Pallas kernels and asynchronous collectives are
  costed. A result still negative means there is no estimate.

  Args:
    compiled: A `jax.stages.Compiled`.

  Returns:
    Seconds, or None.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0] if cost else {}
  seconds = (cost or {}).get('optimal_seconds')
  if seconds is None:
    return None
  seconds += sum(
      n
      for target, n in hlo.custom_calls(compiled.as_text()).items()
      if target not in COSTED_CUSTOM_CALLS
  )
  return float(seconds) if seconds > 0 else None


def _attention_call(model: nn.Module, image_size: int) -> dict[str, Any]:
  """The shapes of the model's first self-attention call, from a trace."""
  found: dict[str, Any] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if (
        not found
        and isinstance(module, vit.MultiHeadDotProductAttention)
        and context.method_name == '__call__'
        and args[1:2] in ((), (None,))
        and kwargs.get('inputs_kv') is None
    ):
      found.update(
          shape=tuple(args[0].shape),
          num_heads=module.num_heads,
          dtype=module.dtype,
          dropout=module.dropout_rate,
      )
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            jnp.zeros((1, image_size, image_size, 3)),
            train=False,
        )
    )
  return found


def _compile_attention(
    impl: str,
    call: dict[str, Any],
    batch: int,
    mesh: jax.sharding.Mesh,
    platform: str,
) -> Any:
  """One attention layer, forward and backward, compiled on `mesh`."""
  _, tokens, hidden = call['shape']
  layer = vit.MultiHeadDotProductAttention(
      num_heads=call['num_heads'], dtype=call['dtype'], attention_impl=impl
  )
  x = jax.ShapeDtypeStruct(
      (batch, tokens, hidden),
      call['dtype'],
      sharding=sharding.batch_sharding(mesh),
  )
  with vit.compiling_for(platform):
    params = jax.eval_shape(
        layer.init,
        jax.random.key(0),
        jnp.zeros((1, tokens, hidden), call['dtype']),
    )
    replicated = sharding.replicated(mesh)
    params = jax.tree_util.tree_map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated),
        params,
    )

    def loss(params, x):
      with sharding.activation_sharding(mesh):
        out = layer.apply(params, x)
      return jnp.sum(cast(jax.Array, out).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()


def choose(run: config_lib.Run, mesh: jax.sharding.Mesh) -> Choice:
  """The attention a run uses on `mesh` (`mesh`'s devices' platform).

  Args:
    run: The parsed config.
    mesh: The run's mesh; its devices say what is compiled for.

  Returns:
    The choice; an explicit `attention_impl` is kept as it is.
  """
  fields = vit_jax.models.model_fields(run.model.model_name)
  if 'attention_impl' not in fields:
    return Choice('', f'{run.model.model_name} has no attention')
  requested = run.model.model.get('attention_impl', fields['attention_impl'])
  platform = mesh.devices.flat[0].platform
  if requested != 'auto' or platform != 'tpu':
    return Choice(
        requested,
        'asked for'
        if requested != 'auto'
        else f'the rule for {platform} (vit.resolve_attention_impl)',
    )
  model = vit_jax.models.get_model(num_classes=1, **run.model.model_args())
  with vit.compiling_for(platform):
    call = _attention_call(model, run.data.image_size)
  if not call:
    return Choice('einsum', 'the model has no self-attention to compile')
  if call['dropout'] > 0:
    return Choice('einsum', 'attention dropout is on (only einsum has it)')
  batch = run.data.batch // run.loop.accum_steps
  estimates, failed = {}, {}
  for impl in TPU_CANDIDATES:
    try:
      estimates[impl] = estimated_seconds(
          _compile_attention(impl, call, batch, mesh, platform)
      )
    except Exception as e:  # pylint: disable=broad-except
      # A candidate that does not compile for these shapes is not chosen.
      failed[impl] = str(e).splitlines()[0][:200] if str(e) else repr(e)
  timed = {k: v for k, v in estimates.items() if v is not None}
  if not timed:
    impl = next(iter(estimates), 'xla')
    why = (
        'no compiler estimate'
        if estimates
        else f'no candidate compiled ({failed})'
    )
    return Choice(impl, f'{why}; the first that compiled', estimates)
  impl = min(timed, key=lambda k: timed[k])
  ranking = ', '.join(
      f'{k} {v * 1e3:.3g} ms'
      for k, v in sorted(timed.items(), key=lambda kv: kv[1])
  )
  _, tokens, hidden = call['shape']
  reason = (
      f"the compiler's estimate for one attention layer forward and "
      f'backward, batch {batch} x {tokens} tokens x {hidden} wide: '
      f'{ranking} (Pallas kernels costed from their declared FLOPs '
      'and bytes)'
  )
  if failed:
    reason += f'; did not compile: {", ".join(sorted(failed))}'
  return Choice(impl, reason, estimates)


def apply(run: config_lib.Run, choice: Choice) -> config_lib.Run:
  """`run` with its model's `attention_impl` set to the choice."""
  if not choice.impl:
    return run
  model = dataclasses.replace(
      run.model, model={**run.model.model, 'attention_impl': choice.impl}
  )
  return dataclasses.replace(run, model=model)


def resolve(run: config_lib.Run, mesh: jax.sharding.Mesh) -> config_lib.Run:
  """`run` with 'auto' attention decided for a TPU mesh (logged); else as is.

  Args:
    run: The parsed config.
    mesh: The run's mesh.

  Returns:
    The run to build the model from.
  """
  choice = choose(run, mesh)
  if choice.estimates:
    logging.info(
        "attention_impl='auto' on tpu: %r (%s).", choice.impl, choice.reason
    )
    return apply(run, choice)
  return run
