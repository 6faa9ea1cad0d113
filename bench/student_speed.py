"""How fast `kd distill` trains a student from a store, against an oracle that has no data path at all.

Usage: python bench/student_speed.py [--repeats 3] [--students tiny_cnn,resnet20] [--device cpu|cuda]
                                     [--settings off,bfloat16] [--append BENCHMARKS.md] [--json bench/results.json]

Per student and setting (precision, channels-last, compile), four variants, alternated in every repeat, each training
V + 2 epochs of a store of V = 2 views (`view_schedule: cycle`): epoch 0 is the warm-up (a compile is paid there;
its time is reported on its own), epoch 1 the first pass over view 1 (its crops and flips drawn), epoch V + 1 a
later pass (the draws kept since: `ReplayDataset(memo_views=V)`), the steady state of a run of many epochs:
  memory  `pipeline.train.distill` from a store in memory (replay of crop + flip views, the loader, the store's
          reads, the step; the default run's path)
  ooc     the same from the store through its chunk cache with a memory budget of a tenth of the store
          (`memory_mb`) and the windowed shuffle, as `kd distill` reads a store larger than memory
  ooc_lib (--zarr-lib) ooc with the store's chunks read through the zarr library, not raw (`pipeline.zarrraw`;
          `pipeline.store.RAW_ZARR = False`): the reader before it
  oracle  the same model, optimiser, precision, memory format and compile setting (`pipeline.step.Step` and
          `kd_loss`), stepping on views and teacher logits already on the device: no loader, no store, no replay
  today   the loop as it was before the recipe (issue 23): float32, channels-first, no compile, a host
          synchronisation every step (`loss.item()`), the replay in the training thread: `pipeline/` of git revision
          --today (default 645e227), exported to a temporary folder and run in a subprocess on the same data
Synthetic uint8 images and a real zarr store of random float16 logits (speed does not depend on the values).
Keys in results.json (the later pass; `_first` after `distill`: the first pass): distill_vs_oracle_<student>_<device>,
distill_samples_per_s_<student>_<device> (memory), distill_ooc_vs_oracle_<student>_<device>,
distill_today_vs_oracle_<student>_<device>, distill_vs_today_<student>_<device>; with --zarr-lib
distill_ooc_raw_vs_lib_<student>_<device>; a setting other than float32 adds
_<setting> to the key.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

if "--one" not in sys.argv:  # a `today` subprocess imports the old revision's pipeline from its PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from output import publish  # noqa: E402

# student: (C, H, W), classes, samples, views, batch; crop with padding + horizontal flip
CPU_SETUPS = {"tiny_cnn": ((1, 8, 8), 10, 20_000, 2, 64, 1), "resnet20": ((3, 32, 32), 10, 1_024, 2, 64, 4)}
GPU_SETUPS = {"resnet20": ((3, 32, 32), 10, 50_000, 2, 512, 4), "resnet18": ((3, 224, 224), 100, 5_000, 2, 256, 16)}
VARIANTS = ("memory", "ooc", "oracle", "today")
BEFORE_ISSUE_23 = "645e227"  # `today`'s default revision: the loop before issue 23 (float32, a sync per step)
SETTINGS = {  # name: (amp, channels_last, compile)
    "off": ("off", False, False), "bfloat16": ("bfloat16", False, False),
    "bfloat16_cl": ("bfloat16", True, False), "bfloat16_cl_compile": ("bfloat16", True, True),
    "off_compile": ("off", False, True), "off_cl": ("off", True, False),
}


def config(student: str, batch: int, amp: str, channels_last: bool, compiled: bool, views: int):
    import dataclasses

    from pipeline.params import DistillParams, EnsembleParams, OptimParams

    optim = OptimParams(name="adam", lr=1e-3, betas=[0.9, 0.999], momentum=0.9, nesterov=False, weight_decay=1e-4,
                        schedule="step", lr_milestones=[], lr_factors=[])
    recipe = {"amp": amp, "channels_last": channels_last, "compile": compiled}
    fields = {f.name for f in dataclasses.fields(DistillParams)}  # the old revision's (today) has none of recipe
    return DistillParams(student=student, student_options={}, teacher_source="cache", temperature=4.0,
                         kd_weight=1.0, ce_weight=1.0, view_schedule="cycle", shuffle_chunks=4, topk_tail="none",
                         ensemble=EnsembleParams(weights=None, rule="probabilities"), epochs=views + 2, batch_size=batch,
                         optimizer=optim, **{k: v for k, v in recipe.items() if k in fields})


class Data:
    """One setup's synthetic images, labels and store (zarr, float16 random logits)."""

    def __init__(self, student: str, setup: tuple, root: Path, write: bool = True):
        import torch

        from distill_ooc import chunk_for, write_stores

        self.shape, self.classes, self.samples, self.views, self.batch, self.padding = setup
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (self.samples, *self.shape), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, self.classes, (self.samples,), generator=g)
        self.root = root / student
        if write:
            self.root.mkdir()
            write_stores(self.root, self.classes, self.samples, self.views)
            (self.root / "logits.h5").unlink()
        self.chunk = chunk_for(self.samples)
        self.store_bytes = self.samples * self.views * self.classes * 2


