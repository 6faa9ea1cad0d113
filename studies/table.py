"""Write a study's table from its runs' metrics (studies/README.md): table.md, table.csv and metrics.json.

    python ../table.py          # run by the study's `table` stage, in the study's folder

The study's params.yaml names the rows (`rows`: each row's `label`, in table order), the seeds and the table's
columns (`table`: column -> header, in order). A run is one row and one seed, `<row>-<seed>`; its numbers come from
the files its stages wrote:

    live/<run>/metrics.json     kd distill's last epoch: val_acc (validation split)
    eval/<run>/metrics.json     kd evaluate: student_acc, student_errors, teacher_acc (ensemble_acc) on the test split
    params/<run>.yaml           its kd params: views, epochs, training images, kd_weight, teacher_source
    stores/<row>.zarr           the row's store, if it has one: bytes on disk, views computed

table.md is the markdown table (as in RESULTS.md); table.csv holds every run's numbers, one line per row and seed;
metrics.json each row's means in percent, for `dvc exp show`.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import yaml


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def _per_seed(xs: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in xs)


def _or_dash(x) -> str:
    return "-" if x is None else str(x)


def _of(runs: list[dict], key: str) -> list:
    return [r[key] for r in runs]


# column -> its cell, from the row's runs (one dict per seed, in seed order; accuracies in percent)
COLUMNS = {
    "label": lambda rs: rs[0]["label"],
    "views": lambda rs: _or_dash(rs[0]["views"]),
    "seeds": lambda rs: ",".join(map(str, _of(rs, "seed"))),
    "val": lambda rs: _mean_sd(_of(rs, "val_acc")),
    "val_seeds": lambda rs: f"{_per_seed(_of(rs, 'val_acc'))} ({statistics.mean(_of(rs, 'val_acc')):.2f})",
    "test": lambda rs: _mean_sd(_of(rs, "test_acc")),
    "test_seeds": lambda rs: _per_seed(_of(rs, "test_acc")),
    "test_seeds_sd": lambda rs: f"{_per_seed(_of(rs, 'test_acc'))} ({_mean_sd(_of(rs, 'test_acc'))})",
    "errors": lambda rs: (" / ".join(map(str, _of(rs, "test_errors")))
                          + f" ({statistics.mean(_of(rs, 'test_errors')):.1f})"),
    "teacher_test": lambda rs: f"{rs[0]['teacher_test_acc']:.2f}",
    "store_bytes": lambda rs: _or_dash(rs[0]["store_bytes"]),
    "teacher_views": lambda rs: _or_dash(rs[0]["teacher_views"]),
}


def _store_facts(path: Path) -> tuple[int, int]:
    """(bytes on disk, views stored) of a store."""
    from pipeline.store import LogitStore

    meta = LogitStore(str(path)).meta
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return size, meta.num_samples * meta.num_views


def _training_images(kd: dict, path: Path) -> int:
    """The run's training images: data.train_subset, or all of the training split."""
    if kd["data"]["train_subset"] is not None:
        return kd["data"]["train_subset"]
    from pipeline.data import load_dataset
    from pipeline.params import load_params

    return len(load_dataset(load_params(path).data).train)


def run_record(row: str, label: str, seed: int) -> dict:
    """One run's numbers (accuracies in percent; None where the run has no such number)."""
    run = f"{row}-{seed}"
    kd_path = Path(f"params/{run}.yaml")
    kd = yaml.safe_load(kd_path.read_text())
    record = {"row": row, "label": label, "seed": seed,
              "val_acc": 100 * json.loads(Path(f"live/{run}/metrics.json").read_text())["val_acc"],
              "test_acc": None, "test_errors": None, "teacher_test_acc": None,
              "views": None, "store_bytes": None, "teacher_views": None}
    evaluated = Path(f"eval/{run}/metrics.json")
    if evaluated.is_file():
        m = json.loads(evaluated.read_text())
        record.update(test_acc=100 * m["student_acc"], test_errors=m["student_errors"],
                      teacher_test_acc=100 * m.get("ensemble_acc", m["teacher_acc"]))
    store = Path(f"stores/{row}.{kd['cache']['format']}")
    distill = kd["distill"]
    if store.exists():
        record["views"] = kd["cache"]["num_views"]
        record["store_bytes"], computed = _store_facts(store)
        if distill["kd_weight"] > 0:
            record["teacher_views"] = computed
    elif distill["kd_weight"] > 0 and distill["teacher_source"] == "online":  # the teacher on every view trained on
        record["teacher_views"] = distill["epochs"] * _training_images(kd, kd_path)
    return record


def main(study_path: str = "params.yaml") -> None:
    study = yaml.safe_load(Path(study_path).read_text())
    columns = study["table"]
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        raise SystemExit(f"{study_path}: table: unknown column(s) {sorted(unknown)}; known: {', '.join(COLUMNS)}")
    runs = {row: [run_record(row, spec["label"], seed) for seed in study["seeds"]]
            for row, spec in study["rows"].items()}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(COLUMNS[c](rs) for c in columns) + " |" for rs in runs.values()]
    Path("table.md").write_text("\n".join(lines) + "\n")
    records = [r for rs in runs.values() for r in rs]
    with open("table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    means = {row: {k: round(statistics.mean(r[k] for r in rs), 4) for k in ("val_acc", "test_acc")
                   if rs[0][k] is not None} for row, rs in runs.items()}
    Path("metrics.json").write_text(json.dumps(means, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
