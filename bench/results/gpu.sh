#!/usr/bin/env bash
# The GPU figures of BENCHMARKS-GPU.md (run on a machine with CUDA and this repository's Python packages; the lent
# device had torch but not zarr, so zarr and its needs came as wheels in .whl/). Writes into ${OUT:-gpu-out}/.
# With gpu-old/pipeline present (an earlier commit's pipeline/), the cache stage is timed with it too, side by side.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi -L
python3 -c "import torch, zarr; print('torch', torch.__version__, 'zarr', zarr.__version__, torch.cuda.get_device_name())"
# issue 23 first: the student's step against the oracle (resnet20 at batch 512 and resnet18 at 224 px; bfloat16,
# channels-last, with and without torch.compile), then the cache benches
python3 bench/student_speed.py --device cuda --repeats ${SPEED_REPEATS:-2} --settings bfloat16_cl,bfloat16_cl_compile \
    --append "$OUT/gpu_student.md" --json "$OUT/gpu.json"
python3 bench/replay_check.py --device cuda
# issue 15's pair: an ImageNet-like JPEG folder (made here; 2,500 images, 2,025 of them training), resnet50 at 224
python3 bench/imagefolder_cache.py --device cuda --teacher resnet50 --amp bfloat16 --images 2500 --samples 2000 \
    --views 8 --batch 256 --workers 15 --repeats ${REPEATS:-3} --data /tmp/kd_imagenet_like \
    --append "$OUT/gpu_imagefolder.md" --json "$OUT/gpu.json"
python3 bench/cache_throughput.py --device cuda --workers 8 --repeats ${REPEATS:-3} --amps off,float16 \
    --append "$OUT/gpu_cache.md" --json "$OUT/gpu.json"
if [ -d gpu-old/pipeline ]; then
  PYTHONPATH=${SITE:+$SITE:}$PWD/gpu-old python3 bench/cache_throughput.py --device cuda --workers 8 --repeats 3 \
      --amps float16 --append "$OUT/gpu_cache_old.md" --json "$OUT/gpu_old.json"
fi
python3 bench/distill_ooc.py --device cuda --repeats ${OOC_REPEATS:-2} --hdf5-h5py --zarr-lib --append "$OUT/gpu_ooc.md" --json "$OUT/gpu.json"
