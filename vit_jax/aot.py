r"""Does a run fit, and how fast would it go? Compile it ahead of time.

  python -m vit_jax.aot --config=configs/pretrain_vit_g14_pod.py \
      --topology=v4:8x8x4 --json=g14.json --hlo=g14.hlo

builds the train step and the eval step exactly as `python -m vit_jax.main`
builds them for the config (the same parse and checks, mesh, shardings and
train state), all abstract: no parameter is materialised, no data is read,
no workdir is written. Both are compiled for the named TPU slice by the real
TPU compiler (libtpu, on any host: a CPU is enough), or, without
`--topology`, for this host's devices. The report says what each device
holds against its memory, the collectives of the program, its FLOPs and the
compiler's estimated step time with what follows from it (images/s per chip,
MFU). The estimate is the compiler's cost model, never a measurement.

A config that does not fit exits with status 2 and one line naming the
excess and the fields that change it. Topology names are libtpu's:
`v3:16x32`, `v4:8x8x4`, `v5e:16x16`, `v5p:8x8x8`, `v6e:16x16`, ...
"""

if __name__ == '__main__':
  from vit_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.reexec_tuned('vit_jax.aot')

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import time
from typing import Any, cast

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import attention_choice
from vit_jax import cli
from vit_jax import config_lib
from vit_jax import fileio
from vit_jax import hlo
from vit_jax import input_pipeline
from vit_jax import objectives
from vit_jax import optim
from vit_jax import sharding
from vit_jax import train
import vit_jax.models
from vit_jax.models import vit

# pylint: enable=g-import-not-at-top,wrong-import-position

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """What one accelerator chip has.

  Attributes:
    hbm_gib: High-bandwidth memory per chip.
    bf16_tflops: Peak dense bfloat16 TFLOP/s per chip.
    cores: TensorCores per chip (a device is a core or, with megacore, the
      chip: `device.num_cores` says which).
  """

  hbm_gib: float
  bf16_tflops: float
  cores: int = 1


# Published figures per chip (Cloud TPU system architecture pages).
CHIPS = {
    'TPU v2': Chip(16, 45, 2),
    'TPU v3': Chip(32, 123, 2),
    'TPU v4': Chip(32, 275, 2),
    'TPU v5 lite': Chip(16, 197, 1),
    'TPU v5': Chip(95, 459, 2),  # v5p
    'TPU v6 lite': Chip(32, 918, 1),
}


MEGACORE_GENERATIONS = ('v4', 'v5', 'v5p')


class AotError(ValueError):
  """The run cannot be compiled as asked, or does not fit (one line)."""


def _libtpu_requirement() -> str:
  """The libtpu pin of the installed jax's `tpu` extra."""
  try:
    for requirement in importlib.metadata.requires('jax') or ():
      if requirement.startswith('libtpu'):
        return requirement.split(';')[0].strip()
  except importlib.metadata.PackageNotFoundError:
    pass
  return 'libtpu'


def libtpu_version() -> str | None:
  """The installed libtpu's version, or None."""
  try:
    return importlib.metadata.version('libtpu')
  except importlib.metadata.PackageNotFoundError:
    return None


def topology_devices(name: str) -> list[Any]:
  """The abstract devices of a TPU slice, e.g. 'v4:2x2x1', for compiling.

  Args:
    name: A libtpu topology name, `<generation>:<chips per dimension>`.

  Returns:
    The devices (every process's).

  Raises:
    AotError: libtpu is missing (with the line that installs it), or the
      name is unknown.
  """
  if importlib.util.find_spec('libtpu') is None:
    raise AotError(
        f'--topology={name} compiles with the TPU compiler, which is the '
        f'libtpu package: pip install "{_libtpu_requirement()}" (the version '
        "this jax's tpu extra pins; about 210 MB, any host)."
    )
  # A compile-only use of libtpu: it need not hold the host's TPU lock (an
  # abstract slice has no devices to guard, and a run may hold the lock).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import topologies
  # TPU v4 and v5p run as one device per chip (two TensorCores, "megacore"),
  # as on their VMs; libtpu's default description has a device per core.
  megacore = name.split(':')[0] in MEGACORE_GENERATIONS
  try:
    return list(
        topologies.get_topology_desc(
            platform='tpu',
            topology_name=name,
            **({'chip_config_name': 'megacore'} if megacore else {}),
        ).devices
    )
  except Exception as e:  # libtpu raises its own status errors.
    raise AotError(
        f'libtpu has no TPU slice --topology={name!r} '
        f'({cli.one_line(e)[:300]}); names look like v3:16x32, v4:2x2x1, '
        'v5e:2x2, v5p:2x2x1, v6e:2x2.'
    ) from e


