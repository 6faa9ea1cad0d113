# Sourced by the GPU scripts here: $OUT made, zarr and its needs installed from .whl/ when present (the lent device
# had torch but not zarr), this repository on PYTHONPATH, progress bars off. SITE holds the wheels' folder
# (empty without .whl/), for scripts that put another checkout in front (gpu.sh's gpu-old/).
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
SITE=${PYTHONPATH:-}
export PYTHONPATH=${SITE:+$SITE:}$PWD TQDM_DISABLE=1 PYTHONUNBUFFERED=1
