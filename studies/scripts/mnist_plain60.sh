#!/usr/bin/env bash
# MNIST as in the paper (recipes/mnist-hinton.yaml) with the recipe's full 60-epoch teacher; students 20 epochs,
# lambda = 0.5 (chosen on validation with mnist_plain.sh's teacher). `bash studies/scripts/mnist_plain60.sh`
set -euo pipefail
OUT=${OUT:-runs/mnist-plain60}
MNIST=${MNIST:-../shared/data/mnist}
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT"
python studies/scripts/derive_params.py recipes/mnist-hinton.yaml "$OUT/params.yaml" data.root="$MNIST" \
    distill.epochs=20
: > "$OUT/times.txt"
t teacher kd teacher --params "$OUT/params.yaml" --out "$OUT/teacher.pt" --live-dir "$OUT/live/teacher"
t cache kd cache --params "$OUT/params.yaml" --teacher "$OUT/teacher.pt" --out "$OUT/logits.zarr"
du -sb "$OUT/logits.zarr" >> "$OUT/times.txt"
run() { python studies/scripts/sweep.py --params "$OUT/params.yaml" --cache "$OUT/logits.zarr" -T 20 "$@" \
    --seeds 0 --seeds 1 --seeds 2 --report-test --out "$OUT/final.jsonl"; }
s=$(date +%s); run -l 0 & run -l 0.5 & wait; echo "final $(( $(date +%s) - s ))" >> "$OUT/times.txt"
