"""The cache stage on an ImageNet-like JPEG folder (CPU): its throughput against bounds measured in the same run,
and how many times it decodes each image. Writes a markdown section (--append) and flat keys (--json).

Usage: python bench/imagefolder_cache.py [--images 2000 --classes 100 --samples 256 --views 8 --repeats 3]
                                         [--data /tmp/kd_imagenet_like] [--append BENCHMARKS.md] [--json FILE]
On a GPU (issue 15's pair, key cache_vs_teacher_forward_imagefolder_gpu; bench/results/gpu.sh):
       python bench/imagefolder_cache.py --device cuda --teacher resnet50 --amp bfloat16 --samples 2000 --batch 256

The data is made here, once (nothing is downloaded): `--images` JPEGs of 500x375 px at quality 90 in
`<data>/train/c<k>/*.jpg` (image j in class j mod `--classes`), each a real image upsampled with PIL (bicubic):
CIFAR-10's JPEGs from ../shared/data/cifar10-jpg.tar.gz beside the repository (read in place), or where that is absent tiles of
scikit-learn's two sample photographs. A marker file lets later runs reuse the folder.

Params as a user sets them: `data.name: imagefolder`, `data.image_size: 256` (decode, shorter side to 256,
centre crop), augment RandomResizedCrop 224 + RandomHorizontalFlip, V views, the teacher (random weights) at 224,
batch `--batch`, the first `--samples` training images. Each repeat (after waiting up to `--wait` s for other
processes to leave the cores) times, in this order, on those images:
  decode            `split.images[i]` for every sample (JPEG decode + resize + crop), CPU-s per image
  replay            `ReplayDataset` (view by view through `replay_view`) + collate, as the cache stage replays
                    image-folder views, on images decoded beforehand (the first 8 batches of views), CPU-s per view
  teacher forward   `teacher_forward` on 4 batches of views replayed beforehand, CPU-s per view
                    (each of the three on torch's default threads, then again on 1 thread, as each worker runs)
  cache stage       `cache_teacher_logits` into a fresh zarr store, num_workers 0, then num_workers = cores: views/s
The shared-cores bound is bench/cache_throughput.py's: cores / (CPU-s per view of the steps, summed), the rate if
the steps shared the cores perfectly, with the decode counted
  per view          decode CPU-s + replay + forward (what the cache stage does today: V decodes per image)
  once              decode CPU-s / V + replay + forward (each image decoded once, its V views replayed from it)
from the default-thread CPU-s (cache_throughput's way; the JSON keys without `_1thread`) and from the 1-thread
CPU-s (`_1thread`: no idle spinning of torch's thread pool in the sum). "One core" is 1 / the same sum. Decodes:
`ImageFiles.__getitem__` is wrapped with a counter shared with the (forked) DataLoader workers; per sample = the
calls during one cache run / samples (the excess over V is the augmentation check on image 0 that every replay
starts with). Other processes' load during each step is read from /proc/stat and reported.
With --device cuda (or --vs-forward on the CPU), `measure_device` instead times the cache stage against the
teacher's forward alone on that device (keys {teacher_forward,cache}_views_per_s_imagefolder_gpu,
cache_vs_teacher_forward_imagefolder_gpu, cache_decodes_per_sample_imagefolder_gpu; `_cpu` with --vs-forward).
If neither the CIFAR-10 archive nor scikit-learn's sample photographs are there, the folder is made of smooth
random images (the marker says so).
Keys: cache_views_per_s_imagefolder_cpu (best of the worker settings) and _w0, _w<cores>;
shared_cores_bound[_1thread]_views_per_s_imagefolder_cpu_{decode_once,decode_per_view};
one_core[_1thread]_views_per_s_imagefolder_cpu_{decode_once,decode_per_view};
cache_vs_bound[_1thread]_imagefolder_cpu (best cache / decode-once bound);
cache_vs_bound[_1thread]_decode_per_view_imagefolder_cpu; cache_decodes_per_sample (median of both worker
settings) and _w0, _w<cores>; {decode,replay,forward}[_1thread]_ms_per_{image,view}_imagefolder_cpu (CPU-ms);
others_cores_imagefolder_cpu (median cores other processes used during the steps).
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from machine import busy_seconds, others_between, wait_quiet
from output import publish
from pipeline.data import input_transform, load_dataset
from pipeline.models import build_model
from pipeline.params import CacheParams, DataParams, load_params
from pipeline.store import LogitStore
from pipeline.train import distill, store_targets
from pipeline.replay import ReplayDataset
from pipeline.augment import build_augment
from pipeline.sources import ImageFiles
from pipeline.cache import cache_teacher_logits, prepare_teacher, resolve_amp, teacher_forward, teacher_logits_on

CIFAR_JPG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"
WIDTH, HEIGHT, QUALITY = 500, 375, 90
IMAGE_SIZE = 256
AUGMENT = [{"RandomResizedCrop": {"size": 224}}, {"RandomHorizontalFlip": {}}]
CPU = torch.device("cpu")
CORES = os.cpu_count() or 1
MARKER = ".kd_bench_imagefolder.json"
STUDENT = "mobilenet_v3_small"  # at 224: small enough for one epoch on 2 cores


# ---- the data -------------------------------------------------------------------------------------------------

def cifar_images(count: int):
    """Up to `count` PIL images from the CIFAR-10 JPEG archive's train/<class>/*.jpg, the classes interleaved (the
    archive is sorted by class) so that any prefix spans them all."""
    from PIL import Image

    by_class: dict[str, list[bytes]] = {}
    with tarfile.open(CIFAR_JPG, "r:gz") as tar:  # one pass (a gzip stream cannot seek back cheaply)
        for m in tar:
            parts = m.name.removeprefix("./").split("/")
            if m.isfile() and len(parts) == 3 and parts[0] == "train" and parts[2].lower().endswith(".jpg"):
                by_class.setdefault(parts[1], []).append(tar.extractfile(m).read())
    names = sorted(by_class)
    longest = max(len(v) for v in by_class.values())
    chosen = [by_class[k][j] for j in range(longest) for k in names if j < len(by_class[k])][:count]
    return [Image.open(io.BytesIO(data)).convert("RGB") for data in chosen]


def sample_tiles(count: int):
    """`count` 4:3 tiles of scikit-learn's two sample photographs (427x640), on a grid fine enough to give them."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    tile_w, tile_h = 160, 120
    per_photo = -(-count // len(photos))
    tiles = []
    for photo in photos:
        w, h = photo.size
        side = int(np.ceil(np.sqrt(per_photo)))
        xs = np.linspace(0, w - tile_w, side).astype(int)
        ys = np.linspace(0, h - tile_h, side).astype(int)
        tiles += [photo.crop((x, y, x + tile_w, y + tile_h)) for y in ys for x in xs][:per_photo]
    return tiles[:count]


def smooth_images(count: int):
    """`count` 160x120 images of seeded random low-frequency colour fields (a last resort without real images)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((160, 120), Image.BICUBIC)
            for _ in range(count)]


def build_folder(root: Path, images: int, classes: int, smooth: bool = False) -> dict:
    """`root`/train/c<k>/<j>.jpg, made once; returns the marker's record (source, mean file size)."""
    wanted = {"images": images, "classes": classes, "size": [WIDTH, HEIGHT], "quality": QUALITY,
              **({"smooth": True} if smooth else {})}
    marker = root / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text())
        if {k: record.get(k) for k in wanted} == wanted:
            return record
        shutil.rmtree(root / "train")  # made by this bench with other settings
        marker.unlink()
    elif (root / "train").exists():
        raise click.ClickException(f"{root}/train exists but was not made by this bench (no {MARKER}); "
                                   "pass another --data")
    from PIL import Image

    start = time.perf_counter()
    if smooth:
        source, pictures = "smooth random images", smooth_images(images)
    elif CIFAR_JPG.is_file():
        source, pictures = "cifar10-jpg", cifar_images(images)
    else:
        try:
            source, pictures = "sklearn sample images", sample_tiles(images)
        except (ImportError, OSError):  # e.g. a GPU machine without scikit-learn's data files
            source, pictures = "smooth random images", smooth_images(images)
    pictures = [pictures[j % len(pictures)] for j in range(images)]  # repeat if the source holds fewer
    tmp = root / "train.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    sizes = []
    for j, picture in enumerate(pictures):
        folder = tmp / f"c{j % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{j:06d}.jpg"
        picture.resize((WIDTH, HEIGHT), Image.BICUBIC).save(path, quality=QUALITY)
        sizes.append(path.stat().st_size)
    tmp.rename(root / "train")
    record = {**wanted, "source": source, "mean_bytes": float(np.mean(sizes)),
              "build_s": time.perf_counter() - start}
    marker.write_text(json.dumps(record))
    return record


