"""Command line: train, fine-tune or resume a model.

  python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m vit_jax.main --config=configs/finetune.py:b16,cifar10 \\
      --workdir=gs://bucket/run --config.pretrained_path=gs://vit_models/imagenet21k/ViT-B_16.npz

Any config field can be overridden with `--config.<field>=<value>`; unknown
fields are refused. Multi-host: on a Cloud TPU pod or under SLURM pass
`--distributed` (JAX finds the coordinator itself; see launch/slurm.sbatch);
for local multi-process rehearsals pass `--coordinator_address`,
`--num_processes` and `--process_id` (see launch/local.sh). All logic lives in `vit_jax.train.train_and_evaluate`.
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
from ml_collections import config_flags

from vit_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config: configs/<file>.py[:arg].',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (local or gs://).')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() (TPU pods: automatic).')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for explicit multi-process runs.')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.DEFINE_list('local_device_ids', None,
                  'Devices this process drives, e.g. 0,1,2,3 (SLURM with one '
                  'process per node: all the node\'s GPUs; default: what '
                  'jax.distributed detects).')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  # orbax logs every file it writes at INFO; keep its warnings and errors.
  return 'orbax' not in record.pathname or record.levelno >= pylogging.WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
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
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
        local_device_ids=([int(i) for i in FLAGS.local_device_ids]
                          if FLAGS.local_device_ids else None))
  logging.info('JAX process %d/%d, %d local / %d global devices',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if 'preempted_at_step' in metrics:
    # Exit 0: the scheduler restarts the job, which then resumes.
    logging.info('Stopped for preemption at step %d.',
                 metrics['preempted_at_step'])
  else:
    logging.info('Final evaluation: %s', metrics)


if __name__ == '__main__':
  app.run(main)
