"""Command line: train, fine-tune or resume a model.

  python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m vit_jax.main --config=configs/finetune.py:b16,cifar10 \\
      --workdir=gs://bucket/run --config.pretrained_path=gs://vit_models/imagenet21k/ViT-B_16.npz

Any config field can be overridden with `--config.<field>=<value>`, nested
model fields included (`--config.model.transformer.dropout_rate=0.1`);
unknown fields are refused with the closest names. `--print_config` lists
every field with its value and comment, for the config given, and exits.

The workdir is the run's identity: the same command again resumes the run
(or says it is finished); a command that would train something else there
is refused, naming each field that differs. `--overwrite` starts the run in
that workdir from scratch, deleting what an earlier run wrote there.
Ctrl-C (like SIGTERM) saves a checkpoint at the next step and exits;
a second Ctrl-C stops at once. Multi-host: on a Cloud TPU pod or under
SLURM pass `--distributed` (JAX finds the coordinator itself; see
launch/slurm.sbatch); for local multi-process rehearsals pass
`--coordinator_address`, `--num_processes` and `--process_id` (see
launch/local.sh). All logic lives in `vit_jax.train.train_and_evaluate`.
"""

# Before anything heavy is imported: restart once with the process settings
# of vit_jax.runtime (huge pages for malloc), which only apply at start-up.
if __name__ == '__main__':
  from vit_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.reexec_tuned('vit_jax.main')

import logging as pylogging  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app
from absl import flags
from absl import logging
import jax

from vit_jax import cli
from vit_jax import config_lib
from vit_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string(
    'config',
    None,
    'Experiment config: configs/<file>.py[:arg]; then '
    '--config.<field>=<value> for any field (--print_config lists them).',
)
flags.DEFINE_string('workdir', None, 'Run directory (local or gs://).')
flags.DEFINE_bool(
    'print_config',
    False,
    'Print every config field with its '
    'value and comment (after the overrides) and exit.',
)
flags.DEFINE_bool(
    'overwrite',
    False,
    'Start from scratch in a --workdir '
    'that holds a run, deleting its checkpoints, metrics and '
    'final parameters.',
)
flags.DEFINE_bool(
    'distributed',
    False,
    'Call jax.distributed.initialize() (TPU pods: automatic).',
)
flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0, for explicit multi-process runs.',
)
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.DEFINE_list(
    'local_device_ids',
    None,
    'Devices this process drives, e.g. 0,1,2,3 (SLURM with one '
    "process per node: all the node's GPUs; default: what "
    'jax.distributed detects).',
)
flags.mark_flags_as_required(['config'])


def _quiet_orbax(record) -> bool:
  # orbax logs every file it writes at INFO; keep its warnings and errors.
  return 'orbax' not in record.pathname or record.levelno >= pylogging.WARNING


def main(argv, overrides):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = config_lib.load_config_file(FLAGS.config)
  config_lib.apply_overrides(config, overrides)
  if FLAGS.print_config:
    print(config_lib.describe(config))
    return
  if not FLAGS.workdir:
    raise app.UsageError(
        '--workdir is required: the run directory ' '(local or gs://).'
    )
  config_lib.parse(config)  # A config mistake is refused before all else.
  logging.get_absl_handler().addFilter(_quiet_orbax)
  # Global JAX flags belong to the program, not the library. Random bits
  # independent of the sharding (jax's default since 0.5; explicit here so
  # an environment setting cannot turn it off): the same dropout on 1 or 256
  # devices.
  jax.config.update('jax_threefry_partitionable', True)
  if FLAGS.distributed or FLAGS.coordinator_address:
    # Collectives between CPU processes (local rehearsals) need gloo; the
    # option does not affect TPU or GPU backends.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        local_device_ids=(
            [int(i) for i in FLAGS.local_device_ids]
            if FLAGS.local_device_ids
            else None
        ),
    )
  logging.info(
      'JAX process %d/%d, %d local / %d global devices',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  metrics = train.train_and_evaluate(
      config, FLAGS.workdir, overwrite=FLAGS.overwrite
  )
  if 'preempted_at_step' in metrics:
    # Exit 0: the scheduler restarts the job, which then resumes.
    logging.info(
        'Stopped for preemption at step %d.', metrics['preempted_at_step']
    )
  else:
    logging.info('Final evaluation: %s', metrics)


if __name__ == '__main__':
  cli.run(main, config_flag='config')
