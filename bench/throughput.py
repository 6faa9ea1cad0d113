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
tables give medians over repeats, and the ratios are medians of the per-repeat ratios.

Usage: python bench/throughput.py --out BENCHMARKS.md          (what `make bench` runs)
       python bench/throughput.py --quick --out /tmp/x.md      (smoke run, a few seconds)
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import platform
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

from pipeline.loss import kd_loss
from pipeline.models import build_model, resolve_device
from pipeline.store import LogitStore, StoreMeta, write_store
from pipeline.train import make_optimizer, online_targets, store_targets, teacher_forward

TEMPERATURE = 4.0   # params.yaml distill.temperature; does not change the cost
CHUNK_SAMPLES = 1024  # params.yaml cache.chunk_samples
TEACHER_BATCH = 256   # params.yaml cache.batch_size: the batch the cache stage runs the teacher at
IMAGE_POOL = 4        # distinct pre-built image batches, cycled


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


def pairs_for(quick: bool) -> list[Pair]:
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
    steps: int = 1
    rates: list[float] = field(default_factory=list)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(job: Job, steps: int, device: torch.device) -> float:
    """Seconds for `steps` steps of `job`."""
    gc.collect()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        job.step()
    sync(device)
    return time.perf_counter() - start


def calibrate(job: Job, window_s: float, min_steps: int, device: torch.device) -> None:
    """Warm up (one untimed step), then pick the step count that fills about `window_s` seconds."""
    job.step()
    probe = 0
    elapsed = 0.0
    while elapsed < min(0.2, window_s) or probe == 0:
        elapsed += timed(job, 1, device)
        probe += 1
    job.steps = max(min_steps, round(window_s / (elapsed / probe)))


def make_stores(pair: Pair, root: Path) -> dict[str, Path]:
    """Write a zarr and an HDF5 store (float16, random logits) of the pair's shape; return their paths."""
    meta = StoreMeta(num_samples=pair.num_samples, num_views=pair.num_views, num_classes=pair.num_classes,
                     augment=[], seed=0, dtype="float16", teacher_arch=pair.teacher,
                     teacher_fingerprint="bench", dataset_fingerprint="bench")
    rng = np.random.default_rng(0)
    labels = rng.integers(pair.num_classes, size=pair.num_samples)

    def blocks():
        for start in range(0, pair.num_samples, CHUNK_SAMPLES):
            rows = min(CHUNK_SAMPLES, pair.num_samples - start)
            yield start, rng.normal(0, 3, (rows, pair.num_views, pair.num_classes)).astype(np.float32)

    paths = {"zarr": root / "logits.zarr", "hdf5": root / "logits.h5"}
    for fmt, path in paths.items():
        write_store(path, fmt, meta, labels, blocks(), CHUNK_SAMPLES)
    return paths


def disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def build_jobs(pair: Pair, paths: dict[str, Path], device: torch.device) -> tuple[list[Job], list]:
    """The variants for one pair, sharing pre-built batches; also returns the open stores (to close)."""
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

    teacher = build_model(pair.teacher, c, pair.num_classes).to(device).eval()
    base_student = build_model(pair.student, c, pair.num_classes)

    def distill_step(targets, kd_weight: float) -> Callable[[], None]:
        student = copy.deepcopy(base_student).to(device).train()
        optimizer, _ = make_optimizer(student, lr=1e-3, weight_decay=1e-4)
        counter = iter(range(sys.maxsize))

        def step() -> None:  # the body of distill's batch loop
            k = next(counter)
            x, y = images[k % IMAGE_POOL], labels[k % IMAGE_POOL]
            s, v = samples[k % len(samples)], views[k % len(views)]
            teacher_logits = targets(x, s, v).to(device) if kd_weight else None
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = student(x)
            loss = kd_loss(logits, teacher_logits, y, TEMPERATURE, kd_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()

        return step

    stores = {(fmt, where): LogitStore(path, **({} if where == "in-memory" else {"max_memory_bytes": 0}))
              for fmt, path in paths.items() for where in ("in-memory", "on-disk")}
    for (fmt, where), store in stores.items():
        assert store.in_memory == (where == "in-memory"), (fmt, where)

    jobs = [Job("CE only, no teacher (floor)", distill_step(None, 0.0), b, "floor")]
    for (fmt, where), store in stores.items():
        jobs.append(Job(f"{fmt} store, {where}", distill_step(store_targets(store), 1.0), b))
    jobs.append(Job(f"online teacher ({pair.teacher})", distill_step(online_targets(teacher, device), 1.0), b,
                    "online"))
    if pair.teacher_pass:
        tx = torch.rand(TEACHER_BATCH, c, h, w)
        jobs.append(Job(f"teacher forward alone, batch {TEACHER_BATCH}",
                        lambda: teacher_forward(teacher, tx, device), TEACHER_BATCH, "teacher"))
    return jobs, list(stores.values())


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def pair_report(pair: Pair, jobs: list[Job], sizes: dict[str, int]) -> list[str]:
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
        lines.append(f"| {job.name} | {fmt_rate(med)} | {fmt_rate(min(job.rates))} - {fmt_rate(max(job.rates))} "
                     f"| {ratio:.2f} | {1e3 * b / med:.2f} | "
                     f"{'-' if job is floor else f'{extra:+.2f}'} | "
                     f"{'-' if job is online else f'{speedup:.1f}x'} |")
    steps = ", ".join(f"{j.steps}" for j in jobs if j.kind != "teacher")
    lines += ["", f"Steps per timing window, in table order: {steps}.", ""]
    return lines


def teacher_report(rows: list[tuple[Pair, Job]]) -> list[str]:
    if not rows:
        return []
    lines = ["### Cost of the cache stage: one teacher pass over the data", "",
             f"`teacher_forward` alone at the cache stage's batch size ({TEACHER_BATCH}); the cache stage runs "
             "it once per (sample, view), so N x V images. The estimate leaves out the augmentation replay "
             "and the store writes.", "",
             "| pair | teacher | median img/s | min - max img/s | N x V views | est. teacher time for the cache |",
             "|---|---|---:|---:|---:|---:|"]
    for pair, job in rows:
        med = statistics.median(job.rates)
        views = pair.num_samples * pair.num_views
        lines.append(f"| {pair.name} | `{pair.teacher}` | {fmt_rate(med)} | {fmt_rate(min(job.rates))} - "
                     f"{fmt_rate(max(job.rates))} | {views:,} | {fmt_duration(views / med)} |")
    return lines + [""]


def machine_lines(device: torch.device) -> list[str]:
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
            f"zarr {zarr.__version__}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})"]


