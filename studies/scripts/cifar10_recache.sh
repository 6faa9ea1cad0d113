#!/usr/bin/env bash
# Rebuild runs/cifar10's store with the current store format (the teacher and params of cifar10.sh are kept).
set -euo pipefail
OUT=${OUT:-runs/cifar10}
JPG=${JPG:-runs/cifar10-jpg}
source "$(dirname "$0")/common.sh"
python studies/scripts/derive_params.py recipes/cifar10-origin.yaml "$OUT/params.yaml" data.name=imagefolder \
    data.root="$JPG" data.train_subset=20000 teacher.arch=resnet20 teacher.epochs=15 \
    teacher.optimizer.schedule=cosine teacher.optimizer.lr_milestones=[] teacher.optimizer.lr_factors=[] \
    cache.num_views=4 distill.epochs=15 distill.optimizer.lr_milestones=[13]
rm -rf "$OUT/logits.zarr"
s=$(date +%s); kd cache --params "$OUT/params.yaml" --teacher "$OUT/teacher.pt" --out "$OUT/logits.zarr"
echo "cache(rebuilt) $(( $(date +%s) - s ))" >> "$OUT/times.txt"