def epoch_seconds(variant: str, student: str, data: Data, setting: str, device) -> tuple[float, float, float]:
    """Seconds of (the later pass: epoch V + 1, the first pass: epoch 1, the warm-up: epoch 0) of `variant`."""
    import torch
    from torchvision.transforms import v2

    import pipeline.store
    from pipeline.data import Split, input_transform
    from pipeline.loaders import PREFETCH
    from pipeline.models import build_model
    from pipeline.store import LogitStore
    from pipeline.train import distill, store_targets

    amp, channels_last, compiled = SETTINGS[setting] if variant != "today" else SETTINGS["off"]
    cfg = config(student, data.batch, amp, channels_last, compiled, data.views)
    model = build_model(student, data.shape[0], data.classes, image_size=data.shape[-1], seed=0)
    if variant == "oracle":
        return oracle(model, cfg, data, device)
    augment = v2.Compose([v2.RandomCrop(data.shape[-1], padding=data.padding), v2.RandomHorizontalFlip()])
    transform = input_transform(augment, (0.5,) * data.shape[0], (0.25,) * data.shape[0])
    train, val = Split(data.images, data.labels), Split(data.images[:data.batch], data.labels[:data.batch])
    budget = data.store_bytes // 10 if variant.startswith("ooc") else 1 << 40
    pipeline.store.RAW_ZARR = variant != "ooc_lib"
    try:
        store = LogitStore(data.root / "logits.zarr", max_memory_bytes=budget)
    finally:
        pipeline.store.RAW_ZARR = True  # as imported
    assert store.in_memory == (not variant.startswith("ooc"))
    marks = [time.perf_counter()]

    def log(epoch, metrics):
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    distill(model, train, val, store_targets(store), transform, transform, 0, data.views, cfg, kd_weight=1.0, seed=0,
            device=device, chunk_samples=data.chunk, prefetch=PREFETCH if variant.startswith("ooc") else 0, log=log,
            progress=False)
    return marks[-1] - marks[-2], marks[2] - marks[1], marks[1] - marks[0]


def today(student: str, data: Data, device, old: Path) -> tuple[float, float, float]:
    """`epoch_seconds("today", ...)` in a subprocess importing the old revision's `pipeline` from `old`."""
    import json
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(old), str(Path(__file__).resolve().parent)]),
           "TQDM_DISABLE": "1"}
    quick = ["--quick"] if data.samples == 2_048 else []
    out = subprocess.run([sys.executable, __file__, "--one", student, "--root", str(data.root.parent), "--device",
                          device.type, *quick], env=env, capture_output=True, text=True, check=True, cwd=old)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def old_pipeline(revision: str, tmp: Path) -> Path | None:
    """`pipeline/` of git `revision`, exported under `tmp`/old; None (said on stderr) where git cannot give it (no
    history, e.g. a shallow clone): the `today` variant is then left out."""
    import subprocess

    old = tmp / "old"
    old.mkdir()
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", revision, "pipeline"], capture_output=True)
    if archive.returncode != 0 or not revision:
        click.echo(f"note: git cannot export pipeline/ of revision {revision!r} "
                   f"({archive.stderr.decode().strip()[:200]}); the `today` variant is left out", err=True)
        return None
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    return old


