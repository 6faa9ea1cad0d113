"""The cache stage's throughput against its two bounds, side by side in one run, and its time per view as the
data grows. Writes a markdown section (--append) and bench/results.json (flat keys, documented below).

Usage: python bench/cache_throughput.py [--repeats 3] [--append BENCHMARKS.md] [--json bench/results.json]

For each pair (teacher, input), on the same synthetic uint8 images and in alternation:
  teacher forward alone   `teacher_forward` on pre-replayed batches (views/s; CPU-seconds per view)
  replay alone            `ReplayDataset` + collate, the views the cache makes (views/s; CPU-seconds per view)
  cache stage             `cache_teacher_logits` into a real zarr store (num_workers 0 and 1)
The shared-cores bound is cores / (teacher CPU-s per view + replay CPU-s per view): the rate if replay and
teacher shared this machine's cores perfectly. Keys in results.json:
  cache_views_per_s_<pair>_w<N>, teacher_forward_views_per_s_<pair>, replay_views_per_s_<pair>,
  shared_cores_bound_views_per_s_<pair>, cache_vs_teacher_forward_<pair>, cache_vs_shared_cores_bound_<pair>
  (best of the worker settings), cache_us_per_view_<N>samples (the scaling run).
"""

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from pipeline.data import Split, input_transform
from pipeline.models import build_model
from pipeline.params import CacheParams
from pipeline.replay import ReplayDataset, build_augment
from pipeline.train import cache_teacher_logits, teacher_forward

PAIRS = {  # name: (teacher, (C, H, W), augmentation, samples)
    "default": ("cnn", (1, 8, 8), [{"RandomAffine": {"degrees": 10, "translate": [0.125, 0.125]}}], 4096),
    "cifar_resnet20": ("resnet20", (3, 32, 32), [{"RandomCrop": {"size": 32, "padding": 4}},
                                                 {"RandomHorizontalFlip": {"p": 0.5}}], 1024),
}
VIEWS = 2
CPU = torch.device("cpu")


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
    runs = {"teacher": [], "replay": [], "cache_w0": [], "cache_w1": []}
    cpu = {"teacher": [], "replay": []}

    def forward():
        for x in batches:
            teacher_forward(teacher, x, CPU, "off")

    def replay():
        for s in range(0, len(pairs), 256):
            torch.utils.data.default_collate([dataset[p] for p in pairs[s:s + 256]])

    def cache(workers):
        cfg = CacheParams(num_views=VIEWS, seed=0, format="zarr", dtype="float16", storage="full", top_k=1,
                          chunk_samples=1024, batch_size=256, amp="off")
        out = root / f"{name}-{workers}-{time.perf_counter_ns()}.zarr"
        cache_teacher_logits(out, cfg, teacher, arch, train, 10, augment, (0.5,) * shape[0], (0.25,) * shape[0],
                             CPU, num_workers=workers)

    forward(), replay()  # warm up
    for _ in range(repeats):
        for key, fn in (("teacher", forward), ("replay", replay), ("cache_w0", lambda: cache(0)),
                        ("cache_w1", lambda: cache(1))):
            wall, cpu_s = timed(fn)
            runs[key].append(views / wall)
            if key in cpu:
                cpu[key].append(cpu_s / views)
    med = {k: statistics.median(v) for k, v in runs.items()}
    cores = os.cpu_count() or 1
    bound = cores / (statistics.median(cpu["teacher"]) + statistics.median(cpu["replay"]))
    best = max(med["cache_w0"], med["cache_w1"])
    return {f"teacher_forward_views_per_s_{name}": med["teacher"], f"replay_views_per_s_{name}": med["replay"],
            f"cache_views_per_s_{name}_w0": med["cache_w0"], f"cache_views_per_s_{name}_w1": med["cache_w1"],
            f"shared_cores_bound_views_per_s_{name}": bound,
            f"cache_vs_teacher_forward_{name}": best / med["teacher"],
            f"cache_vs_shared_cores_bound_{name}": best / bound}


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
def main(repeats, out, json_path, scaling_run):
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in PAIRS:
            results.update(measure_pair(name, repeats, Path(tmp)))
        if scaling_run:
            results.update(scaling(Path(tmp)))
    lines = ["", "## The cache stage against its bounds", "",
             f"`python bench/cache_throughput.py --repeats {repeats}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}): views per second, medians of "
             f"{repeats} alternated repeats, {VIEWS} views per sample, synthetic uint8 images, real zarr stores.", "",
             "| pair | teacher forward alone | replay alone | shared-cores bound | cache, 0 workers | cache, 1 worker "
             "| cache / teacher forward | cache / bound |", "|---|---|---|---|---|---|---|---|"]
    for name in PAIRS:
        r = {k.replace(f"_{name}", ""): v for k, v in results.items() if name in k}
        lines.append(f"| {name} | {r['teacher_forward_views_per_s']:.0f} | {r['replay_views_per_s']:.0f} | "
                     f"{r['shared_cores_bound_views_per_s']:.0f} | {r['cache_views_per_s_w0']:.0f} | "
                     f"{r['cache_views_per_s_w1']:.0f} | {r['cache_vs_teacher_forward']:.2f}x | "
                     f"{r['cache_vs_shared_cores_bound']:.2f}x |")
    scale = {k: v for k, v in results.items() if k.startswith("cache_us_per_view_")}
    if scale:
        lines += ["", "Time per view as the data grows (1 view, no augmentation, mlp teacher on 1x8x8): " +
                  ", ".join(f"{k.split('_')[-1].replace('samples', '')} samples {v:.1f} us" for k, v in scale.items())]
    print("\n".join(lines))
    if out:
        with open(out, "a") as f:
            f.write("\n".join(lines) + "\n")
    if json_path:
        path = Path(json_path)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update({k: round(v, 4) for k, v in results.items()})
        path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
