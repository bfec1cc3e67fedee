"""Smoke tests of the benchmark scripts' measuring functions (no timings)."""

import pytest

from benchmarks import inference
import vit_jax.models

# The slow tier: the benchmark scripts run their measurements.
pytestmark = pytest.mark.slow


def test_inference_row_and_largest_batch():
  row = inference.measure('testing', 16, 2, repeats=1)
  assert row['model'] == 'testing' and row['batch'] == 2
  assert row['images_per_s'] > 0 and row['compile_s'] > 0
  model = vit_jax.models.get_model('testing', num_classes=1000)
  fn = inference.forward_fn(model)
  params = inference.abstract_params(model, 16)
  need = [inference.program_bytes(fn, params, b, 16) for b in (1, 2, 4, 8)]
  assert need == sorted(need) and need[0] > 0
  # A memory limit of exactly what batch 4 needs: 4 fits, 8 does not.
  assert inference.largest_batch(fn, params, 16, need[2]) == 4
  assert inference.largest_batch(fn, params, 16, need[0] - 1) == 0
  assert inference.device_memory_bytes(2.0) == 2 * 2**30


def test_suite_rows_measure_the_product_step():
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  from vit_jax import flops  # pylint: disable=g-import-not-at-top

  for variant, devices in (('base', 8), ('fsdp', 8), ('scan', 8)):
    row = run.measure_step(
        'testing', variant, 'train', batch=8, res=16, steps=1
    )
    assert row['devices'] == devices and row['step_s'] > 0
    assert row['program_bytes_per_device'] > 0
    assert row['gflops_per_s'] == pytest.approx(
        8 * flops.train_flops('testing', 16) / row['step_s'] / 1e9
    )
  row = run.measure_step(
      'testing',
      'base',
      'inference',
      batch=8,
      res=16,
      steps=1,
      compile_only=True,
  )
  assert 'step_s' not in row and row['compile_s'] > 0


def test_suite_targets_compare_the_right_rows():
  from benchmarks import run  # pylint: disable=g-import-not-at-top

  def row(model, variant, mode, **values):
    return dict(model=model, variant=variant, mode=mode, **values)

  rows = [
      row(
          'ViT-S_16',
          'base',
          'train',
          gflops_per_s=70.0,
          step_s=10.0,
          images_per_s=3.2,
          program_bytes_per_device=100,
          compile_s=3.0,
      ),
      row(
          'ViT-S_16',
          'remat',
          'train',
          gflops_per_s=60.0,
          step_s=12.0,
          images_per_s=2.7,
          program_bytes_per_device=40,
          compile_s=3.0,
      ),
      row(
          'ViT-S_16',
          'base',
          'inference',
          gflops_per_s=75.0,
          step_s=1.0,
          compile_s=1.0,
      ),
      row('ViT-B_16', 'scan', 'train', compile_s=1.0),  # With dropout.
      row(
          'ViT-B_16',
          'scan',
          'train',
          compile_s=2.0,
          model_overrides=run._NO_DROPOUT,
      ),
      row(
          'ViT-L_16',
          'scan',
          'train',
          compile_s=2.6,
          model_overrides=run._NO_DROPOUT,
      ),
      row(
          'ViT-B_16',
          'scan',
          'train',
          compile_s=2.1,
          model_overrides=run.twice_as_deep('ViT-B_16'),
      ),
  ]
  checks = {
      what: (measured, met)
      for what, measured, _, met in run.targets(
          rows, peak=100.0, pipeline={'pipeline_images_per_s': 9.0}
      )
  }
  assert checks['ViT-S_16 train MFU (float32)'] == ('70.0%', True)
  assert checks['ViT-S_16 inference MFU (float32)'] == ('75.0%', True)
  assert checks['ViT-S_16 remat: program memory vs base'] == ('40%', True)
  assert checks['ViT-S_16 remat: throughput loss vs base'] == ('17%', True)
  assert not any('scan_remat' in what for what in checks)  # No such row.
  assert checks['scan: ViT-L_16 / ViT-B_16 train-step compile time'] == (
      '1.30x',
      False,
  )
  assert run.twice_as_deep('ViT-B_16')['transformer']['num_layers'] == 24
  assert checks['scan: ViT-B_16 at 2x depth / 1x train-step compile'] == (
      '1.05x',
      True,
  )
  assert not any('ViT-L_16 at 2x' in what for what in checks)  # No row.
  assert checks['input pipeline / ViT-S_16 train step images/s'] == (
      '2.8x',
      False,
  )
  assert not any('ViT-B_16 train MFU' in what for what in checks)


def test_accelerator_mode_peaks_and_batch_search():
  from benchmarks import accelerator  # pylint: disable=g-import-not-at-top

  assert accelerator.peak_tflops('NVIDIA H200') == 989.0
  assert accelerator.peak_tflops('NVIDIA A100-SXM4-80GB') == 312.0
  assert accelerator.peak_tflops('TPU v4') == 275.0
  assert accelerator.peak_tflops('cpu') is None
  # A fake compiler: the program needs 1000 bytes per image; 17,000 bytes
  # of memory (90% usable: a margin for the runtime) fit 8 images, not 16.
  seen = []

  def compile_only(task):
    assert task['compile_only'] and task['variant'] == 'bf16'
    seen.append(task['batch'])
    return {'program_bytes_per_device': 1000 * task['batch']}

  assert (
      accelerator.largest_batch(
          compile_only, 'testing', 16, 17_000, max_batch=1024, start=1
      )
      == 8
  )
  assert seen == [1, 2, 4, 8, 16]
  assert (
      accelerator.largest_batch(
          compile_only, 'testing', 16, 10**9, max_batch=64, start=8
      )
      == 64
  )
  assert (
      accelerator.largest_batch(
          lambda task: {'error': 'out of memory'},
          'testing',
          16,
          10**9,
          max_batch=64,
      )
      == 0
  )
