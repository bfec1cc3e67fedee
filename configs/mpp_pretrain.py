r"""Self-supervised pre-training by masked patch prediction (paper §4.6, B.1.2).

Half of each image's patch embeddings are corrupted (80% [mask], 10% a random
patch, 10% kept) and the model predicts every corrupted patch's 3-bit mean
colour (512 classes). The paper's recipe: Adam, base LR 2e-4, 10k warm-up
steps, cosine decay, batch 4096, 1M steps (diminishing returns after 100k),
224 px, on JFT; here on any image folder or tfds dataset (labels unused).
Fine-tune the result with configs/finetune.py and
`--config.pretrained_path=<workdir>/final_params.npz` (the MPP head and
[mask] token are dropped, a zero head is attached).

  python -m vit_jax.main --config=configs/mpp_pretrain.py:b16 \
      --workdir=gs://bucket/b16_mpp --config.image_folder=/data/images \
      --distributed

`configs/mpp_pretrain.py:runlocal` pre-trains the digits model (Ti width,
2 blocks, 4x4 patches, 16 px) on the bundled digits, without labels, in a
few minutes on a 2-core CPU.
"""

import os

from vit_jax import config_lib

STEPS = 1_000_000


def _sibling_config(name):
  """get_config() of another file in configs/ (found next to this one)."""
  return config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
  )


def get_config(arg='b16'):
  """Returns the config for `<model>[,runlocal]` (`target=4x4|l2` too)."""
  args, runlocal = config_lib.parse_args(arg)
  targets = [a.split('=', 1)[1] for a in args if a.startswith('target=')]
  models = [a for a in args if not a.startswith('target=')]
  c = config_lib.get_base()
  c.model_name = config_lib.resolve_model(models[0] if models else 'b16')
  c.objective = 'mpp'
  c.mpp.target = targets[0] if targets else '3bit'
  c.dataset = 'image_folder'
  c.image_folder_test_percent = 1
  c.image_size = 224
  c.optimizer = 'adam'
  c.base_lr = 2e-4
  c.warmup_steps = 10_000
  c.decay_type = 'cosine'
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.batch = 4096
  c.batch_eval = 4096
  c.total_steps = STEPS
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  c.log_every = 100
  if runlocal:
    # The digits model and data of configs/digits.py, pre-trained without
    # labels (no dropout: the corruption is the regulariser).
    digits = _sibling_config('digits.py')
    for field in (
        'model_name',
        'model',
        'dataset',
        'image_folder',
        'image_size',
        'pp',
        'shuffle_buffer',
        'batch',
        'batch_eval',
        'base_lr',
        'warmup_steps',
    ):
      c[field] = digits[field]
    c.model.transformer.dropout_rate = 0.0
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    # The probe shows what the labels-free features are worth.
    c.evals.fewshot.every = 500
    c.evals.fewshot.shots = (1, 5, 10)
  return c