# ---- decode counting ------------------------------------------------------------------------------------------

DECODES = multiprocessing.Value("q", 0)  # shared with forked DataLoader workers


def count_decodes() -> None:
    """Wrap `ImageFiles.__getitem__` with a counter (before any worker forks, so workers count too)."""
    original = ImageFiles.__getitem__

    def counted(self, i):
        with DECODES.get_lock():
            DECODES.value += 1
        return original(self, i)

    ImageFiles.__getitem__ = counted


# ---- timing ---------------------------------------------------------------------------------------------------

def timed(fn) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process and its children, cores other processes used meanwhile)."""
    before = busy_seconds(children=True)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    after = busy_seconds(children=True)
    return wall, after[1] - before[1], others_between(before, after, wall)


def on_threads(threads: int, fn):
    """`fn` run with torch's intra-op threads set to `threads` (0: as they are)."""
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            fn()
        finally:
            torch.set_num_threads(before)
    return run


def replayed_batches(replayer: ReplayDataset, pairs: list, batch: int) -> list[torch.Tensor]:
    """The views `pairs`, `batch` at a time, replayed and collated as the cache stage's loader does (on the CPU)."""
    return [replayer.collate(replayer.__getitems__(pairs[s:s + batch]))[0] for s in range(0, len(pairs), batch)]


