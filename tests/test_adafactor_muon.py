"""Known answers for optimizer='adafactor' and optimizer='muon'.

Adafactor is big_vision's variant ("Scaling Vision Transformers"): its
numpy reference below follows the Adafactor paper's notation (row and
column sums R, C of the squared gradient, V = R C / sum(R)), with the decay
1 - t^-c capped at beta2, clipping of the update's RMS, a momentum stored in
bfloat16 (ml_dtypes), decoupled weight decay of kernels and the learning
rate. Muon's reference is the Newton-Schulz iteration of its authors
(quintic coefficients 3.4445, -4.7750, 2.0315 on the Frobenius-normalised
matrix) written in numpy, and which parameter it takes is listed by hand
for each model.
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import helpers
from vit_jax import checkpoint
from vit_jax import config_lib
from vit_jax import optim
from vit_jax import sharding
from vit_jax import train
import vit_jax.models

LR = 0.05
WD = 0.1
# float32 against float64 on values of order 1.
TOL = dict(rtol=2e-6, atol=5e-7)


def _set(config, fields):
  """Sets dotted fields ('adafactor.decay_rate') of a config."""
  for name, value in fields.items():
    holder = config
    *parents, leaf = name.split('.')
    for parent in parents:
      holder = holder[parent]
    holder[leaf] = value
  return config


def _section(**fields):
  """The optimizer section: constant LR, no clipping, WD, then `fields`."""
  config = config_lib.get_base()
  config.base_lr = LR
  config.warmup_steps = 0
  config.decay_type = 'constant'
  config.grad_clip_norm = 0.0
  config.weight_decay = WD
  return config_lib.section(_set(config, fields), 'optim')


def _two_steps(tx, params, grads):
  state = tx.init(params)
  out = []
  for g in grads:
    updates, state = jax.jit(tx.update)(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(jax.tree_util.tree_map(np.asarray, params))
  return out, state


# ----------------------------------------------------------------------------
# Adafactor.
# ----------------------------------------------------------------------------


def flat(tree):
  return {k: np.asarray(v) for k, v in checkpoint.flatten(tree).items()}


def _rng_tree(seed, shapes):
  rng = np.random.default_rng(seed)
  return {
      name: {leaf: rng.normal(size=shape).astype(np.float32)}
      for name, (leaf, shape) in shapes.items()
  }


# A matrix whose two dimensions reach min_dim_size_to_factor (32): factored;
# a kernel with one short side and a bias: a full second moment. Kernels are
# decayed, the bias is not.
ADAFACTOR_SHAPES = {
    'matrix': ('kernel', (36, 40)),
    'thin': ('kernel', (3, 40)),
    'vector': ('bias', (40,)),
}


def _round(x, dtype):
  return np.asarray(x).astype(dtype).astype(np.float64)


def _numpy_adafactor(
    p0, grads, *, exponent, cap, momentum, clip, factored, mu_dtype
):
  """Parameters after each step; `factored`: names of factored leaves."""
  eps = 1e-30
  p = {k: v.astype(np.float64) for k, v in p0.items()}
  stats, mom, out = {}, {k: np.zeros_like(v) for k, v in p.items()}, []
  for t, g in enumerate(grads, start=1):
    decay = min(cap, 1.0 - t ** (-exponent))
    new_p = {}
    for name, w in p.items():
      g2 = g[name].astype(np.float64) ** 2 + eps
      if name in factored:
        # Row and column sums of the squared gradient.
        r_new, c_new = g2.sum(axis=1), g2.sum(axis=0)
        r, c = stats.get(name, (np.zeros_like(r_new), np.zeros_like(c_new)))
        r = decay * r + (1 - decay) * r_new
        c = decay * c + (1 - decay) * c_new
        stats[name] = (r, c)
        v = np.outer(r, c) / r.sum()
      else:
        v = decay * stats.get(name, 0.0) + (1 - decay) * g2
        stats[name] = v
      u = g[name] / np.sqrt(v)
      if clip:
        u = u / max(1.0, np.sqrt(np.mean(u**2)) / clip)
      # The update is the new average; what is kept is rounded.
      m = momentum * mom[name] + (1 - momentum) * u
      mom[name] = _round(m, mu_dtype)
      decayed = WD * w if name.endswith('kernel') else 0.0
      new_p[name] = w - LR * (m + decayed)
    p = new_p
    out.append(p)
  return out


@pytest.mark.parametrize('cap', [0.3, 0.999])
def test_adafactor_equals_numpy_over_two_steps(cap):
  """Factored and full second moments, the capped decay, update clipping,
  a bfloat16 momentum, decay of kernels only: two steps, every leaf.

  The second step's decay is 1 - 2^-0.7 = 0.38: beta2 0.3 caps it, 0.999
  does not (the exponent shows). Clipping at RMS 0.9 clips the first
  step's sign-like update (RMS 1) of the full leaves. Momentum 0.5 is exact
  in bfloat16, so the decayed bfloat16 average is exact whether XLA rounds
  that product or not (optax multiplies in the accumulator's dtype; under
  jit XLA may keep more precision).
  """
  fields = dict(
      momentum=0.5,
      beta2=cap,
      mu_dtype='bfloat16',
      **{'adafactor.decay_rate': 0.7, 'adafactor.clipping_threshold': 0.9},
  )
  tx, _ = optim.make_optimizer(_section(optimizer='adafactor', **fields))
  params = _rng_tree(0, ADAFACTOR_SHAPES)
  grads = [_rng_tree(s, ADAFACTOR_SHAPES) for s in (1, 2)]
  got, state = _two_steps(tx, params, grads)

  kwargs = dict(
      exponent=0.7,
      cap=cap,
      momentum=0.5,
      clip=0.9,
      factored={'matrix/kernel'},
      mu_dtype=ml_dtypes.bfloat16,
  )
  want = _numpy_adafactor(flat(params), [flat(g) for g in grads], **kwargs)
  for step, (g, w) in enumerate(zip(got, want), start=1):
    for name, value in flat(g).items():
      np.testing.assert_allclose(
          value, w[name], **TOL, err_msg=f'{name} step {step}'
      )

  # The test tells apart what it pins: each change moves step 2 beyond the
  # tolerance above.
  p0, g_list = flat(params), [flat(g) for g in grads]
  changes = [
      dict(cap=0.999 if cap < 0.38 else 0.3),
      dict(factored=set()),
      dict(clip=None),
      dict(mu_dtype=np.float32),
      dict(momentum=0.9),
  ]
  if cap > 0.38:
    changes.append(dict(exponent=0.8))
  for change in changes:
    other = _numpy_adafactor(p0, g_list, **{**kwargs, **change})
    assert any(
        not np.allclose(other[1][k], want[1][k], **TOL) for k in want[1]
    ), change
  # The momentum is stored in bfloat16; the factored matrix keeps a row and
  # a column statistic, not a whole second moment.
  kept = {
      (x.shape, str(x.dtype))
      for x in jax.tree_util.tree_leaves(state)
      if x.size > 1
  }
  assert ((36, 40), 'bfloat16') in kept
  assert ((36, 40), 'float32') not in kept
  assert {((36,), 'float32'), ((40,), 'float32')} <= kept


def _abstract_state(model, tx, image_size=32):
  def init(rng):
    params = model.init(
        rng, jnp.zeros((1, image_size, image_size, 3)), train=False
    )['params']
    return {'params': params, 'opt_state': tx.init(params)}

  return jax.eval_shape(init, jax.random.key(0))


def _factored_bytes(shape, min_dim=32):
  """A row and a column statistic when the two largest sides reach
  `min_dim`, else the whole second moment (float32)."""
  size = int(np.prod(shape))
  sides = sorted(shape)
  if len(shape) >= 2 and sides[-2] >= min_dim:
    return 4 * (size // sides[-1] + size // sides[-2])
  return 4 * size


@pytest.mark.parametrize('scan', [False, True])
def test_adafactor_train_state_is_smaller_than_adams(scan):
  """The `train state:` figure (train.state_size_mib) of ViT-Ti: Adam with
  a bfloat16 first moment holds 10 bytes a parameter; Adafactor 4 + 2 and
  its statistics, counted here from the shapes (per layer when scanned)."""
  model = vit_jax.models.get_model('ViT-Ti_16', num_classes=10, scan=scan)
  mesh = sharding.make_mesh((('data', -1),))
  totals = {}
  for name in ('adam', 'adafactor'):
    tx, _ = optim.make_optimizer(
        _section(optimizer=name, mu_dtype='bfloat16', momentum=0.9, beta2=0.999)
    )
    abstract = _abstract_state(model, tx)
    shardings = sharding.tree_shardings(abstract, mesh)
    totals[name] = train.state_size_mib(abstract, shardings)[1] * 2**20
  params = jax.tree_util.tree_leaves(abstract['params'])
  n = sum(x.size for x in params)
  stats = sum(
      _factored_bytes(x.shape[1:] if scan and x.shape[0] == 12 else x.shape)
      * (12 if scan and x.shape[0] == 12 else 1)
      for x in params
  )
  assert abs(totals['adam'] - 10 * n) < 64  # Step counts.
  # optax's one-element stand-ins for the statistics a leaf does not keep.
  assert 0 <= totals['adafactor'] - (6 * n + stats) < 8 * len(params) + 64
  # The patch embedding (16 x 16 x 3 x 192) is too narrow to factor.
  assert totals['adafactor'] < 0.62 * totals['adam']


@pytest.mark.parametrize('optimizer', ['adafactor', 'muon'])
@pytest.mark.parametrize('scan', [False, True])
def test_optimizer_state_shards_like_its_parameters(optimizer, scan):
  """Tensor parallelism and FSDP on 8 devices: a state leaf shaped like its
  parameter (momentum, a whole second moment) is split like it, a reduced
  statistic (Adafactor's rows and columns) never over 'model'."""
  model = vit_jax.models.get_model(
      'ViT-Ti_16',
      num_classes=10,
      scan=scan,
      transformer={'num_layers': 2, 'num_heads': 4},
  )
  tx, _ = optim.make_optimizer(_section(optimizer=optimizer))
  abstract = _abstract_state(model, tx)
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 2), ('model', 2)))
  specs = {
      sharding.path_str(p): s.spec
      for p, s in jax.tree_util.tree_flatten_with_path(
          sharding.tree_shardings(
              abstract,
              mesh,
              fsdp_min_size=1,
              param_axes=vit_jax.models.PARAM_AXES,
          ),
          is_leaf=lambda s: isinstance(s, jax.sharding.Sharding),
      )[0]
  }
  params = {
      sharding.path_str(p): x.shape
      for p, x in jax.tree_util.tree_flatten_with_path(abstract['params'])[0]
  }
  assert any('model' in specs[f'params/{p}'] for p in params)
  copies = reduced = 0
  for path, x in jax.tree_util.tree_flatten_with_path(abstract['opt_state'])[0]:
    path = 'opt_state/' + sharding.path_str(path)
    param = next((p for p in params if path.endswith('/' + p)), None)
    if param is None:
      continue  # Counts, Newton-Schulz coefficients.
    if x.shape == params[param]:
      assert specs[path] == specs[f'params/{param}'], path
      copies += 1
    else:
      assert 'model' not in jax.tree_util.tree_leaves(tuple(specs[path])), path
      reduced += 1
  assert copies >= len(params)
  assert reduced > 0 if optimizer == 'adafactor' else reduced == 0


