#!/usr/bin/env bash
# The steps of cifar10.sh after the teacher (cache and the validation search), on their own.
set -euo pipefail
OUT=${OUT:-runs/cifar10}
source "$(dirname "$0")/common.sh"
t cache kd cache --params "$OUT/params.yaml" --teacher "$OUT/teacher.pt" --out "$OUT/logits.zarr"
du -sb "$OUT/logits.zarr" >> "$OUT/times.txt"
t search python studies/scripts/sweep.py --params "$OUT/params.yaml" --cache "$OUT/logits.zarr" -T 4 -l 0 -l 1 -l 4 \
    --seeds 0 --out "$OUT/search.jsonl"
