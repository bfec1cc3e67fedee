"""Device mesh, parameter and batch sharding, global batch assembly.

The mesh is data: `config.mesh = (('data', -1), ('fsdp', 1))` names the axes
and their sizes (one -1 takes the remaining devices). Batches are split along
their leading axis over *all* mesh axes, so every device holds a distinct
slice of the global batch whatever mix of data and FSDP parallelism is used.

Parameter (and optimizer-state) sharding is data too: `config.sharding_rules`
is a sequence of (regex, spec) pairs matched against each leaf's path
('params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel',
'opt_state/0/mu/...'); the first match wins. A spec is
  'fsdp'       shard the largest dimension divisible by the 'fsdp' axis size
               over it, for tensors of at least `fsdp_min_size` elements
               (smaller ones, and everything when the axis has size 1, are
               replicated);
  'replicate'  replicate;
  a tuple      an explicit PartitionSpec, e.g. (None, 'fsdp').
The default `(('.*', 'fsdp'),)` is plain data parallelism on a mesh whose
'fsdp' axis has size 1, and ZeRO-3-style FSDP when it is larger.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import config_lib

DEFAULT_MESH = (('data', -1), ('fsdp', 1))
DEFAULT_RULES = (('.*', 'fsdp'),)
FSDP_AXIS = 'fsdp'
# Below this many elements a tensor is cheaper to replicate than to gather.
DEFAULT_FSDP_MIN_SIZE = 2**14


def mesh_shape(axes: Sequence[tuple[str, int]],
               num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves the axis sizes of a mesh config for `num_devices` devices.

  Args:
    axes: (name, size) pairs; at most one size may be -1 ("the rest").
    num_devices: Devices available.

  Returns:
    (names, sizes) whose product of sizes is `num_devices`.

  Raises:
    ValueError: naming the config and the device count when they don't fit.
  """
  axes = [(str(name), int(size)) for name, size in axes]
  names = tuple(n for n, _ in axes)
  if len(set(names)) != len(names):
    raise ValueError(f'config.mesh repeats an axis name: {names}.')
  free = [n for n, s in axes if s == -1]
  fixed = int(np.prod([s for _, s in axes if s != -1]))
  if len(free) > 1 or any(s == 0 or s < -1 for _, s in axes):
    raise ValueError(
        f'config.mesh={axes}: sizes must be positive, with at most one -1.')
  if num_devices % fixed:
    raise ValueError(
        f'config.mesh={axes} needs a multiple of {fixed} devices but '
        f'{num_devices} are available; change the axis sizes.')
  sizes = tuple(num_devices // fixed if s == -1 else s for _, s in axes)
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
        f'config.mesh={axes} covers {int(np.prod(sizes))} devices but '
        f'{num_devices} are available; use -1 for one axis or fix the sizes.')
  return names, sizes


def make_mesh(axes: Sequence[tuple[str, int]] = DEFAULT_MESH,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh over all (global) devices, multi-host aware.

  Args:
    axes: (name, size) pairs, e.g. `(('data', -1), ('fsdp', 1))`.
    devices: Defaults to `jax.devices()` (every process's devices).

  Returns:
    A `jax.sharding.Mesh`.
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(axes, len(devices))
  try:
    # Physical topology-aware order on TPU slices.
    device_array = mesh_utils.create_device_mesh(
        sizes, devices=devices)
  except Exception:  # pylint: disable=broad-except
    # CPU/GPU, or shapes mesh_utils cannot map: plain process-major order.
    device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batches: leading axis split over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, *,
                     what: str = 'config.batch') -> int:
  """Returns the per-process batch; raises if it does not split evenly.

  Args:
    global_batch: Batch size over all processes.
    mesh: The device mesh.
    what: Config field named in errors.

  Returns:
    `global_batch // jax.process_count()`.

  Raises:
    ValueError: the batch is not a positive multiple of the process count
      and of the device count.
  """
  processes, devices = jax.process_count(), mesh.devices.size
  if global_batch <= 0:
    raise ValueError(f'{what}={global_batch} must be positive.')
  if global_batch % processes:
    raise ValueError(
        f'{what}={global_batch} is not divisible by the {processes} JAX '
        f'processes; use a multiple of {processes}.')
  if global_batch % devices:
    raise ValueError(
        f'{what}={global_batch} is not divisible by the {devices} devices of '
        f'the mesh; use a multiple of {devices} (e.g. '
        f'{max(1, round(global_batch / devices)) * devices}).')
  return global_batch // processes


def make_global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
  """Assembles per-process numpy batches into global `jax.Array`s.

  Each process passes its own slice (leading axis = global / processes); the
  result is one array per leaf with the global leading dimension, sharded by
  `sharding`. This is the explicit host->device transfer of the input.

  Args:
    local_batch: Pytree of numpy arrays, this process's part of the batch.
    sharding: Usually `batch_sharding(mesh)`.

  Returns:
    Pytree of global `jax.Array`s.
  """
  def to_global(x):
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree_util.tree_map(to_global, local_batch)


def put_global(tree: Any, shardings: Any) -> Any:
  """Places host arrays that every process holds whole into `shardings`.

  Unlike `jax.device_put`, this works when the shardings span devices of
  other processes: each process copies only the shards of its own devices.

  Args:
    tree: Pytree of numpy (or host) arrays, identical on every process; it
      may also hold global `jax.Array`s (they are resharded if needed).
    shardings: Matching pytree (or prefix) of `jax.sharding.Sharding`s.

  Returns:
    Pytree of global `jax.Array`s.
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


def path_str(path: Sequence[Any]) -> str:
  """'a/b/0/c' for a jax tree path."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _fsdp_spec(path: str, shape: tuple[int, ...], mesh: Mesh,
               min_size: int) -> P:
  size = dict(mesh.shape).get(FSDP_AXIS, 1)
  if size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Never the leading layer axis of scanned blocks: each scan iteration
  # would then gather a whole layer from a single device.
  first = 1 if '/encoderblock/' in f'/{path}/' else 0
  candidates = [d for d in range(first, len(shape)) if shape[d] % size == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], -d))
  spec = [None] * len(shape)
  spec[dim] = FSDP_AXIS
  return P(*spec)


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """The PartitionSpec of one leaf under `rules` (first match wins)."""
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      if spec == 'fsdp':
        return _fsdp_spec(path, shape, mesh, fsdp_min_size)
      if spec in ('replicate', None):
        return P()
      spec = tuple(spec)
      if len(spec) > len(shape):
        raise ValueError(f'Sharding rule {pattern!r} -> {spec} has more '
                         f'entries than {path} has dimensions {shape}.')
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, partition_spec(
          path_str(path), tuple(x.shape), mesh, rules, fsdp_min_size)), tree)


def mesh_from_config(config: Any) -> Mesh:
  """The mesh of `config.mesh` over all devices."""
  return make_mesh(tuple(tuple(a) for a in config_lib.get(config, 'mesh')))


def shardings_from_config(tree: Any, mesh: Mesh, config: Any) -> Any:
  """`tree_shardings` with the config's `sharding_rules` / `fsdp_min_size`."""
  return tree_shardings(
      tree, mesh,
      tuple(config_lib.get(config, 'sharding_rules')),
      int(config_lib.get(config, 'fsdp_min_size')))
