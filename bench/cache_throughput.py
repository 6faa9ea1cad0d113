"""The cache stage's throughput against its two bounds, side by side in one run, and its time per view as the
data grows. Writes a markdown section (--append) and bench/results.json (flat keys, documented below).

Usage: python bench/cache_throughput.py [--repeats 3] [--append BENCHMARKS.md] [--json bench/results.json]
       python bench/cache_throughput.py --device cuda --workers 8 ...   (the GPU table: see `measure_device`)

For each pair (teacher, input), on the same synthetic uint8 images and in alternation:
  teacher forward alone   `teacher_forward` on pre-replayed batches (views/s; CPU-seconds per view)
  replay alone            `ReplayDataset` batches as the cache makes them (`BatchReplay` for crops and flips, else
                          view by view and collated) (views/s; CPU-seconds per view)
  cache stage             `cache_teacher_logits` into a real zarr store: num_workers 0 (replay, then the teacher on
                          all torch threads, in this process) and num_workers = cores (each worker replays and runs
                          the teacher on one torch thread; this process writes)
The shared-cores bound is cores / (teacher CPU-s per view + replay CPU-s per view): the rate if replay and
teacher shared this machine's cores perfectly. Keys in results.json:
  cache_views_per_s_<pair>_w<N>, teacher_forward_views_per_s_<pair>, replay_views_per_s_<pair>,
  shared_cores_bound_views_per_s_<pair>, cache_vs_teacher_forward_<pair>, cache_vs_shared_cores_bound_<pair>
  (best of the worker settings), cache_us_per_view_<N>samples (the scaling run).
"""

import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from output import growth_line, publish
from pipeline.data import Split, input_transform
from pipeline.models import build_model
from pipeline.params import CacheParams
from pipeline.replay import ReplayDataset
from pipeline.augment import build_augment
from pipeline.cache import cache_teacher_logits, teacher_forward

