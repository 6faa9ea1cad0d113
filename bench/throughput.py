"""Distill-step throughput: how much do cached teacher logits cost compared with the alternatives?

For each (teacher, student) pair it times, in training images per second, one distill step
(obtain the teacher targets + student forward + kd_loss + backward + Adam step, exactly the inner
loop of `pipeline.train.distill`) with the targets coming from:

  * nowhere: plain CE, kd_weight 0 (the floor: what the student costs on its own),
  * a zarr store (float16) and an HDF5 store (float16), each loaded in memory (the default
    `LogitStore`) and read from disk per batch (`LogitStore(path, max_memory_bytes=0)`), through
    `store_targets` / `LogitStore.read` on the batch's (sample, view) pairs,
  * the teacher run live on the batch (`online_targets` / `teacher_forward`).

Input batches are random tensors drawn once, with (sample, view) pairs from a seeded per-epoch
shuffle: the augmentation replay costs the same in every variant, so it is left out and the
numbers isolate target acquisition + student step. The stores are real files in a temporary
directory, written with `write_store` from random logits (contents do not change the speed).

Every repeat runs every variant once, in a rotated order, so machine noise hits all alike; the
tables give medians over repeats, and the ratios are medians of the per-repeat ratios. The CPU time
other processes take during each timing window is measured from /proc/stat: with torch's default
one thread per core, a step of a small model can slow down ~100x while another process holds a core.
So before each repeat the run waits for a quiet machine, and a disturbed repeat is redone, both only
while the time budget (`--budget`) lasts; the report says how many repeats were clean.

Usage: python bench/throughput.py --out BENCHMARKS.md          (what `make bench` runs; ~3.5 min quiet)
       python bench/throughput.py --quick --out /tmp/x.md      (smoke run, ~15-25 s, no waiting)
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click
import numpy as np
import torch

from machine import busy_seconds, others_between, others_now
from output import publish

from pipeline.models import build_model, resolve_device
from pipeline.params import OptimParams
from pipeline.store import LogitStore, StoreMeta
from pipeline.writer import write_store
from pipeline.train import distill_step, make_optimizer, online_targets, store_targets
from pipeline.cache import teacher_forward

ADAM = OptimParams(name="adam", lr=1e-3, betas=[0.9, 0.999], momentum=0.9, nesterov=False, weight_decay=1e-4,
                   schedule="step", lr_milestones=[], lr_factors=[])  # the origin's optimizer
TEMPERATURE = 4.0   # params.yaml distill.temperature; does not change the cost
CHUNK_SAMPLES = 1024  # params.yaml cache.chunk_samples
TEACHER_BATCH = 256   # params.yaml cache.batch_size: the batch the cache stage runs the teacher at
IMAGE_POOL = 4        # distinct pre-built image batches, cycled
QUIET = 0.25          # a repeat is clean when other processes used at most this many CPU cores in every window


@dataclass(frozen=True)
class Pair:
    name: str
    teacher: str
    student: str
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    batch_size: int
    num_samples: int
    num_views: int
    teacher_pass: bool  # also time the teacher alone (the cost of the cache stage)


def pairs_for(quick: bool, device: torch.device = torch.device("cpu")) -> list[Pair]:
    if device.type == "cuda":  # students of real size too: a tiny one is launch-bound on a GPU
        return [Pair("A (defaults)", "cnn", "tiny_cnn", (1, 8, 8), 10, 64, 1077, 8, True),
                Pair("C (resnet56 -> resnet20, batch 128)", "resnet56", "resnet20", (3, 32, 32), 10, 128, 50000, 8,
                     True),
                Pair("C (resnet56 -> resnet20, batch 512)", "resnet56", "resnet20", (3, 32, 32), 10, 512, 50000, 8,
                     False)]
    if quick:
        return [Pair("A (defaults)", "cnn", "tiny_cnn", (1, 8, 8), 10, 64, 1077, 8, False),
                Pair("B (resnet18, 10 classes)", "resnet18", "tiny_cnn", (3, 32, 32), 10, 64, 1000, 8, True)]
    return [Pair("A (defaults)", "cnn", "tiny_cnn", (1, 8, 8), 10, 64, 1077, 8, True),
            Pair("B (resnet18, 10 classes)", "resnet18", "tiny_cnn", (3, 32, 32), 10, 64, 10000, 8, True),
            Pair("B (resnet18, 100 classes)", "resnet18", "tiny_cnn", (3, 32, 32), 100, 64, 10000, 8, False)]


@dataclass
class Job:
    """One timed variant: `step()` does one step that consumes `images_per_step` images."""
    name: str
    step: Callable[[], None]
    images_per_step: int
    kind: str = "distill"  # distill | floor | online | teacher
    min_steps: int = 2
    rates: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # CPU cores other processes used, per window


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def window(job: Job, seconds: float, min_steps: int, device: torch.device) -> tuple[int, float]:
    """Run `job` until `seconds` have passed and at least `min_steps` steps are done: (steps, elapsed).

    Time-bounded rather than a fixed step count, so a burst of other load on the machine cannot
    stretch the run; a step is never cut short.
    """
    gc.collect()
    sync(device)
    before = busy_seconds()
    start = time.perf_counter()
    steps = 0
    while True:
        job.step()
        steps += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if steps >= min_steps and elapsed >= seconds:
            job.others.append(others_between(before, busy_seconds(), elapsed))
            return steps, elapsed


def make_stores(pair: Pair, root: Path) -> dict[str, Path]:
    """Write a zarr and an HDF5 store (float16, random logits) of the pair's shape; return their paths."""
    meta = StoreMeta(num_samples=pair.num_samples, num_views=pair.num_views, num_classes=pair.num_classes,
                     augment=[], mean=[0.0], std=[1.0], seed=0, dtype="float16", storage="full", top_k=0,
                     chunk_samples=CHUNK_SAMPLES,
                     amp="off", teacher_arch=pair.teacher,
                     teacher_fingerprint="bench", dataset_fingerprint="bench")
    rng = np.random.default_rng(0)
    labels = rng.integers(pair.num_classes, size=pair.num_samples)

    def blocks():
        for k in range(meta.num_chunks):
            first, stop = meta.chunk_rows(k)
            yield k, rng.normal(0, 3, (stop - first, pair.num_views, pair.num_classes)).astype(np.float32)

    paths = {"zarr": root / "logits.zarr", "hdf5": root / "logits.h5"}
    for fmt, path in paths.items():
        write_store(path, fmt, meta, labels, blocks())
    return paths


def disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def build_jobs(pair: Pair, paths: dict[str, Path], device: torch.device, teacher_batches: tuple[int, ...]
               ) -> tuple[list[Job], list, float]:
    """The variants for one pair, sharing pre-built batches; also returns the open stores (to close)
    and the mean number of store chunks one batch touches."""
    torch.manual_seed(0)
    c, h, w = pair.shape
    b = pair.batch_size
    images = torch.rand(IMAGE_POOL, b, c, h, w)
    labels = torch.randint(pair.num_classes, (IMAGE_POOL, b))
    # (sample, view) pairs as distill draws them: a seeded shuffle of all samples per epoch, each
    # batch `b` distinct samples, views drawn uniformly (the `random` schedule; `cycle` reads alike)
    rng = np.random.default_rng(1)
    order = rng.permutation(pair.num_samples)[: (pair.num_samples // b) * b].reshape(-1, b)
    samples = torch.from_numpy(order.astype(np.int64))
    views = torch.from_numpy(rng.integers(pair.num_views, size=order.shape).astype(np.int64))
    chunks_touched = float(np.mean([len(np.unique(row // CHUNK_SAMPLES)) for row in order]))

    teacher = build_model(pair.teacher, c, pair.num_classes, image_size=h).to(device).eval()
    base_student = build_model(pair.student, c, pair.num_classes, image_size=h)

    def step_runner(targets, kd_weight: float) -> Callable[[], None]:
        student = copy.deepcopy(base_student).to(device).train()
        optimizer, _ = make_optimizer(student, ADAM, epochs=1)
        counter = iter(range(sys.maxsize))

        def step() -> None:  # the body of distill's batch loop
            k = next(counter)
            x, y = images[k % IMAGE_POOL], labels[k % IMAGE_POOL]
            s, v = samples[k % len(samples)], views[k % len(views)]
            loss, _ = distill_step(student, optimizer, targets, x, y, s, v, TEMPERATURE, kd_weight, device)
            loss.item()

        return step

    stores = {(fmt, where): LogitStore(path, **({} if where == "in-memory" else {"max_memory_bytes": 0}))
              for fmt, path in paths.items() for where in ("in-memory", "on-disk")}
    for (fmt, where), store in stores.items():
        assert store.in_memory == (where == "in-memory"), (fmt, where)

    jobs = [Job("CE only, no teacher (floor)", step_runner(None, 0.0), b, "floor")]
    for (fmt, where), store in stores.items():
        jobs.append(Job(f"{fmt} store, {where}", step_runner(store_targets(store), 1.0), b))
    jobs.append(Job(f"online teacher ({pair.teacher})", step_runner(online_targets(teacher, device), 1.0), b,
                    "online"))
    if pair.teacher_pass:
        for tb in teacher_batches:
            tx = torch.rand(tb, c, h, w)
            # one step per window at least: a ResNet-18 batch of 256 takes seconds on a small CPU
            jobs.append(Job(f"teacher forward alone, batch {tb}",
                            lambda tx=tx: teacher_forward(teacher, tx, device), tb, "teacher", min_steps=1))
    return jobs, list(stores.values()), chunks_touched


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def keep(jobs: list[Job], indices: list[int]) -> None:
    """Keep only the given repeats' measurements (drops the warm-up window's load sample too)."""
    for job in jobs:
        others = job.others[-len(job.rates):]
        job.rates = [job.rates[i] for i in indices]
        job.steps = [job.steps[i] for i in indices]
        job.others = [others[i] for i in indices]


def slug(text: str) -> str:
    """A results.json key part: lower case, runs of other characters as one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def pair_report(pair: Pair, jobs: list[Job], sizes: dict[str, int], chunks_touched: float, runs: int,
                clean: int, results: dict | None = None) -> list[str]:
    """The pair's markdown section; its figures also go into `results` (keys `step_images_per_s_<pair>_<variant>`
    and `step_vs_floor_<pair>_<variant>`, slugged names)."""
    floor = next(j for j in jobs if j.kind == "floor")
    online = next(j for j in jobs if j.kind == "online")
    b = pair.batch_size
    c, h, w = pair.shape
    lines = [f"### Pair {pair.name}: teacher `{pair.teacher}` -> student `{pair.student}`", "",
             f"Inputs {c}x{h}x{w}, {pair.num_classes} classes, batch {b}, N = {pair.num_samples:,} samples x "
             f"V = {pair.num_views} views; stores float16, chunks of {CHUNK_SAMPLES} samples "
             f"(zarr {sizes['zarr'] / 1e6:.2f} MB on disk, HDF5 {sizes['hdf5'] / 1e6:.2f} MB).", "",
             "| variant | median img/s | min - max img/s | x CE floor | ms/step | extra ms/step vs floor "
             "| speed-up vs online |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for job in jobs:
        if job.kind == "teacher":
            continue
        med = statistics.median(job.rates)
        ratio = statistics.median(r / f for r, f in zip(job.rates, floor.rates))
        extra = statistics.median(1e3 * b * (1 / r - 1 / f) for r, f in zip(job.rates, floor.rates))
        speedup = statistics.median(r / o for r, o in zip(job.rates, online.rates))
        if results is not None:
            results[f"step_images_per_s_{slug(pair.name)}_{slug(job.name)}"] = med
            results[f"step_vs_floor_{slug(pair.name)}_{slug(job.name)}"] = ratio
        lines.append(f"| {job.name} | {fmt_rate(med)} | {fmt_rate(min(job.rates))} - {fmt_rate(max(job.rates))} "
                     f"| {ratio:.2f} | {1e3 * b / med:.2f} | "
                     f"{'-' if job is floor else f'{extra:+.2f}'} | "
                     f"{'-' if job is online else f'{speedup:.1f}x'} |")
    num_chunks = -(-pair.num_samples // CHUNK_SAMPLES)
    chunk_mb = min(CHUNK_SAMPLES, pair.num_samples) * pair.num_views * pair.num_classes * 2 / 1e6
    chunk_note = (f"An on-disk read of one shuffled batch touches {chunks_touched:.1f} of the {num_chunks} chunks "
                  f"on average ({chunks_touched * chunk_mb:.2f} MB of float16 logits fetched and, for zarr, "
                  f"decompressed, for {b * pair.num_classes * 2 / 1e3:.1f} kB used).")
    steps = ", ".join(f"{statistics.median(j.steps):g}" for j in jobs if j.kind != "teacher")
    others = [o for j in jobs for o in j.others]
    kept = len(floor.rates)
    lines += ["", f"Repeats: {kept} kept of {runs} run ({clean} clean, i.e. other processes used at most {QUIET:g} "
              f"CPU cores in each of the repeat's windows; unclean repeats are redone while time allows). "
              f"Other processes used {statistics.median(others):.2f} CPU cores (median; max {max(others):.2f}) "
              f"during the kept windows. Median steps per timing window, in table order: {steps}. {chunk_note}", ""]
    if kept > clean:
        lines += [f"**Warning: {kept - clean} of the {kept} kept repeats ran while other processes were using the "
                  "CPU; the numbers above are distorted (rerun on a quieter machine).**", ""]
    return lines


def teacher_report(rows: list[tuple[Pair, Job]]) -> list[str]:
    if not rows:
        return []
    lines = ["### Cost of the cache stage: one teacher pass over the data", "",
             f"`teacher_forward` alone, at batch 64 and at the cache stage's default batch size "
             f"({TEACHER_BATCH}, params.yaml `cache.batch_size`); the cache stage runs it once per "
             "(sample, view), so N x V images. The estimate leaves out the augmentation replay and the "
             "store writes.", "",
             "| pair | teacher | batch | median img/s | min - max img/s | N x V views "
             "| est. teacher time for the cache |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for pair, job in rows:
        med = statistics.median(job.rates)
        views = pair.num_samples * pair.num_views
        lines.append(f"| {pair.name} | `{pair.teacher}` | {job.images_per_step} | {fmt_rate(med)} | "
                     f"{fmt_rate(min(job.rates))} - {fmt_rate(max(job.rates))} | {views:,} | "
                     f"{fmt_duration(views / med)} |")
    return lines + [""]


def machine_lines(device: torch.device, load_before: tuple, load_after: tuple) -> list[str]:
    import h5py
    import zarr

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return [f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- Machine: {platform.system()} {platform.machine()}, CPU {cpu}, nproc {os.cpu_count()}, "
            f"torch threads {torch.get_num_threads()}{gpu}; device `{device}`",
            f"- Software: Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"zarr {zarr.__version__}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})",
            "- Load average (1, 5, 15 min) before / after the run: "
            f"{', '.join(f'{x:.2f}' for x in load_before)} / {', '.join(f'{x:.2f}' for x in load_after)} "
            "(other work on the machine slows every variant, and with one torch thread per core a "
            "small model's step can slow down a hundredfold while another process holds a core; each "
            "pair's section says how much CPU other processes took during its timing windows)"]


def intro_lines(repeats: int, window_s: float, quick: bool) -> list[str]:
    lines = ["# Benchmarks: distill-step throughput", "",
             "These are CPU figures from `make bench`; the GPU figures (a lent H200) are in BENCHMARKS-GPU.md.", ""]
    if quick:
        lines += ["**Quick smoke run (`--quick`): tiny timing windows, numbers are not meaningful.**", ""]
    lines += [
        "What is measured: training images per second of one distillation step, i.e. obtaining the "
        "teacher's logits for the batch + student forward + `kd_loss` + backward + Adam step (the inner "
        "loop of `pipeline.train.distill`), with the teacher's logits taken from",
        "",
        "- nowhere: plain CE, `kd_weight = 0`, student alone (the floor),",
        "- a zarr v3 or HDF5 store (float16), read per batch with `LogitStore.read` on the batch's "
        "(sample, view) pairs, either loaded into memory on open (the default `LogitStore`) or read from "
        "the file per batch (`LogitStore(path, max_memory_bytes=0)`; the file sits in the OS page "
        "cache, so this is decoding + indexing cost, not disk latency),",
        "- the teacher run live on the batch (`online_targets`, i.e. `teacher_forward`).",
        "",
        "How: input batches are random tensors drawn once and (sample, view) pairs follow a seeded "
        "per-epoch shuffle, so the augmentation replay (the same in every variant) is left out. Stores "
        "are real files in a temporary directory, written by `write_store` with random logits. Models "
        "have random weights (speed does not depend on them). Each variant is warmed up, then timed "
        f"over windows of about {window_s:g} s; every one of the {repeats} repeats times every variant "
        "once, in a rotated order, so machine noise hits all alike. The CPU time other processes take "
        "during each window is measured (from /proc/stat); before each repeat the benchmark waits for a "
        "quiet machine, and a repeat that others disturbed is redone while the time budget lasts. Tables "
        "give the median over the kept repeats; "
        "`x CE floor`, `extra ms/step` and `speed-up vs online` are medians of the per-repeat ratios or "
        "differences, which pair measurements taken seconds apart.",
        "",
        "Regenerate with `make bench`, i.e. `.venv/bin/python bench/throughput.py --out BENCHMARKS.md` "
        "(`--repeats N`, default 5; `--quick` for a short smoke run; `--threads N` to override torch's "
        "thread count).",
        "",
        "## Machine",
        "",
    ]
    return lines


@click.command()
@click.option("--out", "out_path", default="BENCHMARKS.md", show_default=True,
              help="Write the markdown report here.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timing windows per variant; variants are interleaved within each repeat.")
@click.option("--quick", is_flag=True, help="Short smoke run: small pair B, one repeat, tiny windows.")
@click.option("--window", "window_s", type=float, default=None,
              help="Seconds per timing window (default 1.5, or 0.05 with --quick).")
@click.option("--device", "device_name", default="cpu", show_default=True, help="cpu | cuda | auto.")
@click.option("--budget", type=float, default=None,
              help="Seconds after which disturbed repeats are no longer redone (default 360, or 0 with --quick).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch.set_num_threads; default: leave torch's default (one per core).")
@click.option("--json", "json_path", default=None, help="Merge the figures into this flat JSON object.")
def main(out_path, repeats, quick, window_s, device_name, budget, threads, json_path):
    """Measure distill-step throughput (CE floor, zarr/HDF5 stores, online teacher) and write markdown."""
    device = resolve_device(device_name)
    if threads:
        torch.set_num_threads(threads)
    if quick:
        repeats = 1 if click.get_current_context().get_parameter_source("repeats").name == "DEFAULT" else repeats
    window_s = window_s if window_s is not None else (0.05 if quick else 1.5)
    budget = budget if budget is not None else (0.0 if quick else 360.0)
    started = time.perf_counter()
    load_before = os.getloadavg()
    sections: list[str] = []
    teacher_rows: list[tuple[Pair, Job]] = []
    results: dict = {}
    pairs = pairs_for(quick, device)
    for p_index, pair in enumerate(pairs):
        click.echo(f"[{time.perf_counter() - started:6.1f}s] pair {pair.name}: writing stores", err=True)
        with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
            paths = make_stores(pair, Path(tmp))
            sizes = {fmt: disk_bytes(p) for fmt, p in paths.items()}
            jobs, stores, chunks_touched = build_jobs(pair, paths, device, (64,) if quick else (64, TEACHER_BATCH))
            for job in jobs:  # warm-up: first-call allocations, Adam state, store handles
                if quick:
                    job.min_steps = 1
                window(job, min(0.3, window_s), 1, device)
            click.echo(f"[{time.perf_counter() - started:6.1f}s]   warmed up", err=True)
            # share what is left of the budget among the pairs still to run; while it lasts, wait for a quiet
            # machine before each repeat and redo repeats that other processes disturbed
            deadline = time.perf_counter() + (started + budget - time.perf_counter()) / (len(pairs) - p_index)
            clean, runs = [], 0
            while len(clean) < repeats and (runs < repeats or time.perf_counter() < deadline):
                while time.perf_counter() < deadline and others_now() > QUIET:
                    time.sleep(2)
                shift = runs % len(jobs)
                for job in jobs[shift:] + jobs[:shift]:
                    steps, elapsed = window(job, window_s, job.min_steps, device)
                    job.steps.append(steps)
                    job.rates.append(steps * job.images_per_step / elapsed)
                worst = max(job.others[-1] for job in jobs)
                if worst <= QUIET:
                    clean.append(runs)
                runs += 1
                click.echo(f"[{time.perf_counter() - started:6.1f}s]   repeat {runs}: other processes used up to "
                           f"{worst:.2f} cores; {len(clean)}/{repeats} clean", err=True)
            # the clean repeats when there are enough of them for a median, else all of them
            keep(jobs, clean[:repeats] if len(clean) >= min(repeats, 3) else list(range(runs)))
            for store in stores:
                if store.format == "hdf5":
                    store._file.close()
            del stores
        sections += pair_report(pair, jobs, sizes, chunks_touched, runs, min(len(clean), len(jobs[0].rates)), results)
        teacher_rows += [(pair, j) for j in jobs if j.kind == "teacher"]
        for job in jobs:
            click.echo(f"  {job.name:40s} median {statistics.median(job.rates):10.1f} img/s", err=True)
    total = time.perf_counter() - started
    lines = intro_lines(repeats, window_s, quick) + machine_lines(device, load_before, os.getloadavg()) + [
        f"- Run: {repeats} repeats, about {window_s:g} s per timing window, {fmt_duration(total)} in all", "",
        "## Results", ""] + sections + teacher_report(teacher_rows)
    while lines and not lines[-1]:
        lines.pop()
    publish(lines, results, append_to=out_path, json_path=json_path, quiet=True, new_file=True)
    click.echo(f"wrote {out_path} ({fmt_duration(total)})", err=True)


if __name__ == "__main__":
    main()