# ----------------------------------------------------------------------------
# Muon.
# ----------------------------------------------------------------------------

# (batch, reduction, output) axes of every matrix Muon takes, by hand: the
# MLP's dense kernels [in, out]; query, key, value [embed, heads, head_dim]
# read as [embed, heads * head_dim]; out [heads, head_dim, embed] as
# [heads * head_dim, embed]. Scanned blocks add a leading layer axis, a
# batch axis.
VIT_BLOCK_MATRICES = {
    'MlpBlock_0/Dense_0/kernel': ((), (0,), (1,)),
    'MlpBlock_0/Dense_1/kernel': ((), (0,), (1,)),
    'MultiHeadDotProductAttention_0/query/kernel': ((), (0,), (1, 2)),
    'MultiHeadDotProductAttention_0/key/kernel': ((), (0,), (1, 2)),
    'MultiHeadDotProductAttention_0/value/kernel': ((), (0,), (1, 2)),
    'MultiHeadDotProductAttention_0/out/kernel': ((), (0, 1), (2,)),
}
MIXER_BLOCK_MATRICES = {
    f'{mixing}/{dense}/kernel': ((), (0,), (1,))
    for mixing in ('token_mixing', 'channel_mixing')
    for dense in ('Dense_0', 'Dense_1')
}


