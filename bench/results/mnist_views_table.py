"""The table of bench/results/mnist_views.sh: validation and test accuracy (and test errors) of each row's students.

Usage: python bench/results/mnist_views_table.py runs/mnist-views
"""

import statistics
import sys
from pathlib import Path

import torch

from pipeline.data import input_transform, load_dataset
from pipeline.models import load_checkpoint
from pipeline.params import load_params
from pipeline.train import accuracy

ROWS = {"alone": "student alone, plain images", "plain": "distilled from 1 plain view (T = 20, λ = 0.5)",
        "alone_mix": "student alone, MixUp views (mixed labels)",
        "mix": "distilled from 4 MixUp views (λ_mix ~ U[0, 1]; T = 20, λ = 0.5)"}

out = Path(sys.argv[1])
data = load_dataset(load_params(out / "plain.yaml").data)
plain = input_transform(None, data.mean, data.std)
cpu = torch.device("cpu")


def scores(checkpoint: Path) -> tuple[float, float]:
    model, _ = load_checkpoint(checkpoint)
    return 100 * accuracy(model, data.val, plain, cpu), 100 * accuracy(model, data.test, plain, cpu)


_, teacher_test = scores(out / "teacher.pt")
print(f"teacher: test {teacher_test:.2f} % ({round((100 - teacher_test) * len(data.test) / 100)} errors)\n")
print("| row | seeds | validation % per seed (mean) | test % per seed (mean ± sd) | test errors per seed (mean) |")
print("|---|---|---|---|---|")
for row, label in ROWS.items():
    found = sorted(out.glob(f"{row}-s*.pt"), key=lambda p: int(p.stem.rsplit("-s", 1)[1]))
    if not found:
        continue
    val, test = zip(*(scores(p) for p in found))
    errors = [round((100 - t) * len(data.test) / 100) for t in test]
    sd = statistics.stdev(test) if len(test) > 1 else 0.0
    print(f"| {label} | {','.join(p.stem.rsplit('-s', 1)[1] for p in found)} | "
          f"{' / '.join(f'{v:.2f}' for v in val)} ({statistics.mean(val):.2f}) | "
          f"{' / '.join(f'{t:.2f}' for t in test)} ({statistics.mean(test):.2f} ± {sd:.2f}) | "
          f"{' / '.join(map(str, errors))} ({statistics.mean(errors):.1f}) |")
