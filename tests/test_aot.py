"""vit_jax.aot on this host's devices (CPU): the report, its figures, refusals.

The TPU side (compiling for TPU slices with libtpu) is
tests/test_tpu_compile.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vit_jax import aot
from vit_jax import attention_choice
from vit_jax import config_lib
from vit_jax import sharding

# The slow tier: whole train and eval steps compiled, and the command line.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny ViT of the digits config: two blocks, 16 px, 4x4 patches.
TINY = [
    ('model.hidden_size', '32'),
    ('model.transformer.mlp_dim', '64'),
    ('model.transformer.num_heads', '2'),
    ('batch', '16'),
    ('batch_eval', '16'),
]


def tiny_config(*overrides):
  config = config_lib.load_config_file('configs/digits.py')
  config_lib.apply_overrides(config, TINY + list(overrides))
  return config


def test_scanned_layers_are_costed_as_the_unrolled_program():
  # XLA counts a loop body once: the scanned step's FLOPs are extrapolated
  # from 1- and 2-layer compiles. The independent value: the same step with
  # its 3 layers unrolled, costed directly.
  layers = ('model.transformer.num_layers', '3')
  unrolled = aot.compile_run(tiny_config(layers), num_classes=10)
  scanned = aot.compile_run(
      tiny_config(layers, ('scan', 'True')), num_classes=10
  )
  assert unrolled['per_step']['method'] == 'the compiled train step'
  assert 'extrapolated' in scanned['per_step']['method']
  # The scanned program's own count misses two of the three layers.
  assert scanned['train_step']['flops'] < 0.8 * unrolled['per_step']['flops']
  np.testing.assert_allclose(
      scanned['per_step']['flops'], unrolled['per_step']['flops'], rtol=0.02
  )


def test_accumulated_micro_batches_are_costed_as_the_whole_batch():
  whole = aot.compile_run(tiny_config(), num_classes=10)
  accum = aot.compile_run(tiny_config(('accum_steps', '2')), num_classes=10)
  assert 'extrapolated' in accum['per_step']['method']
  assert accum['train_step']['flops'] < 0.7 * whole['per_step']['flops']
  # The optimizer update is counted once per micro-batch: a few percent on
  # this tiny model, a fraction of a percent on a real one.
  assert whole['per_step']['flops'] <= accum['per_step']['flops']
  np.testing.assert_allclose(
      accum['per_step']['flops'], whole['per_step']['flops'], rtol=0.1
  )


def test_report_of_the_local_devices(tmp_path):
  report = aot.compile_run(
      tiny_config(), num_classes=10, hlo_path=str(tmp_path / 'train.hlo')
  )
  assert report['topology'] == 'local' and report['platform'] == 'cpu'
  assert report['devices'] == 8 and report['mesh'] == {'data': 8, 'fsdp': 1}
  # The parameters of the model the run trains: counted independently.
  config = tiny_config()
  run = config_lib.parse(config)
  import jax  # pylint: disable=g-import-not-at-top

  import vit_jax.models  # pylint: disable=g-import-not-at-top

  model = vit_jax.models.get_model(num_classes=10, **run.model.model_args())
  params = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False
      )
  )['params']
  assert report['parameters'] == sum(
      int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)
  )
  memory = report['train_step']['memory']
  assert memory['total'] == (
      memory['arguments']
      + memory['outputs']
      - memory['aliased']
      + memory['temporaries']
      + memory['generated_code']
  )
  # Data parallel: gradients are summed over the devices.
  assert 'all-reduce' in report['train_step']['collectives']
  assert report['attention']['impl'] == 'auto'  # CPU: the model's rule.
  hlo_text = (tmp_path / 'train.hlo').read_text()
  assert 'all-reduce' in hlo_text and 'ENTRY' in hlo_text
  # The CPU has no HBM figure: no verdict, and no refusal.
  assert report['fits'] is None and aot.refusal(report, config) is None
  text = aot.format_report(report)
  assert 'mesh' in text and "this device's memory size is unknown" in text


def test_auto_attention_on_cpu_is_the_models_rule():
  run = config_lib.parse(tiny_config())
  mesh = sharding.make_mesh(run.mesh.mesh)
  assert attention_choice.resolve(run, mesh) is run
  choice = attention_choice.choose(run, mesh)
  assert choice.impl == 'auto' and not choice.estimates


def test_a_config_that_does_not_fit_is_refused_naming_the_fields(monkeypatch):
  report = aot.compile_run(tiny_config(), num_classes=10)
  report.update(
      hbm_bytes_per_device=1 << 20,
      fits=False,
      margin_bytes=(1 << 20) - report['bytes_per_device'],
      device='TPU chip (TPU v5 lite)',
      topology='v5e:2x2',
  )
  message = aot.refusal(report, tiny_config())
  assert '\n' not in message
  for field in (
      'config.batch (16)',
      'config.accum_steps',
      'config.mesh',
      "remat_policy='full'",
      'config.scan=True',
      "config.mu_dtype='bfloat16'",
  ):
    assert field in message, (field, message)
  excess = report['bytes_per_device'] - (1 << 20)
  assert f'{excess / 2**20:.1f} MiB more than the 1.0 MiB' in message
  del monkeypatch


def test_topology_without_libtpu_names_the_install_line(monkeypatch):
  real = aot.importlib.util.find_spec
  monkeypatch.setattr(
      aot.importlib.util,
      'find_spec',
      lambda name, *a: None if name == 'libtpu' else real(name, *a),
  )
  with pytest.raises(aot.AotError, match=r'pip install "libtpu==0\.0\.42\.\*"'):
    aot.topology_devices('v5e:2x2')


def test_estimated_seconds_adds_back_the_uncosted_concat_bitcasts():
  # libtpu's cost model counts -1 for each custom call it does not cost
  # (figures of a ViT-B step compiled for v5e:2x2: -26.99499 with 27
  # ConcatBitcast calls); Pallas kernels and async collectives are costed.
  class Compiled:

    def __init__(self, seconds, **calls):
      self.seconds, self.calls = seconds, calls

    def cost_analysis(self):
      return {'optimal_seconds': self.seconds}

    def as_text(self):
      return '\n'.join(
          f'  %c = f32[2] custom-call(%a), custom_call_target=' f'"{target}"'
          for target, n in self.calls.items()
          for _ in range(n)
      )

  estimate = attention_choice.estimated_seconds
  assert estimate(Compiled(-26.99499, ConcatBitcast=27)) == pytest.approx(
      0.00501
  )
  assert estimate(Compiled(-3.99995, X64Combine=4)) == pytest.approx(5e-5)
  assert estimate(
      Compiled(
          -0.9993, ConcatBitcast=1, tpu_custom_call=3, AsyncCollectiveStart=2
      )
  ) == pytest.approx(7e-4)
  assert estimate(Compiled(0.004)) == 0.004
  assert estimate(Compiled(-2.5, ConcatBitcast=1)) is None


@pytest.mark.slow
def test_command_line_writes_the_json_and_refuses_in_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['VIT_JAX_CPU_DEVICES'] = '2'
  out = tmp_path / 'report.json'
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'vit_jax.aot',
          '--config=configs/digits.py',
          *[f'--config.{k}={v}' for k, v in TINY],
          f'--json={out}',
          '--num_classes=10',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report['model'] == 'ViT-Ti_16' and report['batch'] == 16
  assert "compiler's estimate" in result.stdout
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'vit_jax.aot',
          '--config=configs/digits.py',
          '--json=/no/such/dir/r.json',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: --json=/no/such/dir/r.json: its directory does not exist.'
  )
