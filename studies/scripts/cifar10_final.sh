#!/usr/bin/env bash
# After cifar10.sh: the student alone, the distilled student (lambda chosen on validation by the search) and the
# origin's T = 43.25, lambda = 38.21, 3 seeds each, validation and test; three processes in parallel.
# `bash studies/scripts/cifar10_final.sh`
set -euo pipefail
OUT=${OUT:-runs/cifar10}
source "$(dirname "$0")/common.sh"
L=$(python -c "import json; rows=[json.loads(l) for l in open('$OUT/search.jsonl') if json.loads(l)['kd_weight'] > 0]; \
print(max(rows, key=lambda r: r['val_acc_mean'])['kd_weight'])")
echo "chosen lambda $L (T = 4)"
s=$(date +%s)
run() { python studies/scripts/sweep.py --params "$OUT/params.yaml" --cache "$OUT/logits.zarr" "$@" \
    --seeds 0 --seeds 1 --seeds 2 --report-test --out "$OUT/final.jsonl"; }
run -T 4 -l 0 & run -T 4 -l "$L" & run -T 43.25 -l 38.21 & wait
echo "final $(( $(date +%s) - s ))" >> "$OUT/times.txt"
