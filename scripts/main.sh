#!/usr/bin/env bash
# The main job: train on the built-in 8x8 digits (about 5 minutes on a 2-core CPU) and write pictures.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-} bash scripts/setup.sh
OUT=${OUT:-runs/digits}
.venv/bin/diffusekit train --data digits --out "$OUT" --seed 0 "$@"
.venv/bin/diffusekit sample "$OUT" --sampler dpmpp_2m --steps 20 --n 100 --class each --seed 0 \
    --out "$OUT/grid.png" --trajectory "$OUT/trajectory.png"
.venv/bin/diffusekit plot-schedule --out "$OUT/schedule.png"
echo "pictures: $OUT/grid.png $OUT/trajectory.png $OUT/schedule.png $OUT/loss.png $OUT/samples/"
