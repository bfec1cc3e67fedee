"""Smoke tests of the benchmark scripts' measuring functions (no timings)."""

from benchmarks import inference
import vit_jax.models


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
