r"""Prints the VTAB-1k table of a set of runs: each task and each group's mean.

  python -m vit_jax.vtab_summary --workdirs=/tmp/vtab_b16

`--workdirs` is the folder holding one workdir per task (the runs of
`configs/vtab.py`, e.g. /tmp/vtab_b16/clevr_count); each run's config.json
says which task it is. The table lists the 19 tasks' final top-1 accuracy,
the means of the natural (7), specialized (4) and structured (8) groups and
of all 19; a task without a finished run is marked `missing` or
`unfinished` and the means it belongs to read `-`. `--json` also writes the
numbers to a file. See `vit_jax.evaluators.vtab`.
"""

import json

from absl import flags

from vit_jax import cli
from vit_jax import fileio
from vit_jax.evaluators import vtab

FLAGS = flags.FLAGS
flags.DEFINE_string(
    'workdirs', None, 'Folder of the VTAB runs, one workdir per task.'
)
flags.DEFINE_string(
    'json', None, 'Also write the accuracies and means to this JSON file.'
)
flags.mark_flags_as_required(['workdirs'])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments: {argv[1:]}')
  summary = vtab.summarize(FLAGS.workdirs)
  print(vtab.format_summary(summary))
  if FLAGS.json:
    fileio.write_text_atomic(
        FLAGS.json, json.dumps(vtab.to_json(summary), indent=1)
    )


if __name__ == '__main__':
  cli.run(main)
