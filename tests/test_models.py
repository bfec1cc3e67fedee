"""Tests of `vit_jax.models`: registry, parameter counts, shapes, options."""

import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import init_params
from helpers import random_images
from helpers import randomize
from helpers import tiny_model
import vit_jax.models
from vit_jax.models import vit

# Exact parameter counts with a 1000-class head at 224x224. The ViT, hybrid
# and Mixer figures equal those of the original google-research vit_jax code
# (and the list); ViT-g/G are 1,011M and 1,843M without the head, as
# in "Scaling Vision Transformers" (Zhai et al.) Table 2.
EXPECTED_PARAM_COUNTS = {
    'testing': 21_390,
    'ViT-Ti_16': 5_717_416,
    'ViT-S_16': 22_050_664,
    'ViT-S_32': 22_878_952,
    'ViT-B_8': 86_576_872,
    'ViT-B_16': 86_567_656,
    'ViT-B_32': 88_224_232,
    'ViT-L_16': 304_326_632,
    'ViT-L_32': 306_535_400,
    'ViT-H_14': 632_045_800,
    'ViT-g_14': 1_012_611_432,
    'ViT-G_14': 1_844_440_680,
    # MAP head, no class token; from the formula in test_model_options.py.
    'ViT-So400m_14': 428_833_704,
    # timm 1.0.31's counts of `timm.create_model(NAME, img_size=224,
    # num_classes=1000)` for the timm model of each family.
    'DINOv2-S_14': 22_013_800,  # vit_small_patch14_dinov2
    'DINOv2-B_14': 86_493_928,  # vit_base_patch14_dinov2
    'DINOv2-L_14': 304_252_904,  # vit_large_patch14_dinov2
    'DINOv2-g_14': 1_136_306_664,  # vit_giant_patch14_dinov2
    'SigLIP2-B_16': 93_653_224,  # vit_base_patch16_siglip_224
    'SigLIP2-L_16': 316_919_784,  # vit_large_patch16_siglip_256
    'SigLIP2-So400m_14': 428_833_704,  # vit_so400m_patch14_siglip_224
    'SigLIP2-So400m_16': 428_971_944,  # vit_so400m_patch16_siglip_256
    'ViT-gopt_16': 1_164_613_096,  # vit_giantopt_patch16_siglip_256
    'AIMv2-L_14': 310_222_824,  # aimv2_large_patch14_224
    'AIMv2-H_14': 682_388_968,  # aimv2_huge_patch14_224
    # timm 1.0.31's counts of `timm.create_model(NAME, img_size=224,
    # num_classes=1000)` for timm's eva.py models (RoPE tables and EVA's
    # zero key bias are buffers, not parameters).
    'EVA02-S_14': 22_006_120,  # eva02_small_patch14_224
    'EVA02-B_14': 86_527_720,  # eva02_base_patch14_224
    'EVA02-L_14': 304_293_800,  # eva02_large_patch14_224
    'DINOv3-S_16': 21_971_944,  # vit_small_patch16_dinov3
    'DINOv3-S+_16': 29_068_264,  # vit_small_plus_patch16_dinov3
    'DINOv3-B_16': 86_410_216,  # vit_base_patch16_dinov3
    'DINOv3-L_16': 304_104_424,  # vit_large_patch16_dinov3
    'DINOv3-H+_16': 841_790_440,  # vit_huge_plus_patch16_dinov3
    'DINOv3-7B_16': 6_720_127_976,  # vit_7b_patch16_dinov3
    'PE-core-B_16': 93_655_528,  # vit_pe_core_base_patch16_224
    'PE-core-L_14': 316_799_976,  # vit_pe_core_large_patch14_336
    'R+ViT-Ti_16': 6_337_704,
    'R26+ViT-S_32': 36_431_912,
    'R50+ViT-B_16': 98_659_112,
    'R50+ViT-L_32': 328_994_856,
    'Mixer-B_16': 59_880_472,
    'Mixer-B_32': 60_293_428,
    'Mixer-L_16': 208_196_168,
}