def _shifted(axes):
  batch, reduction, output = axes
  add = lambda t: tuple(a + 1 for a in t)
  return ((0,), add(reduction), add(output))


def _expected_matrices(case):
  """{path: (batch, reduction, output)} for Muon; the rest is AdamW's."""
  if case == 'mixer':
    return {
        f'MixerBlock_{i}/{name}': axes
        for i in range(2)
        for name, axes in MIXER_BLOCK_MATRICES.items()
    }
  if case == 'scan':
    return {
        f'Transformer/encoderblock/{name}': _shifted(axes)
        for name, axes in VIT_BLOCK_MATRICES.items()
    }
  out = {
      f'Transformer/encoderblock_{i}/{name}': axes
      for i in range(12)
      for name, axes in VIT_BLOCK_MATRICES.items()
  }
  if case == 'map':
    # The MAP head's attention and MLP, and the pre-logits layer.
    out.update(
        {f'MAPHead_0/{n}': axes for n, axes in VIT_BLOCK_MATRICES.items()}
    )
    out['pre_logits/kernel'] = ((), (0,), (1,))
  return out


# Leaves AdamW must take in every case (embeddings, output layer, norms,
# biases, class token, position embedding, MAP probe).
ADAM_EXAMPLES = {
    'loop': (
        'embedding/kernel',
        'head/kernel',
        'head/bias',
        'cls',
        'Transformer/posembed_input/pos_embedding',
        'Transformer/encoder_norm/scale',
        'Transformer/encoderblock_3/MultiHeadDotProductAttention_0/query/bias',
        'Transformer/encoderblock_3/LayerNorm_1/scale',
    ),
    'scan': (
        'embedding/kernel',
        'head/kernel',
        'Transformer/encoderblock/MlpBlock_0/Dense_0/bias',
        'Transformer/encoderblock/LayerNorm_0/scale',
    ),
    'map': ('MAPHead_0/probe', 'MAPHead_0/LayerNorm_0/scale', 'head/kernel'),
    'mixer': ('stem/kernel', 'head/kernel', 'pre_head_layer_norm/scale'),
}