def device_memory(device: Any) -> tuple[float | None, float | None, str]:
  """(HBM bytes, peak bf16 FLOP/s, what it is) of one device; None unknown."""
  chip = CHIPS.get(device.device_kind)
  if chip is not None:
    share = getattr(device, 'num_cores', 1) / chip.cores
    what = (
        'TPU chip' if share == 1 else 'TPU core'
    ) + f' ({device.device_kind})'
    return chip.hbm_gib * GIB * share, chip.bf16_tflops * 1e12 * share, what
  try:
    limit = (device.memory_stats() or {}).get('bytes_limit')
  except Exception:  # pylint: disable=broad-except
    limit = None
  return limit, None, f'{device.platform} device ({device.device_kind})'


@dataclasses.dataclass
class StepReport:
  """One compiled step, per device."""

  compile_seconds: float
  memory: dict[str, int]
  flops: float | None
  estimated_seconds: float | None
  collectives: dict[str, dict[str, int]]
  custom_calls: dict[str, int]


def _step_report(compiled: Any, seconds: float) -> StepReport:
  memory = compiled.memory_analysis()
  parts = {
      'arguments': memory.argument_size_in_bytes,
      'outputs': memory.output_size_in_bytes,
      'aliased': memory.alias_size_in_bytes,
      'temporaries': memory.temp_size_in_bytes,
      'generated_code': memory.generated_code_size_in_bytes,
  }
  # Donated inputs share their buffers with the outputs they become.
  parts['total'] = (
      parts['arguments']
      + parts['outputs']
      - parts['aliased']
      + parts['temporaries']
      + parts['generated_code']
  )
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  text = compiled.as_text()
  return StepReport(
      compile_seconds=round(seconds, 1),
      memory=parts,
      flops=(cost or {}).get('flops'),
      estimated_seconds=attention_choice.estimated_seconds(compiled),
      collectives={
          op: {'count': n, 'bytes': b}
          for op, (n, b) in sorted(hlo.collective_summary(text).items())
      },
      custom_calls=hlo.custom_calls(text),
  )


def _num_classes(run: config_lib.Run, given: int | None) -> int:
  """Classes of the run's dataset, from its metadata (no image is read)."""
  if given:
    return given
  data = run.data
  if data.dataset == 'image_folder' and not data.image_folder:
    raise AotError(
        'config.image_folder is not set, so the number of classes is '
        'unknown: pass --num_classes=N (the head size; e.g. 21843 for '
        'ImageNet-21k, 18291 for JFT-300M).'
    )
  try:
    return input_pipeline.get_dataset_info(
        data, input_pipeline.get_source(data)
    ).num_classes
  except Exception as e:  # pylint: disable=broad-except
    raise AotError(
        f'The number of classes of {data.dataset!r} could not be read '
        f'({cli.one_line(e)[:200]}): pass --num_classes=N.'
    ) from e


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree,
      shardings,
  )


