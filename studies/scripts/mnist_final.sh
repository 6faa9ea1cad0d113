#!/usr/bin/env bash
# After mnist.sh: the student alone and the distilled student (lambda from the validation search), 3 seeds,
# validation and test. `LAMBDA=1 bash studies/scripts/mnist_final.sh`
set -euo pipefail
OUT=${OUT:-runs/mnist}
source "$(dirname "$0")/common.sh"
s=$(date +%s)
python studies/scripts/sweep.py --params "$OUT/params.yaml" --cache "$OUT/logits.zarr" -T 20 -l 0 -l "$LAMBDA" \
    --seeds 0 --seeds 1 --seeds 2 --report-test --out "$OUT/final.jsonl"
echo "final $(( $(date +%s) - s ))" >> "$OUT/times.txt"
