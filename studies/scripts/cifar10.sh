#!/usr/bin/env bash
# CIFAR-10 (JPEG class folders from ../shared/data) with recipes/cifar10-origin.yaml, shortened for a 2-core CPU
# (see RESULTS.md). Run from the project root with the venv active: `bash studies/scripts/cifar10.sh`.
set -euo pipefail
OUT=${OUT:-runs/cifar10}
JPG=${JPG:-runs/cifar10-jpg}
SUBSET=${SUBSET:-20000}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-15}
EPOCHS=${EPOCHS:-15}
MILESTONE=${MILESTONE:-13}
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT" "$JPG"
[ -d "$JPG/train" ] || tar xzf ../shared/data/cifar10-jpg.tar.gz -C "$JPG"
python studies/scripts/derive_params.py recipes/cifar10-origin.yaml "$OUT/params.yaml" data.name=imagefolder \
    data.root="$JPG" data.train_subset="$SUBSET" teacher.arch=resnet20 teacher.epochs="$TEACHER_EPOCHS" \
    teacher.optimizer.schedule=cosine teacher.optimizer.lr_milestones=[] teacher.optimizer.lr_factors=[] \
    cache.num_views=4 distill.epochs="$EPOCHS" distill.optimizer.lr_milestones=["$MILESTONE"]
: > "$OUT/times.txt"
t teacher kd teacher --params "$OUT/params.yaml" --out "$OUT/teacher.pt" --live-dir "$OUT/live/teacher"
t cache kd cache --params "$OUT/params.yaml" --teacher "$OUT/teacher.pt" --out "$OUT/logits.zarr"
du -sb "$OUT/logits.zarr" >> "$OUT/times.txt"
# T and lambda chosen on validation (seed 0); the student alone is the lambda = 0 row.
t search python studies/scripts/sweep.py --params "$OUT/params.yaml" --cache "$OUT/logits.zarr" -T 4 -l 0 -l 1 -l 4 \
    --seeds 0 --out "$OUT/search.jsonl"
