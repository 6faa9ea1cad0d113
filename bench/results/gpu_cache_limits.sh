#!/usr/bin/env bash
# What bounds the cache stage on a GPU (BENCHMARKS-GPU.md): a profile of its main thread, and the cache stage at a
# larger batch and with more workers. Writes into ${OUT:-gpu-out}/. Same set-up as gpu.sh.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 bench/profile_cache.py --device cuda --workers 8 --batch 512 --top 30 > "$OUT/profile_b512.txt"
head -12 "$OUT/profile_b512.txt"
for spec in "2048 8" "512 15"; do
  set -- $spec
  python3 bench/cache_throughput.py --device cuda --pairs cifar_resnet20,cifar_resnet56 --amps float16 --batch "$1" \
      --workers "$2" --repeats 2 --append "$OUT/gpu_cache_b$1_w$2.md" --json "$OUT/gpu_b$1_w$2.json" | grep "^{"
done
