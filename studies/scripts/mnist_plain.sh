#!/usr/bin/env bash
# MNIST as in the paper: the teacher trained with jitter, the students on the plain images (recipes/mnist-hinton.yaml),
# shortened for a 2-core CPU (RESULTS.md). Reuses the teacher of mnist.sh when present (same recipe, seed and teacher
# augmentation, so `kd teacher` would make the same file). `bash studies/scripts/mnist_plain.sh`
set -euo pipefail
OUT=${OUT:-runs/mnist-plain}
MNIST=${MNIST:-../shared/data/mnist}
EPOCHS=${EPOCHS:-20}
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT"
python studies/scripts/derive_params.py recipes/mnist-hinton.yaml "$OUT/params.yaml" data.root="$MNIST" \
    teacher.epochs="$EPOCHS" distill.epochs="$EPOCHS"
: > "$OUT/times.txt"
if [ -f runs/mnist/teacher.pt ]; then cp runs/mnist/teacher.pt "$OUT/teacher.pt"; else
    t teacher kd teacher --params "$OUT/params.yaml" --out "$OUT/teacher.pt" --live-dir "$OUT/live/teacher"; fi
t cache kd cache --params "$OUT/params.yaml" --teacher "$OUT/teacher.pt" --out "$OUT/logits.zarr"
du -sb "$OUT/logits.zarr" >> "$OUT/times.txt"
t search python studies/scripts/sweep.py --params "$OUT/params.yaml" --cache "$OUT/logits.zarr" -T 20 -l 0.5 -l 1 \
    --seeds 0 --out "$OUT/search.jsonl"
L=$(python -c "import json; rows=[json.loads(l) for l in open('$OUT/search.jsonl')]; \
print(max(rows, key=lambda r: r['val_acc_mean'])['kd_weight'])")
t final python studies/scripts/sweep.py --params "$OUT/params.yaml" --cache "$OUT/logits.zarr" -T 20 -l 0 -l "$L" \
    --seeds 0 --seeds 1 --seeds 2 --report-test --out "$OUT/final.jsonl"
