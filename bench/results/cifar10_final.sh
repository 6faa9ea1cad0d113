#!/usr/bin/env bash
# After cifar10.sh: the student alone and the distilled student (lambda chosen on validation by the search), 3 seeds,
# then the origin's T = 43.25, lambda = 38.21 on the same seeds; validation and test. `bash bench/results/cifar10_final.sh`
set -euo pipefail
OUT=${OUT:-runs/cifar10}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
t() { local name=$1; shift; local s=$(date +%s); "$@"; echo "$name $(( $(date +%s) - s ))" >> "$OUT/times.txt"; }
L=$(python -c "import json; rows=[json.loads(l) for l in open('$OUT/search.jsonl') if json.loads(l)['kd_weight'] > 0]; \
print(max(rows, key=lambda r: r['val_acc_mean'])['kd_weight'])")
echo "chosen lambda $L (T = 4)"
t final python bench/sweep.py --params "$OUT/params.yaml" --cache "$OUT/logits.zarr" -T 4 -l 0 -l "$L" \
    --seeds 0 --seeds 1 --seeds 2 --report-test --out "$OUT/final.jsonl"
t origin python bench/sweep.py --params "$OUT/params.yaml" --cache "$OUT/logits.zarr" -T 43.25 -l 38.21 \
    --seeds 0 --seeds 1 --seeds 2 --report-test --out "$OUT/final.jsonl"