def _abstract_params(model, size=224):
  return jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False
      )
  )['params']


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_every_registered_model_has_a_parameter_count():
  assert set(vit_jax.models.MODEL_NAMES) == set(
      EXPECTED_PARAM_COUNTS
  ), 'Add the exact parameter count of every newly registered model here.'


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(EXPECTED_PARAM_COUNTS))
def test_parameter_count(name):
  model = vit_jax.models.get_model(name, num_classes=1000)
  assert _count(_abstract_params(model)) == EXPECTED_PARAM_COUNTS[name]


def test_official_parameter_tree():
  params = _abstract_params(
      vit_jax.models.get_model('ViT-B_16', num_classes=1000)
  )
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  block = 'Transformer/encoderblock_0/'
  expected = {
      'cls': (1, 1, 768),
      'embedding/kernel': (16, 16, 3, 768),
      'Transformer/posembed_input/pos_embedding': (1, 197, 768),
      block + 'LayerNorm_0/scale': (768,),
      block + 'MultiHeadDotProductAttention_0/query/kernel': (768, 12, 64),
      block + 'MultiHeadDotProductAttention_0/query/bias': (12, 64),
      block + 'MultiHeadDotProductAttention_0/out/kernel': (12, 64, 768),
      block + 'MultiHeadDotProductAttention_0/out/bias': (768,),
      block + 'LayerNorm_1/bias': (768,),
      block + 'MlpBlock_0/Dense_0/kernel': (768, 3072),
      block + 'MlpBlock_0/Dense_1/kernel': (3072, 768),
      'Transformer/encoder_norm/scale': (768,),
      'head/kernel': (768, 1000),
      'head/bias': (1000,),
  }
  for key, shape in expected.items():
    assert flat[key].shape == shape, key
  assert len(flat) == 4 + 2 + 12 * 16 + 2


def test_hybrid_and_mixer_parameter_names():
  hybrid = flax.traverse_util.flatten_dict(
      _abstract_params(
          vit_jax.models.get_model('R50+ViT-B_16', num_classes=10)
      ),
      sep='/',
  )
  for key in (
      'conv_root/kernel',
      'gn_root/scale',
      'block1/unit1/conv_proj/kernel',
      'block1/unit1/gn_proj/bias',
      'block3/unit9/conv3/kernel',
      'embedding/kernel',
  ):
    assert key in hybrid, key
  assert hybrid['gn_root/scale'].shape == (64,)
  assert hybrid['embedding/kernel'].shape == (1, 1, 1024, 768)
  mixer = flax.traverse_util.flatten_dict(
      _abstract_params(vit_jax.models.get_model('Mixer-B_16', num_classes=10)),
      sep='/',
  )
  for key in (
      'stem/kernel',
      'MixerBlock_11/token_mixing/Dense_0/kernel',
      'MixerBlock_0/channel_mixing/Dense_1/bias',
      'MixerBlock_0/LayerNorm_1/scale',
      'pre_head_layer_norm/scale',
  ):
    assert key in mixer, key
  assert mixer['MixerBlock_0/token_mixing/Dense_0/kernel'].shape == (196, 384)


@pytest.mark.slow
def test_initialisers_follow_the_paper_code():
  model = vit_jax.models.get_model(
      'ViT-S_16', num_classes=10, head_bias_init=-3.0
  )
  params = model.init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False
  )['params']
  np.testing.assert_array_equal(params['head']['kernel'], 0)
  np.testing.assert_array_equal(params['head']['bias'], -3.0)
  np.testing.assert_array_equal(params['cls'], 0)
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert abs(float(jnp.std(posemb)) - 0.02) < 0.001
  block = params['Transformer']['encoderblock_0']
  mlp_bias = block['MlpBlock_0']['Dense_0']['bias']
  assert 0 < float(jnp.std(mlp_bias)) < 1e-5
  # xavier_uniform on (D, H*Dh): bound sqrt(6 / (D + D)).
  query = block['MultiHeadDotProductAttention_0']['query']['kernel']
  bound = np.sqrt(6 / (384 + 384))
  assert float(jnp.max(jnp.abs(query))) <= bound
  assert float(jnp.max(jnp.abs(query))) > 0.95 * bound
  np.testing.assert_array_equal(
      block['MultiHeadDotProductAttention_0']['query']['bias'], 0
  )
  # lecun_normal patch embedding: std ~ sqrt(1 / fan_in).
  emb_std = float(jnp.std(params['embedding']['kernel']))
  assert abs(emb_std - np.sqrt(1 / (16 * 16 * 3))) < 0.1 * emb_std


