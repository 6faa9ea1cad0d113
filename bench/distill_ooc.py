"""The distill stage from a store larger than memory, against the plain-CE floor, side by side in one run.

Usage: python bench/distill_ooc.py [--repeats 3] [--append BENCHMARKS.md] [--json bench/results.json]

Each variant trains one epoch of the real `pipeline.train.distill` loop (replay, DataLoader, read-ahead,
`kd_loss`, Adam) in a fresh process (so its peak RSS is its own), on synthetic uint8 images and a real store of
random float16 logits written once per run:
  floor        kd_weight 0: the student alone (what the student costs)
  oracle       the teacher's logits already one torch tensor in memory (`targets = lambda: logits[s, v]`)
  memory       the zarr store loaded into memory (`LogitStore`'s default when it fits), read per batch
  zarr / hdf5  the store read through its chunk cache with `memory_mb` = store size / 10, windowed shuffle
               (`distill.shuffle_chunks`), read-ahead thread (`kd distill`'s setting for stores larger than memory)
  hdf5_h5py    (--hdf5-h5py) the HDF5 store read through h5py, which holds the GIL through each chunk's read and
               checksum, instead of raw (pipeline.h5raw: os.pread and numpy, without the GIL): the reader before
               this changed (`pipeline.store.RAW_HDF5 = False`)
  zarr_lib     (--zarr-lib) the zarr store read through the zarr library (its event loop and thread pool) instead
               of raw (pipeline.zarrraw: each chunk's file read whole, crc32c checked): the reader before this
               changed (`pipeline.store.RAW_ZARR = False`)
  s3           (--s3) the zarr store at an s3:// URL on a local S3 server (moto's server mode on 127.0.0.1, started
               here, reached through AWS_ENDPOINT_URL), read as zarr is, within the same budget
With --reads (--reads-only: nothing else), the readers alone as well: one epoch of the windowed batches'
`LogitStore.read` (no training, one thread, the chunk cache emptied before each pass so every chunk is decoded once,
as in an epoch), raw and through the library per format, alternated; keys
distill_ooc_read_us_per_batch_<reader>[...] and distill_ooc_read_raw_vs_lib_<fmt>[...] (the
library's time over raw's).
(A full shuffle of a store larger than memory decodes most chunks for every batch: far slower, so left out; the
distill-step figures in BENCHMARKS.md time it.)
Variants alternate within each repeat. Before each repeat the run waits for a quiet machine; a repeat is clean when
other processes and the hypervisor (steal) used at most QUIET cores while each variant ran (bench/machine.py), and up
to ATTEMPTS x --repeats repeats run until --repeats are clean; the --repeats least disturbed are kept (not --quick:
there every repeat is kept). The tables give medians and per-repeat ratio medians. Students: tiny_cnn
on 1x8x8 (100 classes) and resnet20 on 3x32x32 (10 classes). Keys in results.json:
  distill_ooc_vs_floor_<fmt>[_resnet20], distill_ooc_vs_oracle_<fmt>[_resnet20], distill_oracle_vs_floor[_resnet20],
  distill_memory_vs_oracle[_resnet20],
  distill_ooc_ceiling_vs_floor[...] (`step_ceiling`: a KD step against a CE step in one process, the most any store
  can give), distill_ooc_peak_rss_mb (the largest out-of-core variant's peak RSS minus the floor's),
  distill_ooc_budget_mb,
  distill_ooc_us_per_sample_<N>samples (zarr, tiny student, as the data grows); with --workers N the keys end
  in _wN (_gpu before it on a GPU); with --hdf5-h5py distill_ooc_hdf5_raw_vs_h5py[...]; with --zarr-lib
  distill_ooc_zarr_raw_vs_lib[...]; with --s3 distill_ooc_vs_floor_s3[...] and distill_ooc_s3_vs_zarr[...].
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from machine import busy_seconds, others_between, wait_quiet
from output import growth_line, publish

SETUPS = {  # name: (student, (C, H, W), classes, samples, views, batch)
    "tiny": ("tiny_cnn", (1, 8, 8), 100, 100_000, 8, 64),
    "resnet20": ("resnet20", (3, 32, 32), 10, 6_000, 8, 64),
    "classes1k": ("tiny_cnn", (1, 8, 8), 1000, 20_000, 8, 64),  # ImageNet's 1,000 classes: 10x the bytes a sample
}
QUICK = {"tiny": ("tiny_cnn", (1, 8, 8), 100, 3_000, 2, 64)}  # --quick: a smoke run, numbers meaningless
GPU_SETUPS = {"resnet20": ("resnet20", (3, 32, 32), 10, 50_000, 8, 256)}  # --device cuda
WINDOW_CHUNKS = 4
DEVICE = "cpu"
WORKERS = 0  # DataLoader workers of every variant (--workers)
QUIET = 0.05  # a repeat is clean when others (processes, steal) used at most this many cores during each variant
CEILING_WINDOWS = 30  # alternated windows of ~0.25 s (100 steps of the tiny student), CE and KD, in `step_ceiling`
ATTEMPTS = 3  # at most this many times --repeats repeats are run, until --repeats of them are clean


def chunk_for(samples: int) -> int:
    """Store chunk rows for a setup: a power of two giving about 64-128 chunks (at least 64 rows), so a budget
    of a tenth of the store holds more decoded chunks than a window needs."""
    return 1 << max(6, (samples // 96).bit_length() - 1)
VARIANTS = ("floor", "oracle", "memory", "zarr", "hdf5")


def s3_server() -> str:
    """Start moto's S3 server on 127.0.0.1 (a thread of this process, serving the variants' processes), point the
    environment at it, make a bucket; return its s3:// prefix."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3").create_bucket(Bucket="kd-bench")
    return "s3://kd-bench"