PAIRS = {  # name: (teacher, (C, H, W), augmentation, samples)
    "default": ("cnn", (1, 8, 8), [{"RandomAffine": {"degrees": 10, "translate": [0.125, 0.125]}}], 4096),
    "cifar_resnet20": ("resnet20", (3, 32, 32), [{"RandomCrop": {"size": 32, "padding": 4}},
                                                 {"RandomHorizontalFlip": {"p": 0.5}}], 1024),
}
VIEWS = 2
CPU = torch.device("cpu")
CORES = os.cpu_count() or 1


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its children)."""
    start, cpu = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - start, _cpu() - cpu


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure_pair(name: str, repeats: int, root: Path) -> dict:
    arch, shape, augment, n = PAIRS[name]
    g = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), torch.zeros(n, dtype=torch.long))
    teacher = build_model(arch, shape[0], 10, image_size=shape[-1], seed=0).eval()
    transform = input_transform(build_augment(augment), (0.5,) * shape[0], (0.25,) * shape[0])
    dataset = ReplayDataset(train.images, train.labels, transform, 0)
    pairs = [(i, v) for i in range(n) for v in range(VIEWS)]
    batches = [torch.stack([dataset[p][0] for p in pairs[s:s + 256]]) for s in range(0, len(pairs), 256)]
    views = len(pairs)
    wide = f"cache_w{CORES}"
    runs = {"teacher": [], "replay": [], "cache_w0": [], wide: []}
    cpu = {"teacher": [], "replay": []}

    def forward():
        for x in batches:
            teacher_forward(teacher, x, CPU, "off")

    def replay():  # as the cache stage replays: batched (crops, flips) or view by view, then collated
        for s in range(0, len(pairs), 256):
            dataset.collate(dataset.__getitems__(pairs[s:s + 256]))

    def cache(workers):
        cfg = CacheParams(num_views=VIEWS, seed=0, format="zarr", dtype="float16", storage="full", top_k=1,
                          chunk_samples=1024, batch_size=256, amp="off")
        out = root / f"{name}-{workers}-{time.perf_counter_ns()}.zarr"
        cache_teacher_logits(out, cfg, teacher, arch, train, 10, augment, (0.5,) * shape[0], (0.25,) * shape[0],
                             CPU, num_workers=workers)

    forward(), replay()  # warm up
    for _ in range(repeats):
        for key, fn in (("teacher", forward), ("replay", replay), ("cache_w0", lambda: cache(0)),
                        (wide, lambda: cache(CORES))):
            wall, cpu_s = timed(fn)
            runs[key].append(views / wall)
            if key in cpu:
                cpu[key].append(cpu_s / views)
    med = {k: statistics.median(v) for k, v in runs.items()}
    bound = CORES / (statistics.median(cpu["teacher"]) + statistics.median(cpu["replay"]))
    best = max(med["cache_w0"], med[wide])
    return {f"teacher_forward_views_per_s_{name}": med["teacher"], f"replay_views_per_s_{name}": med["replay"],
            f"cache_views_per_s_{name}_w0": med["cache_w0"], f"cache_views_per_s_{name}_w{CORES}": med[wide],
            f"shared_cores_bound_views_per_s_{name}": bound,
            f"cache_vs_teacher_forward_{name}": best / med["teacher"],
            f"cache_vs_shared_cores_bound_{name}": best / bound}


DEVICE_PAIRS = {  # name: (teacher, samples); 3x32x32 inputs with crop + flip, as CIFAR training
    "cifar_resnet20": ("resnet20", 65536),
    "cifar_resnet56": ("resnet56", 65536),
}


def measure_device(name: str, repeats: int, root: Path, device: torch.device, amp: str, workers: int,
                   batch_size: int = 512) -> dict:
    """On `device` (a GPU): the cache stage against the teacher's forward alone, both under `amp`.

    The forward alone is `teacher_forward` (host-to-device copy, channels-last, autocast, logits back to the
    host) on batches replayed beforehand; the cache stage replays in `workers` DataLoader workers. Keys:
    gpu_teacher_forward_views_per_s_<pair>_<amp>, gpu_cache_views_per_s_<pair>_<amp>,
    gpu_cache_vs_teacher_forward_<pair>_<amp>.
    """
    from pipeline.cache import prepare_teacher
    arch, n = DEVICE_PAIRS[name]
    augment = PAIRS["cifar_resnet20"][2]
    g = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.zeros(n, dtype=torch.long))
    teacher = build_model(arch, 3, 10, image_size=32, seed=0).eval()
    live = prepare_teacher(build_model(arch, 3, 10, image_size=32, seed=0), device)
    transform = input_transform(build_augment(augment), (0.5,) * 3, (0.25,) * 3)
    dataset = ReplayDataset(train.images, train.labels, transform, 0)
    pairs = [(i, v) for i in range(n) for v in range(VIEWS)]
    batches = [torch.stack([dataset[p][0] for p in pairs[s:s + batch_size]]) for s in range(0, len(pairs), batch_size)]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    views = len(pairs)

    def forward():
        for x in batches:
            teacher_forward(live, x, device, amp)

    def cache():
        cfg = CacheParams(num_views=VIEWS, seed=0, format="zarr", dtype="float16", storage="full", top_k=1,
                          chunk_samples=4096, batch_size=batch_size, amp=amp)
        out = root / f"{name}-{amp}-{time.perf_counter_ns()}.zarr"
        cache_teacher_logits(out, cfg, teacher, arch, train, 10, augment, (0.5,) * 3, (0.25,) * 3, device,
                             num_workers=workers)

    forward()  # warm up (cuDNN autotuning, allocator)
    runs = {"forward": [], "cache": []}
    for _ in range(repeats):
        for key, fn in (("forward", forward), ("cache", cache)):
            wall, _ = timed(fn)
            runs[key].append(views / wall)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {f"gpu_teacher_forward_views_per_s_{name}_{amp}": med["forward"],
            f"gpu_cache_views_per_s_{name}_{amp}": med["cache"],
            f"gpu_cache_vs_teacher_forward_{name}_{amp}": med["cache"] / med["forward"]}


def device_section(results: dict, repeats: int, workers: int, device: torch.device, batch: int) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    lines = ["", f"## The cache stage on a GPU ({name})", "",
             f"`python bench/cache_throughput.py --device {device} --workers {workers} --repeats {repeats} "
             f"--batch {batch}` "
             f"({', '.join(f'{n}: {DEVICE_PAIRS[n][1]} samples' for n in DEVICE_PAIRS)}) "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {CORES} CPU cores, torch "
             f"{torch.__version__}): views per second, medians of {repeats} alternated repeats, {VIEWS} views per "
             f"sample, 3x32x32 synthetic uint8 images with crop + flip (`BatchReplay`: drawn in {workers} DataLoader "
             "workers, applied on the GPU), "
             f"batch {batch}, real zarr stores (float16).", "",
             "| teacher | amp | teacher forward alone | cache stage | cache / teacher forward |", "|---|---|---|---|---|"]
    for name in DEVICE_PAIRS:
        for amp in ("off", "float16", "bfloat16"):
            key = f"{name}_{amp}"
            if f"gpu_cache_views_per_s_{key}" in results:
                lines.append(f"| {DEVICE_PAIRS[name][0]} | {amp} | {results[f'gpu_teacher_forward_views_per_s_{key}']:.0f} "
                             f"| {results[f'gpu_cache_views_per_s_{key}']:.0f} | "
                             f"{results[f'gpu_cache_vs_teacher_forward_{key}']:.2f}x |")
    return lines


def scaling(root: Path, sizes=(10_000, 100_000, 1_000_000)) -> dict:
    """Time per view of the cache stage as the data grows (1 view, no augmentation, a small MLP teacher)."""
    out = {}
    teacher = build_model("mlp", 1, 10, {"hidden_sizes": [16]}, 8, seed=0).eval()
    for n in sizes:
        train = Split(torch.zeros((n, 1, 8, 8), dtype=torch.uint8), torch.zeros(n, dtype=torch.long))
        cfg = CacheParams(num_views=1, seed=0, format="zarr", dtype="float16", storage="full", top_k=1,
                          chunk_samples=8192, batch_size=4096, amp="off")
        wall, _ = timed(lambda: cache_teacher_logits(root / f"scale-{n}.zarr", cfg, teacher, "mlp", train, 10, [],
                                                     (0.0,), (1.0,), CPU))
        out[f"cache_us_per_view_{n}samples"] = 1e6 * wall / n
    return out


@click.command()
@click.option("--repeats", default=3, show_default=True)
@click.option("--append", "out", default=None, help="Append the markdown section to this file.")
@click.option("--json", "json_path", default="bench/results.json", show_default=True,
              help="Merge the figures into this flat JSON object.")
@click.option("--scaling/--no-scaling", "scaling_run", default=True, show_default=True)
@click.option("--device", "device_name", default="cpu", show_default=True,
              help="cpu: the bounds table; cuda: the GPU table (teacher forward vs cache stage, amp off/float16/bfloat16).")
@click.option("--workers", default=8, show_default=True, help="DataLoader workers for the GPU table.")
@click.option("--amps", default="off,float16,bfloat16", show_default=True, help="GPU table: precisions to time.")
@click.option("--pairs", "pair_names", default=",".join(DEVICE_PAIRS), show_default=True, help="GPU table: pairs.")
@click.option("--samples", default=0, help="GPU table: samples per pair (0: the pair's default).")
@click.option("--batch", default=512, show_default=True, help="GPU table: batch size (forward alone and cache).")
def main(repeats, out, json_path, scaling_run, device_name, workers, amps, pair_names, samples, batch):
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = {}
    if device_name != "cpu":
        from pipeline.models import resolve_device
        device = resolve_device(device_name)
        with tempfile.TemporaryDirectory() as tmp:
            for name in pair_names.split(","):
                if samples:
                    DEVICE_PAIRS[name] = (DEVICE_PAIRS[name][0], samples)
                for amp in amps.split(",") if device.type == "cuda" else ("off",):
                    results.update(measure_device(name, repeats, Path(tmp), device, amp, workers, batch))
                    print({k: round(v, 3) for k, v in results.items() if name in k and amp in k}, flush=True)
        return publish(device_section(results, repeats, workers, device, batch), results, out, json_path)
    with tempfile.TemporaryDirectory() as tmp:
        for name in PAIRS:
            results.update(measure_pair(name, repeats, Path(tmp)))
        if scaling_run:
            results.update(scaling(Path(tmp)))
    lines = ["", "## The cache stage against its bounds", "",
             f"`python bench/cache_throughput.py --repeats {repeats}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{CORES} cores, torch threads {torch.get_num_threads()}): views per second, medians of "
             f"{repeats} alternated repeats, {VIEWS} views per sample, synthetic uint8 images, real zarr stores.", "",
             f"| pair | teacher forward alone | replay alone | shared-cores bound | cache, 0 workers | cache, {CORES} workers "
             "| cache / teacher forward | cache / bound |", "|---|---|---|---|---|---|---|---|"]
    for name in PAIRS:
        r = {k.replace(f"_{name}", ""): v for k, v in results.items() if name in k}
        lines.append(f"| {name} | {r['teacher_forward_views_per_s']:.0f} | {r['replay_views_per_s']:.0f} | "
                     f"{r['shared_cores_bound_views_per_s']:.0f} | {r['cache_views_per_s_w0']:.0f} | "
                     f"{r[f'cache_views_per_s_w{CORES}']:.0f} | {r['cache_vs_teacher_forward']:.2f}x | "
                     f"{r['cache_vs_shared_cores_bound']:.2f}x |")
    lines += growth_line("Time per view as the data grows (1 view, no augmentation, mlp teacher on 1x8x8)", results,
                         "cache_us_per_view_")
    publish(lines, results, out, json_path)


if __name__ == "__main__":
    main()
