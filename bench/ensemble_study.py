"""Several teachers, one student (issue 17's study; RESULTS.md): each single teacher's student against the
ensemble's, averaging probabilities against averaging logits, and the ensemble's own test accuracy.

The setting is bench/views_study.py's (same data subset, student, schedule, T and λ; stores of 4 views of crop +
flip): its teacher (seed 0) is teacher a, and two more resnet20 teachers are trained with seeds 1 and 2. Each
teacher has its own store; the ensembles read all three. Results: OUT/ensemble.jsonl, then `--table`.

    OMP_NUM_THREADS=1 python bench/ensemble_study.py --out runs/views      # after (or beside) views_study.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from views_study import _kd, _params, _size, _test_accuracy  # noqa: E402


def base_params(data_root: str, subset: int, teacher_epochs: int, epochs: int) -> list[str]:
    return ["data.name=imagefolder", f"data.root={data_root}", f"data.train_subset={subset}", "data.val_fraction=0.05",
            "teacher.arch=resnet20", f"teacher.epochs={teacher_epochs}", "teacher.optimizer.schedule=cosine",
            "teacher.optimizer.lr_milestones=[]", "teacher.optimizer.lr_factors=[]", "distill.student=resnet8",
            "distill.temperature=4.0", "distill.kd_weight=4.0", f"distill.epochs={epochs}",
            f"distill.optimizer.lr_milestones=[{epochs - 2}]", "cache.num_views=4", "distill.view_schedule=cycle"]


@click.command()
@click.option("--data", "data_root", default="/tmp/c10", show_default=True)
@click.option("--out", default="runs/views", show_default=True)
@click.option("--subset", default=5000, show_default=True)
@click.option("--teacher-subset", default=5000, show_default=True, help="data.train_subset of the teachers' training")
@click.option("--teacher-epochs", default=15, show_default=True)
@click.option("--epochs", default=10, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--table", is_flag=True)
def main(data_root, out, subset, teacher_subset, teacher_epochs, epochs, seeds, table):
    out = Path(out).resolve()
    results = out / "ensemble.jsonl"
    if table:
        print_table(results)
        return
    base = base_params(data_root, subset, teacher_epochs, epochs)
    teachers = {"a": out / "teacher.pt", "b": out / "teacher_b.pt", "c": out / "teacher_c.pt"}
    for name, seed in (("b", 1), ("c", 2)):
        if not teachers[name].exists():
            start = time.time()
            _kd("teacher", "--params", str(_params(out, f"teacher_{name}", base, f"seed={seed}",
                                                   f"data.train_subset={teacher_subset}")),
                "--out", str(teachers[name]))
            print(f"teacher {name} {time.time() - start:.0f} s", flush=True)
    stores = {}
    for name, path in teachers.items():
        stores[name] = out / f"ens-{name}-V4.zarr"
        if not stores[name].exists():
            _kd("cache", "--params", str(_params(out, "ens-cache", base)), "--teacher", str(path),
                "--out", str(stores[name]))
    done = {json.loads(line)["run"] for line in results.read_text().splitlines()} if results.exists() else set()
    if "teachers" not in done:
        record = {"run": "teachers", **{f"test_acc_{n}": _test_accuracy(out / "params" / "ens-cache.yaml", p)
                                         for n, p in teachers.items()},
                  **{f"store_bytes_{n}": _size(s) for n, s in stores.items()}}
        record.update(ensemble_accuracy(out / "params" / "ens-cache.yaml", list(teachers.values()), 4.0))
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    rows = [("b", ["b"], "probabilities"), ("c", ["c"], "probabilities"), ("a", ["a"], "probabilities"),
            ("abc-probabilities", ["a", "b", "c"], "probabilities"), ("abc-logits", ["a", "b", "c"], "logits")]
    for seed in map(int, seeds.split(",")):
        for row, members, rule in rows:
            name = f"ens-{row}-s{seed}"
            if name in done:
                continue
            params = _params(out, name, base, f"seed={seed}", f"distill.ensemble.rule={rule}")
            pairs = [a for m in members for a in ("--cache", str(stores[m]), "--teacher", str(teachers[m]))]
            start = time.time()
            _kd("distill", "--params", str(params), *pairs, "--out", str(out / f"{name}.pt"),
                "--live-dir", str(out / "live" / name))
            val = json.loads((out / "live" / name / "metrics.json").read_text())["val_acc"]
            record = {"run": name, "row": row, "seed": seed, "val_acc": val, "distill_s": round(time.time() - start, 1),
                      "test_acc": _test_accuracy(params, out / f"{name}.pt")}
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


def ensemble_accuracy(params_path: Path, checkpoints: list[Path], temperature: float) -> dict:
    """Test accuracy of the three teachers' ensemble under each rule (equal weights)."""
    import torch

    from pipeline.data import input_transform, load_dataset
    from pipeline.ensemble import combine
    from pipeline.models import load_checkpoint
    from pipeline.params import load_params
    from pipeline.train import eval_loader

    data = load_dataset(load_params(params_path).data)
    models = [load_checkpoint(p)[0].eval() for p in checkpoints]
    loader = eval_loader(data.test, input_transform(None, data.mean, data.std))
    correct = {"probabilities": 0, "logits": 0}
    with torch.no_grad():
        for x, y in loader:
            logits = [m(x) for m in models]
            for rule in correct:
                z = combine(logits, [1 / len(models)] * len(models), rule, temperature)
                correct[rule] += (z.argmax(1) == y).sum().item()
    return {f"ensemble_test_acc_{rule}": c / len(data.test) for rule, c in correct.items()}


def print_table(results: Path) -> None:
    records = [json.loads(line) for line in results.read_text().splitlines()]
    facts = next(r for r in records if r["run"] == "teachers")
    print("| teacher(s) | teacher test % | student validation % (mean ± sd) | student test % per seed | "
          "student test % (mean ± sd) |")
    print("|---|---|---|---|---|")
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    for row in ("a", "b", "c", "abc-probabilities", "abc-logits"):
        rs = sorted((r for r in records if r.get("row") == row), key=lambda r: r["seed"])
        if not rs:
            continue
        own = (facts[f"test_acc_{row}"] if row in "abc" else facts[f"ensemble_test_acc_{row.split('-')[1]}"])
        val, test = [100 * r["val_acc"] for r in rs], [100 * r["test_acc"] for r in rs]
        label = f"resnet20 {row} (seed {'abc'.index(row)})" if row in "abc" else f"ensemble a+b+c, {row.split('-')[1]}"
        print(f"| {label} | {100 * own:.2f} | {statistics.mean(val):.2f} ± {sd(val):.2f} | "
              f"{' / '.join(f'{t:.2f}' for t in test)} | {statistics.mean(test):.2f} ± {sd(test):.2f} |")


if __name__ == "__main__":
    main()
