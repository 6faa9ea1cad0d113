"""How many stored views does a student need, with and without mixing (issue 16's study; RESULTS.md).

One teacher on a CIFAR-10 training subset (JPEG class folders), the same student and schedule in every row, each
row for several seeds: the student alone on fresh views, students from stores of V views (crop + flip), the same
with mixing, and the teacher run live on a fresh view every epoch (`view_schedule: fresh`) without and with mixing.
Each run is the real stage commands (`kd teacher`, `kd cache`, `kd distill`); results go, one JSON line per run, to
OUT/runs.jsonl (a run already there is skipped, so the study resumes), then `--table` prints the markdown table.

    OMP_NUM_THREADS=1 python bench/views_study.py --data /tmp/c10 --out runs/views      # then --table
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def _kd(*args: str) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "stages.cli", *args], check=True, env=env, cwd=ROOT)


def _params(out: Path, name: str, base: list[str], *overrides: str) -> Path:
    path = out / "params" / f"{name}.yaml"
    subprocess.run([sys.executable, str(ROOT / "bench" / "derive_params.py"), str(ROOT / "recipes" / "cifar10-origin.yaml"),
                    str(path), *base, *overrides], check=True, cwd=ROOT)
    return path


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _test_accuracy(params: Path, checkpoint: Path) -> float:
    sys.path.insert(0, str(ROOT))
    import torch

    from pipeline.data import input_transform, load_dataset
    from pipeline.models import load_checkpoint
    from pipeline.params import load_params
    from pipeline.train import accuracy

    data = load_dataset(load_params(params).data)
    model, _ = load_checkpoint(checkpoint)
    return accuracy(model, data.test, input_transform(None, data.mean, data.std), torch.device("cpu"))


MIX = ["mix.mode=mixup", "mix.mixup_alpha=1.0", "mix.prob=1.0"]
CUTMIX = ["mix.mode=cutmix", "mix.cutmix_alpha=1.0", "mix.prob=1.0"]
ROW_MIX = {"cache_mix": MIX, "fresh_mix": MIX, "cache_fm": MIX, "cache_cutmix": CUTMIX}
# the training recipe (issue 23): the same stores as the plain rows, the student trained otherwise
ROW_RECIPE = {"cache_bf16": ["distill.amp=bfloat16"],
              "cache_ema": ["distill.ema=0.99", "distill.optimizer.warmup_epochs=2"],
              "cache_ema9": ["distill.ema=0.9", "distill.optimizer.warmup_epochs=2"],
              "cache_warm": ["distill.optimizer.warmup_epochs=2"]}
STORE_OF = {"cache_fm": "cache_mix", "cache_bf16": "cache", "cache_ema": "cache",  # rows reading another row's stores
            "cache_ema9": "cache", "cache_warm": "cache"}


@click.command()
@click.option("--data", "data_root", default="/tmp/c10", show_default=True, help="Folder with train/ and test/.")
@click.option("--out", default="runs/views", show_default=True)
@click.option("--subset", default=5000, show_default=True, help="data.train_subset")
@click.option("--teacher-subset", default=5000, show_default=True, help="data.train_subset of the teachers' training")
@click.option("--teacher-epochs", default=15, show_default=True)
@click.option("--epochs", default=10, show_default=True, help="Student epochs (lr x0.1 for the last 2).")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--views", default="1,4,16", show_default=True)
@click.option("--rows", default="alone,cache,cache_mix,fresh,fresh_mix", show_default=True,
              help="Also: cache_fm (MixUp stores, ce_weight 0), cache_cutmix (CutMix stores), cache_bf16 (the plain "
                   "stores, distill.amp bfloat16), cache_ema / cache_ema9 (the plain stores, an EMA of decay 0.99 / 0.9 "
                   "and 2 warm-up epochs), cache_warm (the warm-up alone).")
@click.option("--table", is_flag=True, help="Only print the table of OUT/runs.jsonl.")
def main(data_root, out, subset, teacher_subset, teacher_epochs, epochs, seeds, views, rows, table):
    out = Path(out).resolve()
    (out / "params").mkdir(parents=True, exist_ok=True)
    results = out / "runs.jsonl"
    if table:
        print_table(results)
        return
    base = ["data.name=imagefolder", f"data.root={data_root}", f"data.train_subset={subset}", "data.val_fraction=0.05",
            "teacher.arch=resnet20", f"teacher.epochs={teacher_epochs}", "teacher.optimizer.schedule=cosine",
            "teacher.optimizer.lr_milestones=[]", "teacher.optimizer.lr_factors=[]", "distill.student=resnet8",
            "distill.temperature=4.0", "distill.kd_weight=4.0", f"distill.epochs={epochs}",
            f"distill.optimizer.lr_milestones=[{epochs - 2}]"]
    teacher = out / "teacher.pt"  # trained on its own subset (teacher_subset); the students' subset is `subset`
    if not teacher.exists():
        start = time.time()
        _kd("teacher", "--params", str(_params(out, "teacher", base, f"data.train_subset={teacher_subset}")), "--out",
            str(teacher))
        print(f"teacher {time.time() - start:.0f} s, test accuracy "
              f"{100 * _test_accuracy(out / 'params' / 'teacher.yaml', teacher):.2f} %", flush=True)
    done = {json.loads(line)["run"] for line in results.read_text().splitlines()} if results.exists() else set()
    plan = []
    for row in rows.split(","):
        if row.startswith("cache"):
            plan += [(row, int(v)) for v in views.split(",")]
        else:
            plan.append((row, 0))
    for seed in map(int, seeds.split(",")):
        for row, v in plan:
            name = f"{row}-V{v}-s{seed}" if v else f"{row}-s{seed}"
            if name in done:
                continue
            overrides = [f"seed={seed}", *ROW_MIX.get(row, []), *ROW_RECIPE.get(row, [])]
            if row == "cache_fm":
                overrides.append("distill.ce_weight=0.0")
            store = None
            if row.startswith("cache"):
                overrides += [f"cache.num_views={v}", "distill.view_schedule=cycle", "distill.teacher_source=cache"]
            else:
                overrides += ["distill.view_schedule=fresh", "distill.teacher_source=online"]
            params = _params(out, name, base, *overrides)
            cache_s = 0.0
            if row.startswith("cache"):
                store = out / f"{STORE_OF.get(row, row)}-V{v}.zarr"
                if not store.exists():
                    start = time.time()
                    _kd("cache", "--params", str(params), "--teacher", str(teacher), "--out", str(store))
                    cache_s = time.time() - start
            student = out / f"{name}.pt"
            start, seconds = time.time(), None
            if not (student.exists() and (out / "live" / name / "metrics.json").exists()):  # else: trained, unrecorded
                _kd("distill", "--params", str(params), "--teacher", str(teacher), "--out", str(student),
                    *(["--cache", str(store)] if store else []), *(["--baseline"] if row == "alone" else []),
                    "--live-dir", str(out / "live" / name))
                seconds = round(time.time() - start, 1)
            val = json.loads((out / "live" / name / "metrics.json").read_text())["val_acc"]
            record = {"run": name, "row": row, "views": v, "seed": seed, "val_acc": val,
                      "test_acc": _test_accuracy(params, student), "distill_s": seconds,
                      "cache_s": round(cache_s, 1), "store_bytes": _size(store) if store else 0,
                      "teacher_views": (v * subset if store else (0 if row == "alone" else epochs * subset))}
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


LABELS = {"alone": "student alone (fresh crop + flip every epoch)", "cache": "from a store of V views",
          "cache_mix": "from a store of V mixed views (MixUp, λ ~ U[0, 1])",
          "cache_fm": "the same, pure function matching (`ce_weight: 0`)",
          "cache_cutmix": "from a store of V CutMix views (λ ~ U[0, 1])",
          "cache_bf16": "the same, trained in bfloat16 autocast (`distill.amp: bfloat16`)",
          "cache_ema": "the same, with an EMA of the weights (decay 0.99) and 2 warm-up epochs",
          "cache_ema9": "the same, with an EMA of the weights (decay 0.9) and 2 warm-up epochs",
          "cache_warm": "the same, with 2 warm-up epochs and no EMA",
          "fresh": "teacher live, a fresh view every epoch", "fresh_mix": "teacher live, a fresh mixed view every epoch"}


def print_table(results: Path) -> None:
    records = [json.loads(line) for line in results.read_text().splitlines()]
    groups: dict = {}
    for r in records:
        groups.setdefault((r["row"], r["views"]), []).append(r)
    print("| row | V | seeds | validation % (mean ± sd) | test % per seed | test % (mean ± sd) | store bytes | "
          "teacher views computed |")
    print("|---|---|---|---|---|---|---|---|")
    order = list(LABELS)
    for (row, v), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        rs.sort(key=lambda r: r["seed"])
        val = [100 * r["val_acc"] for r in rs]
        test = [100 * r["test_acc"] for r in rs]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        print(f"| {LABELS[row]} | {v or '-'} | {','.join(str(r['seed']) for r in rs)} | "
              f"{statistics.mean(val):.2f} ± {sd(val):.2f} | {' / '.join(f'{t:.2f}' for t in test)} | "
              f"{statistics.mean(test):.2f} ± {sd(test):.2f} | {rs[0]['store_bytes'] or '-'} | "
              f"{rs[0]['teacher_views'] or '-'} |")


if __name__ == "__main__":
    main()