def write_stores(root: Path, classes: int, samples: int, views: int) -> dict[str, Path]:
    from pipeline.store import StoreMeta
    from pipeline.writer import write_store

    meta = StoreMeta(num_samples=samples, num_views=views, num_classes=classes, augment=[], mean=[0.0], std=[1.0],
                     seed=0, dtype="float16", storage="full", top_k=0, chunk_samples=chunk_for(samples), amp="off",
                     teacher_arch="bench", teacher_fingerprint="bench", dataset_fingerprint="bench")
    labels = np.random.default_rng(0).integers(classes, size=samples)
    paths = {"zarr": root / "logits.zarr", "hdf5": root / "logits.h5"}
    if "s3" in VARIANTS:
        paths["s3"] = os.environ["KD_BENCH_S3"] + f"/{root.name}/logits.zarr"
    for fmt, path in paths.items():
        rng = np.random.default_rng(1)

        def blocks():
            for k in range(meta.num_chunks):
                first, stop = meta.chunk_rows(k)
                yield k, rng.normal(0, 3, (stop - first, views, classes)).astype(np.float32)

        write_store(path, "zarr" if fmt == "s3" else fmt, meta, labels, blocks())
    return paths


def one(variant: str, setup: str, samples: int, root: Path) -> dict:
    """Train one epoch of `variant` in this process; return seconds, samples/s and peak RSS (MB)."""
    import torch

    from pipeline.data import Split, input_transform
    from pipeline.models import build_model
    from pipeline.params import DistillParams, EnsembleParams, OptimParams
    from pipeline.store import LogitStore
    from pipeline.train import distill, store_targets
    from pipeline.loaders import PREFETCH

    torch.set_num_threads(1)
    student_arch, shape, classes, _, views, batch = SETUPS[setup]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (samples, *shape), dtype=torch.uint8, generator=g)
    train = Split(images, torch.randint(0, classes, (samples,), generator=g))
    val = Split(images[:64], train.labels[:64])
    store_bytes = samples * views * classes * 2
    budget = store_bytes // 10
    targets, prefetch, window, kd = None, 0, WINDOW_CHUNKS, 1.0
    if variant == "floor":
        kd = 0.0
    elif variant == "oracle":
        logits = torch.from_numpy(LogitStore(root / "logits.zarr").read(np.repeat(np.arange(samples), views),
                                                                          np.tile(np.arange(views), samples)))
        logits = logits.reshape(samples, views, classes)
        targets = lambda x, s, v: logits[s, v]  # noqa: E731
    elif variant == "memory":
        store = LogitStore(root / "logits.zarr")
        assert store.in_memory
        targets = store_targets(store)
    else:
        if variant in ("hdf5_h5py", "zarr_lib"):
            import pipeline.store

            pipeline.store.RAW_HDF5 = pipeline.store.RAW_ZARR = False
        path = {"hdf5": root / "logits.h5", "hdf5_h5py": root / "logits.h5", "zarr": root / "logits.zarr",
                "zarr_lib": root / "logits.zarr",
                "s3": os.environ.get("KD_BENCH_S3", "") + f"/{root.name}/logits.zarr"}[variant]
        store = LogitStore(path, max_memory_bytes=budget)
        assert not store.in_memory
        targets, prefetch = store_targets(store), PREFETCH
    optim = OptimParams(name="adam", lr=1e-3, betas=[0.9, 0.999], momentum=0.9, nesterov=False, weight_decay=1e-4,
                        schedule="step", lr_milestones=[], lr_factors=[])
    cfg = DistillParams(student=student_arch, student_options={}, teacher_source="cache", temperature=4.0,
                        kd_weight=kd, ce_weight=1.0, view_schedule="random", shuffle_chunks=window, topk_tail="none",
                        ensemble=EnsembleParams(weights=None, rule="probabilities"), epochs=1,
                        batch_size=batch, optimizer=optim)
    student = build_model(student_arch, shape[0], classes, image_size=shape[-1], seed=0)
    transform = input_transform(None, (0.5,) * shape[0], (0.25,) * shape[0])
    device = torch.device(DEVICE)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    distill(student, train, val, targets, transform, transform, 0, views, cfg, kd_weight=kd, seed=0,
            device=device, chunk_samples=chunk_for(samples), prefetch=prefetch, num_workers=WORKERS)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "per_s": samples / seconds, "budget_mb": budget / 2**20,
            "store_mb": store_bytes / 2**20, "rss_mb": peak_rss_mb(),
            "rss_before_mb": rss_before}


