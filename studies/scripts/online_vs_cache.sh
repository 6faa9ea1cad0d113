#!/usr/bin/env bash
# One real run trained twice: from a float32 store and with distill.teacher_source: online (MNIST, the teacher
# of mnist.sh). Prints whether the two students' weights are identical. `bash studies/scripts/online_vs_cache.sh`
set -euo pipefail
RUN=${RUN:-runs/mnist}
OUT=${OUT:-runs/mnist-online}
EPOCHS=${EPOCHS:-2}
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT"
python studies/scripts/derive_params.py "$RUN/params.yaml" "$OUT/cache.yaml" cache.dtype=float32 cache.batch_size=128 \
    distill.epochs="$EPOCHS"
python studies/scripts/derive_params.py "$OUT/cache.yaml" "$OUT/online.yaml" distill.teacher_source=online
: > "$OUT/times.txt"
t cache32 kd cache --params "$OUT/cache.yaml" --teacher "$RUN/teacher.pt" --out "$OUT/logits32.zarr"
t distill_cache kd distill --params "$OUT/cache.yaml" --teacher "$RUN/teacher.pt" --cache "$OUT/logits32.zarr" \
    --out "$OUT/from_cache.pt"
t distill_online kd distill --params "$OUT/online.yaml" --teacher "$RUN/teacher.pt" --out "$OUT/online.pt"
python - "$OUT" <<'PY'
import sys, torch
out = sys.argv[1]
a, b = (torch.load(f"{out}/{n}.pt", weights_only=True)["state_dict"] for n in ("from_cache", "online"))
same = all(torch.equal(a[k], b[k]) for k in a)
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"identical weights: {same}; largest absolute difference: {diff:.3g}")
with open(f"{out}/times.txt", "a") as f:
    f.write(f"identical {same} maxdiff {diff:.3g}\n")
PY