def _model_of(case):
  if case == 'mixer':
    model, size = helpers.tiny_model('mixer', num_classes=10)
    return model, size
  overrides = {
      'loop': {},
      'scan': {'scan': True},
      'map': {'classifier': 'map', 'representation_size': 192},
  }[case]
  return vit_jax.models.get_model('ViT-Ti_16', num_classes=10, **overrides), 32


def _state_leaf_paths(state, cls):
  """Paths of the parameters whose moments `cls` states hold."""
  found = set()
  for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, cls)
  ):
    if isinstance(s, cls):
      found |= {
          sharding.path_str(p)
          for p, _ in jax.tree_util.tree_flatten_with_path(s.mu)[0]
      }
  return found


def _axes(axes, ndim):
  """Muon's axes (an int or a tuple, maybe negative) as sorted indices."""
  return tuple(
      sorted(a % ndim for a in ((axes,) if isinstance(axes, int) else axes))
  )


@pytest.mark.parametrize('case', ['loop', 'scan', 'map', 'mixer'])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(case):
  """The split on real parameter trees: which leaves Muon's momentum holds
  (through the built optimizer) and the axes of each matrix."""
  model, size = _model_of(case)
  tx, _ = optim.make_optimizer(_section(optimizer='muon'))
  abstract = _abstract_state(model, tx, size)
  params = {
      sharding.path_str(p): x.shape
      for p, x in jax.tree_util.tree_flatten_with_path(abstract['params'])[0]
  }
  expected = _expected_matrices(case)
  assert set(expected) <= set(params)
  assert set(ADAM_EXAMPLES[case]) <= set(params) - set(expected)

  muon = _state_leaf_paths(abstract['opt_state'], optax.contrib.MuonState)
  adam = _state_leaf_paths(abstract['opt_state'], optax.ScaleByAdamState)
  assert muon == set(expected)
  assert adam == set(params) - set(expected)

  for path, shape in params.items():
    dims = optim.muon_dimension_numbers(path, shape)
    if path not in expected:
      assert dims is None, path
      continue
    reduction = _axes(dims.reduction_axis, len(shape))
    output = _axes(dims.output_axis, len(shape))
    batch = tuple(sorted(set(range(len(shape))) - set(reduction) - set(output)))
    assert (batch, reduction, output) == expected[path], path


NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _numpy_orthogonalise(x):
  """Five quintic Newton-Schulz steps on the Frobenius-normalised matrix."""
  a, b, c = NS_COEFFS
  x = x / (np.linalg.norm(x) + 1e-8)
  wide = x.shape[0] <= x.shape[1]
  x = x if wide else x.T
  for _ in range(5):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x if wide else x.T


def _numpy_muon_leaf(p, grads, beta, to_matrices, rms):
  """Muon on one leaf: momentum with optax's Nesterov and bias correction,
  orthogonalised per matrix, scaled, decoupled decay, learning rate."""
  p, mu, out = p.astype(np.float64), np.zeros(p.shape), []
  for t, g in enumerate(grads, start=1):
    mu = beta * mu + (1 - beta) * g
    nesterov = beta * mu / (1 - beta ** (t + 1)) + (1 - beta) * g / (
        1 - beta**t
    )
    matrices, back = to_matrices(nesterov)
    fan_in, fan_out = matrices.shape[-2:]
    scale = (
        rms * np.sqrt(max(fan_in, fan_out))
        if rms
        else np.sqrt(max(1, fan_out / fan_in))
    )
    u = back(np.stack([_numpy_orthogonalise(m) for m in matrices]) * scale)
    p = p - LR * (u + WD * p)
    out.append(p)
  return out


def _numpy_adamw_leaf(p, grads, b1, b2, decay):
  p, mu, nu, out = p.astype(np.float64), 0.0, 0.0, []
  for t, g in enumerate(grads, start=1):
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    u = (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + 1e-8)
    p = p - LR * (u + (WD * p if decay else 0.0))
    out.append(p)
  return out


# Leaf -> (shape, its matrices as [batch, in, out] and back). Muon's leaves:
# a query kernel [embed 8, heads 2, head_dim 3] is one 8 x 6 matrix, an out
# kernel [2, 3, 8] one 6 x 8 matrix, a scanned dense kernel [layers 2, 8, 6]
# two 8 x 6 matrices.
MUON_LEAVES = {
    'MultiHeadDotProductAttention_0/query/kernel': (
        (8, 2, 3),
        lambda x: (x.reshape(1, 8, 6), lambda m: m.reshape(8, 2, 3)),
    ),
    'MultiHeadDotProductAttention_0/out/kernel': (
        (2, 3, 8),
        lambda x: (x.reshape(1, 6, 8), lambda m: m.reshape(2, 3, 8)),
    ),
    'encoderblock/MlpBlock_0/Dense_0/kernel': (
        (2, 8, 6),
        lambda x: (x, lambda m: m),
    ),
}
# AdamW's: the classifier (decayed kernel) and biases.
ADAMW_LEAVES = {
    'MultiHeadDotProductAttention_0/query/bias': (2, 3),
    'head/kernel': (8, 4),
    'head/bias': (4,),
}


