"""An ensemble's reads against the plain-CE floor: the distill step with 1, 2 and 4 stores, side by side in one run.

Usage: python bench/ensemble_reads.py [--repeats 3] [--append BENCHMARKS.md] [--json bench/results.json]

Each variant trains one epoch of the real `pipeline.train.distill` loop (replay, DataLoader, `kd_loss`, Adam) in a
fresh process, tiny_cnn on synthetic 1x8x8 uint8 images (100 classes, 4 views), from K real zarr stores of random
float16 logits mixed by `pipeline.ensemble.Ensemble` (rule probabilities):
  floor           kd_weight 0: the student alone
  memory K        K stores, each loaded into memory
  disk K          K stores, each read through its chunk cache with a tenth of its size (`memory_mb` split
                  among the stores, as `kd distill` splits it), windowed shuffle and read-ahead thread
Variants alternate within each repeat; the table gives medians and per-repeat ratio medians. Keys in results.json:
ensemble_vs_floor_memory_<K>, ensemble_vs_floor_disk_<K>.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from output import publish

CLASSES, SAMPLES, VIEWS, BATCH, CHUNK = 100, 50_000, 4, 64, 512
COUNTS = (1, 2, 4)
VARIANTS = ("floor", *(f"memory {k}" for k in COUNTS), *(f"disk {k}" for k in COUNTS))


def write_stores(root: Path, count: int, samples: int) -> list[Path]:
    from pipeline.store import StoreMeta
    from pipeline.writer import write_store

    meta = StoreMeta(num_samples=samples, num_views=VIEWS, num_classes=CLASSES, augment=[], mean=[0.5], std=[0.25],
                     seed=0, dtype="float16", storage="full", top_k=0, chunk_samples=CHUNK, amp="off",
                     teacher_arch="bench", teacher_fingerprint="bench", dataset_fingerprint="bench")
    labels = np.random.default_rng(0).integers(CLASSES, size=samples)
    paths = []
    for k in range(count):
        rng = np.random.default_rng(k + 1)

        def blocks():
            for c in range(meta.num_chunks):
                first, stop = meta.chunk_rows(c)
                yield c, rng.normal(0, 3, (stop - first, VIEWS, CLASSES)).astype(np.float32)

        paths.append(root / f"t{k}.zarr")
        write_store(paths[-1], "zarr", meta, labels, blocks())
    return paths


def one(variant: str, samples: int, root: Path) -> dict:
    import torch

    from pipeline.data import Split, input_transform
    from pipeline.ensemble import Ensemble
    from pipeline.loaders import PREFETCH
    from pipeline.models import build_model
    from pipeline.params import DistillParams, EnsembleParams, OptimParams
    from pipeline.store import LogitStore
    from pipeline.train import distill, store_targets

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (samples, 1, 8, 8), dtype=torch.uint8, generator=g)
    train = Split(images, torch.randint(0, CLASSES, (samples,), generator=g))
    val = Split(images[:64], train.labels[:64])
    kd, targets, prefetch = 1.0, None, 0
    if variant == "floor":
        kd = 0.0
    else:
        where, count = variant.split()
        budget = 1 << 40 if where == "memory" else samples * VIEWS * CLASSES * 2 // 10
        stores = [LogitStore(root / f"t{k}.zarr", max_memory_bytes=budget) for k in range(int(count))]
        assert all(s.in_memory == (where == "memory") for s in stores)
        members = [store_targets(s, 4.0) for s in stores]
        targets = members[0] if len(members) == 1 else Ensemble(members, [1 / len(members)] * len(members),
                                                                 "probabilities", 4.0)
        prefetch = 0 if where == "memory" else PREFETCH
    optim = OptimParams(name="adam", lr=1e-3, betas=[0.9, 0.999], momentum=0.9, nesterov=False, weight_decay=1e-4,
                        schedule="step", lr_milestones=[], lr_factors=[])
    cfg = DistillParams(student="tiny_cnn", student_options={}, teacher_source="cache", temperature=4.0,
                        kd_weight=kd, ce_weight=1.0, view_schedule="random", shuffle_chunks=4, topk_tail="none",
                        ensemble=EnsembleParams(weights=None, rule="probabilities"), epochs=1, batch_size=BATCH,
                        optimizer=optim)
    student = build_model("tiny_cnn", 1, CLASSES, image_size=8, seed=0)
    transform = input_transform(None, (0.5,), (0.25,))
    start = time.perf_counter()
    distill(student, train, val, targets, transform, transform, 0, VIEWS, cfg, kd_weight=kd, seed=0,
            device=torch.device("cpu"), chunk_samples=CHUNK, prefetch=prefetch, progress=False)
    return {"per_s": samples / (time.perf_counter() - start)}


def run_one(variant: str, samples: int, root: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, __file__, "--one", variant, "--samples", str(samples), "--root", str(root)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli():
    args = sys.argv[1:]
    if "--one" in args:
        variant = args[args.index("--one") + 1]
        samples = int(args[args.index("--samples") + 1])
        print(json.dumps(one(variant, samples, Path(args[args.index("--root") + 1]))))
        return
    _main()


@click.command()
@click.option("--repeats", default=3, show_default=True)
@click.option("--samples", default=SAMPLES, show_default=True)
@click.option("--append", default=None, help="Append the markdown section to this file.")
@click.option("--json", "json_path", default=None, help="Merge the ratios into this flat JSON object.")
def _main(repeats, samples, append, json_path):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_stores(root, max(COUNTS), samples)
        runs = {v: [] for v in VARIANTS}
        for r in range(repeats):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            for variant in order:
                runs[variant].append(run_one(variant, samples, root))
                click.echo(f"  repeat {r + 1} {variant}: {runs[variant][-1]['per_s']:.0f} samples/s", err=True)
    ratio = lambda a: statistics.median(x["per_s"] / y["per_s"] for x, y in zip(runs[a], runs["floor"]))  # noqa: E731
    results = {f"ensemble_vs_floor_{v.replace(' ', '_')}": ratio(v) for v in VARIANTS[1:]}
    command = f"python bench/ensemble_reads.py --repeats {repeats}" + (f" --samples {samples}" if samples != SAMPLES
                                                                        else "")
    lines = [f"## Ensembles: the distill step reading 1, 2 and 4 stores (`{command}`)", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 2 cores (shared), one torch thread per run: "
             f"tiny_cnn on {samples:,} synthetic 1x8x8 images, {CLASSES} classes, {VIEWS} views, batch {BATCH}, one "
             f"epoch of the real distill loop per variant in a fresh process, {repeats} alternated repeats; each store "
             f"{samples * VIEWS * CLASSES * 2 / 2**20:.0f} MB of float16 logits (zarr, chunks of {CHUNK} samples). "
             "From disk: each store through a chunk cache of a tenth of its size, windowed shuffle "
             "(`distill.shuffle_chunks: 4`), read ahead in a thread.", "",
             "| variant | samples/s (median) | / plain-CE floor (median of per-repeat ratios) |", "|---|---|---|"]
    for v in VARIANTS:
        median = statistics.median(x["per_s"] for x in runs[v])
        label = "floor (student alone, CE)" if v == "floor" else f"{v} store{'s' if v[-1] != '1' else ''}"
        lines.append(f"| {label} | {median:.0f} | {'1.00' if v == 'floor' else f'{ratio(v):.2f}'}x |")
    publish(lines + [""], results, append, json_path)


if __name__ == "__main__":
    cli()
