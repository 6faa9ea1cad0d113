#!/usr/bin/env bash
# Top-K storage on 100 classes of real images (RESULTS.md, "Students from top-K stores, 100 classes"): MNIST pairs
# (studies/scripts/mnist_pairs.py) in the CIFAR-100 layout, an MLP teacher trained by `kd teacher`, its full store and
# top-1 / top-5 stores, the loss and gradient errors of each tail scheme on this teacher's logits
# (bench/topk.py), then students trained from each store with each tail (studies/scripts/topk_students.py,
# 3 seeds) at T = 4 and T = 1.
# `bash studies/scripts/topk_many_classes.sh` (MNIST at ../shared/data/mnist; writes runs/pairs100/).
set -euo pipefail
RUN=${RUN:-runs/pairs100}
OUT=$RUN
source "$(dirname "$0")/common.sh"
[ -e "$RUN/cifar-100-python/train" ] || python studies/scripts/mnist_pairs.py \
    --mnist ${MNIST:-../shared/data/mnist} --out "$RUN"
[ -e "$RUN/params.yaml" ] || python studies/scripts/derive_params.py runs/mnist-window/base.yaml "$RUN/params.yaml" \
    data.name=cifar100 data.root="$RUN" data.val_fraction=0.1 'augment=[{RandomCrop: {size: 32, padding: 2}}]' \
    teacher.augment=null teacher.epochs=10 teacher.optimizer.name=adam teacher.optimizer.lr=0.001 \
    teacher.arch_options.dropout=0.2 teacher.arch_options.input_dropout=0.0 \
    'distill.student_options={hidden_sizes: [256]}' distill.epochs=5 distill.temperature=4.0 distill.kd_weight=1.0 \
    distill.optimizer.name=adam distill.optimizer.lr=0.001 distill.shuffle_chunks=0 cache.num_views=2
[ -e "$RUN/teacher.pt" ] || OMP_NUM_THREADS=2 t teacher kd teacher --params "$RUN/params.yaml" --out "$RUN/teacher.pt"
[ -e "$RUN/full.zarr" ] || t cache-full kd cache --params "$RUN/params.yaml" --teacher "$RUN/teacher.pt" --out "$RUN/full.zarr"
for K in 1 5; do
  python studies/scripts/derive_params.py "$RUN/params.yaml" "$RUN/top$K.yaml" cache.storage=topk cache.top_k=$K
  [ -e "$RUN/top$K.zarr" ] || t "cache-top$K" kd cache --params "$RUN/top$K.yaml" --teacher "$RUN/teacher.pt" \
      --out "$RUN/top$K.zarr"
done
python bench/topk.py --store "$RUN/full.zarr" --ks 1,5,20 --no-synthetic ${APPEND:+--append "$APPEND"}
OMP_NUM_THREADS=2 t students python studies/scripts/topk_students.py --params "$RUN/params.yaml" \
    --teacher "$RUN/teacher.pt" --full "$RUN/full.zarr" --topk "$RUN/top1.zarr,$RUN/top5.zarr" --seeds ${SEEDS:-0,1,2} \
    ${RESULTS:+--append "$RESULTS"} --json bench/results.json
python studies/scripts/derive_params.py "$RUN/params.yaml" "$RUN/params_T1.yaml" distill.temperature=1.0
OMP_NUM_THREADS=2 t students-T1 python studies/scripts/topk_students.py --params "$RUN/params_T1.yaml" \
    --teacher "$RUN/teacher.pt" --full "$RUN/full.zarr" --topk "$RUN/top1.zarr,$RUN/top5.zarr" --seeds ${SEEDS:-0,1,2} \
    ${RESULTS:+--append "$RESULTS"} --json bench/results.json
