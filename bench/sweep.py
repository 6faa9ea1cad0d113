"""Choose T, λ and the student on the *validation* split: grid over (student, T, λ) x seeds.

Uses the teacher and store that `dvc repro cache` wrote. The test split is never read.
Usage: python bench/sweep.py --students tiny_cnn -T 2 -T 4 -l 0 -l 0.5 -l 2 --seeds 0 --seeds 1 --seeds 2
"""

import itertools
import json
import statistics
import sys

import click
import torch

from pipeline.data import load_dataset
from pipeline.models import build_model
from pipeline.params import load_params
from pipeline.replay import build_augment
from pipeline.store import LogitStore
from pipeline.train import accuracy, distill, store_targets


@click.command()
@click.option("--params", "params_path", default="params.yaml")
@click.option("--cache", "cache_path", default="cache/teacher_logits.zarr")
@click.option("--students", multiple=True, default=["tiny_cnn"])
@click.option("--temperatures", "-T", multiple=True, type=float, default=[4.0])
@click.option("--kd-weights", "-l", multiple=True, type=float, default=[0.0, 1.0])
@click.option("--seeds", multiple=True, type=int, default=[0, 1, 2])
@click.option("--epochs", type=int, default=None)
@click.option("--threads", type=int, default=1)
@click.option("--out", default=None, help="Append JSON lines here.")
@click.option("--report-test", is_flag=True,
              help="Also score the test split: only to report the chosen defaults, never to choose them.")
def main(params_path, cache_path, students, temperatures, kd_weights, seeds, epochs, threads, out, report_test):
    torch.set_num_threads(threads)
    p = load_params(params_path)
    d = p.distill
    data = load_dataset(p.data)
    store = LogitStore(cache_path)
    transform = build_augment(store.meta.augment)
    for student_name, T, lam in itertools.product(students, temperatures, kd_weights):
        if lam == 0 and T != temperatures[0]:
            continue  # the baseline does not depend on T
        accs, test_accs = [], []
        for seed in seeds:
            student = build_model(student_name, data.image_shape[0], data.num_classes, seed=seed)
            distill(student, data.train, data.val, store_targets(store), transform, store.meta.seed,
                    store.meta.num_views, temperature=T, kd_weight=lam, view_schedule=d.view_schedule,
                    epochs=epochs or d.epochs, batch_size=d.batch_size, lr=d.lr, betas=d.betas,
                    weight_decay=d.weight_decay, lr_milestones=d.lr_milestones, lr_factors=d.lr_factors,
                    seed=seed, device=torch.device("cpu"))
            accs.append(accuracy(student, data.val, torch.device("cpu")))
            if report_test:
                test_accs.append(accuracy(student, data.test, torch.device("cpu")))
        row = {"student": student_name, "T": T, "kd_weight": lam, "val_acc_mean": statistics.mean(accs),
               "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "val_accs": accs}
        if report_test:
            row.update(test_acc_mean=statistics.mean(test_accs), test_accs=test_accs,
                       test_acc_std=statistics.stdev(test_accs) if len(test_accs) > 1 else 0.0)
        print(json.dumps(row), flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
