"""Search the distillation temperature T and weight λ on the validation split, from one logit store (or several:
an ensemble of teachers, one store each, mixed by `distill.ensemble` as `kd distill` mixes them).

Two rounds of seeded log-uniform draws, as in the origin's report: `search.trials` from the ranges
`search.temperature` x `search.kd_weight`, then `search.refine_trials` within `refine_span` of the first round's
best (clipped to the first round's ranges). A trial is `distill` shortened to `search.epochs`, with targets read
from the store at the trial's T, scored by its final-epoch validation accuracy. The search is given the training
and validation splits only: it cannot read the test split. Results are one CSV row per trial, rewritten atomically
after every trial, so an interrupted search resumes where it stopped.

Wherever a store is taken, a list of stores is too (holding the same views: `pipeline.ensemble.check_same_views`);
a trial then reads `Ensemble([store_targets(s, T, tail) for s in stores], weights, rule, T)`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import KDError
from pipeline.params import DataParams, DistillParams, SearchParams

COLUMNS = ("trial", "round", "temperature", "kd_weight", "seed", "epochs", "val_acc", "seconds", "config")
TYPES = {"trial": int, "round": int, "temperature": float, "kd_weight": float, "seed": int, "epochs": int,
         "val_acc": float, "seconds": float, "config": str}


@dataclasses.dataclass(frozen=True)
class Trial:
    round: int  # 1: the first round, 2: the refinement
    trial: int  # index within its round, from 0
    temperature: float
    kd_weight: float


def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """One draw from log-uniform [lo, hi], rounded to 4 significant digits (readable, exact in CSV and YAML)."""
    value = float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.4g}")
    return min(hi, max(lo, value))


def draw_trials(count: int, round: int, temperature: list[float], kd_weight: list[float], seed: int) -> list[Trial]:
    """`count` trials of `round`, T and λ log-uniform in the [lo, hi] ranges given. Trial k is drawn from its own
    generator, seeded by (seed, round, k): the same arguments give the same trials, and more trials keep the first."""
    trials = []
    for k in range(count):
        rng = np.random.default_rng([seed, round, k])
        trials.append(Trial(round, k, log_uniform(rng, *temperature), log_uniform(rng, *kd_weight)))
    return trials


def refine_range(best: float, span: float, bounds: list[float]) -> list[float]:
    """[best / span, best * span], clipped to `bounds` (the first round's [lo, hi])."""
    return [max(bounds[0], best / span), min(bounds[1], best * span)]


def best_row(rows: list[dict]) -> dict | None:
    """The row of highest val_acc (the earliest of equals, by round and trial); None without a finite one."""
    scored = [r for r in rows if math.isfinite(r["val_acc"])]
    return max(sorted(scored, key=lambda r: (r["round"], r["trial"])), key=lambda r: r["val_acc"], default=None)


def as_list(stores) -> list:
    """One store, or a list of them (an ensemble), as a list."""
    return list(stores) if isinstance(stores, (list, tuple)) else [stores]


def config_hash(store_meta, distill: DistillParams, epochs: int, seed: int, data: DataParams) -> str:
    """Short hash of everything besides T and λ that changes a trial's result: the store's metadata (teacher and
    dataset fingerprints, views, replay seed, ...), the distill params (but T, λ, epochs and teacher_source: trials
    always read the store), the trials' `epochs`, the training `seed` and the data params (the validation split).
    `store_meta` may be a list of several stores' metadata (an ensemble): then every store's metadata, in order, and
    the ensemble's normalised weights and rule go in too (one store's hash is the same as passed alone)."""
    from pipeline.ensemble import normalized

    metas = as_list(store_meta)
    trial_free = {k: v for k, v in dataclasses.asdict(distill).items()
                  if k not in ("temperature", "kd_weight", "epochs", "teacher_source")}
    payload = {"store": dataclasses.asdict(metas[0]), "distill": trial_free, "epochs": epochs, "seed": seed,
               "data": dataclasses.asdict(data)}
    if len(metas) > 1:
        payload["store"] = [dataclasses.asdict(meta) for meta in metas]
        payload["ensemble"] = {"weights": normalized(distill.ensemble.weights, len(metas)),
                               "rule": distill.ensemble.rule}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def trial_targets(stores, cfg: DistillParams, temperature: float):
    """The targets a trial reads at `temperature`: one store's `store_targets`, or several stores' mixed by
    `cfg.ensemble` (`pipeline.ensemble.Ensemble`)."""
    from pipeline.ensemble import Ensemble, normalized
    from pipeline.train import store_targets

    members = [store_targets(store, temperature, cfg.topk_tail) for store in as_list(stores)]
    if len(members) == 1:
        return members[0]
    return Ensemble(members, normalized(cfg.ensemble.weights, len(members)), cfg.ensemble.rule, temperature)


def run_trial(store, train, val, cfg: DistillParams, temperature: float, kd_weight: float, *, seed: int,
              device, num_workers: int = 0) -> float:
    """Distill a fresh `cfg.student` (seeded by `seed`) for `cfg.epochs` on the store's views and logits at this T
    and λ (`store`: one, or a list of stores holding the same views, mixed by `cfg.ensemble`); return its validation
    accuracy after the last epoch (NaN when the training diverged)."""
    from pipeline.data import input_transform
    from pipeline.models import build_model
    from pipeline.augment import build_augment
    from pipeline.train import DivergedError, distill

    meta = as_list(store)[0].meta  # the stores hold the same views: any one's metadata describes them
    run = dataclasses.replace(cfg, temperature=temperature, kd_weight=kd_weight)
    shape = tuple(train.images[0].shape)
    student = build_model(cfg.student, shape[0], meta.num_classes, cfg.student_options, shape[-1], seed=seed)
    transform = input_transform(build_augment(meta.augment), meta.mean, meta.std)
    scores = []
    try:
        distill(student, train, val, trial_targets(store, cfg, temperature), transform,
                input_transform(None, meta.mean, meta.std), meta.seed, meta.num_views, run, kd_weight=kd_weight,
                seed=seed, device=device, num_workers=num_workers, chunk_samples=meta.chunk_samples,
                log=lambda epoch, metrics: scores.append(metrics["val_acc"]), progress=False, mix=meta.mix,
                num_classes=meta.num_classes)
    except DivergedError:
        return float("nan")
    return scores[-1]


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a search CSV (typed as `TYPES`); [] when there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise KDError(f"{path}: not a search results file (columns {reader.fieldnames}, expected "
                          f"{','.join(COLUMNS)}); delete it or pass another --out")
        try:
            return [{k: TYPES[k](row[k]) for k in COLUMNS} for row in reader]
        except (TypeError, ValueError) as e:
            raise KDError(f"{path}: unreadable row ({e}); delete the file to search afresh") from None


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Rewrite the search CSV atomically with `rows`, sorted by round and trial."""
    from pipeline.report import write_text

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: (r["round"], r["trial"])))
    write_text(path, out.getvalue())


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def trial_threads(processes: int) -> int:
    """Torch threads for each of `processes` trial runners: the user's setting (OMP_NUM_THREADS, or
    torch.set_num_threads before the search; torch's default is one per physical core), at most `cores()`, shared
    out as max(1, threads // processes). So `OMP_NUM_THREADS=1` beside other jobs gives one thread, as asked."""
    import torch

    return max(1, min(cores(), torch.get_num_threads()) // processes)


_WORKER: dict = {}  # a worker process's stores, splits and settings, set once by `_start_worker`


def _start_worker(store_paths: list, memory_bytes: int, train, val, cfg: DistillParams, seed: int, device,
                  num_workers: int, threads: int) -> None:
    """Open every store by path, each within its share of `memory_bytes`."""
    import torch

    from pipeline.store import LogitStore

    torch.set_num_threads(threads)
    stores = [LogitStore(path, max_memory_bytes=memory_bytes // len(store_paths)) for path in store_paths]
    _WORKER.update(store=stores[0] if len(stores) == 1 else stores, train=train, val=val, cfg=cfg, seed=seed,
                   device=device, num_workers=num_workers)


def _timed_trial(trial: Trial, store, train, val, cfg: DistillParams, seed: int, device,
                 num_workers: int) -> tuple[Trial, float, float]:
    """(trial, its validation accuracy, seconds it took)."""
    started = time.perf_counter()
    val_acc = run_trial(store, train, val, cfg, trial.temperature, trial.kd_weight, seed=seed, device=device,
                        num_workers=num_workers)
    return trial, val_acc, time.perf_counter() - started


def _trial_in_worker(trial: Trial) -> tuple[Trial, float, float]:
    return _timed_trial(trial, **_WORKER)


@contextlib.contextmanager
def trial_runner(store, train, val, cfg: DistillParams, *, seed: int, device, processes: int,
                 memory_bytes: int, num_workers: int = 0):
    """A function from trials to an iterator of (trial, val_acc, seconds), in the order they finish.

    `processes` 1: in this process, with `trial_threads(1)` torch threads (the user's). N > 1: in N spawned worker
    processes with `trial_threads(N)` threads each, every worker opening the store (each of `store`, when a list)
    once by path (holding them in memory within `memory_bytes`, shared out equally) and given only `train` and
    `val`.
    """
    import torch

    if processes == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(trial_threads(1))
        try:
            yield lambda trials: (_timed_trial(t, store, train, val, cfg, seed, device, num_workers) for t in trials)
        finally:
            torch.set_num_threads(threads)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker,
                               initargs=([s.path for s in as_list(store)], memory_bytes, train, val, cfg, seed,
                                         device, num_workers, trial_threads(processes)))
    try:
        yield lambda trials: (f.result() for f in as_completed([pool.submit(_trial_in_worker, t) for t in trials]))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def search(store, train, val, distill_cfg: DistillParams, cfg: SearchParams, *, seed: int, config: str,
           out: str | Path, device, memory_bytes: int = 4 << 30, num_workers: int = 0,
           on_trial: Callable[[dict], None] = lambda row: None, echo: Callable[[str], None] = print) -> list[dict]:
    """Run the two rounds of trials (module docstring) and return one row per trial (columns `COLUMNS`).

    `store`: one store, or a list of stores (an ensemble, mixed by `distill_cfg.ensemble`). Each trial is
    `distill_cfg` with its T and λ and `cfg.epochs` epochs, trained with `seed`. Rows of `out` from an
    earlier run with the same `config` (`config_hash`), round, trial, T and λ are kept, not re-run; `out` is
    rewritten after every finished trial (then `on_trial(row)` is called) and at the end, holding this search's rows.
    """
    from tqdm.auto import tqdm

    previous = read_rows(out)
    kept = {(r["round"], r["trial"]): r for r in previous if r["config"] == config}
    if previous and not kept:
        others = sorted({r["config"] for r in previous})
        echo(f"{out}: its {len(previous)} trials were run with another configuration (config {', '.join(others)}, "
             f"now {config}): starting a fresh search")
    trial_cfg = dataclasses.replace(distill_cfg, epochs=cfg.epochs)
    rows: dict[tuple[int, int], dict] = {}
    reused = 0
    runner = trial_runner(store, train, val, trial_cfg, seed=seed, device=device, processes=cfg.processes,
                          memory_bytes=memory_bytes, num_workers=num_workers)
    with runner as run, tqdm(total=cfg.trials + cfg.refine_trials, desc="search", unit="trial") as bar:
        for number in (1, 2):
            if number == 1:
                trials = draw_trials(cfg.trials, 1, cfg.temperature, cfg.kd_weight, cfg.seed)
            else:
                best = best_row(list(rows.values()))
                if best is None or cfg.refine_trials == 0:
                    break
                trials = draw_trials(cfg.refine_trials, 2, refine_range(best["temperature"], cfg.refine_span,
                                                                        cfg.temperature),
                                     refine_range(best["kd_weight"], cfg.refine_span, cfg.kd_weight), cfg.seed)
            todo = []
            for t in trials:
                old = kept.get((t.round, t.trial))
                if old and (old["temperature"], old["kd_weight"]) == (t.temperature, t.kd_weight):
                    rows[t.round, t.trial] = old
                    reused += 1
                    bar.update()
                else:
                    todo.append(t)
            _show_best(bar, rows)
            for t, val_acc, seconds in run(todo):
                rows[t.round, t.trial] = row = {
                    "trial": t.trial, "round": t.round, "temperature": t.temperature, "kd_weight": t.kd_weight,
                    "seed": seed, "epochs": cfg.epochs, "val_acc": val_acc, "seconds": round(seconds, 2),
                    "config": config}
                write_rows(out, list({**kept, **rows}.values()))  # kept rows not yet reached stay on file
                bar.update()
                _show_best(bar, rows)
                on_trial(row)
    write_rows(out, list(rows.values()))
    if reused:
        echo(f"{out}: {reused} of {len(rows)} trials kept from an earlier run, {len(rows) - reused} run now")
    return sorted(rows.values(), key=lambda r: (r["round"], r["trial"]))


def _show_best(bar, rows: dict) -> None:
    best = best_row(list(rows.values()))
    if best is not None:
        bar.set_postfix(best=f"{100 * best['val_acc']:.2f}%")


def best_summary(rows: list[dict]) -> dict:
    """The search's metrics: the best trial's temperature, kd_weight, val_acc, round and trial, and the trial
    count (None for the best's fields when no trial scored)."""
    best = best_row(rows) or {}
    return {"temperature": best.get("temperature"), "kd_weight": best.get("kd_weight"),
            "val_acc": best.get("val_acc"), "round": best.get("round"), "trial": best.get("trial"),
            "trials": len(rows)}


def plot_search(rows: list[dict], path: str | Path) -> None:
    """Validation accuracy over T (x) and λ (y), both log axes, colour = accuracy (with a colourbar); the first
    round as circles, the refinement as triangles, diverged trials as grey crosses, the best marked and labelled."""
    from pipeline.figures import log_axes, pyplot, save_figure
    from pipeline.report import counted

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    scored = [r for r in rows if math.isfinite(r["val_acc"])]
    accs = [100 * r["val_acc"] for r in scored]
    norm = plt.Normalize(min(accs, default=0), max(accs, default=100))
    for number, marker, label in ((1, "o", "first round"), (2, "^", "refinement")):
        mine = [r for r in scored if r["round"] == number]
        if mine:
            points = ax.scatter([r["temperature"] for r in mine], [r["kd_weight"] for r in mine],
                                c=[100 * r["val_acc"] for r in mine], norm=norm, cmap="viridis", marker=marker,
                                s=70, edgecolors="black", linewidths=0.5, label=label)
    diverged = [r for r in rows if not math.isfinite(r["val_acc"])]
    if diverged:
        ax.scatter([r["temperature"] for r in diverged], [r["kd_weight"] for r in diverged], marker="x",
                   color="grey", label="diverged")
    best = best_row(rows)
    if best is not None:
        fig.colorbar(points, ax=ax, label="validation accuracy (%)")
        ax.scatter([best["temperature"]], [best["kd_weight"]], marker="*", s=400, facecolors="none",
                   edgecolors="red", linewidths=1.5, label="best")
        ax.annotate(f"T = {best['temperature']:g}, λ = {best['kd_weight']:g}\n{100 * best['val_acc']:.2f} %",
                    (best["temperature"], best["kd_weight"]), xytext=(10, 10), textcoords="offset points",
                    color="red", fontsize=9)
        log_axes(ax)  # plain-number labels, however few decades the trials span
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trials" if not rows else "every trial diverged", ha="center",
                transform=ax.transAxes)
    epochs = counted(rows[0]["epochs"] if rows else 0, "epoch")
    ax.set(xlabel="temperature T", ylabel="kd_weight λ", title=f"Validation accuracy of {len(rows)} trials ({epochs} each)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)


def set_distill_values(text: str, values: dict[str, float]) -> str:
    """`text` of a params file with `distill.<key>: value` replaced for each of `values`, by editing only the value
    on its line (comments, alignment and every other line kept). KDError when a key is not found as one line."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if re.match(r"distill:\s*(#.*)?$", line)), None)
    if start is None:
        raise KDError("params file: no top-level `distill:` section written as a block; set "
                      f"{', '.join(f'distill.{k}: {v!r}' for k, v in values.items())} by hand")
    stop = next((i for i in range(start + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
    for key, value in values.items():
        pattern = re.compile(rf"^(\s+{key}:\s*)(\S+)(\s*)(#.*)?$")
        hits = [i for i in range(start + 1, stop) if pattern.match(lines[i])]
        if len(hits) != 1:
            raise KDError(f"params file: found {len(hits)} lines `distill.{key}: <value>`, expected one; set "
                          f"distill.{key}: {value!r} by hand")
        head, old, space, comment = pattern.match(lines[hits[0]]).groups()
        new = repr(float(value))
        space = " " * max(1, len(old) + len(space) - len(new)) if comment else space
        lines[hits[0]] = head + new + space + (comment or "")
    return "\n".join(lines)


def write_best_params(path: str | Path, temperature: float, kd_weight: float) -> list[str]:
    """Set `distill.temperature` and `distill.kd_weight` in the params file at `path` (atomically, layout and
    comments kept; checked to change exactly those two values); return what changed as `key: old -> new` lines."""
    import yaml

    from pipeline.report import write_text

    path = Path(path)
    text = path.read_text()
    values = {"temperature": float(temperature), "kd_weight": float(kd_weight)}
    try:
        new_text = set_distill_values(text, values)
    except KDError as e:
        raise KDError(f"{path}: {str(e).removeprefix('params file: ')}") from None
    before, after = yaml.safe_load(text), yaml.safe_load(new_text)
    expected = {**before, "distill": {**before["distill"], **values}}
    if after != expected:
        raise KDError(f"{path}: editing distill.temperature and distill.kd_weight in place would change other "
                      "values; set them by hand")
    write_text(path, new_text)
    return [f"distill.{k}: {before['distill'][k]!r} -> {values[k]!r}" for k in values
            if before["distill"][k] != values[k]]
