"""Device mesh, parameter and batch sharding, global batch assembly.

The mesh is data: `config.mesh = (('data', -1), ('fsdp', 1))` names the axes
and their sizes (one -1 takes the remaining devices). The axis names are
`MESH_AXES`. The data-like ones, `DATA_AXES` ('data' and 'fsdp': FSDP shards
the batch too), split batches along their leading axis, so the devices of one
data-like position hold a distinct slice of the global batch; the 'model'
axis (tensor parallelism) holds copies of that slice and splits the model.

Parameter (and optimizer-state) sharding is data too: `config.sharding_rules`
is a sequence of (regex, spec) pairs matched against each leaf's path
('params/<module>/.../kernel', 'opt_state/0/mu/<module>/.../kernel', ...);
the first match wins. A spec is
  'auto'       tensor parallelism, then FSDP: the dimensions the model names
               with a logical axis that `LOGICAL_RULES` maps to 'model'
               (attention heads, MLP hidden units: Megatron's split) are
               sharded over the 'model' axis, then the 'fsdp' rule below
               applies to the other dimensions. Without a 'model' axis (or of
               size 1) this is exactly 'fsdp';
  'fsdp'       shard the largest dimension divisible by the 'fsdp' axis size
               over it, for tensors of at least `fsdp_min_size` elements
               (smaller ones, and everything when the axis has size 1, are
               replicated); never the layer axis of stacked (scanned) blocks;
  'replicate'  replicate;
  a tuple      an explicit PartitionSpec, e.g. (None, 'fsdp').
The default `(('.*', 'auto'),)` is plain data parallelism on a mesh whose
'fsdp' and 'model' axes have size 1, ZeRO-3-style FSDP when 'fsdp' is larger,
Megatron-style tensor parallelism when 'model' is, and both together.

Which parameter dimension is which is the model's knowledge, not this
module's: a model family lists (path regex, logical axis names per dimension)
pairs (`vit_jax.models.PARAM_AXES`), and `LOGICAL_RULES` maps logical names
onto mesh axes. The same rules, through flax's logical-axis constraints
(`activation_sharding`), keep the activations between blocks split over the
batch only, so each block's only 'model' collectives are the reductions of
its attention and MLP outputs.

Stacked blocks are found from the tree, not from parameter names: `nn.scan`
with `variable_axes={'params': 0}` (how a model declares scanned layers)
gives every parameter of the scanned module one extra leading axis of the
same length, which no unscanned module has (see `stacked_paths`).
"""

import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import dataclasses
import functools
import itertools
import math
import re
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from vit_jax import models

DEFAULT_MESH = (('data', -1), ('fsdp', 1))
DEFAULT_RULES = (('.*', 'auto'),)
FSDP_AXIS = 'fsdp'
MODEL_AXIS = 'model'
# Axes that split the batch: data parallelism, and FSDP (each of its devices
# computes on its own examples with gathered parameters).
DATA_AXES = ('data', FSDP_AXIS)
# Axes that split the model and see the whole batch slice of their data-like
# position (tensor parallelism).
MODEL_AXES = (MODEL_AXIS,)
MESH_AXES = DATA_AXES + MODEL_AXES
# Logical axis name -> mesh axes, for parameters and activations. Names the
# rules do not list ('embed', 'length', 'head_dim', ...) are not split by
# them ('embed' of a parameter may still be split by FSDP).
LOGICAL_RULES = (
    ('batch', DATA_AXES),
    ('heads', MODEL_AXIS),
    ('mlp', MODEL_AXIS),
)
# Below this many elements a tensor is cheaper to replicate than to gather.
DEFAULT_FSDP_MIN_SIZE = 2**14