class _Steps:
  """A run's train and eval steps, built as `train_and_evaluate` builds
  them, on abstract (shape-only, sharded) inputs."""

  def __init__(
      self, run: config_lib.Run, mesh: jax.sharding.Mesh, classes: int
  ):
    self.run, self.mesh = run, mesh
    self.objective = objectives.get(run.objective)
    self.model = train.build_model(run.model, self.objective, classes)
    self.tx, _ = optim.make_optimizer(run.optim)
    init_rng, train_rng = jax.random.split(jax.random.key(run.loop.seed))
    self.state_shapes = jax.eval_shape(
        train.init_fn(run, self.objective, self.model, self.tx), init_rng
    )
    optim.check_param_groups(run.optim, self.state_shapes.params)
    self.shardings = sharding.shardings_from_config(
        self.state_shapes, mesh, run.mesh
    )
    self.state = _abstract(self.state_shapes, self.shardings)
    self.rng = jax.ShapeDtypeStruct(
        train_rng.shape, train_rng.dtype, sharding=sharding.replicated(mesh)
    )
    on_batch = sharding.batch_sharding(mesh)
    size = run.data.image_size
    # Images as the input pipeline gives them, and its one-hot labels
    # (whatever the objective's head).
    self.batch = lambda n: {
        'image': jax.ShapeDtypeStruct(
            (n, size, size, 3), jnp.float32, sharding=on_batch
        ),
        'labels': jax.ShapeDtypeStruct(
            (n, classes), jnp.float32, sharding=on_batch
        ),
    }
    self.on_batch = on_batch

  def train(self) -> Any:
    """The compiled train step."""
    step = cast(
        jax.stages.Wrapped,
        train.make_train_step(
            self.run.loop,
            self.objective,
            self.model,
            self.tx,
            self.mesh,
            self.shardings,
            frozen=optim.frozen_mask(self.run.optim),
        ),
    )
    return step.lower(
        self.state, self.batch(self.run.data.batch), self.rng
    ).compile()

  def eval(self) -> Any:
    """The compiled eval step."""
    n = self.run.data.batch_eval
    eval_fn = cast(
        jax.stages.Wrapped,
        self.objective.make_eval_fn(
            self.model, self.mesh, self.shardings.params
        ),
    )
    batch = {
        **self.batch(n),
        'mask': jax.ShapeDtypeStruct((n,), jnp.float32, sharding=self.on_batch),
    }
    return eval_fn.lower(self.state.params, batch).compile()


def _num_layers(run: config_lib.Run) -> int | None:
  transformer = (
      vit_jax.models.get_config(run.model.model_name).get('transformer') or {}
  )
  transformer = {**transformer, **(run.model.model.get('transformer') or {})}
  return transformer.get('num_layers')


