#!/usr/bin/env bash
# RESULTS.md, "The default run": the embedded digits with a training subset of N images ($1), its own teacher and
# store, then the student alone against distilled (5 seeds, validation). Run from the project root: bash bench/results/digits_subset.sh 300
# (the second sweep of RESULTS.md: python bench/sweep.py ... -T 2 -l 0.5 with the same seeds and --epochs 60).
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 TQDM_DISABLE=1
D=runs/digits/sub$1
mkdir -p $D
[ -f $D/params.yaml ] || .venv/bin/python bench/derive_params.py params.yaml $D/params.yaml data.train_subset=$1
[ -f $D/teacher.pt ] || .venv/bin/kd teacher --params $D/params.yaml --out $D/teacher.pt
[ -d $D/logits.zarr ] || .venv/bin/kd cache --params $D/params.yaml --teacher $D/teacher.pt --out $D/logits.zarr
.venv/bin/python bench/results/test_accuracy.py $D/params.yaml $D/teacher.pt
.venv/bin/python bench/sweep.py --params $D/params.yaml --cache $D/logits.zarr -T 4 -l 0 -l 1 --seeds 0 --seeds 1 --seeds 2 --seeds 3 --seeds 4 --epochs 60 --out $D/sweep.jsonl
