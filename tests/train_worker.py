"""Five deterministic training steps, in-process or as one of N processes.

Used by test_train.py to check that losses and parameters do not depend on
the device count, the sharding (data parallel / FSDP / tensor parallel) or
the process count. As a script (started by launch/local.py) it takes the
coordinator flags and writes the losses and parameters of process 0 to --out.
"""

import argparse
import json
import os
import sys

import numpy as np

NUM_STEPS = 5
GLOBAL_BATCH = 16
# --mesh of the script: data parallel, FSDP, and tensor parallel inside each
# process (its 4 devices: fsdp 2 x model 2) with 'data' across the processes.
MESHES = {
    'data': (('data', -1), ('fsdp', 1)),
    'fsdp': (('data', 1), ('fsdp', -1)),
    'data_fsdp_model': (('data', 2), ('fsdp', 2), ('model', 2)),
}


def config_for(mesh_axes, accum_steps=1):
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top

  c = config_lib.get_base()
  c.model_name = 'testing'
  # Widths divisible by 8 so that FSDP over 8 devices has work to do, and
  # heads and MLP width divisible by 4 for a 'model' axis of 4.
  c.model = {
      'patches': {'size': (4, 4)},
      'hidden_size': 16,
      'transformer': {
          'num_layers': 2,
          'mlp_dim': 32,
          'num_heads': 4,
          'dropout_rate': 0.1,
          'attention_dropout_rate': 0.1,
      },
  }
  c.image_size = 16
  c.batch = GLOBAL_BATCH
  c.accum_steps = accum_steps
  c.optimizer = 'adam'
  c.base_lr = 1e-2
  c.warmup_steps = 1
  c.total_steps = NUM_STEPS
  c.weight_decay = 0.1
  c.mesh = mesh_axes
  c.fsdp_min_size = 1  # Shard every tensor with a divisible dimension.
  return c


def global_batches(num_classes=7):
  rng = np.random.default_rng(0)
  for _ in range(NUM_STEPS):
    images = rng.uniform(-1, 1, (GLOBAL_BATCH, 16, 16, 3)).astype(np.float32)
    labels = np.eye(num_classes, dtype=np.float32)[
        rng.integers(0, num_classes, GLOBAL_BATCH)
    ]
    yield {'image': images, 'labels': labels}


def run_steps(mesh_axes, devices=None, accum_steps=1):
  """Returns (losses, host params) after NUM_STEPS steps."""
  import jax  # pylint: disable=g-import-not-at-top

  # pylint: disable=g-import-not-at-top
  from vit_jax import config_lib
  from vit_jax import objectives
  from vit_jax import optim
  from vit_jax import sharding
  from vit_jax import train
  # pylint: enable=g-import-not-at-top
  jax.config.update('jax_threefry_partitionable', True)
  run = config_lib.parse(config_for(mesh_axes, accum_steps))
  mesh = sharding.make_mesh(mesh_axes, devices)
  train.check_batches(run, mesh)
  objective = objectives.get(run.objective)
  model = train.build_model(run.model, objective, num_classes=7)
  tx, _ = optim.make_optimizer(run.optim)
  init_rng, step_rng = jax.random.split(jax.random.key(0))
  state, shardings, _ = train.create_train_state(
      run, objective, model, tx, mesh, init_rng
  )
  step_fn = train.make_train_step(
      run.loop, objective, model, tx, mesh, shardings
  )
  batch_sharding = sharding.batch_sharding(mesh)
  losses = []
  for batch in global_batches():
    # Every process builds the same global batch; each device takes its rows.
    batch = {
        k: jax.make_array_from_callback(
            v.shape, batch_sharding, lambda idx, v=v: v[idx]
        )
        for k, v in batch.items()
    }
    state, metrics = step_fn(state, batch, step_rng)
    losses.append(float(metrics['loss']))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  params = jax.tree_util.tree_map(
      lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
      if not x.is_fully_addressable
      else np.asarray(x),
      state.params,
  )
  return losses, params, state


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--mesh', default='data', choices=sorted(MESHES))
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      args.coordinator_address, args.num_processes, args.process_id
  )
  losses, params, _ = run_steps(MESHES[args.mesh])
  if jax.process_index() == 0:
    from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top

    np.savez(args.out + '.npz', **checkpoint.flatten(params))
    with open(args.out + '.json', 'w') as f:
      json.dump(
          {
              'losses': losses,
              'devices': jax.device_count(),
              'processes': jax.process_count(),
          },
          f,
      )
  jax.distributed.shutdown()


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main()