def oracle(model, cfg, data: Data, device) -> tuple[float, float, float]:
    """The epochs of the step alone on views and logits already on the device, in a seeded shuffled order."""
    import torch

    from pipeline.loss import kd_loss
    from pipeline.step import Step, Totals
    from pipeline.train import make_optimizer

    torch.manual_seed(0)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, _ = make_optimizer(model, cfg.optimizer, cfg.epochs)
    forward = torch.compile(model) if cfg.compile else model
    step = Step(forward, model, optimizer, cfg.amp, device, None, None, cfg.channels_last)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((data.samples, *data.shape), generator=g).to(device)
    t = (torch.randn((data.samples, data.classes), generator=g) * 3).half().to(device)
    y = data.labels.to(device)
    marks = [time.perf_counter()]
    for epoch in range(cfg.epochs):
        model.train()
        totals = Totals(device, "oracle", epoch, cfg.optimizer.lr)
        order = torch.randperm(data.samples, generator=g).to(device)
        for first in range(0, data.samples, cfg.batch_size):
            idx = order[first:first + cfg.batch_size]
            logits = step.forward(x[idx])
            loss = kd_loss(logits.float(), t[idx], y[idx], cfg.temperature, cfg.kd_weight)
            step.update(loss)
            totals.add(loss, logits, y[idx])
        totals.values()
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
    return marks[-1] - marks[-2], marks[2] - marks[1], marks[1] - marks[0]


def measure(students: list[str], settings: list[str], repeats: int, device_name: str, tmp: Path, old: Path,
            revision: str = BEFORE_ISSUE_23, zarr_lib: bool = False):
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(device_name)
    setups = GPU_SETUPS if device.type == "cuda" else CPU_SETUPS
    variants = VARIANTS if old is not None else tuple(v for v in VARIANTS if v != "today")
    if zarr_lib:
        variants = (*variants, "ooc_lib")
    rows, results = [], {}
    for student in students:
        data = Data(student, setups[student], tmp)
        for setting in settings:
            runs = {v: [] for v in variants}
            first = {v: [] for v in variants}
            warm = {v: [] for v in variants}
            for r in range(repeats):
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                for variant in order:
                    if variant == "today":
                        later, first_pass, warm_up = today(student, data, device, old)
                    else:
                        later, first_pass, warm_up = epoch_seconds(variant, student, data, setting, device)
                    runs[variant].append(data.samples / later)
                    first[variant].append(data.samples / first_pass)
                    warm[variant].append(warm_up)
                    click.echo(f"  {student} {setting} repeat {r + 1} {variant}: {runs[variant][-1]:,.0f} samples/s "
                               f"(first pass {first[variant][-1]:,.0f}; warm epoch {warm_up:.1f} s)", err=True)
            ratio = lambda a, b, of=runs: statistics.median(p / q for p, q in zip(of[a], of[b]))  # noqa: E731
            suffix = f"{student}_{device.type}" + ("" if setting == "off" else f"_{setting}")
            results[f"distill_vs_oracle_{suffix}"] = ratio("memory", "oracle")
            results[f"distill_samples_per_s_{suffix}"] = statistics.median(runs["memory"])
            results[f"distill_ooc_vs_oracle_{suffix}"] = ratio("ooc", "oracle")
            if "today" in variants:
                results[f"distill_today_vs_oracle_{suffix}"] = ratio("today", "oracle")
                results[f"distill_vs_today_{suffix}"] = ratio("memory", "today")
            results[f"distill_first_vs_oracle_{suffix}"] = ratio("memory", "oracle", first)
            results[f"distill_first_ooc_vs_oracle_{suffix}"] = ratio("ooc", "oracle", first)
            if zarr_lib:
                results[f"distill_ooc_raw_vs_lib_{suffix}"] = ratio("ooc", "ooc_lib")
            for variant in variants:
                shown = setting if variant != "today" else ("float32, sync per step" if revision == BEFORE_ISSUE_23
                                                             else f"float32, `pipeline/` of {revision}")
                versus_today = f"{ratio(variant, 'today'):.2f}" if "today" in variants else "-"
                rows.append(f"| {student} | {data.samples:,} x {data.views} views, batch {data.batch} | {shown} | "
                            f"{variant} | {statistics.median(first[variant]):,.0f} | "
                            f"{ratio(variant, 'oracle', first):.2f} | {statistics.median(runs[variant]):,.0f} | "
                            f"{ratio(variant, 'oracle'):.2f} | {versus_today} | "
                            f"{statistics.median(warm[variant]):.1f} |")
    return rows, results