@pytest.mark.slow
@pytest.mark.parametrize(
    'kind,shape',
    [
        ('vit', (2, 7)),
        ('vit_gap', (2, 7)),
        ('vit_rep', (2, 7)),
        ('hybrid', (2, 7)),
        ('hybrid_root', (2, 7)),
        ('mixer', (2, 7)),
    ],
)
def test_output_shapes(kind, shape):
  model, size = tiny_model(kind)
  x = random_images((2, size, size, 3))
  variables = {'params': init_params(model, x)}
  out = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  assert out.shape == shape


@pytest.mark.parametrize(
    'classifier,num_classes,shape',
    [
        ('token', 5, (2, 5)),
        ('gap', 5, (2, 5)),
        ('unpooled', 5, (2, 16, 5)),
        ('token_unpooled', 5, (2, 17, 5)),
        ('unpooled', None, (2, 16, 10)),
        ('token', None, (2, 10)),
    ],
)
def test_classifier_output_shapes(classifier, num_classes, shape):
  model, size = tiny_model(
      'vit', num_classes=num_classes, classifier=classifier
  )
  x = random_images((2, size, size, 3))
  variables = {'params': init_params(model, x)}
  assert model.apply(variables, x, train=False).shape == shape


@pytest.mark.slow
@pytest.mark.parametrize('remat', [False, True])
def test_scan_gives_the_same_logits_and_gradients_as_the_loop(remat):
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top

  loop, size = tiny_model('vit', transformer={'num_layers': 3})
  scanned, _ = tiny_model(
      'vit', transformer={'num_layers': 3}, scan=True, remat=remat
  )
  x = random_images((2, size, size, 3))
  params = randomize(init_params(loop, x))
  stacked = checkpoint.stack_encoder_blocks(params)
  assert stacked['Transformer']['encoderblock']['LayerNorm_0'][
      'scale'
  ].shape == (3, 10)
  logits_loop = loop.apply({'params': params}, x, train=False)
  logits_scan = scanned.apply({'params': stacked}, x, train=False)
  np.testing.assert_allclose(logits_scan, logits_loop, atol=1e-5, rtol=1e-5)
  grad = lambda m, p: jax.jit(
      jax.grad(lambda p: m.apply({'params': p}, x, train=False).sum())
  )(p)
  grad_loop, grad_scan = grad(loop, params), grad(scanned, stacked)
  np.testing.assert_allclose(
      checkpoint.stack_encoder_blocks(grad_loop)['Transformer']['encoderblock'][
          'MlpBlock_0'
      ]['Dense_0']['kernel'],
      grad_scan['Transformer']['encoderblock']['MlpBlock_0']['Dense_0'][
          'kernel'
      ],
      atol=1e-5,
      rtol=1e-4,
  )


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
  plain, size = tiny_model('vit')
  remat, _ = tiny_model('vit', remat=True)
  x = random_images((2, size, size, 3))
  params = randomize(init_params(plain, x))
  grad = lambda m: jax.jit(
      jax.grad(lambda p: m.apply({'params': p}, x, train=False).sum())
  )(params)
  for a, b in zip(
      jax.tree_util.tree_leaves(grad(plain)),
      jax.tree_util.tree_leaves(grad(remat)),
  ):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  model, size = tiny_model('vit', dtype=jnp.bfloat16)
  ref, _ = tiny_model('vit')
  x = random_images((2, size, size, 3))
  variables = {'params': init_params(model, x)}
  assert all(
      p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables)
  )
  params = randomize(variables['params'], scale=0.1)
  out = model.apply({'params': params}, x, train=False)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(out, np.float32),
      ref.apply({'params': params}, x, train=False),
      atol=0.1,
      rtol=0.1,
  )


