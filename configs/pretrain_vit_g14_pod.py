r"""ViT-G/14 pre-training on a TPU pod slice: the mesh of a 1.8B-parameter ViT.

ViT-G/14 ("Scaling Vision Transformers", Zhai et al. 2021, Table 2): width
1664, depth 48, MLP 8192, 16 heads, 1.84B parameters with a 1000-class head
(docs/models.md's table). It trains with the paper's modified Adafactor
(`optimizer='adafactor'`, big_vision's values): factored second moment whose
decay is capped at 0.999, momentum 0.9 kept in bfloat16, no clipping of the
update; learning rate 8e-4, decoupled weight decay 0.03, global-norm
clipping at 1; the head's kernel decays 100x more (3.0, a parameter group).
One part of big_vision's recipe is not reproduced: its schedule is
reciprocal square root with a final cooldown, where this config decays
linearly after the 10k warm-up. JFT is
private: point `image_folder` at your own collection.

The mesh, for 256 chips (`MESH`; e.g. a TPU v4-512 slice, 32 GiB per chip):

  ('data', -1) x ('fsdp', 16) x ('model', 4)

* 'model' 4, tensor parallelism (vit_jax.sharding's Megatron split): each
  chip holds 4 of the 16 heads and 2048 of the 8192 MLP units of every block;
  a block costs two all-reduces of its [batch, 257, 1664] activations forward
  and two backward, so the axis stays small and inside one slice's fast
  interconnect (`jax.make_mesh` lays the mesh onto the slice's topology).
* 'fsdp' 16: parameters and Adafactor's momentum (bfloat16, `mu_dtype`)
  shard 16 ways more; each layer's weights are gathered just in time. With
  'model' that is 64-way. The second moment is factored into a row and a
  column vector per matrix, so the train state is about 6 bytes a
  parameter: 170 MiB per chip of 10.4 GiB in all, where Adam's float32 second
  moment would make it 10 bytes (tests/test_train.py computes it from the
  shapes: `test_vit_g14_pod_config_fits_its_mesh`).
* 'data' the rest (4 on 256 chips), and the axis that spans slices over the
  data-centre network on a multi-slice job: it only all-reduces gradients
  once per step.
* The batch (4096) splits over data x fsdp = 64 shards: 64 examples per
  chip, copied over the 4 'model' chips of each shard.

Compiled for that slice by the TPU compiler (libtpu 0.0.42.1, deviceless,
2026-12-07):

  python -m vit_jax.aot --config=configs/pretrain_vit_g14_pod.py \
      --topology=v4:8x8x4 --num_classes=18291

the train step needs 3.93 GiB per chip of its 32 GiB: 239 MiB of arguments
(the state's shards and the batch), 3.67 GiB of temporaries (`scan` with
`remat_policy='full'` keeps only each block's input and recomputes one
block at a time; bfloat16 compute with float32 softmax, LayerNorm and loss)
and 29 MiB of code; the eval step 0.39 GiB. `attention_impl='auto'` picks
splash there (the compiler's estimate for one layer: splash 2.59 ms, flash
2.61 ms, xla 8.85 ms). The compiler estimates 0.42 s per step, 38 images/s
per chip, 48% of the bf16 peak: an estimate of its cost model, not a
measurement. On another chip count, keep 'model' 4
and 'fsdp' 16 and let 'data' absorb the rest (the batch must divide by
data x fsdp); on chips with 16 GiB, raise 'fsdp' first.

  python -m vit_jax.main --config=configs/pretrain_vit_g14_pod.py \
      --workdir=gs://bucket/g14 --config.image_folder=/data/jft --distributed

`runlocal` keeps the mesh's axes but lets them fit any device count (on 8
simulated CPU devices: `--config.mesh="(('data', 2), ('fsdp', 2), ('model',
2))"`).
"""

from vit_jax import config_lib

MESH = (('data', -1), ('fsdp', 16), ('model', 4))
JFT_IMAGES = 303_000_000
EPOCHS = 7


def get_config(arg=''):
  """Returns the config for `[runlocal]`."""
  args, runlocal = config_lib.parse_args(arg)
  if args:
    raise ValueError(
        f'pretrain_vit_g14_pod.py takes only runlocal, not ' f'{args}.'
    )
  c = config_lib.pretraining_base('ViT-G_14', dropout=0.0)
  c.dataset = 'image_folder'
  c.image_folder_test_percent = 1
  c.loss = 'sigmoid_xent'
  c.optimizer = 'adafactor'
  c.momentum = 0.9
  c.mu_dtype = 'bfloat16'
  c.beta2 = 0.999  # The cap of Adafactor's second-moment decay.
  c.base_lr = 8e-4
  c.decay_type = 'linear'  # big_vision: rsqrt with a cooldown.
  c.weight_decay = 0.03
  c.param_groups = (('^head/', {'weight_decay': 3.0}),)  # big_vision's.
  c.total_steps = EPOCHS * JFT_IMAGES // c.batch
  c.compute_dtype = 'bfloat16'
  c.scan = True
  c.model.remat_policy = 'full'
  c.model.attention_impl = 'auto'
  c.mesh = MESH
  if runlocal:
    config_lib.set_runlocal(c)
    c.model.remat_policy = 'full'
    c.mesh = (('data', -1), ('fsdp', 1), ('model', 1))
  return c
