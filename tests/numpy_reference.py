"""Independent NumPy forward passes over *published-layout* parameters.

Written from the paper and the published key names only (no Flax), so that a
mistake in how `vit_jax.models` interprets an official checkpoint (kernel
layouts, patch order, pre-Linen numbering, class token, position embeddings,
GroupNorm, weight standardisation) shows up as a logits mismatch.

`p` is always a flat dict {'a/b/c': array} as stored in a gs://vit_models
`.npz` (pre-Linen numbering inside encoder blocks).
"""

import math

import numpy as np


def gelu(x):
  # The tanh approximation (flax.linen.gelu's default, as in the original).
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def gelu_exact(x):
  # The erf GELU (torch.nn.GELU(), transformers' hidden_act='gelu').
  import scipy.special  # pylint: disable=g-import-not-at-top

  return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


def layer_norm(x, p, prefix, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p[prefix + '/scale'] + p[
      prefix + '/bias'
  ]


def dense(x, p, prefix):
  return x @ p[prefix + '/kernel'] + p[prefix + '/bias']


def _same_padding(size, kernel, stride):
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def conv2d(x, w, stride, padding, pad_value=0.0):
  """NHWC x HWIO convolution by explicit patch extraction."""
  kh, kw = w.shape[:2]
  if padding == 'SAME':
    ph = _same_padding(x.shape[1], kh, stride)
    pw = _same_padding(x.shape[2], kw, stride)
    x = np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=pad_value)
  n, h, wd, c = x.shape
  oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
  cols = np.stack(
      [
          x[:, i : i + stride * oh : stride, j : j + stride * ow : stride]
          for i in range(kh)
          for j in range(kw)
      ],
      axis=3,
  )
  return cols.reshape(n, oh, ow, kh * kw * c) @ w.reshape(kh * kw * c, -1)