@pytest.mark.parametrize('rms', [0.2, None])
def test_muon_two_steps_equal_numpy_newton_schulz(rms):
  """Muon's matrices (a 3-D attention kernel read as one matrix, a stacked
  kernel as one matrix per layer) and AdamW's leaves, two steps each."""
  beta, b1, b2 = 0.8, 0.7, 0.85
  shapes = {k: v[0] for k, v in MUON_LEAVES.items()} | ADAMW_LEAVES
  rng = np.random.default_rng(0)
  draw = lambda: {
      k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()
  }
  p0, grads = draw(), [draw(), draw()]
  tx, _ = optim.make_optimizer(
      _section(
          optimizer='muon',
          momentum=beta,
          beta1=b1,
          beta2=b2,
          **{'muon.consistent_rms': rms},
      )
  )
  got, _ = _two_steps(
      tx, checkpoint.unflatten(p0), [checkpoint.unflatten(g) for g in grads]
  )
  got = [flat(tree) for tree in got]

  def muon_ref(name, beta=beta, to_matrices=None):
    return _numpy_muon_leaf(
        p0[name],
        [g[name].astype(np.float64) for g in grads],
        beta,
        to_matrices or MUON_LEAVES[name][1],
        rms,
    )

  for name in MUON_LEAVES:
    want = muon_ref(name)
    for step in range(2):
      np.testing.assert_allclose(
          got[step][name], want[step], rtol=1e-4, atol=1e-5, err_msg=name
      )
  for name in ADAMW_LEAVES:
    want = _numpy_adamw_leaf(
        p0[name],
        [g[name].astype(np.float64) for g in grads],
        b1,
        b2,
        decay=name.endswith('kernel'),
    )
    for step in range(2):
      np.testing.assert_allclose(
          got[step][name], want[step], rtol=1e-5, atol=1e-6, err_msg=name
      )

  # The test tells apart: each head's own matrix, one matrix over all
  # layers, Muon's default momentum.
  query = 'MultiHeadDotProductAttention_0/query/kernel'
  per_head = lambda x: (
      x.transpose(1, 0, 2),
      lambda m: m.transpose(1, 0, 2),
  )
  dense = 'encoderblock/MlpBlock_0/Dense_0/kernel'
  all_layers = lambda x: (x.reshape(1, 16, 6), lambda m: m.reshape(2, 8, 6))
  for name, other in (
      (query, muon_ref(query, to_matrices=per_head)),
      (dense, muon_ref(dense, to_matrices=all_layers)),
      (dense, muon_ref(dense, beta=0.95)),
  ):
    assert not np.allclose(got[1][name], other[1], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# A few train steps; the checks at parse time.
# ----------------------------------------------------------------------------


@pytest.mark.slow  # Compiles a train step per optimizer.
@pytest.mark.parametrize('optimizer', ['adafactor', 'muon'])
def test_train_steps_lower_the_loss(optimizer):
  """Five steps of the 2-layer test ViT on one batch; its 10-wide kernels
  are factored with min_dim_size_to_factor 8. Under Muon each part of the
  split lowers the loss on its own: the trained matrices with the other
  parameters as they started, and the other way round."""
  model, size = helpers.tiny_model('vit', num_classes=5)
  images = helpers.random_images((8, size, size, 3), seed=1)
  # Random weights: the zero-initialised head would hide every other part.
  params = helpers.randomize(helpers.init_params(model, images[:1]), seed=2)
  batch = {
      'image': images,
      'labels': np.eye(5, dtype=np.float32)[np.arange(8) % 5],
  }
  tx, _ = optim.make_optimizer(
      _section(
          optimizer=optimizer,
          mu_dtype='bfloat16',
          **{'adafactor.min_dim_size_to_factor': 8},
      )
  )
  if optimizer == 'adafactor':
    kinds = jax.tree_util.tree_leaves(optim._second_moment_kinds(params, 8))
    assert 'factored' in kinds
  step = jax.jit(
      lambda state, b, r: train.train_step(state, b, r, model=model, tx=tx)
  )
  state = train.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=None,
  )
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics['loss']))
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0] - 0.05, losses
  if optimizer == 'muon':
    start = _numpy_xent(model, params, batch)
    for part in ('muon', 'adam'):
      mixed = jax.tree_util.tree_map_with_path(
          lambda path, p0, p1, part=part: p1
          if (
              optim.muon_dimension_numbers(sharding.path_str(path), p0.shape)
              is None
          )
          == (part == 'adam')
          else p0,
          params,
          state.params,
      )
      assert _numpy_xent(model, mixed, batch) < start - 0.01, part


