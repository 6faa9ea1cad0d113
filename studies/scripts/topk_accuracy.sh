#!/usr/bin/env bash
# Students trained from top-K stores against one trained from the full store (MNIST, the teacher and params of
# runs/mnist-plain, T = 20, λ = 0.5, MLP 800-800, 5 epochs, seeds 0-2). Prints validation accuracies and store sizes.
# `BASE=runs/mnist-window/base.yaml bash studies/scripts/topk_accuracy.sh`
set -euo pipefail
RUN=${RUN:-runs/mnist-plain}
BASE=${BASE:-$RUN/params.yaml}
OUT=${OUT:-runs/mnist-topk}
EPOCHS=${EPOCHS:-5}
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT"
: > "$OUT/times.txt"
for seed in ${SEEDS:-0 1 2}; do
for K in full 1 3; do
  if [ "$K" = full ]; then store="$RUN/logits.zarr"; extra="cache.storage=full"; else
    store="$OUT/top$K.zarr"; extra="cache.storage=topk cache.top_k=$K"; fi
  name="$K-s$seed"
  python studies/scripts/derive_params.py "$BASE" "$OUT/$name.yaml" distill.epochs="$EPOCHS" distill.kd_weight=0.5 \
      seed="$seed" $extra
  [ -e "$store" ] || t "cache-$K" kd cache --params "$OUT/$name.yaml" --teacher "$RUN/teacher.pt" --out "$store"
  t "distill-$name" kd distill --params "$OUT/$name.yaml" --teacher "$RUN/teacher.pt" --cache "$store" \
      --out "$OUT/$name.pt" | tee "$OUT/$name.txt"
done
done
grep -H "validation accuracy" "$OUT"/*-s*.txt
du -sb "$RUN/logits.zarr" "$OUT"/top*.zarr
