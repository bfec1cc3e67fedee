#!/usr/bin/env bash
# The prepared GPU run (under ten minutes on one H100/H200-class GPU): the
# accelerator table for docs/performance.md. Writes $OUT/gpu_table.txt and .json.
#   OUT=/tmp/gpu bash benchmarks/gpu.sh
set -euo pipefail
OUT=${OUT:-/tmp/vit_jax_gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import jax; print(jax.devices())" | tee -a "$OUT/gpu.txt"
# Rows print as they finish, so a cut-off run still leaves its table.
timeout 540 python -m benchmarks.accelerator --models ViT-B_16,ViT-L_16 \
    --max_batch 512 --json "$OUT/gpu_table.json" | tee "$OUT/gpu_table.txt"