def _numpy_xent(model, params, batch):
  logits = np.asarray(
      model.apply({'params': params}, batch['image'], train=False), np.float64
  )
  logits -= logits.max(-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(np.mean(-(batch['labels'] * log_p).sum(-1)))


@pytest.mark.parametrize(
    'fields, message',
    [
        (
            {'adafactor.decay_rate': 0.0},
            'config.adafactor.decay_rate=0.0 must be positive.',
        ),
        (
            {'adafactor.min_dim_size_to_factor': 0},
            'config.adafactor.min_dim_size_to_factor=0 must be positive.',
        ),
        (
            {'adafactor.clipping_threshold': -1.0},
            'config.adafactor.clipping_threshold=-1.0 must be positive',
        ),
        (
            {'muon.consistent_rms': 0.0},
            'config.muon.consistent_rms=0.0 must be positive',
        ),
        (
            {'optimizer': 'muon', 'momentum': 1.0},
            "config.momentum=1.0 must be in [0, 1) for optimizer='muon'",
        ),
        (
            {'optimizer': 'adafactor', 'beta2': 0.0},
            "config.beta2=0.0 must be in (0, 1] for optimizer='adafactor'",
        ),
        ({'optimizer': 'lion'}, "config.optimizer='lion'; use one of"),
    ],
)
def test_fields_are_checked_when_parsed(fields, message):
  config = _set(config_lib.get_base(), fields)
  with pytest.raises(ValueError, match=re.escape(message)) as e:
    config_lib.parse(config)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('optimizer', ['adafactor', 'muon'])
def test_scanned_blocks_get_the_updates_of_unscanned_ones(optimizer):
  """Two steps on the 4-layer test ViT, as separate blocks and stacked
  (scan=True): the same parameters after each. With factoring from 4
  entries a stack of biases [4, 10] could be factored over its layers, a
  stacked query kernel [4, 10, 2, 5] over layers and features; neither is
  (the layer axis is Muon's batch axis too)."""
  model = vit_jax.models.get_model(
      'testing',
      num_classes=3,
      patches={'size': (4, 4)},
      transformer={'num_layers': 4},
  )
  loop = helpers.randomize(
      helpers.init_params(model, np.zeros((1, 16, 16, 3), np.float32)), seed=3
  )
  grads = [helpers.randomize(loop, seed=s) for s in (4, 5)]
  tx, _ = optim.make_optimizer(
      _section(
          optimizer=optimizer,
          momentum=0.5,
          **{'adafactor.min_dim_size_to_factor': 4},
      )
  )
  got_loop, _ = _two_steps(tx, loop, grads)
  stack = checkpoint.stack_encoder_blocks
  got_scan, _ = _two_steps(tx, stack(loop), [stack(g) for g in grads])
  if optimizer == 'adafactor':
    kinds = flat(optim._second_moment_kinds(stack(loop), 4))  # pylint: disable=protected-access
    assert (
        kinds['Transformer/encoderblock/MlpBlock_0/Dense_0/kernel']
        == 'factored'
    )
    assert kinds['Transformer/encoderblock/LayerNorm_0/scale'] == 'full'
  for step, (a, b) in enumerate(zip(got_loop, got_scan), start=1):
    a, b = flat(a), flat(checkpoint.unstack_encoder_blocks(b))
    assert a.keys() == b.keys()
    for name in a:
      np.testing.assert_allclose(
          b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=f'{name} {step}'
      )


def test_a_copy_of_a_stacked_parameter_keeps_its_layout_alone():
  """An optimizer over one leaf of a scanned stack (what a parameter group
  gives) holds that leaf's moments alone in their subtree, where their
  shape cannot tell a stack; they are split like the parameter all the
  same."""
  model = vit_jax.models.get_model(
      'ViT-Ti_16',
      num_classes=10,
      scan=True,
      transformer={'num_layers': 2, 'num_heads': 4},
  )
  one = 'Transformer/encoderblock/MlpBlock_0/Dense_0/kernel'
  tx = optax.masked(
      optax.adam(1e-3),
      lambda params: jax.tree_util.tree_map_with_path(
          lambda path, _: sharding.path_str(path) == one, params
      ),
  )
  abstract = _abstract_state(model, tx)
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 2), ('model', 2)))
  shardings = sharding.tree_shardings(
      abstract, mesh, fsdp_min_size=1, param_axes=vit_jax.models.PARAM_AXES
  )
  specs = {
      sharding.path_str(p): s.spec
      for p, s in jax.tree_util.tree_flatten_with_path(
          shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
      )[0]
  }
  moments = [p for p in specs if p.startswith('opt_state') and p.endswith(one)]
  assert len(moments) == 2  # Adam's mu and nu.
  assert tuple(specs[f'params/{one}']) == (None, 'fsdp', 'model')
  for path in moments:
    assert specs[path] == specs[f'params/{one}'], path
