"""Where the cache stage's main thread spends its time: cProfile of one `cache_teacher_logits` run on synthetic
CIFAR-size data (crop + flip), the top functions by own time. For finding the host-side limit on a GPU.

Usage: python bench/profile_cache.py [--device cuda] [--workers 8] [--batch 512] [--samples 65536] [--top 25]
"""

import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

import click
import torch

from pipeline.data import Split
from pipeline.models import build_model, resolve_device
from pipeline.params import CacheParams
from pipeline.cache import cache_teacher_logits

AUGMENT = [{"RandomCrop": {"size": 32, "padding": 4}}, {"RandomHorizontalFlip": {"p": 0.5}}]


@click.command()
@click.option("--device", "device_name", default="cuda", show_default=True)
@click.option("--arch", default="resnet20", show_default=True)
@click.option("--workers", default=8, show_default=True)
@click.option("--batch", default=512, show_default=True)
@click.option("--samples", default=65536, show_default=True)
@click.option("--amp", default="float16", show_default=True)
@click.option("--top", default=25, show_default=True)
def main(device_name, arch, workers, batch, samples, amp, top):
    os.environ.setdefault("TQDM_DISABLE", "1")
    device = resolve_device(device_name)
    g = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 256, (samples, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.zeros(samples, dtype=torch.long))
    teacher = build_model(arch, 3, 10, image_size=32, seed=0).eval()
    cfg = CacheParams(num_views=2, seed=0, format="zarr", dtype="float16", storage="full", top_k=1,
                      chunk_samples=4096, batch_size=batch, amp=amp if device.type == "cuda" else "off")
    with tempfile.TemporaryDirectory() as tmp:
        def run(name):
            start = time.perf_counter()
            cache_teacher_logits(Path(tmp) / name, cfg, teacher, arch, train, 10, AUGMENT, (0.5,) * 3, (0.25,) * 3,
                                 device, num_workers=workers)
            return 2 * samples / (time.perf_counter() - start)

        print(f"warm-up: {run('warm.zarr'):.0f} views/s")
        profile = cProfile.Profile()
        profile.enable()
        rate = run("profiled.zarr")
        profile.disable()
    print(f"profiled run: {rate:.0f} views/s ({arch}, {device}, amp {cfg.amp}, {workers} workers, batch {batch})")
    pstats.Stats(profile).sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    main()
