#!/usr/bin/env bash
# For whoever has a GPU: train -> sample -> edit -> invert -> inpaint -> eval on CUDA (or MPS) in a few
# minutes, then the CUDA tests. Usage: bash scripts/gpu_check.sh [cuda|mps]   (after scripts/setup.sh with a
# CUDA build of torch, e.g. TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128)
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=${1:-cuda}
OUT=${OUT:-runs/gpu_check}
DK=".venv/bin/python -m diffusekit"
rm -rf "$OUT" && mkdir -p "$OUT"
# an input digit and a lower-half mask, 8x8
.venv/bin/python -c "
import sys, numpy as np; from PIL import Image
from diffusekit.data import DataConfig, load_dataset, save_image
save_image(load_dataset(DataConfig('digits')).images[0], '$OUT/digit.png')
m = np.zeros((8, 8), np.uint8); m[4:] = 255; Image.fromarray(m).save('$OUT/mask.png')"
$DK train --data digits --out "$OUT/run" --train-steps 600 --batch-size 128 --device "$DEV" --precision bf16 \
    --sample-every 300 --seed 0
$DK sample "$OUT/run" --device "$DEV" --sampler euler_ancestral --steps 20 --n 100 --class each --seed 1 \
    --out "$OUT/grid.png" --trajectory "$OUT/trajectory.png"
$DK sample "$OUT/run" --device "$DEV" --guide brightness=0.9 --n 16 --out "$OUT/bright.png"
$DK sample "$OUT/run" --device "$DEV" --sampler ddpm --steps 50 --n 16 --class 3 --guidance 3 --out "$OUT/cfg.png"
$DK edit "$OUT/run" --device "$DEV" --image "$OUT/digit.png" --strength 0.6 --class 7 --out "$OUT/edited.png"
$DK invert "$OUT/run" --device "$DEV" --image "$OUT/digit.png" --class 0 --edit-class 8 --out "$OUT/inversion"
$DK inpaint "$OUT/run" --device "$DEV" --image "$OUT/digit.png" --mask "$OUT/mask.png" --sampler ddpm --steps 50 \
    --resample 2 --class 0 --out "$OUT/inpainted.png"
$DK eval "$OUT/run" --device "$DEV" --n 500 --steps 20 --out "$OUT/eval.json"
$DK sample "$OUT/run" --device "$DEV" --cuda-graphs off --steps 20 --n 64 --class each --seed 1 --out "$OUT/eager.png"
.venv/bin/python -m pytest -q tests/test_app_layer.py tests/base/test_cuda_graphs.py -k cuda -rs
[ "$DEV" = cuda ] && .venv/bin/python bench/cuda_graphs.py --json "$OUT/cuda_graphs.json"
echo "GPU check done: pictures and eval.json in $OUT"