def peak_rss_mb() -> float:
    """Peak resident MB of this process; with DataLoader workers, plus that of its largest finished child (a
    forked worker also counts the pages it shares with this process: an upper bound)."""
    import gc

    gc.collect()  # let the loader (and its workers) go
    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if WORKERS else (resource.RUSAGE_SELF,)
    return sum(resource.getrusage(w).ru_maxrss for w in who) / 1024


def _quick() -> bool:
    """Whether this is a --quick (smoke) run: its tiny setup replaced by QUICK's."""
    return SETUPS.get("tiny") == QUICK["tiny"]


def run_one(variant: str, setup: str, samples: int, root: Path) -> dict:
    """`one` in a fresh process; its result with `others`: the cores other processes and the hypervisor (steal)
    used while it ran (machine.py), start-up included."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH")]))}
    quick = ["--quick"] if _quick() else []
    quick += ["--device", DEVICE, "--workers", str(WORKERS)]
    before, start = busy_seconds(children=True), time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--one", variant, "--setup", setup, "--samples", str(samples),
                          "--root", str(root), *quick], env=env, capture_output=True, text=True, check=True)
    others = others_between(before, busy_seconds(children=True), time.perf_counter() - start)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "others": others}


def measure(setup: str, repeats: int, tmp: Path) -> tuple[dict, dict, tuple[int, float]]:
    _, _, classes, samples, views, _ = SETUPS[setup]
    root = tmp / setup
    root.mkdir()
    write_stores(root, classes, samples, views)
    attempts = []  # (the most cores others used during one of its variants, {variant: run})
    quick = _quick()
    while len(attempts) < repeats * (1 if quick else ATTEMPTS):
        if not quick:
            wait_quiet(60, QUIET)
        r = len(attempts)
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        runs = {}
        for variant in order:
            runs[variant] = run_one(variant, setup, samples, root)
            click.echo(f"  {setup} repeat {r + 1} {variant}: {runs[variant]['per_s']:.0f} samples/s "
                       f"(others {runs[variant]['others']:.2f} cores)", err=True)
        attempts.append((max(x["others"] for x in runs.values()), runs))
        if sum(worst <= QUIET for worst, _ in attempts) >= repeats:
            break
    kept = sorted(range(len(attempts)), key=lambda i: attempts[i][0])[:repeats]  # the least disturbed, in order
    kept.sort()
    runs = {v: [attempts[i][1][v] for i in kept] for v in VARIANTS}
    kept_note = (len(attempts), max(attempts[i][0] for i in kept))
    suffix = (("" if setup == "tiny" else f"_{setup}") + ("" if DEVICE == "cpu" else "_gpu")
              + (f"_w{WORKERS}" if WORKERS else ""))
    ratio = lambda a, b: statistics.median(x["per_s"] / y["per_s"] for x, y in zip(runs[a], runs[b]))  # noqa: E731
    results = {f"distill_oracle_vs_floor{suffix}": ratio("oracle", "floor")}
    results[f"distill_memory_vs_oracle{suffix}"] = ratio("memory", "oracle")
    for fmt in ("zarr", "hdf5", "s3")[:3 if "s3" in VARIANTS else 2]:
        results[f"distill_ooc_vs_floor_{fmt}{suffix}"] = ratio(fmt, "floor")
        results[f"distill_ooc_vs_oracle_{fmt}{suffix}"] = ratio(fmt, "oracle")
    if "s3" in VARIANTS:
        results[f"distill_ooc_s3_vs_zarr{suffix}"] = ratio("s3", "zarr")
    if "hdf5_h5py" in VARIANTS:
        results[f"distill_ooc_hdf5_raw_vs_h5py{suffix}"] = ratio("hdf5", "hdf5_h5py")
    if "zarr_lib" in VARIANTS:
        results[f"distill_ooc_zarr_raw_vs_lib{suffix}"] = ratio("zarr", "zarr_lib")
    floor_rss = statistics.median(x["rss_mb"] for x in runs["floor"])
    results[f"distill_ooc_peak_rss_mb{suffix}"] = max(x["rss_mb"] for v in ("zarr", "hdf5") for x in runs[v]) - floor_rss
    results[f"distill_ooc_budget_mb{suffix}"] = runs["zarr"][0]["budget_mb"]
    results[f"distill_floor_rss_mb{suffix}"] = floor_rss
    return results, runs, kept_note


def step_ceiling(setup: str, windows: int = CEILING_WINDOWS, window_s: float = 0.25) -> dict:
    """The most any source of teacher logits can give this setup, as a fraction of the plain-CE floor: one
    `distill_step` (forward, loss, backward, Adam) with `kd_loss` on logits already in memory, against one with
    kd_weight 0, the same batch, alternated `windows` windows of about `window_s` seconds each (the same step count
    on both sides, at most 100) in this process (medians). Steady where whole epochs are not: both
    sides of each pair run within a second of each other in one process.
    Keys distill_step_us_<ce|kd>[...] and distill_ooc_ceiling_vs_floor[...] (CE step time over KD step time)."""
    import torch

    from pipeline.models import build_model
    from pipeline.train import distill_step

    torch.set_num_threads(1)
    student_arch, shape, classes, _, _, batch = SETUPS[setup]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g)
    teacher = (3 * torch.randn(batch, classes, generator=g)).half()  # as a float16 store returns them
    model = build_model(student_arch, shape[0], classes, image_size=shape[-1], seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    none = torch.zeros(batch, dtype=torch.int64)  # (sample, view) indices: unused with the logits given
    kd_weights = {"ce": 0.0, "kd": 1.0}
    times = {kind: [] for kind in kd_weights}
    start = time.perf_counter()
    for _ in range(3):
        distill_step(model, optimizer, None, x, y, none, none, 4.0, 1.0, torch.device("cpu"), teacher_logits=teacher)
    steps = max(2, min(100, round(window_s * 3 / (time.perf_counter() - start))))
    for w in range(windows + 1):
        for kind, kd in kd_weights.items():
            start = time.perf_counter()
            for _ in range(steps):
                distill_step(model, optimizer, None, x, y, none, none, 4.0, kd, torch.device("cpu"),
                             teacher_logits=teacher if kd else None)
            if w:  # the first window warms up
                times[kind].append((time.perf_counter() - start) / steps * 1e6)
    click.echo(f"  {setup} ceiling: {steps} steps a window", err=True)
    suffix = _setup_suffix(setup)
    return {f"distill_step_us_ce{suffix}": statistics.median(times["ce"]),
            f"distill_step_us_kd{suffix}": statistics.median(times["kd"]),
            f"distill_ooc_ceiling_vs_floor{suffix}": statistics.median(c / k for c, k in zip(times["ce"], times["kd"]))}


READERS = {"zarr": ("logits.zarr", True), "zarr_lib": ("logits.zarr", False), "hdf5": ("logits.h5", True),
           "hdf5_h5py": ("logits.h5", False)}  # reader: (store, read raw)


def _setup_suffix(setup: str) -> str:
    """The key suffix of a setup's figures that do not depend on the device or workers (reads, the ceiling)."""
    return "" if setup == "tiny" else f"_{setup}"


