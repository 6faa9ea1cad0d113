#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md (run on a machine with CUDA and this repository's Python packages; the lent
# device had torch but not zarr, so zarr and its needs came as wheels in .whl/). Writes into ${OUT:-gpu-out}/.
set -euo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD TQDM_DISABLE=1 PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, zarr; print('torch', torch.__version__, 'zarr', zarr.__version__, torch.cuda.get_device_name())"
python3 bench/cache_throughput.py --device cuda --workers 8 --repeats 3 --append "$OUT/gpu_cache.md" --json "$OUT/gpu.json"
python3 bench/throughput.py --device cuda --repeats 3 --window 1.0 --budget 20 --out "$OUT/gpu_distill.md"