def intro_lines(repeats: int, window_s: float, quick: bool) -> list[str]:
    lines = ["# Benchmarks: distill-step throughput", ""]
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
        "once, in a rotated order, so machine noise hits all alike. Tables give the median over repeats; "
        "`x CE floor`, `extra ms/step` and `speed-up vs online` are medians of the per-repeat ratios or "
        "differences, which pair measurements taken seconds apart.",
        "",
        "Regenerate with `make bench`, i.e. `.venv/bin/python bench/throughput.py --out BENCHMARKS.md` "
        "(`--repeats N`, default 5; `--quick` for a short smoke run).",
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
def main(out_path, repeats, quick, window_s, device_name):
    """Measure distill-step throughput (CE floor, zarr/HDF5 stores, online teacher) and write markdown."""
    device = resolve_device(device_name)
    if quick:
        repeats = 1 if click.get_current_context().get_parameter_source("repeats").name == "DEFAULT" else repeats
    window_s = window_s if window_s is not None else (0.05 if quick else 1.5)
    min_steps = 1 if quick else 2
    started = time.perf_counter()
    sections: list[str] = []
    teacher_rows: list[tuple[Pair, Job]] = []
    for pair in pairs_for(quick):
        click.echo(f"[{time.perf_counter() - started:6.1f}s] pair {pair.name}: writing stores", err=True)
        with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
            paths = make_stores(pair, Path(tmp))
            sizes = {fmt: disk_bytes(p) for fmt, p in paths.items()}
            jobs, stores = build_jobs(pair, paths, device)
            for job in jobs:
                # the teacher pass gets one step per window: a ResNet-18 batch of 256 takes seconds on CPU
                calibrate(job, window_s, 1 if job.kind == "teacher" else min_steps, device)
                click.echo(f"[{time.perf_counter() - started:6.1f}s]   calibrated {job.name}: "
                           f"{job.steps} steps/window", err=True)
            for r in range(repeats):
                shift = r % len(jobs)
                for job in jobs[shift:] + jobs[:shift]:
                    job.rates.append(job.steps * job.images_per_step / timed(job, job.steps, device))
                click.echo(f"[{time.perf_counter() - started:6.1f}s]   repeat {r + 1}/{repeats} done", err=True)
            for store in stores:
                if store.format == "hdf5":
                    store._file.close()
            del stores
        sections += pair_report(pair, jobs, sizes)
        teacher_rows += [(pair, j) for j in jobs if j.kind == "teacher"]
        for job in jobs:
            click.echo(f"  {job.name:40s} median {statistics.median(job.rates):10.1f} img/s", err=True)
    total = time.perf_counter() - started
    lines = intro_lines(repeats, window_s, quick) + machine_lines(device) + [
        f"- Run: {repeats} repeats, about {window_s:g} s per timing window, {fmt_duration(total)} in all", "",
        "## Results", ""] + sections + teacher_report(teacher_rows)
    Path(out_path).write_text("\n".join(lines).rstrip() + "\n")
    click.echo(f"wrote {out_path} ({fmt_duration(total)})", err=True)


if __name__ == "__main__":
    main()
