"""Students trained from top-K stores against one trained from the full store (and the student alone), with three
ways to fill the tail: `summary` (distill.topk_tail summary: the tail summary rebuilt for the run's T), `uniform`
(FKD / TinyViT: the tail's mass at T = 1 spread evenly at every T: the same store read at temperature 1) and `none`
(distill.topk_tail none: the renormalised top K, the target Anshumann et al. 2025 call biased). Same data, teacher,
student, views and seeds for every row, through the project's `distill`; validation accuracy (the test split is
never read).

Usage: python studies/scripts/topk_students.py --params runs/pairs100/params.yaml --teacher runs/pairs100/teacher.pt \
           --full runs/pairs100/full.zarr --topk runs/pairs100/top1.zarr,runs/pairs100/top5.zarr --seeds 0,1,2 \
           [--append RESULTS.md] [--json bench/results.json]
"""

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from pipeline.data import input_transform, load_dataset
from pipeline.models import build_model, load_checkpoint, weights_fingerprint
from pipeline.params import load_params
from pipeline.augment import build_augment
from pipeline.store import LogitStore
from pipeline.train import accuracy, distill, store_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from output import publish  # noqa: E402  (bench/output.py: the benchmarks' output helper, shared)


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() \
        else Path(path).stat().st_size


@click.command()
@click.option("--params", "params_path", required=True)
@click.option("--teacher", "teacher_path", required=True)
@click.option("--full", "full_path", required=True, help="The full store.")
@click.option("--topk", "topk_paths", required=True, help="Top-K stores, comma-separated.")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--append", "out", default=None)
@click.option("--json", "json_path", default=None)
def main(params_path, teacher_path, full_path, topk_paths, seeds, out, json_path):
    params = load_params(params_path)
    data = load_dataset(params.data)
    cfg = params.distill
    T = cfg.temperature
    fingerprint = weights_fingerprint(load_checkpoint(teacher_path)[0])
    transform = input_transform(build_augment(params.augment), data.mean, data.std)
    eval_transform = input_transform(None, data.mean, data.std)
    stores = {path: LogitStore(path) for path in [full_path, *topk_paths.split(",")]}  # each read into memory once
    for path, store in stores.items():
        if store.meta.teacher_fingerprint != fingerprint:
            raise SystemExit(f"{path}: written by another teacher than {teacher_path}; cache it with that teacher")
    rows = [("alone", "-", full_path), ("full", "-", full_path)]
    for path in topk_paths.split(","):
        rows += [(f"top-{stores[path].meta.top_k}", tail, path) for tail in ("summary", "uniform", "none")]
    read_as = {"-": (T, "summary"), "summary": (T, "summary"), "uniform": (1.0, "summary"), "none": (T, "none")}
    accs: dict[tuple, list] = {}
    for seed in [int(s) for s in seeds.split(",")]:
        for name, tail, path in rows:
            targets = store_targets(stores[path], *read_as[tail])
            kd = 0.0 if name == "alone" else cfg.kd_weight
            student = build_model(cfg.student, data.image_shape[0], data.num_classes, cfg.student_options,
                                  data.image_shape[-1], seed=seed)
            start = time.perf_counter()
            distill(student, data.train, data.val, targets, transform, eval_transform, params.cache.seed,
                    params.cache.num_views, cfg, kd_weight=kd, seed=seed, device=torch.device("cpu"),
                    chunk_samples=params.cache.chunk_samples, progress=False)
            acc = accuracy(student, data.val, eval_transform)
            accs.setdefault((name, tail, path), []).append(acc)
            print(f"seed {seed} {name} {tail}: val acc {100 * acc:.2f} % ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    full_bytes = store_bytes(full_path)
    views = stores[full_path].meta.num_samples * stores[full_path].meta.num_views
    lines = ["", f"### Top-K students on {data.num_classes} classes", "",
             f"`python studies/scripts/topk_students.py --params {params_path} --teacher {teacher_path} "
             f"--full {full_path} --topk {topk_paths} --seeds {seeds}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): "
             f"student {cfg.student} {cfg.student_options}, T = {T:g}, λ = {cfg.kd_weight:g}, {cfg.epochs} epochs, "
             f"{params.cache.num_views} views; validation accuracy ({len(data.val)} images), seeds {seeds}.", "",
             "| store | tail | bytes per view on disk | " + " | ".join(f"seed {s}" for s in seeds.split(","))
             + " | mean |", "|---|---|---|" + "---|" * (len(seeds.split(",")) + 1)]
    results = {}
    for (name, tail, path), values in accs.items():
        per_view = "-" if name == "alone" else f"{store_bytes(path) / views:.0f}"
        lines.append(f"| {name} | {tail} | {per_view} | " + " | ".join(f"{100 * a:.2f} %" for a in values)
                     + f" | {100 * np.mean(values):.2f} % |")
        key = name.replace("-", "") + ("" if tail == "-" else f"_{tail}")
        results[f"topk_student_val_acc_{key}_T{T:g}"] = float(np.mean(values))
    lines.append("")
    lines.append(f"Full store: {full_bytes / views:.0f} bytes per view on disk; alone: the student without the "
                 "teacher (λ = 0).")
    publish(lines, results, out, json_path)


if __name__ == "__main__":
    main()
