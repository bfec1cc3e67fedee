r"""VTAB-1k: fine-tuning on one of the 19 tasks with the paper's recipe.

The fine-tuning recipe of configs/finetune.py (SGD momentum 0.9, batch 512,
cosine decay, no weight decay, clipping at global norm 1, 384 px, a new
zero-initialised head) with the VTAB row of the paper's Table 4: 2,500
steps at learning rate 0.01, the same for every task (Appendix B.1.1). Each
run trains on the task's 1,000 examples (`train800val200`) and reports the
accuracy on its test split, evaluated once, at the end:

  python -m vit_jax.main --config=configs/vtab.py:b16,clevr_count \
      --workdir=/tmp/vtab_b16/clevr_count \
      --config.pretrained_path=gs://vit_models/imagenet21k/ViT-B_16.npz \
      --config.tfds_data_dir=/data/tfds

Argument: `<model>,<task>[,runlocal]`; model a registry or short name (b16,
l16, ...), task one of `vit_jax.datasets.vtab.TASKS` (caltech101, cifar100,
dtd, oxford_flowers102, oxford_iiit_pet, sun397, svhn, patch_camelyon,
eurosat, resisc45, diabetic_retinopathy, clevr_count, clevr_distance,
dmlab, dsprites_location, dsprites_orientation, kitti_distance,
smallnorb_azimuth, smallnorb_elevation). The paper chose its one setting
on the 200 validation examples: `--config.eval_split=holdout` trains on
`train800` and evaluates on `val200`. `runlocal` keeps the task and makes
the model and the run tiny (seconds on a CPU, for prepared data).

All 19 tasks, each in its own workdir under one folder, then the table of
the tasks and the means of the three groups (the launcher prints it when it
ends; `vit_jax.vtab_summary` prints it at any time):

  launch/vtab.sh b16 /tmp/vtab_b16 --config.pretrained_path=...
  python -m vit_jax.vtab_summary --workdirs=/tmp/vtab_b16
"""

import os

from vit_jax import config_lib
from vit_jax.datasets import vtab

STEPS = 2_500  # Table 4, VTAB (19 tasks).
BASE_LR = 0.01  # Table 4: one learning rate for all tasks.


def _sibling_config(spec):
  """get_config(arg) of another file in configs/ (found next to this one)."""
  return config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), spec)
  )


def get_config(arg='b16,caltech101'):
  """Returns the config for `<model>,<task>[,runlocal]`."""
  args, runlocal = config_lib.parse_args(arg)
  if len(args) != 2:
    raise ValueError(f'vtab.py takes "<model>,<task>[,runlocal]", got {arg!r}.')
  model, task = args
  dataset = vtab.get_task(task).dataset
  c = _sibling_config(f'finetune.py:{model},{dataset}')
  c.total_steps = STEPS
  c.base_lr = BASE_LR
  c.warmup_steps = min(500, STEPS // 10)  # finetune.py's rule at 2,500.
  # The test split is the reported number, not a signal to select on: one
  # evaluation, at the end.
  c.eval_every = STEPS
  c.checkpoint_every = 500
  if runlocal:
    config_lib.set_runlocal(c)
    c.dataset = dataset  # set_runlocal's data is digits: keep the task.
  return c
