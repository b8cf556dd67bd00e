#!/usr/bin/env bash
# Text-to-image latent diffusion in one command, from a fresh clone: an autoencoder on the built-in
# captioned shapes, a text-conditioned UNet on its latents (learned text encoder), then a grid with
# one labelled row per prompt. The recipe of bench/text_to_image.py (docs/BENCHMARKS.md, "Text-to-image"):
# about 14 CPU-minutes of training in all on a 2-core AVX512-BF16 CPU (3.3 autoencoder + 11 UNet with
# its learned text encoder), joint prompt adherence 99.7 % at guidance 2.
#   OUT       where the runs, prompts.txt and grid.png go (default runs/text2img)
#   GUIDANCE  classifier-free guidance scale of the grid (default 2)
#   AE_STEPS, STEPS   training steps of the autoencoder (default 1500) and of the latent UNet (3000)
# Extra arguments go to `diffusekit train`, e.g. --device cuda or --batch-size 128.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-} bash scripts/setup.sh
OUT=${OUT:-runs/text2img}
GUIDANCE=${GUIDANCE:-2}
AE_STEPS=${AE_STEPS:-1500}
STEPS=${STEPS:-3000}
DK=.venv/bin/diffusekit
mkdir -p "$OUT"
# --resume: a finished folder is kept as it is, an interrupted one continues where it stopped
$DK train-autoencoder --data shapes --out "$OUT/ae" --train-steps "$AE_STEPS" --seed 0 --resume
if [ -f "$OUT/ldm/config.json" ]; then
  $DK train --out "$OUT/ldm" --resume --train-steps "$STEPS" "$@"
else
  $DK train --data shapes --autoencoder "$OUT/ae" --text learned --out "$OUT/ldm" --train-steps "$STEPS" \
      --seed 0 "$@"
fi
cat > "$OUT/prompts.txt" <<'PROMPTS'
a large red circle on the left
a small blue square at the top
a large yellow triangle in the center
a small magenta circle at the bottom
a large cyan square on the right
a small green triangle on the left
PROMPTS
$DK sample "$OUT/ldm" --prompts-file "$OUT/prompts.txt" --n 8 --guidance "$GUIDANCE" --sampler dpmpp_2m \
    --steps 20 --seed 0 --out "$OUT/grid.png"
echo "pictures: $OUT/grid.png $OUT/ae/reconstructions.png $OUT/ldm/samples/"