def test_dropout_is_active_only_in_training():
  model, size = tiny_model(
      'vit', transformer={'dropout_rate': 0.5, 'attention_dropout_rate': 0.5}
  )
  x = random_images((2, size, size, 3))
  params = randomize(init_params(model, x))
  apply = lambda train, seed: model.apply(
      {'params': params}, x, train=train, rngs={'dropout': jax.random.key(seed)}
  )
  np.testing.assert_array_equal(apply(False, 0), apply(False, 1))
  assert not np.allclose(apply(True, 0), apply(True, 1))


def test_intermediates_are_sown_only_on_request():
  model, size = tiny_model('vit', transformer={'num_layers': 2})
  x = random_images((3, size, size, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables) == {'params'}
  logits, state = model.apply(
      variables, x, train=False, mutable=['intermediates']
  )
  inter = state['intermediates']
  assert inter['pre_logits'][0].shape == (3, 10)
  block = inter['Transformer']['encoderblock_1']
  weights = block['MultiHeadDotProductAttention_0']['attention_weights'][0]
  assert weights.shape == (3, 2, 17, 17)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  assert block['block_output'][0].shape == (3, 17, 10)
  np.testing.assert_array_equal(logits, model.apply(variables, x, train=False))


def test_accepts_official_ml_collections_configs():
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
      {
          'patches': {'size': (4, 4)},
          'hidden_size': 8,
          'transformer': {
              'mlp_dim': 16,
              'num_heads': 2,
              'num_layers': 1,
              'attention_dropout_rate': 0.0,
              'dropout_rate': 0.0,
          },
          'classifier': 'token',
          'representation_size': None,
      }
  )
  model = vit_jax.models.VisionTransformer(num_classes=3, **config)
  x = random_images((1, 8, 8, 3))
  variables = {'params': init_params(model, x)}
  assert model.apply(variables, x, train=False).shape == (1, 3)


def test_unknown_model_name_lists_the_known_names():
  with pytest.raises(vit_jax.models.UnknownModelError) as e:
    vit_jax.models.get_model('ViT-B16', num_classes=10)
  assert "'ViT-B16'" in str(e.value) and 'ViT-B_16' in str(e.value)
  assert 'Mixer-B_16' in str(e.value)


def test_unknown_override_names_the_field():
  with pytest.raises(TypeError, match='hidden_dim.*valid fields'):
    vit_jax.models.get_model('ViT-B_16', num_classes=10, hidden_dim=3)


def test_overrides_merge_into_nested_configs():
  model = vit_jax.models.get_model(
      'ViT-B_16', num_classes=10, transformer={'dropout_rate': 0.3}
  )
  assert vit.config_value(model.transformer, 'dropout_rate') == 0.3
  assert vit.config_value(model.transformer, 'num_layers') == 12
  assert (
      vit_jax.models.get_config('ViT-B_16')['transformer']['dropout_rate']
      == 0.0
  )


@pytest.mark.parametrize(
    'kind,size,message',
    [
        ('vit', 18, r'18x18 is not divisible by the patch size 4x4'),
        ('hybrid', 36, r'36x36 is not divisible by the total stride 8x8'),
        ('mixer', 10, r'10x10 is not divisible by the patch size 4x4'),
    ],
)
def test_image_size_not_divisible_by_patch_size(kind, size, message):
  model, _ = tiny_model(kind)
  with pytest.raises(ValueError, match=message):
    model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)


def test_params_for_another_resolution_say_how_to_resize():
  model, size = tiny_model('vit')
  variables = model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False
  )
  with pytest.raises(ValueError, match='load_pretrained'):
    model.apply(variables, jnp.zeros((1, 2 * size, 2 * size, 3)), train=False)


@pytest.mark.slow
def test_models_package_does_not_import_tensorflow():
  code = (
      'import sys, vit_jax.models, vit_jax.checkpoint; '
      'assert "tensorflow" not in sys.modules, "tensorflow imported"'
  )
  subprocess.run([sys.executable, '-c', code], check=True)