def _per_step_cost(
    config: Any,
    run: config_lib.Run,
    choice: attention_choice.Choice,
    mesh: jax.sharding.Mesh,
    classes: int,
    step: StepReport,
) -> dict[str, Any]:
  """FLOPs, estimated seconds and collectives of one whole train step.

  XLA's cost analysis counts the body of a loop once, so a program with
  loops (layers under `scan`, micro-batches under `accum_steps`) is costed
  from two more compiles without them: the same step of one micro-batch
  with 1 and 2 layers unrolled, whose difference is one layer. The step is
  then (1-layer cost + (layers - 1) x one layer) x micro-batches, the
  optimizer update counted once per micro-batch (a small overcount).
  """
  layers = _num_layers(run)
  accum = run.loop.accum_steps
  direct = {
      'flops': step.flops,
      'estimated_seconds': step.estimated_seconds,
      'collectives': {op: c['count'] for op, c in step.collectives.items()},
      'method': 'the compiled train step',
  }
  if not (run.model.scan and layers) and accum == 1:
    return direct
  if not layers:
    return {
        **direct,
        'method': 'the compiled train step (its micro-batch '
        'loop counted once: an undercount)',
    }
  costs = []
  for n in (1, 2):
    small = config.copy_and_resolve_references()
    overrides = [
        ('scan', 'False'),
        ('accum_steps', '1'),
        ('batch', str(run.data.batch // accum)),
        ('model.transformer.num_layers', str(n)),
    ]
    if choice.impl:
      overrides.append(('model.attention_impl', repr(choice.impl)))
    config_lib.apply_overrides(small, overrides)
    compiled = _Steps(config_lib.parse(small), mesh, classes).train()
    costs.append(_step_report(compiled, 0.0))
  one, two = costs

  def whole(a, b):
    if a is None or b is None:
      return None
    return (a + (layers - 1) * (b - a)) * accum

  ops = set(one.collectives) | set(two.collectives)
  count = lambda r, op: r.collectives.get(op, {}).get('count', 0)
  return {
      'flops': whole(one.flops, two.flops),
      'estimated_seconds': whole(one.estimated_seconds, two.estimated_seconds),
      'collectives': {
          op: whole(count(one, op), count(two, op)) for op in sorted(ops)
      },
      'method': (
          f'extrapolated from the step unrolled with 1 and 2 layers'
          f' ({layers} layers, {accum} micro-batch'
          f'{"es" if accum > 1 else ""}): XLA counts a loop body '
          'once'
      ),
  }


def compile_run(
    config: Any,
    *,
    topology: str | None = None,
    num_classes: int | None = None,
    hlo_path: str | None = None,
) -> dict[str, Any]:
  """Compiles a config's train and eval steps; the report as a dict.

  Args:
    config: The experiment config (with its overrides applied).
    topology: A TPU slice name for libtpu, or None for this host's devices.
    num_classes: The head size; by default from the dataset's metadata.
    hlo_path: Where to write the compiled train step's HLO text, if given.

  Returns:
    The report (JSON-able): see `format_report` for its fields in words.

  Raises:
    AotError: a problem with the request (libtpu missing, an unknown
      topology, no class count), naming the fix.
    ValueError: the config's own checks (`config_lib.parse`,
      `train.check_batches`).
  """
  run = config_lib.parse(config)
  devices = topology_devices(topology) if topology else jax.devices()
  platform = devices[0].platform
  mesh = sharding.make_mesh(run.mesh.mesh, devices)
  train.check_batches(run, mesh)
  classes = _num_classes(run, num_classes)

  started = time.monotonic()
  choice = attention_choice.choose(run, mesh)
  run = attention_choice.apply(run, choice)
  choice_seconds = time.monotonic() - started
  with vit.compiling_for(platform):
    steps = _Steps(run, mesh, classes)
    started = time.monotonic()
    where = topology or 'this host'
    compiled = _compile_or_refuse(steps.train, 'train step', run, where)
    train_report = _step_report(compiled, time.monotonic() - started)
    if hlo_path:
      fileio.write_text_atomic(hlo_path, compiled.as_text())
    del compiled
    started = time.monotonic()
    eval_report = _step_report(
        _compile_or_refuse(steps.eval, 'eval step', run, where),
        time.monotonic() - started,
    )
    per_step = _per_step_cost(config, run, choice, mesh, classes, train_report)
  state_shapes = steps.state_shapes
  size, batch, batch_eval = (
      run.data.image_size,
      run.data.batch,
      run.data.batch_eval,
  )

  hbm, peak, device_what = device_memory(devices[0])
  chips = _chips(devices)
  need = max(train_report.memory['total'], eval_report.memory['total'])
  report = {
      'date': datetime.date.today().isoformat(),
      'jax': jax.__version__,
      'libtpu': libtpu_version() if topology else None,
      'topology': topology or 'local',
      'platform': platform,
      'device_kind': devices[0].device_kind,
      'device': device_what,
      'devices': len(devices),
      'chips': chips,
      'processes': len({d.process_index for d in devices}),
      'mesh': dict(mesh.shape),
      'model': run.model.model_name,
      'parameters': int(
          sum(
              np.prod(x.shape)
              for x in jax.tree_util.tree_leaves(state_shapes.params)
          )
      ),
      'image_size': size,
      'batch': batch,
      'batch_eval': batch_eval,
      'accum_steps': run.loop.accum_steps,
      'num_classes': classes,
      'compute_dtype': run.model.compute_dtype,
      'scan': run.model.scan,
      'remat_policy': _remat_policy(run),
      'attention': {
          'impl': choice.impl,
          'reason': choice.reason,
          'estimates': choice.estimates,
          'choice_seconds': round(choice_seconds, 1),
      },
      'state_bytes_per_device': int(
          train.state_size_mib(state_shapes, steps.shardings)[0] * 2**20
      ),
      'hbm_bytes_per_device': hbm,
      'bf16_flops_per_device': peak,
      'bytes_per_device': need,
      'fits': None if hbm is None else need <= hbm,
      'margin_bytes': None if hbm is None else hbm - need,
      'train_step': dataclasses.asdict(train_report),
      'eval_step': dataclasses.asdict(eval_report),
  }
  report['per_step'] = per_step
  report['estimate'] = _estimate(report, per_step, peak)
  return report


def _chips(devices: list[Any]) -> int:
  chip = CHIPS.get(devices[0].device_kind)
  if chip is None:
    return len(devices)
  return max(
      1, len(devices) * getattr(devices[0], 'num_cores', 1) // chip.cores
  )


def _remat_policy(run: config_lib.Run) -> str:
  model = run.model.model
  if model.get('remat_policy'):
    return model['remat_policy']
  return 'full' if run.model.remat else 'none'


def _estimate(
    report: dict[str, Any], step: dict[str, Any], peak: float | None
) -> dict[str, Any] | None:
  """What the compiler's step-time estimate implies (an estimate too)."""
  seconds = step['estimated_seconds']
  if not seconds:
    return None
  per_chip = report['batch'] / seconds / report['chips']
  return {
      'step_seconds': seconds,
      'images_per_second_per_chip': per_chip,
      'images_per_second_per_device': report['batch']
      / seconds
      / report['devices'],
      'mfu': (step['flops'] / seconds / peak)
      if peak and step['flops']
      else None,
  }


def _gib(n: float | None) -> str:
  """Bytes in words: GiB from 1 GiB up, MiB below."""
  if n is None:
    return '?'
  if abs(n) >= GIB:
    return f'{n / GIB:.2f} GiB'
  return f'{n / 2**20:.1f} MiB'


def _seconds(s: float) -> str:
  return f'{s:.3f} s' if s >= 0.1 else f'{s * 1e3:.3g} ms'


def format_report(report: dict[str, Any]) -> str:
  """The report in words, as the console shows it."""
  lines: list[str] = []
  add = lines.append
  topo = report['topology']
  add(
      f"{report['model']} ({report['parameters']:,} parameters), "
      f"{report['image_size']} px, batch {report['batch']} "
      f"(accum_steps {report['accum_steps']}), {report['compute_dtype']}, "
      f"scan {report['scan']}, remat {report['remat_policy']}"
  )
  add(
      f"compiled for {topo}: {report['devices']} x {report['device']}, "
      f"{report['chips']} chips, {report['processes']} "
      f"process{'es' if report['processes'] > 1 else ''}; mesh "
      f"{report['mesh']}"
      + (f"; libtpu {report['libtpu']}" if report['libtpu'] else '')
  )
  attention = report['attention']
  if attention['impl']:
    add(f"attention: {attention['impl']} ({attention['reason']})")
  for name in ('train_step', 'eval_step'):
    step = report[name]
    mem = step['memory']
    add(
        f"{name.replace('_', ' ')}: {_gib(mem['total'])} per device = "
        f"arguments {_gib(mem['arguments'])} + outputs {_gib(mem['outputs'])}"
        f" - donated {_gib(mem['aliased'])} + temporaries "
        f"{_gib(mem['temporaries'])} + code {_gib(mem['generated_code'])}; "
        f"compiled in {step['compile_seconds']:.1f} s"
    )
    if step['collectives']:
      add(
          '  collectives: '
          + ', '.join(
              f"{op} x{c['count']} ({c['bytes'] / 2**20:,.1f} MiB)"
              for op, c in step['collectives'].items()
          )
      )
    else:
      add('  collectives: none')
    kernels = step['custom_calls'].get('tpu_custom_call', 0)
    if kernels:
      add(f'  Pallas kernels (tpu_custom_call): {kernels}')
  hbm = report['hbm_bytes_per_device']
  if hbm is None:
    add(
        f"memory: {_gib(report['bytes_per_device'])} per device; this "
        "device's memory size is unknown"
    )
  else:
    verdict = 'fits' if report['fits'] else 'DOES NOT FIT'
    add(
        f"memory: {verdict}: {_gib(report['bytes_per_device'])} of "
        f"{_gib(hbm)} per device (margin {_gib(report['margin_bytes'])}); "
        f"train state {_gib(report['state_bytes_per_device'])} of it"
    )
  step = report['per_step']
  if step['flops']:
    add(
        f"train step: {step['flops'] / 1e9:,.1f} GFLOP per device, "
        f"collectives per step {step['collectives']} ({step['method']})"
    )
  estimate = report['estimate']
  if estimate:
    mfu = (
        f", MFU {estimate['mfu']:.0%} of the bf16 peak"
        if estimate['mfu']
        else ''
    )
    add(
        f"compiler's estimate (not a measurement): "
        f"{_seconds(estimate['step_seconds'])} per train step, "
        f"{estimate['images_per_second_per_chip']:,.1f} images/s per chip"
        f'{mfu}'
    )
  else:
    add("compiler's estimate: none for this program")
  return '\n'.join(lines)


def _fit_hints(run: config_lib.Run) -> str:
  """The fields that change what a device holds, with their values."""
  mesh = run.mesh.mesh
  hints = [
      f'lower config.batch ({run.data.batch}) or raise config.accum_steps '
      f'({run.loop.accum_steps})',
      f'shard more: config.mesh fsdp or model axes (now {mesh})',
  ]
  remat = _remat_policy(run)
  if remat != 'full':
    hints.append(f"config.model.remat_policy='full' (now {remat!r})")
  if not run.model.scan:
    hints.append('config.scan=True')
  if run.optim.mu_dtype != 'bfloat16':
    hints.append("config.mu_dtype='bfloat16'")
  return '; '.join(hints) + '.'


def refusal(report: dict[str, Any], config: Any) -> str | None:
  """The one-line refusal of a run that does not fit, or None."""
  if report['fits'] is not False:
    return None
  excess = -report['margin_bytes']
  return (
      f"{report['model']} on {report['topology']} needs "
      f"{_gib(report['bytes_per_device'])} per device, {_gib(excess)} "
      f"more than the {_gib(report['hbm_bytes_per_device'])} of a "
      f"{report['device']}: " + _fit_hints(config_lib.parse(config))
  )


def _compile_or_refuse(
    compile_step: Any, what: str, run: config_lib.Run, where: str
) -> Any:
  """`compile_step()`; the compiler's out-of-memory as a one-line refusal."""
  try:
    return compile_step()
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    said = cli.one_line(e).split('RESOURCE_EXHAUSTED: ')[-1].rstrip('.')
    raise AotError(
        f'{run.model.model_name} on {where} does not fit, the compiler says '
        f'of the {what}: "{said}". Change: {_fit_hints(run)}'
    ) from e


FLAGS = flags.FLAGS
flags.DEFINE_string(
    'config',
    None,
    'Experiment config: configs/<file>.py[:arg]; then '
    '--config.<field>=<value> for any field.',
)
flags.DEFINE_string(
    'topology',
    None,
    'TPU slice to compile for, by libtpu name (v3:16x32, '
    "v4:8x8x4, v5e:16x16, v5p:8x8x8, v6e:16x16, ...); default: this host's "
    'devices.',
)
flags.DEFINE_integer(
    'num_classes',
    None,
    "Head size, when the config's " 'dataset cannot say it without its data.',
)
flags.DEFINE_string('json', None, 'Write the report here as JSON.')
flags.DEFINE_string(
    'hlo', None, "Write the compiled train step's HLO text " 'here.'
)
flags.mark_flags_as_required(['config'])


def main(argv, overrides):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = config_lib.load_config_file(FLAGS.config)
  config_lib.apply_overrides(config, overrides)
  config_lib.parse(config)  # A config mistake is refused before all else.
  for flag in ('json', 'hlo'):
    path = getattr(FLAGS, flag)
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
      raise AotError(f'--{flag}={path}: its directory does not exist.')
  if FLAGS.topology and 'JAX_PLATFORMS' not in os.environ:
    # A deviceless compile: never initialise (or wait for) a local TPU.
    jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_threefry_partitionable', True)  # As vit_jax.main.
  report = compile_run(
      config,
      topology=FLAGS.topology,
      num_classes=FLAGS.num_classes,
      hlo_path=FLAGS.hlo,
  )
  print(format_report(report), flush=True)
  if FLAGS.json:
    fileio.write_text_atomic(FLAGS.json, json.dumps(report, indent=1) + '\n')
  message = refusal(report, config)
  if message:
    raise AotError(message)


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  cli.run(main, config_flag='config')
