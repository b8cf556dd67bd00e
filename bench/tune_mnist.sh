#!/usr/bin/env bash
# Steps tuned to a trained MNIST model (issue 12's goal: at 5 model calls, FD within 10 % of the same
# sampler at 50 calls): tune-steps on the run, then eval at 5 tuned calls, 5 calls with the built-in
# spacings, and 50 calls; FD/KID/precision/recall on the judge's features against MNIST t10k.
#   bash bench/tune_mnist.sh RUN MNIST_DIR JUDGE OUT [SAMPLERS...]
# RUN: a trained MNIST run; JUDGE: a `diffusekit train-classifier` folder; results in OUT/eval-*.json.
# GUIDANCE=2 (environment) tunes and samples a class-conditional run with classifier-free guidance 2;
# SEEDS="0 1 2" scores the tuned 5-call and the 50-call plans from several sets of sample noise.
set -euo pipefail
RUN=$1 MNIST=$2 JUDGE=$3 OUT=$4
shift 4
SAMPLERS=${*:-dpmpp_2m unipc}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DK=${DK:-.venv/bin/diffusekit}
mkdir -p "$OUT"
GUIDANCE=${GUIDANCE:-1} SEEDS=${SEEDS:-0}
EV=(--ref "$MNIST" --ref-split t10k --n 1000 --features "classifier:$JUDGE" --device cpu
    --cache-dir "$OUT/cache" --guidance "$GUIDANCE")
for S in $SAMPLERS; do
  $DK tune-steps "$RUN" --nfe 5 --sampler "$S" --n 32 --out "$OUT/$S-5.json" --device cpu --guidance "$GUIDANCE"
  $DK eval "$RUN" "${EV[@]}" --seed 0 --sampler "$S" --steps 5 --out "$OUT/eval-$S-5.json"
  $DK eval "$RUN" "${EV[@]}" --seed 0 --sampler "$S" --steps 5 --spacing logsnr --out "$OUT/eval-$S-5-logsnr.json"
  for SEED in $SEEDS; do
    suffix=$([ "$SEED" = 0 ] && echo "" || echo "-s$SEED")
    $DK eval "$RUN" "${EV[@]}" --seed "$SEED" --sampler "$S" --timesteps "$OUT/$S-5.json" --out "$OUT/eval-$S-tuned5$suffix.json"
    $DK eval "$RUN" "${EV[@]}" --seed "$SEED" --sampler "$S" --steps 50 --out "$OUT/eval-$S-50$suffix.json"
  done
done