def max_pool_3x3_s2_same(x):
  n, h, w, c = x.shape
  ph, pw = _same_padding(h, 3, 2), _same_padding(w, 3, 2)
  x = np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=-np.inf)
  oh, ow = -(-h // 2), -(-w // 2)
  windows = [
      x[:, i : i + 2 * oh : 2, j : j + 2 * ow : 2]
      for i in range(3)
      for j in range(3)
  ]
  return np.max(np.stack(windows), axis=0)


def group_norm(x, p, prefix, groups=32, eps=1e-6):
  n, h, w, c = x.shape
  g = x.reshape(n, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  scale = p[prefix + '/scale'].reshape(-1)
  bias = p[prefix + '/bias'].reshape(-1)
  return g.reshape(n, h, w, c) * scale + bias


def std_conv(x, p, prefix, stride):
  w = p[prefix + '/kernel']
  w = w - w.mean(axis=(0, 1, 2), keepdims=True)
  w = w / (w.std(axis=(0, 1, 2), keepdims=True) + 1e-5)
  return conv2d(x, w, stride, 'SAME')


def bit_resnet(x, p, num_layers, width_factor):
  relu = lambda v: np.maximum(v, 0)
  width = int(64 * width_factor)
  x = relu(group_norm(std_conv(x, p, 'conv_root', 2), p, 'gn_root'))
  x = max_pool_3x3_s2_same(x)
  for s, units in enumerate(num_layers):
    features = width * 2**s
    for u in range(units):
      pre = f'block{s + 1}/unit{u + 1}/'
      stride = 2 if (s > 0 and u == 0) else 1
      residual = x
      if x.shape[-1] != 4 * features or stride != 1:
        residual = group_norm(
            std_conv(x, p, pre + 'conv_proj', stride), p, pre + 'gn_proj'
        )
      y = relu(group_norm(std_conv(x, p, pre + 'conv1', 1), p, pre + 'gn1'))
      y = relu(
          group_norm(std_conv(y, p, pre + 'conv2', stride), p, pre + 'gn2')
      )
      y = group_norm(std_conv(y, p, pre + 'conv3', 1), p, pre + 'gn3')
      x = relu(residual + y)
  return x


def attention(x, p, prefix, num_heads, kv=None):
  """Multi-head attention of `x` over itself, or over `kv` when given."""
  del num_heads  # Implied by the kernel shapes (D, H, D/H).
  kv = x if kv is None else kv
  q = np.einsum('ntd,dhk->nhtk', x, p[prefix + '/query/kernel'])
  k = np.einsum('ntd,dhk->nhtk', kv, p[prefix + '/key/kernel'])
  v = np.einsum('ntd,dhk->nhtk', kv, p[prefix + '/value/kernel'])
  q = q + p[prefix + '/query/bias'][None, :, None]
  k = k + p[prefix + '/key/bias'][None, :, None]
  v = v + p[prefix + '/value/bias'][None, :, None]
  logits = np.einsum('nhqk,nhtk->nhqt', q, k) / np.sqrt(q.shape[-1])
  logits = logits - logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights = weights / weights.sum(-1, keepdims=True)
  out = np.einsum('nhqt,nhtk->nhqk', weights, v)
  return (
      np.einsum('nhqk,hkd->nqd', out, p[prefix + '/out/kernel'])
      + p[prefix + '/out/bias']
  )


def vit_logits(
    p,
    images,
    *,
    num_heads,
    classifier='token',
    resnet=None,
    gelu_approximate=True,
    eps=1e-6,
):
  """ViT / hybrid forward pass from published-layout parameters.

  `gelu_approximate=False` is the exact erf GELU and `eps` the LayerNorm
  epsilon (transformers' configs: hidden_act='gelu', layer_norm_eps=1e-12).
  """
  act = gelu if gelu_approximate else gelu_exact
  x = images.astype(np.float64)
  p = {k: v.astype(np.float64) for k, v in p.items()}
  if resnet is not None:
    x = bit_resnet(x, p, resnet['num_layers'], resnet['width_factor'])
  w = p['embedding/kernel']
  x = conv2d(x, w, w.shape[0], 'VALID') + p['embedding/bias']
  n, gh, gw, d = x.shape
  x = x.reshape(n, gh * gw, d)
  if classifier == 'token':
    x = np.concatenate([np.broadcast_to(p['cls'], (n, 1, d)), x], axis=1)
  x = x + p['Transformer/posembed_input/pos_embedding']
  layer = 0
  while f'Transformer/encoderblock_{layer}/LayerNorm_0/scale' in p:
    pre = f'Transformer/encoderblock_{layer}/'
    y = layer_norm(x, p, pre + 'LayerNorm_0', eps)
    x = x + attention(y, p, pre + 'MultiHeadDotProductAttention_1', num_heads)
    y = layer_norm(x, p, pre + 'LayerNorm_2', eps)
    y = dense(
        act(dense(y, p, pre + 'MlpBlock_3/Dense_0')),
        p,
        pre + 'MlpBlock_3/Dense_1',
    )
    x = x + y
    layer += 1
  assert layer > 0, 'no encoder blocks in published layout'
  x = layer_norm(x, p, 'Transformer/encoder_norm', eps)
  x = x[:, 0] if classifier == 'token' else x.mean(axis=1)
  if 'pre_logits/kernel' in p:
    x = np.tanh(dense(x, p, 'pre_logits'))
  return dense(x, p, 'head')


def mixer_logits(p, images):
  """MLP-Mixer forward pass from published-layout parameters."""
  p = {k: v.astype(np.float64) for k, v in p.items()}
  w = p['stem/kernel']
  x = conv2d(images.astype(np.float64), w, w.shape[0], 'VALID') + p['stem/bias']
  n, gh, gw, d = x.shape
  x = x.reshape(n, gh * gw, d)
  mlp = lambda v, pre: dense(
      gelu(dense(v, p, pre + '/Dense_0')), p, pre + '/Dense_1'
  )
  block = 0
  while f'MixerBlock_{block}/LayerNorm_0/scale' in p:
    pre = f'MixerBlock_{block}/'
    y = layer_norm(x, p, pre + 'LayerNorm_0').transpose(0, 2, 1)
    x = x + mlp(y, pre + 'token_mixing').transpose(0, 2, 1)
    x = x + mlp(layer_norm(x, p, pre + 'LayerNorm_1'), pre + 'channel_mixing')
    block += 1
  x = layer_norm(x, p, 'pre_head_layer_norm').mean(axis=1)
  return dense(x, p, 'head')


def sincos_2d(h, w, width, temperature=10_000.0):
  """big_vision's fixed table: [sin x w, cos x w, sin y w, cos y w] per patch
  (row-major), w_k = temperature ** -(k / (width / 4 - 1))."""
  quarter = width // 4
  omega = temperature ** -(np.arange(quarter) / (quarter - 1))
  table = []
  for y in range(h):
    for x in range(w):
      table.append(
          np.concatenate(
              [
                  np.sin(x * omega),
                  np.cos(x * omega),
                  np.sin(y * omega),
                  np.cos(y * omega),
              ]
          )
      )
  return np.stack(table)[None]


def big_vision_logits(p, images, *, pool='tok', posemb='learn'):
  """big_vision ViT forward pass from its own parameter layout.

  Written from big_vision's `models/vit.py` names: top-level `pos_embedding`
  (no class slot, added to the patches before `cls` is prepended),
  `Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0}` (or one stacked `Transformer/encoderblock`),
  `MAPHead_0`, `pre_logits` (tanh), `head` (absent: the pooled embedding).

  Args:
    p: Flat {'a/b/c': array} without the `params/` prefix.
    images: NHWC in [-1, 1].
    pool: 'tok', 'gap' or 'map' (big_vision's `pool_type`).
    posemb: 'learn' or 'sincos2d'.

  Returns:
    Logits, or the pooled embedding when `p` has no head.
  """
  p = {k: v.astype(np.float64) for k, v in p.items()}
  w = p['embedding/kernel']
  x = (
      conv2d(images.astype(np.float64), w, w.shape[0], 'VALID')
      + p['embedding/bias']
  )
  n, gh, gw, d = x.shape
  x = x.reshape(n, gh * gw, d)
  x = x + (p['pos_embedding'] if posemb == 'learn' else sincos_2d(gh, gw, d))
  if pool == 'tok':
    x = np.concatenate([np.broadcast_to(p['cls'], (n, 1, d)), x], axis=1)
  return _big_vision_head(p, _big_vision_encoder(p, x), pool)


def _big_vision_encoder(p, x):
  """big_vision's encoder blocks and final norm on tokens [n, T, D]."""
  stacked = 'Transformer/encoderblock/LayerNorm_0/scale' in p
  depth = (
      p['Transformer/encoderblock/LayerNorm_0/scale'].shape[0]
      if stacked
      else sum(
          1
          for k in p
          if k.startswith('Transformer/encoderblock_')
          and k.endswith('LayerNorm_0/scale')
      )
  )
  assert depth > 0, 'no encoder blocks in big_vision layout'
  for layer in range(depth):
    if stacked:
      pre = 'block/'
      block = {
          pre + k[len('Transformer/encoderblock/') :]: v[layer]
          for k, v in p.items()
          if k.startswith('Transformer/encoderblock/')
      }
    else:
      pre = f'Transformer/encoderblock_{layer}/'
      block = p
    y = layer_norm(x, block, pre + 'LayerNorm_0')
    x = x + attention(y, block, pre + 'MultiHeadDotProductAttention_0', None)
    y = layer_norm(x, block, pre + 'LayerNorm_1')
    x = x + dense(
        gelu(dense(y, block, pre + 'MlpBlock_0/Dense_0')),
        block,
        pre + 'MlpBlock_0/Dense_1',
    )
  return layer_norm(x, p, 'Transformer/encoder_norm')


def _big_vision_head(p, x, pool):
  """Pooling ('tok', 'gap', 'map'), pre-logits and head of tokens [n, T, D]."""
  n, _, d = x.shape
  if pool == 'tok':
    x = x[:, 0]
  elif pool == 'gap':
    x = x.mean(axis=1)
  else:
    probe = np.broadcast_to(p['MAPHead_0/probe'], (n, 1, d))
    a = attention(
        probe, p, 'MAPHead_0/MultiHeadDotProductAttention_0', None, kv=x
    )
    y = layer_norm(a, p, 'MAPHead_0/LayerNorm_0')
    x = (
        a
        + dense(
            gelu(dense(y, p, 'MAPHead_0/MlpBlock_0/Dense_0')),
            p,
            'MAPHead_0/MlpBlock_0/Dense_1',
        )
    )[:, 0]
  if 'pre_logits/kernel' in p:
    x = np.tanh(dense(x, p, 'pre_logits'))
  return dense(x, p, 'head') if 'head/kernel' in p else x


# ----------------------------------------------------------------------------
# PyTorch-layout forward passes, written from transformers' modeling_vit.py
# and timm's vision_transformer.py (state-dict names, Linear weights
# (out, in), OIHW patch convolution on NCHW images), to check converted files
# without torch.
# ----------------------------------------------------------------------------


def _torch_linear(x, sd, name):
  return x @ sd[name + '.weight'].T + sd[name + '.bias']


def _torch_layer_norm(x, sd, name, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * sd[name + '.weight'] + sd[
      name + '.bias'
  ]


def _torch_patches(sd, name, images_nchw):
  """Conv2d(kernel = stride = patch) as a matmul over flattened patches."""
  w, b = sd[name + '.weight'], sd[name + '.bias']  # (D, C, ph, pw)
  d, c, ph, pw = w.shape
  n, _, h, wd = images_nchw.shape
  gh, gw = h // ph, wd // pw
  x = images_nchw.reshape(n, c, gh, ph, gw, pw).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(n, gh * gw, c * ph * pw) @ w.reshape(d, -1).T + b


def _heads_attention(q, k, v, num_heads):
  """softmax(q k^T / sqrt(d)) v over heads; q [n, tq, D], k, v [n, tk, D]."""
  n, tq, d = q.shape
  split = lambda x: x.reshape(n, x.shape[1], num_heads, -1).transpose(
      0, 2, 1, 3
  )
  q, k, v = split(q), split(k), split(v)
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // num_heads)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = weights / weights.sum(-1, keepdims=True)
  return (weights @ v).transpose(0, 2, 1, 3).reshape(n, tq, d)


def transformers_vit_logits(sd, hf_config, images_nchw):
  """transformers' ViTForImageClassification (or ViTModel) forward pass.

  Args:
    sd: {key: array} as in its model.safetensors.
    hf_config: Its config.json (dict).
    images_nchw: [n, 3, h, w].

  Returns:
    Logits (ViTForImageClassification), else the pooler's output when the
    file has one, else the class token's final embedding.
  """
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  prefix = 'vit.' if any(k.startswith('vit.') for k in sd) else ''
  eps = hf_config['layer_norm_eps']
  act = {'gelu': gelu_exact, 'gelu_pytorch_tanh': gelu, 'gelu_new': gelu}[
      hf_config['hidden_act']
  ]
  heads = hf_config['num_attention_heads']
  e = prefix + 'embeddings.'
  x = _torch_patches(
      sd, e + 'patch_embeddings.projection', images_nchw.astype(np.float64)
  )
  n, _, d = x.shape
  x = (
      np.concatenate(
          [np.broadcast_to(sd[e + 'cls_token'], (n, 1, d)), x], axis=1
      )
      + sd[e + 'position_embeddings']
  )
  for i in range(hf_config['num_hidden_layers']):
    layer = f'{prefix}encoder.layer.{i}.'
    y = _torch_layer_norm(x, sd, layer + 'layernorm_before', eps)
    a = layer + 'attention.attention.'
    y = _heads_attention(
        _torch_linear(y, sd, a + 'query'),
        _torch_linear(y, sd, a + 'key'),
        _torch_linear(y, sd, a + 'value'),
        heads,
    )
    x = x + _torch_linear(y, sd, layer + 'attention.output.dense')
    y = _torch_layer_norm(x, sd, layer + 'layernorm_after', eps)
    y = act(_torch_linear(y, sd, layer + 'intermediate.dense'))
    x = x + _torch_linear(y, sd, layer + 'output.dense')
  x = _torch_layer_norm(x, sd, prefix + 'layernorm', eps)[:, 0]
  if 'classifier.weight' in sd:
    return _torch_linear(x, sd, 'classifier')
  if 'pooler.dense.weight' in sd:
    return np.tanh(_torch_linear(x, sd, 'pooler.dense'))
  return x


def timm_vit_logits(
    sd,
    images_nchw,
    *,
    num_heads,
    global_pool='token',
    act_layer='gelu',
    eps=1e-6,
):
  """timm's VisionTransformer forward pass (fc_norm=False, no registers).

  Args:
    sd: Its state dict {key: array}.
    images_nchw: [n, 3, h, w].
    num_heads: Attention heads.
    global_pool: 'token', 'avg' or 'map' (AttentionPoolLatent).
    act_layer: 'gelu' (erf) or 'gelu_tanh'.
    eps: LayerNorm epsilon.

  Returns:
    Logits, or the pooled features without a head.
  """
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  act = {'gelu': gelu_exact, 'gelu_tanh': gelu}[act_layer]
  x = _torch_patches(sd, 'patch_embed.proj', images_nchw.astype(np.float64))
  n, _, d = x.shape
  if 'cls_token' in sd:
    x = np.concatenate([np.broadcast_to(sd['cls_token'], (n, 1, d)), x], axis=1)
  x = x + sd['pos_embed']
  mlp = lambda y, name: _torch_linear(  # pylint: disable=g-long-lambda
      act(_torch_linear(y, sd, name + '.fc1')), sd, name + '.fc2'
  )
  i = 0
  while f'blocks.{i}.norm1.weight' in sd:
    b = f'blocks.{i}.'
    y = _torch_layer_norm(x, sd, b + 'norm1', eps)
    q, k, v = np.split(_torch_linear(y, sd, b + 'attn.qkv'), 3, axis=-1)
    x = x + _torch_linear(
        _heads_attention(q, k, v, num_heads), sd, b + 'attn.proj'
    )
    x = x + mlp(_torch_layer_norm(x, sd, b + 'norm2', eps), b + 'mlp')
    i += 1
  x = _torch_layer_norm(x, sd, 'norm', eps)
  if global_pool == 'token':
    x = x[:, 0]
  elif global_pool == 'avg':
    x = x.mean(axis=1)
  else:
    latent = np.broadcast_to(sd['attn_pool.latent'], (n, 1, d))
    k, v = np.split(_torch_linear(x, sd, 'attn_pool.kv'), 2, axis=-1)
    y = _heads_attention(
        _torch_linear(latent, sd, 'attn_pool.q'), k, v, num_heads
    )
    y = _torch_linear(y, sd, 'attn_pool.proj')
    x = (
        y
        + mlp(_torch_layer_norm(y, sd, 'attn_pool.norm', eps), 'attn_pool.mlp')
    )[:, 0]
  return _torch_linear(x, sd, 'head') if 'head.weight' in sd else x


# ----------------------------------------------------------------------------
# NaFlex (SigLIP 2's NaFlex ViT, big_vision's naflex_vit.py layout).
# ----------------------------------------------------------------------------


def antialiased_linear_weights(n_in, n_out):
  """[n_out, n_in] weights of a half-pixel-centred linear (triangle) resize
  that widens the triangle by n_in / n_out when shrinking (antialiasing),
  each row normalised to sum 1."""
  scale = n_out / n_in
  centres = (np.arange(n_out) + 0.5) / scale - 0.5  # In input coordinates.
  width = max(1.0 / scale, 1.0)
  distance = np.abs(centres[:, None] - np.arange(n_in)[None, :]) / width
  weights = np.maximum(0.0, 1.0 - distance)
  return weights / weights.sum(axis=1, keepdims=True)


def naflex_posemb_grid(table, h, w):
  """The (gh, gw, D) table resized to an h x w patch grid: [h, w, D]."""
  gh, gw, _ = table.shape
  rows = antialiased_linear_weights(gh, h)
  cols = antialiased_linear_weights(gw, w)
  return np.einsum('ya,xb,abd->yxd', rows, cols, table)


def big_vision_naflex_embedding(p, patches, rows, cols, *, pool='map'):
  """One image's NaFlex forward pass, on its real patches only.

  Written from big_vision's `naflex_vit.py` names: `embedding` (a dense
  layer on each flattened patch), top-level `pos_embedding` (gh, gw, D)
  resized to the image's grid and read at each patch's (row, column), the
  encoder as in `big_vision_logits`, then pooling over the patches. There is
  no padding here, so nothing needs masking.

  Args:
    p: Flat {'a/b/c': array} of the image tower.
    patches: [n, P*P*C] the image's patches.
    rows: [n] each patch's row in the image's patch grid.
    cols: [n] its column.
    pool: 'gap' or 'map'.

  Returns:
    Logits, or the pooled embedding when `p` has no head: [D] (or [K]).
  """
  p = {k: v.astype(np.float64) for k, v in p.items()}
  x = dense(patches.astype(np.float64), p, 'embedding')
  grid = naflex_posemb_grid(p['pos_embedding'], rows.max() + 1, cols.max() + 1)
  x = (x + grid[rows, cols])[None]
  return _big_vision_head(p, _big_vision_encoder(p, x), pool)[0]


# RoPE (vit_jax.models.rope), from the formulas (float64, loops).


def rope_angles(
    grid,
    head_dim,
    convention,
    temperature,
    offset=0.0,
    indexing='ij',
    ref_grid=None,
):
  """[h * w, head_dim // 2] angles: pair i < n turns with the first
  coordinate at frequency i, pair n + i with the second."""
  h, w = grid
  n = head_dim // 4
  out = np.zeros((h * w, 2 * n))
  for r in range(h):
    for c in range(w):
      if convention == 'dinov3':
        # The patch centre in [0, 1], mapped to [-1, 1].
        y = 2 * ((r + 0.5 + offset) / h) - 1
        x = 2 * ((c + 0.5 + offset) / w) - 1
      else:
        y, x = r + offset, c + offset
        if ref_grid is not None:
          y, x = y * ref_grid[0] / h, x * ref_grid[1] / w
      first, second = (y, x) if indexing == 'ij' else (x, y)
      for i in range(n):
        if convention == 'dinov3':
          period = temperature ** (i / n)
          out[r * w + c, i] = 2 * math.pi * first / period
          out[r * w + c, n + i] = 2 * math.pi * second / period
        else:
          freq = temperature ** (-i / n)
          out[r * w + c, i] = first * freq
          out[r * w + c, n + i] = second * freq
  return out


def rope_rotation(x, angles, rotate_half):
  """x [..., N, D] with pair j of token t turned by angles[..., t, j]: a
  2x2 rotation of channels (2j, 2j + 1), or (j, j + D/2) with
  `rotate_half`."""
  x = np.asarray(x, np.float64)
  out = x.copy()
  d = x.shape[-1]
  for j in range(d // 2):
    p, q = (j, j + d // 2) if rotate_half else (2 * j, 2 * j + 1)
    cos, sin = np.cos(angles[..., j]), np.sin(angles[..., j])
    out[..., p] = cos * x[..., p] - sin * x[..., q]
    out[..., q] = sin * x[..., p] + cos * x[..., q]
  return out
