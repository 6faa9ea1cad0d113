"""`kd search` in worker processes or in one process with all threads: the same trials, timed side by side.

Runs the search of `params.yaml` (the digits default unless you pass another file) from an existing store, with
`search.processes` 1 (one process, one torch thread per core) and N (N spawned workers, cores // N threads each;
the workers' start-up counted), alternated `--repeats` times on fresh result files; prints the wall-clock medians,
their ratio, and checks that both give the same rows. For reference (not a setting), also one process with one
torch thread: it tells the gain of processes from the cost of threads contending for the cores.
The store is the default pipeline's (`dvc repro cache`, or `make run`). Keys in results.json (--json):
search_processes_<N>_vs_1 (wall-clock time with N processes / with 1), search_one_thread_vs_1 (the reference) and
search_identical_rows (1: all three gave the same rows).
Usage: python bench/search.py [--params params.yaml] [--cache cache/teacher_logits.zarr] [--processes 2]
       [--repeats 3] [--append BENCHMARKS.md] [--json bench/results.json]
"""

import dataclasses
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import torch

import pipeline.search
from output import publish
from pipeline.data import load_dataset
from pipeline.params import load_params
from pipeline.search import cores, search
from pipeline.store import LogitStore


ONE_THREAD = 0  # the reference mode: processes 1 with one torch thread


def timed_search(store, data, params, processes: int, folder: Path) -> tuple[float, list[dict]]:
    """Wall-clock seconds of one whole search (fresh CSV, nothing resumed) with `processes`, and its rows."""
    cfg = dataclasses.replace(params.search, processes=max(1, processes))
    out = folder / f"search-{processes}-{time.perf_counter_ns()}.csv"
    all_cores = pipeline.search.cores
    if processes == ONE_THREAD:
        pipeline.search.cores = lambda: 1
    try:
        started = time.perf_counter()
        rows = search(store, data.train, data.val, params.distill, cfg, seed=params.seed, config="bench", out=out,
                      device=torch.device("cpu"), memory_bytes=params.memory_mb << 20, echo=lambda line: None)
        return time.perf_counter() - started, rows
    finally:
        pipeline.search.cores = all_cores


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--cache", "cache_path", default="cache/teacher_logits.zarr", show_default=True)
@click.option("--processes", default=2, show_default=True, help="Worker processes to compare with 1.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--append", "append_to", default=None, help="Append the table to this markdown file.")
@click.option("--json", "json_path", default=None, help="Merge the ratios into this flat JSON object.")
def main(params_path, cache_path, processes, repeats, append_to, json_path):
    params = load_params(params_path)
    data = load_dataset(params.data)
    store = LogitStore(cache_path, max_memory_bytes=params.memory_mb << 20)
    load_before = os.getloadavg()[0]
    times = {1: [], processes: [], ONE_THREAD: []}
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(repeats):
            for n in ((1, processes, ONE_THREAD) if repeat % 2 == 0 else (ONE_THREAD, processes, 1)):
                seconds, rows[n] = timed_search(store, data, params, n, Path(folder))
                times[n].append(seconds)
                print(f"repeat {repeat}: processes {n}: {seconds:.2f} s", flush=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    same = strip(rows[1]) == strip(rows[processes]) == strip(rows[ONE_THREAD])
    one, many, single = (statistics.median(times[n]) for n in (1, processes, ONE_THREAD))
    s = params.search
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Search: processes vs threads", "",
        f"`python bench/search.py --processes {processes} --repeats {repeats}` ({when}, {cores()} cores): the "
        f"search of `{params_path}` ({params.data.name}, {s.trials} + {s.refine_trials} trials of {s.epochs} "
        f"epochs, student {params.distill.student}), wall-clock seconds of the whole search, medians of {repeats} "
        f"alternated repeats (worker start-up included); load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other work on the machine).", "",
        "| search.processes | torch threads per process | seconds (median) | all runs |", "|---|---|---|---|",
        f"| 1 | {cores()} | {one:.2f} | {', '.join(f'{t:.2f}' for t in times[1])} |",
        f"| {processes} | {max(1, cores() // processes)} | {many:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in times[processes])} |",
        f"| reference: 1, one thread | 1 | {single:.2f} | {', '.join(f'{t:.2f}' for t in times[ONE_THREAD])} |", "",
        f"processes {processes} / processes 1: {many / one:.2f}x the time (one process with one thread: "
        f"{single / one:.2f}x); identical rows: {same}", ""]
    results = {f"search_processes_{processes}_vs_1": many / one, "search_one_thread_vs_1": single / one,
               "search_identical_rows": float(same)}
    publish([""] + lines, results, append_to=append_to, json_path=json_path)


if __name__ == "__main__":
    main()
