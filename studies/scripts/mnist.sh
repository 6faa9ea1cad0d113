#!/usr/bin/env bash
# MNIST with recipes/mnist-hinton.yaml, but the students too on jittered views (4 per sample), shortened for a
# 2-core CPU (RESULTS.md, first MNIST table; mnist_plain.sh is the paper's set-up). Run from the project root
# with the venv active: `bash studies/scripts/mnist.sh`. Writes runs/mnist/ (teacher, store, sweep.jsonl, times).
set -euo pipefail
OUT=${OUT:-runs/mnist}
MNIST=${MNIST:-../shared/data/mnist}
EPOCHS=${EPOCHS:-20}
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT"
python studies/scripts/derive_params.py recipes/mnist-hinton.yaml "$OUT/params.yaml" data.root="$MNIST" \
    teacher.epochs="$EPOCHS" distill.epochs="$EPOCHS" "augment=[{RandomCrop: {size: 28, padding: 2}}]" \
    cache.num_views=4
: > "$OUT/times.txt"
t teacher kd teacher --params "$OUT/params.yaml" --out "$OUT/teacher.pt" --live-dir "$OUT/live/teacher"
t cache kd cache --params "$OUT/params.yaml" --teacher "$OUT/teacher.pt" --out "$OUT/logits.zarr"
du -sb "$OUT/logits.zarr" >> "$OUT/times.txt"
# T = 20 as in the paper; lambda chosen on validation (seed 0), then 3 seeds with test scores.
t search python studies/scripts/sweep.py --params "$OUT/params.yaml" --cache "$OUT/logits.zarr" -T 20 -l 0.5 -l 1 -l 3 \
    --seeds 0 --out "$OUT/search.jsonl"
