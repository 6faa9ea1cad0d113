"""How much a store's soft targets say beyond the labels: for each store given, the share of stored views whose
teacher top class is the label, and the mean top probability and entropy of softmax(z / T) for T = 1, 2, 4.

Usage: python studies/scripts/digits_teacher_targets.py cache/teacher_logits.zarr runs/digits/sub300/logits.zarr
"""

import sys

import numpy as np

from pipeline.store import LogitStore, open_zarr

for path in sys.argv[1:]:
    store = LogitStore(path)
    samples, views = store.meta.num_samples, store.meta.num_views
    z = store.read(np.repeat(np.arange(samples), views), np.tile(np.arange(views), samples)).astype(np.float64)
    labels = np.repeat(open_zarr(path, "r")["labels"][:], views)
    print(f"{path}: {samples} samples x {views} views; teacher top class = label on "
          f"{100 * (z.argmax(1) == labels).mean():.2f} % of the views")
    for T in (1, 2, 4):
        p = np.exp((z - z.max(1, keepdims=True)) / T)
        p /= p.sum(1, keepdims=True)
        entropy = -(p * np.log(p + 1e-30)).sum(1).mean()
        print(f"  T = {T}: mean top probability {p.max(1).mean():.4f}, mean entropy {entropy:.3f} nats "
              f"(uniform {np.log(z.shape[1]):.3f})")