def reads_alone(setup: str, repeats: int, tmp: Path) -> dict:
    """Microseconds a batch of one epoch's windowed `LogitStore.read`s per reader (READERS), medians of `repeats`
    alternated passes (after one unmeasured pass), each with the store's chunk cache emptied (a budget of a tenth
    of the store), so every chunk is decoded once a pass, as in an epoch of training."""
    import pipeline.store
    from pipeline.replay import epoch_pairs
    from pipeline.store import LogitStore

    _, _, classes, samples, views, batch = SETUPS[setup]
    root = tmp / setup
    budget = samples * views * classes * 2 // 10
    pairs = np.array(epoch_pairs("random", views, samples, 0, 0, WINDOW_CHUNKS * chunk_for(samples)))
    times = {r: [] for r in READERS}
    stores = {}
    try:
        for reader, (name, raw) in READERS.items():
            pipeline.store.RAW_ZARR = pipeline.store.RAW_HDF5 = raw
            stores[reader] = LogitStore(root / name, max_memory_bytes=budget)
            assert (raw or stores[reader]._raw is None) and not stores[reader].in_memory  # HDF5 chunks under
            # pipeline.h5raw.MIN_CHUNK_BYTES go through h5py even where raw reads are on
    finally:
        pipeline.store.RAW_ZARR = pipeline.store.RAW_HDF5 = True  # as imported
    for r in range(repeats + 1):
        for reader, store in stores.items():
            store._chunks.clear()
            start = time.perf_counter()
            for first in range(0, samples, batch):
                store.read(pairs[first:first + batch, 0], pairs[first:first + batch, 1])
            if r:
                times[reader].append((time.perf_counter() - start) / -(-samples // batch) * 1e6)
    suffix = _setup_suffix(setup)
    out = {f"distill_ooc_read_us_per_batch_{reader}{suffix}": statistics.median(t) for reader, t in times.items()}
    for fmt, lib in (("zarr", "zarr_lib"), ("hdf5", "hdf5_h5py")):
        out[f"distill_ooc_read_raw_vs_lib_{fmt}{suffix}"] = statistics.median(
            b / a for a, b in zip(times[fmt], times[lib]))
    return out


def reads_lines(setups, results: dict) -> list[str]:
    """A line per setup of `reads_alone`'s figures."""
    lines = []
    for name in setups:
        suffix = _setup_suffix(name)
        us = {r: results[f"distill_ooc_read_us_per_batch_{r}{suffix}"] for r in READERS}
        _, _, classes, samples, views, batch = SETUPS[name]
        lines += ["", f"The readers alone ({name}: {samples:,} x {views} x {classes}, chunks of {chunk_for(samples)} "
                  f"samples; one epoch's windowed batches of {batch}, `LogitStore.read` only, every chunk decoded once "
                  "a pass, medians of alternated passes): us a batch " +
                  ", ".join(f"{r} {v:,.0f}" for r, v in us.items()) +
                  f"; the library's time over raw's: zarr {results[f'distill_ooc_read_raw_vs_lib_zarr{suffix}']:.2f}x, "
                  f"hdf5 {results[f'distill_ooc_read_raw_vs_lib_hdf5{suffix}']:.2f}x"]
    return lines


def scaling(tmp: Path, sizes=(10_000, 100_000, 1_000_000)) -> dict:
    """Time per sample of one zarr out-of-core epoch (tiny student, 10 classes, 1 view) as the data grows."""
    global SETUPS
    out = {}
    for n in sizes:
        root = tmp / f"scale-{n}"
        root.mkdir()
        SETUPS = {**SETUPS, "scale": ("tiny_cnn", (1, 8, 8), 10, n, 1, 64)}
        write_stores(root, 10, n, 1)
        (root / "logits.h5").unlink()
        r = run_one("zarr", "scale", n, root)
        out[f"distill_ooc_us_per_sample_{n}samples"] = 1e6 / r["per_s"]
        click.echo(f"  scaling {n}: {1e6 / r['per_s']:.1f} us/sample", err=True)
    return out


@click.command()
@click.option("--repeats", default=3, show_default=True)
@click.option("--append", "out", default=None, help="Append the markdown section to this file.")
@click.option("--json", "json_path", default="bench/results.json", show_default=True)
@click.option("--setups", default="tiny,resnet20", show_default=True)
@click.option("--scaling/--no-scaling", "scaling_run", default=True, show_default=True)
@click.option("--device", "device_name", default="cpu", show_default=True,
              help="cpu, or cuda: the GPU setup (resnet20 student, 50k samples, batch 256).")
@click.option("--workers", default=0, show_default=True,
              help="DataLoader workers in every variant (with >= 1, a store larger than memory is read in them).")
@click.option("--quick", is_flag=True, help="Smoke run: a small tiny-student setup, no scaling run.")
@click.option("--s3", "with_s3", is_flag=True, help="Add the s3 variant: the zarr store on a local S3 server.")
@click.option("--hdf5-h5py", "with_h5py", is_flag=True,
              help="Add the hdf5_h5py variant: the HDF5 store read through h5py, not raw.")
@click.option("--zarr-lib", "with_zarr_lib", is_flag=True,
              help="Add the zarr_lib variant: the zarr store read through the zarr library, not raw.")
@click.option("--reads", "with_reads", is_flag=True,
              help="Also time the readers alone: one epoch's batch reads, raw and through zarr / h5py.")
@click.option("--reads-only", is_flag=True, help="Only time the readers alone (--reads), no training variants.")
@click.option("--one", "variant", default=None, hidden=True)
@click.option("--setup", default=None, hidden=True)
@click.option("--samples", default=0, hidden=True)
@click.option("--root", default=None, hidden=True)
def main(repeats, out, json_path, setups, scaling_run, device_name, workers, quick, with_s3, with_h5py, with_zarr_lib,
         with_reads, reads_only, variant, setup, samples, root):
    global DEVICE, SETUPS, WORKERS, VARIANTS
    DEVICE, WORKERS = device_name, workers
    if with_h5py:
        VARIANTS = (*VARIANTS, "hdf5_h5py")
    if with_zarr_lib:
        VARIANTS = (*VARIANTS, "zarr_lib")
    if with_s3 or variant == "s3":
        VARIANTS = (*VARIANTS, "s3")
        if not variant:
            os.environ["KD_BENCH_S3"] = s3_server()
    if device_name != "cpu":
        SETUPS = {**SETUPS, **GPU_SETUPS}
        setups, scaling_run = ",".join(GPU_SETUPS), False
    if quick:
        SETUPS.update(QUICK)
        setups, scaling_run = "tiny", False
    if variant:
        if setup == "scale":
            SETUPS["scale"] = ("tiny_cnn", (1, 8, 8), 10, samples, 1, 64)
        print(json.dumps(one(variant, setup, samples, Path(root))))
        return
    results, tables, kept_notes = {}, {}, {}
    ceiling_windows = 3 if quick else CEILING_WINDOWS
    with tempfile.TemporaryDirectory(prefix="kd-ooc-") as tmp:
        for name in setups.split(","):
            if reads_only:
                (Path(tmp) / name).mkdir()
                write_stores(Path(tmp) / name, *SETUPS[name][2:5])
            else:
                r, runs, kept_notes[name] = measure(name, repeats, Path(tmp))
                results.update(r)
                tables[name] = runs
                if DEVICE == "cpu":
                    results.update(step_ceiling(name, ceiling_windows))
            if with_reads or reads_only:
                results.update(reads_alone(name, repeats, Path(tmp)))
        if scaling_run and not reads_only:
            results.update(scaling(Path(tmp)))
    if reads_only:
        lines = ["", "## The store's readers alone: raw against zarr and h5py", "",
                 f"`python bench/distill_ooc.py --reads-only --repeats {repeats} --setups {setups}` "
                 f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, one thread)"]
        publish(lines + reads_lines(setups.split(","), results), results, out, json_path)
        return
    flags = "".join(flag for flag, on in ((" --s3", "s3" in VARIANTS), (" --hdf5-h5py", with_h5py),
                                          (" --zarr-lib", with_zarr_lib), (" --reads", with_reads)) if on)
    lines = ["", "## Distilling from a store larger than memory", "",
             f"`python bench/distill_ooc.py --repeats {repeats}{f' --workers {WORKERS}' if WORKERS else ''}"
             f"{flags}{'' if setups == 'tiny,resnet20' else f' --setups {setups}'}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} cores, one torch thread per process, device {DEVICE}, {WORKERS} DataLoader workers): one epoch of the real `distill` loop per "
             f"variant, each in a fresh process, alternated, medians of {repeats}; float16 stores in "
             f"64-128 chunks (of 1024 samples in the tiny setup), memory budget (`memory_mb`) = store size / 10, windows of {WINDOW_CHUNKS} chunks, "
             "read ahead in a thread (0 workers) or in the workers. Peak RSS: the process's maximum resident size (with "
             "workers, plus its largest worker's: an upper bound). Before each repeat the run waits for a quiet machine; "
             f"it runs up to {ATTEMPTS}x the repeats until that many are clean (others, i.e. other processes and the "
             f"hypervisor's steal per /proc/stat, used at most {QUIET} cores during each variant) and keeps the least "
             "disturbed: " + "; ".join(f"{name} {repeats} of {n} run, others at most {worst:.2f} cores"
                                        for name, (n, worst) in kept_notes.items()) + ".", "",
             "| student | samples x views x classes | store MB | budget MB | variant | samples/s | x floor | "
             "x oracle | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in tables.items():
        student, _, classes, n, views, _ = SETUPS[name]
        for variant in VARIANTS:
            rs = runs[variant]
            per_s = statistics.median(x["per_s"] for x in rs)
            vs = lambda b: statistics.median(x["per_s"] / y["per_s"] for x, y in zip(rs, runs[b]))  # noqa: E731
            lines.append(f"| {student} | {n:,} x {views} x {classes} | {rs[0]['store_mb']:.0f} | "
                         f"{rs[0]['budget_mb']:.1f} | {variant} | {per_s:,.0f} | {vs('floor'):.2f} | "
                         f"{vs('oracle'):.2f} | {max(x['rss_mb'] for x in rs):.0f} |")
    for name in tables if DEVICE == "cpu" else []:
        key = lambda k: results[f"{k}{_setup_suffix(name)}"]  # noqa: E731
        lines += ["", f"The ceiling ({name}): one `distill_step` with `kd_loss` on teacher logits already in memory "
                  f"took {key('distill_step_us_kd'):,.0f} us against {key('distill_step_us_ce'):,.0f} us with plain "
                  f"CE (medians of {ceiling_windows} alternated windows of ~0.25 s in one process): "
                  f"no source of logits can give more than {key('distill_ooc_ceiling_vs_floor'):.2f}x of the floor "
                  "here (`distill_ooc_ceiling_vs_floor`)."]
    lines += reads_lines(tables if with_reads else [], results)
    lines += growth_line("Time per sample, zarr out of core (tiny_cnn, 10 classes, 1 view), as the data grows",
                         results, "distill_ooc_us_per_sample_")
    publish(lines, results, out, json_path)


if __name__ == "__main__":
    main()
