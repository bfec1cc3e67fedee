#!/usr/bin/env bash
# Makes the original google-research vit_jax code importable as `orig_vit_jax`
# (its own package name clashes with ours) for tests/test_parity_original.py.
# Nothing is copied into this repository.
#
#   git clone https://github.com/google-research/vision_transformer /tmp/vt
#   bash tests/make_original_oracle.sh /tmp/vt /tmp/oracle
#   pip install pandas einops   # imported by the original code
#   VIT_JAX_ORIGINAL_PATH=/tmp/oracle python -m pytest tests/test_parity_original.py
set -euo pipefail
src=${1:?usage: make_original_oracle.sh VISION_TRANSFORMER_CLONE OUT_DIR}
out=${2:?usage: make_original_oracle.sh VISION_TRANSFORMER_CLONE OUT_DIR}
pkg="$out/orig_vit_jax"
mkdir -p "$pkg/configs"
for f in __init__.py models.py models_vit.py models_resnet.py models_mixer.py \
         checkpoint.py configs/models.py; do
  [ -f "$src/vit_jax/$f" ] || { echo "missing $src/vit_jax/$f" >&2; exit 1; }
  sed -e 's/from vit_jax/from orig_vit_jax/' -e 's/import vit_jax/import orig_vit_jax/' \
    "$src/vit_jax/$f" > "$pkg/$f"
done
touch "$pkg/configs/__init__.py"
# LiT needs flaxformer and tensorflow_text; the parity tests do not use it.
if [ ! -f "$pkg/models_lit.py" ]; then
  printf 'class LitModel:\n  def __init__(self, *a, **k):\n    raise NotImplementedError\n' \
    > "$pkg/models_lit.py"
fi
echo "oracle ready: VIT_JAX_ORIGINAL_PATH=$out"
