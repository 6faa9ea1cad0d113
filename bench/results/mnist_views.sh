#!/usr/bin/env bash
# Issue 16's follow-up on MNIST (RESULTS.md, "How many views" -> MNIST): the views study's best setting (plain views)
# against the same recipe with MixUp per view (function matching), both against the student alone.
# recipes/mnist-hinton.yaml with its 60-epoch teacher; students 20 epochs (shortened), T = 20, lambda = 0.5, 3 seeds.
# Rows: alone (plain images), distilled from 1 plain view (the recipe), alone on MixUp views (mixed labels),
# distilled from 4 MixUp views (lambda_mix ~ U[0, 1]). `bash bench/results/mnist_views.sh`; then
# `python bench/results/mnist_views_table.py runs/mnist-views`.
set -euo pipefail
OUT=${OUT:-runs/mnist-views}
MNIST=${MNIST:-../shared/data/mnist}
SEEDS=${SEEDS:-"0 1 2"}
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT"
base=(data.root="$MNIST" distill.epochs=20)
mix=(mix.mode=mixup mix.mixup_alpha=1.0 mix.prob=1.0 cache.num_views=4)
python bench/derive_params.py recipes/mnist-hinton.yaml "$OUT/plain.yaml" "${base[@]}"
python bench/derive_params.py recipes/mnist-hinton.yaml "$OUT/mix.yaml" "${base[@]}" "${mix[@]}"
touch "$OUT/times.txt"
[ -f "$OUT/teacher.pt" ] || t teacher kd teacher --params "$OUT/plain.yaml" --out "$OUT/teacher.pt"
for v in plain mix; do
    [ -d "$OUT/$v.zarr" ] || t "cache-$v" kd cache --params "$OUT/$v.yaml" --teacher "$OUT/teacher.pt" --out "$OUT/$v.zarr"
done
student() {  # student ROW PARAMS SEED [--baseline]
    local row=$1 params=$2 seed=$3; shift 3
    local ckpt="$OUT/$row-s$seed.pt"
    [ -f "$ckpt" ] && return 0
    python bench/derive_params.py "$OUT/$params.yaml" "$OUT/$row-s$seed.yaml" seed="$seed"
    t "$row-s$seed" kd distill --params "$OUT/$row-s$seed.yaml" --teacher "$OUT/teacher.pt" --cache "$OUT/$params.zarr" \
        --out "$ckpt" "$@"
}
lane() {  # lane ROW PARAMS [--baseline]: the row's seeds one after the other
    local row=$1 params=$2; shift 2
    for seed in $SEEDS; do student "$row" "$params" "$seed" "$@"; done
}
if [ "${LANES:-2}" = 2 ]; then
    (lane alone plain --baseline; lane plain plain) & (lane alone_mix mix --baseline; lane mix mix) & wait
else
    lane alone plain --baseline; lane plain plain; lane alone_mix mix --baseline; lane mix mix
fi
