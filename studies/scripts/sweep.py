"""Choose T, λ and the student on the *validation* split: grid over (student, T, λ) x seeds.

Uses a teacher and the store `kd cache` wrote from it. The test split is never read unless
`--report-test` is given (only to report settings already chosen, never to choose them).
Usage: python studies/scripts/sweep.py --params params.yaml --cache cache/teacher_logits.zarr -T 2 -T 4 -l 0 -l 0.5 \
           --seeds 0 --seeds 1 --seeds 2 [--epochs N] [--out results.jsonl]
"""

import dataclasses
import itertools
import json
import statistics
import sys
import time

import click
import torch

from pipeline import KDError
from pipeline.data import input_transform, load_dataset
from pipeline.models import build_model
from pipeline.params import load_params
from pipeline.augment import build_augment
from pipeline.store import LogitStore
from pipeline.train import accuracy, distill, store_targets


@click.command()
@click.option("--params", "params_path", default="params.yaml")
@click.option("--cache", "cache_path", default="cache/teacher_logits.zarr")
@click.option("--students", multiple=True, default=None, help="Default: distill.student.")
@click.option("--temperatures", "-T", multiple=True, type=float, default=[4.0])
@click.option("--kd-weights", "-l", multiple=True, type=float, default=[0.0, 1.0])
@click.option("--seeds", multiple=True, type=int, default=[0, 1, 2])
@click.option("--epochs", type=int, default=None, help="Default: distill.epochs (milestones kept as given).")
@click.option("--threads", type=int, default=1)
@click.option("--out", default=None, help="Append JSON lines here.")
@click.option("--report-test", is_flag=True,
              help="Also score the test split: only to report the chosen defaults, never to choose them.")
def main(params_path, cache_path, students, temperatures, kd_weights, seeds, epochs, threads, out, report_test):
    torch.set_num_threads(threads)
    p = load_params(params_path)
    cfg = p.distill if epochs is None else dataclasses.replace(p.distill, epochs=epochs)
    data = load_dataset(p.data)
    store = LogitStore(cache_path)
    meta = store.meta
    transform = input_transform(build_augment(meta.augment), meta.mean, meta.std)
    eval_transform = input_transform(None, meta.mean, meta.std)
    cpu = torch.device("cpu")
    c, size = data.image_shape[0], data.image_shape[-1]
    for student_name, T, lam in itertools.product(students or [cfg.student], temperatures, kd_weights):
        if lam == 0 and T != temperatures[0]:
            continue  # the baseline does not depend on T
        run = dataclasses.replace(cfg, student=student_name, temperature=T, kd_weight=lam)
        accs, test_accs, started = [], [], time.time()
        for seed in seeds:
            student = build_model(student_name, c, data.num_classes, cfg.student_options, size, seed=seed)
            try:
                distill(student, data.train, data.val, store_targets(store, T), transform, eval_transform, meta.seed,
                        meta.num_views, run, kd_weight=lam, seed=seed, device=cpu, num_workers=p.num_workers)
            except KDError as e:  # diverged: scored as chance would be misleading; record it as such
                print(f"T={T} lambda={lam} seed={seed}: {e}", file=sys.stderr)
                accs.append(float("nan"))
                test_accs.append(float("nan"))
                continue
            accs.append(accuracy(student, data.val, eval_transform, cpu))
            if report_test:
                test_accs.append(accuracy(student, data.test, eval_transform, cpu))
        row = {"student": student_name, "T": T, "kd_weight": lam, "ce_weight": cfg.ce_weight, "epochs": cfg.epochs,
               "seeds": list(seeds), "val_acc_mean": statistics.mean(accs),
               "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "val_accs": accs,
               "seconds": round(time.time() - started, 1)}
        if report_test:
            row.update(test_acc_mean=statistics.mean(test_accs), test_accs=test_accs,
                       test_acc_std=statistics.stdev(test_accs) if len(test_accs) > 1 else 0.0)
        print(json.dumps(row), flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
