"""What the end-of-epoch checkpoint (`pipeline/resume.py`) costs: the default digits student trained with and
without it, side by side in one run, and one checkpoint's write time for larger models.

Rows: (a) `distill` of the default params (tiny_cnn on digits, the student alone, so no store is needed) for
`--epochs` epochs, with `resume` None and with a checkpoint written after every epoch, alternating, `--repeats`
times; the median time per epoch of each and their ratio. (b) `Resume.save` (the atomic, fsynced write) of the
state of resnet20, resnet56 and a torchvision resnet18 after one Adam step: milliseconds per save (median of 5),
and the file's size. Keys: `resume_epoch_ratio_digits` (with / without), `resume_save_ms_<arch>`.

Usage: python bench/resume_cost.py [--epochs 10] [--repeats 3] [--append BENCHMARKS.md]
"""

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from output import publish
from pipeline.data import input_transform, load_dataset
from pipeline.models import build_model
from pipeline.params import load_params
from pipeline.augment import build_augment
from pipeline.resume import Resume, capture
from pipeline.train import distill, make_optimizer


@click.command()
@click.option("--epochs", default=10, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--append", "out", default=None)
@click.option("--json", "json_path", default="bench/results.json", show_default=True)
def main(epochs, repeats, out, json_path):
    torch.set_num_threads(1)
    params = load_params("params.yaml")
    cfg = dataclasses.replace(params.distill, epochs=epochs, optimizer=dataclasses.replace(
        params.distill.optimizer, lr_milestones=[], lr_factors=[]))
    data = load_dataset(params.data)
    transform = input_transform(build_augment(params.augment), data.mean, data.std)
    evaluate = input_transform(None, data.mean, data.std)
    times = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for name in times:
                student = build_model(cfg.student, 1, data.num_classes, cfg.student_options, 8, seed=0)
                resume = Resume(Path(tmp) / f"{name}.resume", "bench") if name == "with" else None
                if resume:
                    resume.clear()
                start = time.perf_counter()
                distill(student, data.train, data.val, None, transform, evaluate, 0, params.cache.num_views, cfg,
                        kd_weight=0.0, seed=0, device=torch.device("cpu"), progress=False, resume=resume)
                times[name].append((time.perf_counter() - start) / epochs)
        epoch = {name: statistics.median(t) for name, t in times.items()}
        results = {"resume_epoch_ratio_digits": epoch["with"] / epoch["without"]}
        lines = ["", "### Checkpoint cost (`python bench/resume_cost.py`)", "",
                 f"Default digits student (tiny_cnn, {len(data.train)} samples, one thread), {epochs} epochs x "
                 f"{repeats} repeats, alternating: {1000 * epoch['without']:.1f} ms per epoch without the checkpoint, "
                 f"{1000 * epoch['with']:.1f} ms with one written after every epoch: ratio "
                 f"{results['resume_epoch_ratio_digits']:.3f}.", "",
                 "| model | parameters | checkpoint file | one save (atomic, fsynced) |", "|---|---|---|---|"]
        for arch, image in (("resnet20", 32), ("resnet56", 32), ("resnet18", 32)):
            model = build_model(arch, 3, 10, {}, image, seed=0)
            optimizer, schedule = make_optimizer(model, params.distill.optimizer, 10)
            model(torch.randn(2, 3, image, image)).sum().backward()
            optimizer.step()
            resume = Resume(Path(tmp) / f"{arch}.resume", "bench")
            state = capture(model, optimizer, schedule, 0, [{"loss": 1.0}])
            saves = []
            for _ in range(5):
                start = time.perf_counter()
                resume.save(state)
                saves.append(time.perf_counter() - start)
            ms = 1000 * statistics.median(saves)
            results[f"resume_save_ms_{arch}"] = ms
            size = resume.path.stat().st_size / 2**20
            count = sum(p.numel() for p in model.parameters())
            lines.append(f"| {arch} | {count / 1e6:.2f} M | {size:.1f} MB | {ms:.1f} ms |")
    publish(lines, results, out, json_path)


if __name__ == "__main__":
    main()
