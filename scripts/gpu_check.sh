#!/usr/bin/env bash
# For whoever has a GPU: train -> sample -> edit -> invert -> inpaint -> eval on CUDA (or MPS) in a few
# minutes, then the CUDA tests. Usage: bash scripts/gpu_check.sh [cuda|mps]   (after scripts/setup.sh with a
# CUDA build of torch, e.g. TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128)
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=${1:-cuda}
OUT=${OUT:-runs/gpu_check}
DK=".venv/bin/python -m diffusekit"
rm -rf "$OUT"
$DK train --data digits --out "$OUT/run" --train-steps 600 --batch-size 128 --device "$DEV" --precision bf16 \
    --sample-every 300 --seed 0
$DK sample "$OUT/run" --device "$DEV" --sampler euler_ancestral --steps 20 --n 100 --class each --seed 1 \
    --out "$OUT/grid.png" --trajectory "$OUT/trajectory.png"
$DK sample "$OUT/run" --device "$DEV" --guide brightness=0.9 --n 16 --out "$OUT/bright.png"
$DK sample "$OUT/run" --device "$DEV" --sampler ddpm --steps 50 --n 16 --class 3 --guidance 3 --out "$OUT/cfg.png"
$DK edit "$OUT/run" --device "$DEV" --image "$OUT/grid.png" --strength 0.6 --class 7 --out "$OUT/edited.png" 2>/dev/null \
  || .venv/bin/python - "$OUT" "$DEV" <<'PY'
import sys, torch, diffusekit as dk
from diffusekit.data import DataConfig, load_dataset, save_image
out, dev = sys.argv[1], sys.argv[2]
img = load_dataset(DataConfig("digits")).images[:1]
save_image(img[0], f"{out}/digit.png")
pipe = dk.Pipeline.load(f"{out}/run", device=dev)
g = torch.Generator(dev).manual_seed(0)                     # a generator on the GPU works too
save_image(pipe.edit(img, 0.6, "ddpm", 50, g, 7)[0], f"{out}/edited.png")
x_T = pipe.invert(img, 50, 2, 0)
print("inversion PSNR", dk.editing.psnr(pipe.reconstruct(x_T, 50, 0), img))
mask = torch.zeros(1, 1, 8, 8); mask[..., 4:, :] = 1
save_image(pipe.inpaint(img, mask, "ddpm", 50, g, 2, 0)[0], f"{out}/inpainted.png")
PY
$DK eval "$OUT/run" --device "$DEV" --n 500 --steps 20 --out "$OUT/eval.json"
.venv/bin/python -m pytest -q tests/test_app_layer.py -k cuda -rs
echo "GPU check done: pictures and eval.json in $OUT"
