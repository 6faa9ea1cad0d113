#!/usr/bin/env bash
# Does the windowed shuffle (distill.shuffle_chunks) change accuracy? The same MNIST store (runs/mnist-plain, made
# by mnist_plain.sh: 55k training samples in 54 chunks of 1024), students trained with a full shuffle and with
# windows of 4 chunks, seeds 0-2, T = 20 and λ = 0.5 as chosen there, 5 epochs each (shortened from 20). Prints validation accuracies.
# `bash studies/scripts/window_accuracy.sh`
set -euo pipefail
RUN=${RUN:-runs/mnist-plain}
BASE=${BASE:-$RUN/params.yaml}
OUT=${OUT:-runs/mnist-window}
EPOCHS=${EPOCHS:-5}
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT"
: > "$OUT/times.txt"
for seed in 0 1 2; do
  for window in 0 4; do
    name="w${window}-s${seed}"
    python studies/scripts/derive_params.py "$BASE" "$OUT/$name.yaml" distill.epochs="$EPOCHS" \
        distill.shuffle_chunks="$window" seed="$seed" distill.kd_weight=0.5
    t "$name" kd distill --params "$OUT/$name.yaml" --teacher "$RUN/teacher.pt" --cache "$RUN/logits.zarr" \
        --out "$OUT/$name.pt" | tee "$OUT/$name.txt"
  done
done
grep -H "validation accuracy" "$OUT"/*.txt
