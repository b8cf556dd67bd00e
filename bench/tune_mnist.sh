#!/usr/bin/env bash
# Steps tuned to a trained MNIST model (issue 12's goal: at 5 model calls, FD within 10 % of the same
# sampler at 50 calls): tune-steps on the run, then eval at 5 tuned calls, 5 calls with the built-in
# spacings, and 50 calls; FD/KID/precision/recall on the judge's features against MNIST t10k.
#   bash bench/tune_mnist.sh RUN MNIST_DIR JUDGE OUT [SAMPLERS...]
# RUN: a trained MNIST run; JUDGE: a `diffusekit train-classifier` folder; results in OUT/eval-*.json.
set -euo pipefail
RUN=$1 MNIST=$2 JUDGE=$3 OUT=$4
shift 4
SAMPLERS=${*:-dpmpp_2m unipc}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DK=${DK:-.venv/bin/diffusekit}
mkdir -p "$OUT"
EV=(--ref "$MNIST" --ref-split t10k --n 1000 --features "classifier:$JUDGE" --seed 0 --device cpu
    --cache-dir "$OUT/cache")
for S in $SAMPLERS; do
  $DK tune-steps "$RUN" --nfe 5 --sampler "$S" --n 32 --out "$OUT/$S-5.json" --device cpu
  $DK eval "$RUN" "${EV[@]}" --sampler "$S" --timesteps "$OUT/$S-5.json" --out "$OUT/eval-$S-tuned5.json"
  $DK eval "$RUN" "${EV[@]}" --sampler "$S" --steps 5 --out "$OUT/eval-$S-5.json"
  $DK eval "$RUN" "${EV[@]}" --sampler "$S" --steps 5 --spacing logsnr --out "$OUT/eval-$S-5-logsnr.json"
  $DK eval "$RUN" "${EV[@]}" --sampler "$S" --steps 50 --out "$OUT/eval-$S-50.json"
done