def mesh_shape(
    axes: Sequence[tuple[str, int]], num_devices: int
) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves the axis sizes of a mesh config for `num_devices` devices.

  Args:
    axes: (name, size) pairs; names from `MESH_AXES`; at most one size may
      be -1 ("the rest").
    num_devices: Devices available.

  Returns:
    (names, sizes) whose product of sizes is `num_devices`.

  Raises:
    ValueError: naming the config and the device count when they don't fit,
      or an axis name that is not one of `MESH_AXES`.
  """
  axes = [(str(name), int(size)) for name, size in axes]
  names = tuple(n for n, _ in axes)
  if len(set(names)) != len(names):
    raise ValueError(f'config.mesh repeats an axis name: {names}.')
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    # Whether an axis splits the batch depends on its name; an unknown one
    # would silently hold copies of the batch.
    raise ValueError(
        f'config.mesh={axes}: unknown axis name(s) {unknown}; use names from '
        f'{MESH_AXES} ({DATA_AXES} split the batch).'
    )
  free = [n for n, s in axes if s == -1]
  fixed = int(np.prod([s for _, s in axes if s != -1]))
  if len(free) > 1 or any(s == 0 or s < -1 for _, s in axes):
    raise ValueError(
        f'config.mesh={axes}: sizes must be positive, with at most one -1.'
    )
  if num_devices % fixed:
    raise ValueError(
        f'config.mesh={axes} needs a multiple of {fixed} devices but '
        f'{num_devices} are available; change the axis sizes.'
    )
  sizes = tuple(num_devices // fixed if s == -1 else s for _, s in axes)
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
        f'config.mesh={axes} covers {int(np.prod(sizes))} devices but '
        f'{num_devices} are available; use -1 for one axis or fix the sizes.'
    )
  return names, sizes


def _multi_slice_devices(
    names: tuple[str, ...],
    sizes: tuple[int, ...],
    devices: Sequence[Any],
    slice_sizes: Sequence[int],
) -> np.ndarray | None:
  """Devices of a mesh over several slices (TPU multi-slice), or None.

  The slow network between slices (DCN) carries one data-like axis, 'data'
  first: data parallelism only all-reduces gradients once per step, where
  FSDP gathers parameters at every layer. Within a slice the order follows
  its physical topology.

  Args:
    names: Mesh axis names.
    sizes: Mesh axis sizes.
    devices: All devices of the mesh.
    slice_sizes: Number of devices of each slice.

  Returns:
    The device array, or None when no data-like axis splits evenly over the
    slices or the slices differ in size.
  """
  num_slices = len(slice_sizes)
  if len(set(slice_sizes)) != 1:
    return None
  for axis in DATA_AXES:
    if axis in names and sizes[names.index(axis)] % num_slices == 0:
      dcn = tuple(num_slices if n == axis else 1 for n in names)
      ici = tuple(s // d for s, d in zip(sizes, dcn))
      return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  return None


def _device_array(
    names: tuple[str, ...], sizes: tuple[int, ...], devices: Sequence[Any]
) -> np.ndarray:
  """Devices in mesh order: topology-aware where possible, else plain."""
  slice_sizes: dict[int, int] = {}
  for device in devices:
    key = getattr(device, 'slice_index', 0)
    slice_sizes[key] = slice_sizes.get(key, 0) + 1
  try:
    if len(slice_sizes) == 1:
      # CPU / GPU: process-major (GPU: by id); TPU: physical topology.
      try:
        return jax.make_mesh(
            sizes, names, (AxisType.Auto,) * len(names), devices=devices
        ).devices
      except NotImplementedError:
        # An axis size that is no product of whole physical axes (fsdp 16
        # on a v4 8x8x4 slice): splitting a physical axis keeps each mesh
        # axis on a box of neighbouring chips, which the plain device order
        # below does not.
        return mesh_utils.create_device_mesh(
            sizes, devices, allow_split_physical_axes=True
        )
    array = _multi_slice_devices(
        names, sizes, devices, list(slice_sizes.values())
    )
    why = (
        f'no data-like axis of {dict(zip(names, sizes))} splits evenly '
        f'over the slices {slice_sizes}'
    )
  except NotImplementedError as e:
    # The documented answer of jax's mesh utilities when the axis sizes do
    # not map onto the physical (TPU) axes.
    array, why = None, str(e)
  if array is not None:
    return array
  logging.warning(
      'Mesh %s uses the plain device order: %s.', dict(zip(names, sizes)), why
  )
  return np.asarray(devices).reshape(sizes)


def make_mesh(
    axes: Sequence[tuple[str, int]] = DEFAULT_MESH,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a mesh over all (global) devices, multi-host aware.

  The device order is `jax.make_mesh`'s (the physical topology on TPU); over
  several TPU slices it is a hybrid mesh whose slices lie along a data-like
  axis (`mesh_utils.create_hybrid_device_mesh`). Axis shardings are `Auto`:
  the compiler propagates them from the explicit shardings of each `jit`.

  Args:
    axes: (name, size) pairs, e.g. `(('data', -1), ('fsdp', 1))`.
    devices: Defaults to `jax.devices()` (every process's devices).

  Returns:
    A `jax.sharding.Mesh`.

  Raises:
    ValueError: the axes do not fit the devices (see `mesh_shape`).
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(axes, len(devices))
  return Mesh(
      _device_array(names, sizes, devices),
      names,
      axis_types=(AxisType.Auto,) * len(names),
  )


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes that split the batch: the `DATA_AXES` of `mesh`, in order."""
  return tuple(name for name in mesh.axis_names if name in DATA_AXES)


