"""config.timm_model: a timm family's model, options and preprocessing in a
run's config, checked when the config is parsed."""

import pytest

from vit_jax import config_lib
from vit_jax import timm_models

NAME = 'vit_tiny_test_family'
ENTRY = timm_models.TimmModel(
    registry='ViT-Ti_16',
    layout='vision_transformer',
    options={'classifier': 'gap', 'layer_norm_epsilon': 1e-5},
    head_dim=64,
    preprocessing={
        'image_size': 96,
        'mean': (0.485, 0.456, 0.406),
        'std': (0.229, 0.224, 0.225),
    },
)


@pytest.fixture(name='family')
def _family(monkeypatch):
  monkeypatch.setitem(timm_models.TIMM_MODELS, NAME, ENTRY)
  return ENTRY


def test_use_timm_model_records_model_options_and_preprocessing(family):
  c = config_lib.get_base()
  config_lib.use_timm_model(c, NAME)
  assert (c.timm_model, c.model_name, c.image_size) == (NAME, 'ViT-Ti_16', 96)
  assert dict(c.model) == {'classifier': 'gap', 'layer_norm_epsilon': 1e-5}
  assert tuple(c.pp.mean) == family.preprocessing['mean']
  assert tuple(c.pp.std) == family.preprocessing['std']
  run = config_lib.parse(c)
  assert run.model.timm_model == NAME
  assert run.model.model_args()['classifier'] == 'gap'


def test_use_timm_model_keeps_the_options_already_set(family):
  """A runlocal model's small patches and depth stay; the family's options
  join them; image_size=False keeps the config's size."""
  del family
  c = config_lib.get_base()
  config_lib.set_runlocal(c)
  config_lib.use_timm_model(c, NAME, image_size=False)
  assert c.image_size == 16
  assert tuple(c.model['patches']['size']) == (4, 4)
  assert c.model['classifier'] == 'gap'


def test_finetune_config_takes_a_timm_model_name(family):
  del family
  finetune = config_lib.load_config_file(
      f'configs/finetune.py:{NAME},digits,linear_probe,runlocal'
  )
  assert finetune.timm_model == NAME
  assert finetune.model_name == 'ViT-Ti_16'
  assert finetune.model['classifier'] == 'gap'
  assert tuple(finetune.pp.mean) == (0.485, 0.456, 0.406)
  config_lib.parse(finetune)


@pytest.mark.parametrize(
    'fields, message',
    [
        ({'timm_model': 'vit_tiny_test_famly'}, 'Did you mean'),
        ({'timm_model': NAME, 'model_name': 'ViT-S_16'}, 'config.model_name'),
        (
            {'pretrained_path': '/tmp/x/model.safetensors'},
            'set config.timm_model',
        ),
    ],
)
def test_timm_model_refusals_are_one_line_at_parse(family, fields, message):
  del family
  c = config_lib.get_base()
  c.update(fields)
  with pytest.raises(ValueError) as e:
    config_lib.parse(c)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_unknown_timm_model_in_use_timm_model_is_one_line():
  with pytest.raises(ValueError) as e:
    config_lib.use_timm_model(config_lib.get_base(), 'vit_nonexistent_model')
  assert 'vit_nonexistent_model' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.slow
def test_linear_probe_from_a_timm_file_keeps_its_backbone(tmp_path):
  """configs/finetune.py:<timm model>,digits,linear_probe with the timm
  .safetensors as config.pretrained_path: the run reads it in timm's layout,
  trains the head only (the backbone ends as the file holds it, bit for bit)
  and records the family's options and normalisation in config.json."""
  # pylint: disable=g-import-not-at-top
  import json

  import jax.numpy as jnp
  import numpy as np
  from safetensors.numpy import load_file

  import helpers
  from vit_jax import checkpoint
  from vit_jax import train
  import vit_jax.models
  # pylint: enable=g-import-not-at-top

  name = 'vit_small_patch14_reg4_dinov2'
  c = config_lib.load_config_file(
      f'configs/finetune.py:{name},digits,linear_probe,runlocal'
  )
  # The runlocal model (4x4 patches, 1 block) with the family's options,
  # random weights, written in timm's layout by our own writer.
  model = vit_jax.models.get_model(
      num_classes=0, **config_lib.parse(c).model.model_args()
  )
  params = helpers.randomize(
      helpers.init_params(model, jnp.zeros((1, 16, 16, 3))), seed=3, scale=0.3
  )
  path = str(tmp_path / 'dinov2.safetensors')
  from vit_jax import timm_interop  # pylint: disable=g-import-not-at-top

  timm_interop.to_timm(model, params, path, timm_model=name)
  assert 'blocks.0.ls1.gamma' in load_file(path)  # timm's names.
  c.pretrained_path = path
  c.tfds_data_dir = str(tmp_path / 'tfds')
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)

  final = checkpoint.flatten(checkpoint.load(f'{workdir}/final_params.npz'))
  ours = checkpoint.flatten(params)
  backbone = [k for k in ours if not k.startswith('head/')]
  assert len(backbone) > 10
  for key in backbone:
    np.testing.assert_array_equal(final[key], ours[key], err_msg=key)
  assert np.abs(final['head/kernel']).max() > 0  # The head trained.
  with open(f'{workdir}/config.json') as f:
    recorded = json.load(f)
  assert recorded['timm_model'] == name
  assert recorded['model_name'] == 'DINOv2-S_14'
  assert recorded['model']['num_registers'] == 4
  assert recorded['pp']['mean'] == [0.485, 0.456, 0.406]