@click.command()
@click.option("--repeats", default=3, show_default=True)
@click.option("--students", default=None, help="Comma-separated; default: tiny_cnn,resnet20 (CPU), resnet20,resnet18 "
                                               "(CUDA).")
@click.option("--settings", default=None, help=f"Comma-separated of {', '.join(SETTINGS)}; default: off (CPU), "
                                               "bfloat16_cl,bfloat16_cl_compile (CUDA).")
@click.option("--device", "device_name", default="cpu", show_default=True)
@click.option("--append", "out", default=None, help="Append the markdown section to this file.")
@click.option("--json", "json_path", default="bench/results.json", show_default=True)
@click.option("--today", "revision", default=BEFORE_ISSUE_23, show_default=True,
              help="The git revision whose pipeline/ is `today`'s loop (the last before issue 23).")
@click.option("--zarr-lib", is_flag=True, help="Add the ooc_lib variant: ooc with the store read through the zarr "
                                              "library, not raw.")
@click.option("--quick", is_flag=True, help="Smoke run: tiny_cnn on 2,048 images, one repeat; numbers meaningless.")
@click.option("--one", "one_student", default=None, hidden=True)
@click.option("--root", default=None, hidden=True)
def main(repeats, students, settings, device_name, out, json_path, revision, zarr_lib, quick, one_student, root):
    import json

    if quick:
        CPU_SETUPS["tiny_cnn"] = ((1, 8, 8), 10, 2_048, 2, 64, 1)
        repeats, students = 1, students or "tiny_cnn"

    if one_student:  # a `today` run, in a subprocess with the old pipeline first on the path
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        setups = GPU_SETUPS if device_name.startswith("cuda") else CPU_SETUPS
        data = Data(one_student, setups[one_student], Path(root), write=False)
        print(json.dumps(epoch_seconds("today", one_student, data, "off", torch.device(device_name))))
        return
    cuda = device_name.startswith("cuda")
    students = (students or ("resnet20,resnet18" if cuda else "tiny_cnn,resnet20")).split(",")
    settings = (settings or ("bfloat16_cl,bfloat16_cl_compile" if cuda else "off")).split(",")
    with tempfile.TemporaryDirectory(prefix="kd-student-") as tmp:
        rows, results = measure(students, settings, repeats, device_name, Path(tmp), old_pipeline(revision, Path(tmp)),
                                revision, zarr_lib)
    command = " ".join(["python bench/student_speed.py", *sys.argv[1:]])
    lines = ["", "## The student's step: `kd distill` against an oracle with no data path", "",
             f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
             f"{os.environ.get('OMP_NUM_THREADS', '1')} torch thread(s), device {device_name}, 0 DataLoader workers): "
             "a store of 2 views, 4 epochs per variant: epoch 0 warm, epoch 1 the first pass (crops and flips "
             "drawn), epoch 3 a later pass (draws kept), variants alternated, medians of "
             f"{repeats}; x oracle and x today are medians of per-repeat ratios. memory: from a store "
             "in memory; ooc: from a store 10x the memory budget (chunk cache, windows of 4 chunks, read with the "
             "views in the thread beside the step; ooc_lib: the same, its chunks read through the zarr library, "
             "not raw); "
             "oracle: the same step on views and logits already on the device; today: "
             + ("left out in this run" if not revision else
                f"the loop before issue 23 (`pipeline/` of {revision}: float32, a host synchronisation every step)"
                if revision == BEFORE_ISSUE_23 else f"`pipeline/` of git revision {revision}, in float32")
             + ". Crop with padding + flip views, replayed a batch at a time.", "",
             "| student | data | setting | variant | first pass samples/s | x oracle | later pass samples/s | "
             "x oracle | x today | warm epoch s |", "|---|---|---|---|---|---|---|---|---|---|", *rows]
    publish(lines, results, out, json_path)


if __name__ == "__main__":
    main()