def batch_shards(mesh: Mesh) -> int:
  """Distinct slices of a batch: the product of the data-like axis sizes."""
  return math.prod(mesh.shape[name] for name in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batches: leading axis split over the data-like axes.

  Devices that differ only in a non-data axis (e.g. 'model') hold the same
  examples.

  Args:
    mesh: The device mesh.

  Returns:
    `NamedSharding(mesh, P(batch_axes(mesh)))`.
  """
  return NamedSharding(mesh, P(batch_axes(mesh) or None))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of stacked micro-batches `[accum, B / accum, ...]`.

  Each micro-batch is split over the data-like axes like a whole batch.

  Args:
    mesh: The device mesh.

  Returns:
    `NamedSharding(mesh, P(None, batch_axes(mesh)))`.
  """
  return NamedSharding(mesh, P(None, batch_axes(mesh) or None))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, P())


def check_batch_size(
    global_batch: int, mesh: Mesh, *, what: str = 'config.batch'
) -> int:
  """Returns the per-process batch; raises if it does not split evenly.

  Args:
    global_batch: Batch size over all processes.
    mesh: The device mesh.
    what: Config field named in errors.

  Returns:
    `global_batch // jax.process_count()`.

  Raises:
    ValueError: the batch is not a positive multiple of the process count
      and of `batch_shards(mesh)` (the device count when every mesh axis is
      data-like).
  """
  processes, shards = jax.process_count(), batch_shards(mesh)
  if global_batch <= 0:
    raise ValueError(f'{what}={global_batch} must be positive.')
  if global_batch % processes:
    raise ValueError(
        f'{what}={global_batch} is not divisible by the {processes} JAX '
        f'processes; use a multiple of {processes}.'
    )
  if global_batch % shards:
    if shards == mesh.devices.size:
      where = f'the {shards} devices of the mesh'
    else:
      axes = batch_axes(mesh)
      where = (
          f'the {shards} batch shards of the mesh ('
          f'{" x ".join(axes) or "no data-like axis"} = '
          f'{" x ".join(str(mesh.shape[a]) for a in axes) or 1}; the '
          f'other axes hold copies)'
      )
    raise ValueError(
        f'{what}={global_batch} is not divisible by {where}; use a multiple '
        f'of {shards} (e.g. {max(1, round(global_batch / shards)) * shards}).'
    )
  return global_batch // processes


def make_global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
  """Assembles per-process numpy batches into global `jax.Array` values.

  Each process passes its own slice (leading axis = global / processes); the
  result is one array per leaf with the global leading dimension, sharded by
  `sharding`. This is the explicit host->device transfer of the input.

  Args:
    local_batch: Pytree of numpy arrays, this process's part of the batch.
    sharding: Usually `batch_sharding(mesh)`.

  Returns:
    Pytree of global `jax.Array` values.
  """

  def to_global(x):
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree_util.tree_map(to_global, local_batch)


def prefetch_to_device(
    batches: Iterator[Any], sharding: Any, size: int = 2
) -> Iterator[Any]:
  """Turns local numpy batches into global `jax.Array`s, `size` ahead.

  Transfers are asynchronous, so keeping `size` batches in flight overlaps
  the host->device copy of the next batches with the current step.

  Args:
    batches: Iterator of this process's numpy batches.
    sharding: Batch sharding, e.g. `sharding.batch_sharding(mesh)`.
    size: Batches in flight.

  Yields:
    Pytrees of global arrays.
  """
  queue: collections.deque[Any] = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(batches, n):
      queue.append(make_global_batch(batch, sharding))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)