def cache_params(views: int, batch: int, amp: str) -> CacheParams:
    """The bench's `cache` params: a float16 zarr store of `views` views, seed 0, batch `batch`."""
    return CacheParams(num_views=views, seed=0, format="zarr", dtype="float16", storage="full", top_k=1,
                       chunk_samples=1024, batch_size=batch, amp=amp)


def measure(split, num_classes, mean, std, arch, views, batch, repeats, wait_s, root: Path) -> dict:
    n = len(split)
    teacher = build_model(arch, 3, num_classes, {}, 224, seed=0).eval()
    transform = input_transform(build_augment(AUGMENT), mean, std)
    decoded = torch.stack([split.images[i] for i in range(n)])  # also warms the page cache
    replayer = ReplayDataset(decoded, split.labels, transform, 0)  # batched (RandomResizedCrop + flip), as the stage
    pairs = [(i, v) for i in range(n) for v in range(views)]
    timed_pairs = pairs[:8 * batch]  # the replay's and forward's costs per view do not depend on which views
    forward_batches = replayed_batches(replayer, timed_pairs[:4 * batch], batch)
    forward_views = sum(len(x) for x in forward_batches)
    wide = f"w{CORES}"

    def decode():
        for i in range(n):
            split.images[i]

    def replay():
        replayed_batches(replayer, timed_pairs, batch)

    def forward():
        for x in forward_batches:
            teacher_forward(teacher, x, CPU, "off")

    def cache(workers, out=None):
        cfg = cache_params(views, batch, "off")
        keep, out = out is not None, out or root / f"w{workers}-{time.perf_counter_ns()}.zarr"
        cache_teacher_logits(out, cfg, teacher, arch, split, num_classes, AUGMENT, mean, std, CPU,
                             num_workers=workers)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)

    # the distill stage from the folder: one epoch of a student with the store's targets against plain CE (the
    # floor: the same loop, views and student, no targets), both decoding each image from its file
    store_path = root / "store.zarr"
    cache(0, store_path)
    store = LogitStore(store_path)
    defaults = load_params(Path(__file__).resolve().parents[1] / "params.yaml").distill
    run = dataclasses.replace(defaults, epochs=1, batch_size=32, shuffle_chunks=0, optimizer=dataclasses.replace(
        defaults.optimizer, lr_milestones=[], lr_factors=[]))
    val = split.subset(range(4))

    def student_epoch(kd_weight):
        student = build_model(STUDENT, 3, num_classes, {}, 224, seed=0)
        distill(student, split, val, store_targets(store), transform, input_transform(None, mean, std), 0, views,
                run, kd_weight=kd_weight, seed=0, device=CPU, progress=False)

    steps = {  # name: (fn, units timed, what a unit is)
        "decode": (decode, n), "replay": (replay, len(timed_pairs)), "forward": (forward, forward_views)}
    jobs = [(f"{name}_{t}t" if t else name, on_threads(t, fn), units) for t in (0, 1)
            for name, (fn, units) in steps.items()]
    jobs += [("w0", lambda: cache(0), len(pairs)), (wide, lambda: cache(CORES), len(pairs)),
             ("distill_ce", lambda: student_epoch(0.0), n), ("distill_store", lambda: student_epoch(1.0), n)]
    forward(), replay()  # warm up
    cpu, wall, others, decodes = ({k: [] for k, _, _ in jobs} for _ in range(4))
    for r in range(repeats):
        quiet = wait_quiet(wait_s, 0.3)  # with torch's 2 threads on 2 cores, a third busy thread slows steps ~10x
        for key, fn, units in jobs:
            DECODES.value = 0
            wall_s, cpu_s, others_cores = timed(fn)
            cpu[key].append(cpu_s / units)
            wall[key].append(wall_s / units)
            others[key].append(others_cores)
            decodes[key].append(DECODES.value / n)
            print(f"repeat {r + 1}/{repeats} (others {quiet:.2f} cores before) {key}: {wall_s:.2f} s, "
                  f"others {others_cores:.2f} cores", file=sys.stderr, flush=True)
    cpu, wall, others, decodes = ({k: statistics.median(v) for k, v in d.items()}
                                  for d in (cpu, wall, others, decodes))
    out = {"cache_views_per_s_imagefolder_cpu": max(1 / wall["w0"], 1 / wall[wide]),
           "cache_views_per_s_imagefolder_cpu_w0": 1 / wall["w0"],
           f"cache_views_per_s_imagefolder_cpu_{wide}": 1 / wall[wide],
           "cache_decodes_per_sample": statistics.median([decodes["w0"], decodes[wide]]),
           "cache_decodes_per_sample_w0": decodes["w0"], f"cache_decodes_per_sample_{wide}": decodes[wide],
           "others_cores_imagefolder_cpu": statistics.median(others.values()),
           "distill_vs_ce_imagefolder_cpu": wall["distill_ce"] / wall["distill_store"],
           "distill_samples_per_s_imagefolder_cpu": 1 / wall["distill_store"]}
    for suffix, t in (("", ""), ("_1thread", "_1t")):
        d, rp, f = (cpu[f"{k}{t}"] for k in ("decode", "replay", "forward"))
        for name, per_view in (("decode_once", d / views + rp + f), ("decode_per_view", d + rp + f)):
            out[f"shared_cores_bound{suffix}_views_per_s_imagefolder_cpu_{name}"] = CORES / per_view
            out[f"one_core{suffix}_views_per_s_imagefolder_cpu_{name}"] = 1 / per_view
        out[f"cache_vs_bound{suffix}_imagefolder_cpu"] = (
            out["cache_views_per_s_imagefolder_cpu"] / out[f"shared_cores_bound{suffix}_views_per_s_imagefolder_cpu_decode_once"])
        out[f"cache_vs_bound{suffix}_decode_per_view_imagefolder_cpu"] = (
            out["cache_views_per_s_imagefolder_cpu"] / out[f"shared_cores_bound{suffix}_views_per_s_imagefolder_cpu_decode_per_view"])
        for k, unit in (("decode", "image"), ("replay", "view"), ("forward", "view")):
            out[f"{k}{suffix}_ms_per_{unit}_imagefolder_cpu"] = 1e3 * cpu[f"{k}{t}"]
    return out, wall, others


