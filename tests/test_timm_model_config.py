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