def put_global(tree: Any, shardings: Any) -> Any:
  """Places host arrays that every process holds whole into `shardings`.

  Unlike `jax.device_put`, this works when the shardings span devices of
  other processes: each process copies only the shards of its own devices.

  Args:
    tree: Pytree of numpy (or host) arrays, identical on every process; it
      may also hold global `jax.Array` values (they are resharded if needed).
    shardings: Matching pytree (or prefix) of `jax.sharding.Sharding` objects.

  Returns:
    Pytree of global `jax.Array` values.
  """

  def put(x, sharding):
    if isinstance(x, jax.Array):
      if x.sharding == sharding:
        return x
      return jax.jit(lambda a: a, out_shardings=sharding)(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  def put_subtree(sharding, subtree):
    return jax.tree_util.tree_map(lambda x: put(x, sharding), subtree)

  # Mapping over `shardings` first lets one sharding stand for a subtree.
  return jax.tree_util.tree_map(put_subtree, shardings, tree)


def _key_str(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """'a/b/0/c' for a jax tree path."""
  return '/'.join(_key_str(key) for key in path)


def stacked_paths(tree: Any) -> frozenset[str]:
  """Paths (`path_str`) of the leaves whose leading axis stacks layers.

  `nn.scan(..., variable_axes={'params': 0})` gives every parameter of the
  scanned module a leading axis of the number of layers. So a subtree (below
  the root) of at least two leaves that all have that shape, at least two
  dimensions with the same leading size, is a stack of layers; in an
  unscanned module some leaf (a bias, a norm scale) is a vector or leads with
  another size. Optimizer states and averages mirror the parameters, so their
  copies of a stack are found the same way. Only the tree's shapes are read:
  no parameter name is assumed.

  Args:
    tree: Pytree of arrays or `jax.ShapeDtypeStruct` objects.

  Returns:
    The leaves' paths inside a stack.
  """
  leaves = [
      (tuple(_key_str(k) for k in path), tuple(np.shape(x)))
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]
  nodes: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
  for keys, shape in leaves:
    for depth in range(1, len(keys)):
      nodes.setdefault(keys[:depth], []).append(shape)

  def is_stack(shapes):
    return (
        len(shapes) > 1
        and all(len(s) > 1 for s in shapes)
        and len({s[0] for s in shapes}) == 1
    )

  stacks = {node for node, shapes in nodes.items() if is_stack(shapes)}
  return frozenset(
      '/'.join(keys)
      for keys, _ in leaves
      if any(keys[:depth] in stacks for depth in range(1, len(keys)))
  )


def _mesh_axes_of(logical_name: str, mesh: Mesh) -> tuple[str, ...]:
  """The axes of `mesh` that `LOGICAL_RULES` map `logical_name` onto."""
  axes = dict(LOGICAL_RULES).get(logical_name, ())
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if a in mesh.axis_names)


def logical_axis_rules(mesh: Mesh) -> tuple[tuple[str, Any], ...]:
  """`LOGICAL_RULES` as flax logical-axis rules over the axes of `mesh`."""
  rules = []
  for name, _ in LOGICAL_RULES:
    axes = _mesh_axes_of(name, mesh)
    rules.append((name, axes[0] if len(axes) == 1 else (axes or None)))
  return tuple(rules)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
  """Within: the model's logical activation constraints resolve on `mesh`.

  Enter it inside the traced function (e.g. the body of a `jax.jit`): it sets
  the abstract mesh and flax's logical-axis rules that
  `nn.with_logical_constraint` reads. Outside it the constraints are no-ops.

  Args:
    mesh: The device mesh (axis types `Auto`, as `make_mesh` builds it).

  Yields:
    Nothing.
  """
  with (
      jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
      nn.logical_axis_rules(logical_axis_rules(mesh)),
  ):
    yield


def on_mesh(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """`fn` run inside `activation_sharding(mesh)`: what every jitted model
  call on a mesh traces, so that the activation constraints resolve and the
  TPU kernels find the mesh they run per shard on."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with activation_sharding(mesh):
      return fn(*args, **kwargs)

  return wrapped


def _logical_names(
    path: str, param_axes: Sequence[tuple[str, Sequence[str]]]
) -> tuple[str, ...] | None:
  for pattern, names in param_axes:
    if re.fullmatch(pattern, path):
      return tuple(names)
  return None


# One dimension's entry of a PartitionSpec: a mesh axis, several, or None.
_AxisSpec = str | tuple[str, ...] | None


def _tensor_parallel_spec(
    path: str,
    shape: tuple[int, ...],
    mesh: Mesh,
    names: tuple[str, ...] | None,
    stacked: bool,
) -> list[_AxisSpec]:
  """Per-dimension mesh axes of the leaf's logical names (None: not split).

  Only axes of size > 1 split anything. A leaf the model names no axes of
  is left whole.

  Raises:
    ValueError: the names do not fit the leaf's rank, or a split dimension
      is not divisible by its axis (naming the leaf, dimension and axis).
  """
  spec: list[_AxisSpec] = [None] * len(shape)
  if names is None:
    return spec
  offset = 1 if stacked else 0  # The layer axis of a scanned stack.
  if len(names) != len(shape) - offset:
    raise ValueError(
        f'{path}: logical axes {names} (one per dimension of one layer) do '
        f"not fit its shape {shape}; fix the model's PARAM_AXES."
    )
  for i, name in enumerate(names):
    axes = [a for a in _mesh_axes_of(name, mesh) if mesh.shape[a] > 1]
    if not axes:
      continue
    size = math.prod(mesh.shape[a] for a in axes)
    dim = shape[offset + i]
    if dim % size:
      raise ValueError(
          f'{path} {shape}: its {name!r} dimension ({dim}) is not divisible '
          f'by the mesh axis {" x ".join(axes)} ({size}); use a config.mesh '
          f'size for {" x ".join(axes)} that divides the model\'s {name} '
          f'({dim}).'
      )
    spec[offset + i] = axes[0] if len(axes) == 1 else tuple(axes)
  return spec


def _fsdp_spec(
    shape: tuple[int, ...],
    mesh: Mesh,
    min_size: int,
    stacked: bool,
    taken: Sequence[_AxisSpec] | None = None,
) -> P:
  """'fsdp' on the dimensions that `taken` (an existing spec) leaves free."""
  spec: list[_AxisSpec] = (
      list(taken) if taken is not None else [None] * len(shape)
  )
  size = dict(mesh.shape).get(FSDP_AXIS, 1)
  # Never the leading layer axis of stacked blocks: each scan iteration
  # would then gather a whole layer from a single device.
  first = 1 if stacked else 0
  candidates = [
      d
      for d in range(first, len(shape))
      if shape[d] % size == 0 and spec[d] is None
  ]
  if (
      size > 1
      and candidates
      and int(np.prod(shape, dtype=np.int64)) >= min_size
  ):
    spec[max(candidates, key=lambda d: (shape[d], -d))] = FSDP_AXIS
  # P() for a whole leaf: NamedShardings compare by spec, P() != P(None).
  return P(*spec) if any(a is not None for a in spec) else P()


RULE_SPECS = ('auto', 'fsdp', 'replicate')


def check_rules(rules: Sequence[Any]) -> None:
  """Refuses sharding rules that are not (regex, spec) pairs of known specs.

  Args:
    rules: `config.sharding_rules`.

  Raises:
    ValueError: naming the rule and what is wrong with it.
  """
  for i, rule in enumerate(rules):
    where = f'config.sharding_rules[{i}]={rule!r}'
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f'{where} is not a (regex, spec) pair.')
    pattern, spec = rule
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f'{where}: {pattern!r} is not a regex ({e}).') from e
    if spec is None or spec in RULE_SPECS:
      continue
    entries = spec if isinstance(spec, (tuple, list)) else [spec]
    names = [
        n for e in entries for n in (e if isinstance(e, (tuple, list)) else [e])
    ]
    if isinstance(spec, str) or any(
        n is not None and n not in MESH_AXES for n in names
    ):
      raise ValueError(
          f'{where}: the spec is not one of {RULE_SPECS} nor a tuple of mesh '
          f'axis names from {MESH_AXES} (or None) per dimension.'
      )


def partition_spec(
    path: str,
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
    *,
    stacked: bool = False,
    param_axes: Sequence[tuple[str, Sequence[str]]] = (),
) -> P:
  """The PartitionSpec of one leaf under `rules` (first match wins).

  Args:
    path: The leaf's path ('params/.../kernel').
    shape: The leaf's shape.
    mesh: The device mesh (only its axis sizes are read).
    rules: (regex, spec) pairs, see the module docstring.
    fsdp_min_size: Smallest tensor the 'fsdp' rule shards.
    stacked: Whether dimension 0 stacks layers (`stacked_paths`); the
      'fsdp' rule never shards it.
    param_axes: The model's (path regex, logical axis names) pairs, read by
      the 'auto' rule (`vit_jax.models.PARAM_AXES`).

  Returns:
    A `PartitionSpec`.

  Raises:
    ValueError: an explicit spec has more entries than the leaf dimensions,
      or (rule 'auto') a tensor-parallel dimension does not divide evenly.
  """
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      if spec == 'auto':
        taken = _tensor_parallel_spec(
            path, shape, mesh, _logical_names(path, param_axes), stacked
        )
        return _fsdp_spec(shape, mesh, fsdp_min_size, stacked, taken)
      if spec == 'fsdp':
        return _fsdp_spec(shape, mesh, fsdp_min_size, stacked)
      if spec in ('replicate', None):
        return P()
      spec = tuple(spec)
      if len(spec) > len(shape):
        raise ValueError(
            f'Sharding rule {pattern!r} -> {spec} has more '
            f'entries than {path} has dimensions {shape}.'
        )
      return P(*spec)
  return P()


def tree_shardings(
    tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
    param_axes: Sequence[tuple[str, Sequence[str]]] = (),
) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs).

  Args:
    tree: The state (or parameters) to shard.
    mesh: The device mesh.
    rules: (regex, spec) pairs, see the module docstring.
    fsdp_min_size: Smallest tensor the 'fsdp' rule shards.
    param_axes: The model's logical axes (see `partition_spec`).

  Returns:
    A matching tree of `NamedSharding` objects.
  """
  stacked = stacked_paths(tree)
  params = _parameter_shapes(tree)

  def leaf_sharding(path, x):
    path = path_str(path)
    shape = tuple(x.shape)
    is_stacked, axes = path in stacked, param_axes
    param = _mirrored_parameter(path, params)
    if param is not None and shape == params[param]:
      # A copy of a parameter (Adam's moments, the EMA) is a stack when the
      # parameter is, even beside leaves of other shapes that hide it.
      is_stacked = f'{_PARAMS}/{param}' in stacked
    elif param is not None:
      # A statistic reduced from the parameter (Adafactor's factored second
      # moments, optax's one-element stand-ins): small, and its dimensions
      # are not the parameter's, so no tensor-parallel split.
      is_stacked, axes = False, ()
    return NamedSharding(
        mesh,
        partition_spec(
            path,
            shape,
            mesh,
            rules,
            fsdp_min_size,
            stacked=is_stacked,
            param_axes=axes,
        ),
    )

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


# The parameters' entry in a train state (`train.TrainState.params`).
_PARAMS = 'params'


def _parameter_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{path below the state's parameters: shape}; {} for other trees."""
  if isinstance(tree, Mapping):
    params = tree.get(_PARAMS)
  else:
    params = getattr(tree, _PARAMS, None)
  if params is None:
    return {}
  return {
      path_str(p): tuple(np.shape(x))
      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def _mirrored_parameter(
    path: str, params: Mapping[str, tuple[int, ...]]
) -> str | None:
  """The parameter whose path ends `path` (the longest such), if any.

  An optimizer state or an average keeps its copy of a parameter under the
  parameter's own path ('opt_state/0/mu/<path>', 'ema_params/<path>').
  """
  keys = path.split('/')
  for start in range(1, len(keys)):
    candidate = '/'.join(keys[start:])
    if candidate in params:
      return candidate
  return None


@dataclasses.dataclass(frozen=True)
class MeshSection:
  """Device mesh and parameter sharding (checked when a config is parsed).

  Attributes:
    mesh: ((axis name, size), ...); one size may be -1 (the rest).
    sharding_rules: ((regex, spec), ...) per parameter path.
    fsdp_min_size: Smaller tensors are replicated under FSDP.
  """

  mesh: tuple[tuple[str, int], ...]
  sharding_rules: tuple[tuple[str, Any], ...]
  fsdp_min_size: int

  def __post_init__(self):
    check_rules(self.sharding_rules)


def mesh_from_config(section: MeshSection) -> Mesh:
  """The mesh of the run's mesh section (`mesh` axes) over all devices."""
  return make_mesh(section.mesh)


def shardings_from_config(tree: Any, mesh: Mesh, section: MeshSection) -> Any:
  """`tree_shardings` with the section's `sharding_rules`, `fsdp_min_size`
  and the logical axes of the models' parameters."""
  return tree_shardings(
      tree,
      mesh,
      section.sharding_rules,
      int(section.fsdp_min_size),
      models.PARAM_AXES,
  )