def measure_device(split, num_classes, mean, std, arch, views, batch, repeats, device, amp, workers,
                   root: Path, command: str) -> tuple[dict, list[str]]:
    """The cache stage on `device` against the teacher's forward alone there (issue 15's GPU pair): views/s of
    `cache_teacher_logits` (`workers` DataLoader workers decode and draw; a batched RandomResizedCrop + flip is
    replayed on `device`), and of `teacher_logits_on` over batches of the same views replayed and moved to the
    device beforehand (channels-last, autocast `amp`, synchronised), alternated `repeats` times."""
    tag = "gpu" if device.type == "cuda" else device.type
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    teacher = prepare_teacher(build_model(arch, 3, num_classes, {}, 224, seed=0), device)
    transform = input_transform(build_augment(AUGMENT), mean, std)
    n = len(split)
    head = min(n, max(1, -(-8 * batch // views)))  # the images of 8 batches of views
    replayer = ReplayDataset(torch.stack([split.images[i] for i in range(head)]), split.labels[:head], transform, 0)
    pairs = [(i, v) for i in range(head) for v in range(views)][:8 * batch]
    batches = [x.to(device) for x in replayed_batches(replayer, pairs, batch)]
    forward_views = sum(len(x) for x in batches)
    cfg = cache_params(views, batch, amp)

    def forward():
        for x in batches:
            teacher_logits_on(teacher, x, device, amp)
        sync()

    def cache():
        out = root / f"cache-{time.perf_counter_ns()}.zarr"
        cache_teacher_logits(out, cfg, teacher, arch, split, num_classes, AUGMENT, mean, std, device,
                             num_workers=workers)
        shutil.rmtree(out, ignore_errors=True)

    forward(), cache()  # warm up (cuDNN's choices, the workers' first start, the page cache)
    rates: dict[str, list[float]] = {"forward": [], "cache": []}
    decodes = []
    for r in range(repeats):
        for key, fn, units in (("forward", forward, forward_views), ("cache", cache, n * views)):
            DECODES.value = 0
            start = time.perf_counter()
            fn()
            rates[key].append(units / (time.perf_counter() - start))
            if key == "cache":
                decodes.append(DECODES.value / n)
            print(f"repeat {r + 1}/{repeats} {key}: {rates[key][-1]:.0f} views/s", file=sys.stderr, flush=True)
    fwd, cached = statistics.median(rates["forward"]), statistics.median(rates["cache"])
    precision = resolve_amp(amp, device)
    out = {f"teacher_forward_views_per_s_imagefolder_{tag}": fwd, f"cache_views_per_s_imagefolder_{tag}": cached,
           f"cache_vs_teacher_forward_imagefolder_{tag}": cached / fwd,
           f"cache_decodes_per_sample_imagefolder_{tag}": statistics.median(decodes)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{CORES} CPU cores"
    lines = ["", f"## The cache stage on an ImageNet-like JPEG folder against the teacher's forward ({tag})", "",
             f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {name}, torch {torch.__version__}): the "
             f"first {n} images of the bench's folder (`data.image_size: {IMAGE_SIZE}`), {views} views each of "
             f"RandomResizedCrop 224 + RandomHorizontalFlip, teacher `{arch}` (random weights) at 224, "
             f"{'channels-last, ' if device.type == 'cuda' else ''}autocast {precision}, batch {batch}; the cache "
             f"stage with {workers} DataLoader workers into a real zarr store (float16); the forward alone over "
             f"{forward_views} views replayed and moved to the device beforehand. Medians of {repeats} alternated "
             "repeats, after one warm-up of each.", "",
             "| | views/s | / teacher forward | decodes per sample |", "|---|---|---|---|",
             f"| teacher forward alone | {fwd:.0f} | 1.00x | |",
             f"| cache stage | {cached:.0f} | **{cached / fwd:.2f}x** | {statistics.median(decodes):.3f} |"]
    return out, lines


def section(r: dict, wall: dict, others: dict, command: str, record: dict, samples: int, views: int, arch: str,
            batch: int, repeats: int) -> list[str]:
    wide, threads = f"w{CORES}", torch.get_num_threads()
    key = "shared_cores_bound{}_views_per_s_imagefolder_cpu_{}"
    once, each = r[key.format("", "decode_once")], r[key.format("", "decode_per_view")]
    once1 = r[key.format("_1thread", "decode_once")]
    lines = ["", "## The cache stage on an ImageNet-like JPEG folder (CPU)", "",
             f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {CORES} cores, torch "
             f"{torch.__version__}, {threads} torch threads): {record['images']} JPEGs of "
             f"{WIDTH}x{HEIGHT} at quality {QUALITY} in {record['classes']} classes (upsampled bicubic from "
             f"{record['source']}, {record['mean_bytes'] / 1e3:.0f} kB a file on average), `data.image_size: "
             f"{IMAGE_SIZE}`, augment RandomResizedCrop 224 + RandomHorizontalFlip, {views} views of the first "
             f"{samples} training images, teacher `{arch}` (random weights) at 224, batch {batch}, a real zarr store "
             f"(float16). Views per second, medians of {repeats} alternated repeats. Bounds as in "
             "bench/cache_throughput.py, from CPU-seconds measured in the same repeats: cores / (decode + replay + "
             f"forward CPU-s per view), decode counted per view (as the stage did before it decoded once) or once per image (/ V), "
             f"each step on torch's {threads} threads (cache_throughput's way) or on 1 thread (as each worker "
             "runs). Decodes per sample: calls of `ImageFiles.__getitem__` (in this process and its workers) "
             "during one cache run / samples.", "",
             "| | views/s | / bound, decode once | / bound, decode per view | / 1-thread bound, decode once "
             "| decodes per sample |", "|---|---|---|---|---|---|"]
    for k, label in (("w0", "cache stage, 0 workers"), (wide, f"cache stage, {CORES} workers")):
        v = r[f"cache_views_per_s_imagefolder_cpu_{k}"]
        lines.append(f"| {label} | {v:.1f} | {v / once:.2f}x | {v / each:.2f}x | {v / once1:.2f}x | "
                     f"{r[f'cache_decodes_per_sample_{k}']:.3f} |")
    for suffix, how in (("", f"{threads} threads"), ("_1thread", "1 thread")):
        for name, label, count in (("decode_per_view", "decode per view", views), ("decode_once", "decode once", 1)):
            v = r[key.format(suffix, name)]
            lines.append(f"| shared-cores bound ({CORES} cores), {label}, steps on {how} | {v:.1f} | {v / once:.2f}x | "
                         f"{v / each:.2f}x | {v / once1:.2f}x | {count} |")
    lines += [f"| one core, decode per view / once, steps on {threads} threads | "
              f"{r['one_core_views_per_s_imagefolder_cpu_decode_per_view']:.1f} / "
              f"{r['one_core_views_per_s_imagefolder_cpu_decode_once']:.1f} | | | | |",
              "", "Where the time goes: milliseconds per unit (medians); CPU-ms are what the bounds add up; 'others' "
              "is how many cores other processes used during the step (from /proc/stat):", "",
              f"| step | CPU-ms, {threads} threads | wall-ms, {threads} threads | CPU-ms, 1 thread | wall-ms, 1 thread "
              f"| others (cores), {threads} / 1 threads |", "|---|---|---|---|---|---|"]
    for k, unit, label in (("decode", "image", "decode + resize + crop, per image"),
                           ("replay", "view", "replay (RandomResizedCrop + flip + normalize) + collate, per view"),
                           ("forward", "view", f"teacher forward at batch {batch}, per view")):
        cpu_ms, cpu_ms_1t = (r[f"{k}{s}_ms_per_{unit}_imagefolder_cpu"] for s in ("", "_1thread"))
        lines.append(f"| {label} | {cpu_ms:.2f} | {1e3 * wall[k]:.2f} | {cpu_ms_1t:.2f} | {1e3 * wall[k + '_1t']:.2f} "
                     f"| {others[k]:.2f} / {others[k + '_1t']:.2f} |")
    for k, label in (("w0", "cache stage, 0 workers, per view"), (wide, f"cache stage, {CORES} workers, per view")):
        lines.append(f"| {label} | | {1e3 * wall[k]:.2f} | | | {others[k]:.2f} |")
    lines += ["", f"The distill stage from the same folder (student `{STUDENT}` at 224, one epoch of the real loop, "
              "batch 32, each image decoded from its file, 0 workers): "
              f"{1e3 * wall['distill_ce']:.1f} ms per sample with plain CE (the floor), "
              f"{1e3 * wall['distill_store']:.1f} ms with the store's targets: "
              f"**{r['distill_vs_ce_imagefolder_cpu']:.3f}x** of the floor (`distill_vs_ce_imagefolder_cpu`)."]
    return lines


@click.command()
@click.option("--data", "data_root", default="/tmp/kd_imagenet_like", show_default=True,
              help="The image folder, made here once (reused on later runs).")
@click.option("--images", default=2000, show_default=True)
@click.option("--classes", default=100, show_default=True)
@click.option("--samples", default=256, show_default=True, help="Training images the cache stage runs over.")
@click.option("--views", default=8, show_default=True)
@click.option("--teacher", "arch", default="mobilenet_v3_small", show_default=True)
@click.option("--batch", default=64, show_default=True, help="Teacher batch size (bound and cache stage).")
@click.option("--repeats", default=3, show_default=True)
@click.option("--wait", "wait_s", default=30.0, show_default=True,
              help="Before each repeat, wait up to this many seconds for other processes to leave the cores.")
@click.option("--device", "device_name", default="cpu", show_default=True,
              help="cpu: the CPU bounds above. Any other device (cuda): the cache stage against the teacher's "
                   "forward alone on it (key cache_vs_teacher_forward_imagefolder_gpu).")
@click.option("--amp", default="auto", show_default=True, help="cache.amp for --device other than cpu "
              "(auto: float16 on CUDA; bfloat16 as the issue's resnet50 figure).")
@click.option("--workers", default=None, type=int, help="DataLoader workers of the cache stage (--device other "
              "than cpu; default: the cores).")
@click.option("--vs-forward", is_flag=True, help="The device mode's measurement on the CPU too (a check of it).")
@click.option("--smooth", is_flag=True, help="Make the folder of smooth random images (a quick check).")
@click.option("--append", "out", default=None, help="Append the markdown section to this file.")
@click.option("--json", "json_path", default="bench/results.json", show_default=True,
              help="Merge the figures into this flat JSON object.")
def main(data_root, images, classes, samples, views, arch, batch, repeats, wait_s, device_name, amp, workers,
         vs_forward, smooth, out, json_path):
    device = torch.device(device_name)
    root = Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
    record = build_folder(root, images, classes, smooth)
    print(f"data: {root} ({record['source']}, {record['mean_bytes'] / 1e3:.1f} kB a file)", file=sys.stderr)
    # stratified held-out splits need at least one image per class each
    test_fraction = max(0.1, classes / images)
    val_fraction = max(0.1, classes / (images - int(np.ceil(test_fraction * images))))
    params = DataParams(name="imagefolder", root=str(root), image_size=IMAGE_SIZE, normalize="auto", split_seed=0,
                        val_fraction=val_fraction, test_fraction=test_fraction, train_subset=None)
    dataset = load_dataset(params)
    if samples > len(dataset.train):
        raise click.ClickException(f"--samples {samples}: the training split has {len(dataset.train)} images")
    split = dataset.train.subset(range(samples))
    count_decodes()
    command = ("python bench/imagefolder_cache.py " + " ".join(sys.argv[1:])).strip()
    if device.type != "cpu" or vs_forward:
        with tempfile.TemporaryDirectory() as tmp:
            results, lines = measure_device(split, dataset.num_classes, dataset.mean, dataset.std, arch, views, batch,
                                            repeats, device, amp, CORES if workers is None else workers, Path(tmp),
                                            command)
        publish(lines, results, out, json_path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results, wall, others = measure(split, dataset.num_classes, dataset.mean, dataset.std, arch, views, batch,
                                        repeats, wait_s, Path(tmp))
    publish(section(results, wall, others, command, record, samples, views, arch, batch, repeats), results, out,
            json_path)


if __name__ == "__main__":
    main()
