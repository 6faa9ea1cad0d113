"""Fault-injection soak of the resumable stages (not run in CI): kill a stage at random moments, resume it with
the same command, and check that the result equals an uninterrupted run's bit for bit. And (--fsync-cost) what the
cache's per-chunk fsyncs cost.

Usage: python bench/fault_soak.py [--stage cache,distill] [--kills 5] [--formats zarr,hdf5] [--ranks 1,2] [--seed 0]
                                  [--append BENCHMARKS.md] [--json bench/results.json]
       python bench/fault_soak.py --fsync-cost [--repeats 3] [--append BENCHMARKS.md] [--json bench/results.json]

`kd cache` (a cnn teacher over digits, 17 chunks of 64 samples x 8 views) runs --kills times per configuration
(format x ranks, torchrun on CPU for 2 ranks), each time SIGKILLed with all its processes at a moment drawn in
one of two ways, alternately: a random time in the teacher's work, or just as the store's files change for the
j-th time (j random: a chunk's data has just reached the file, so the kill lands around its mark); then the same
command finishes the store. After each kill the partial store is inspected: a kill "landed mid-write" when some
chunk's data is in the files but not marked done (zarr: its chunk file exists; HDF5: its chunk is allocated), and
no chunk may be marked done without data that reads back. Every resumed store must equal the reference
bit for bit (logits, labels, attributes) and its resume must repair nothing ("recomputing" on stderr: only a
machine crash or a damaged disk can cause that).

A stage kind is one `soak_<stage>` function in SOAKS: it makes its reference, runs its killed and resumed trials, and
returns one `Trial` per kill. `--stage distill` kills `kd distill` (a dropout MLP student reading the store ahead in
a thread, 8 epochs, a checkpoint after each) at a random time or just as its checkpoint file changes, resumes it with
the same command and compares the weights and the dvclive history with an uninterrupted run of as many ranks; for
it "mid-write" counts kills during a checkpoint's write (its .tmp present), "chunks done" the epochs checkpointed,
"marked but unreadable" a torn checkpoint (must be 0), "repaired" a checkpoint the resume could not read.
Keys merged into results.json: fault_soak_<stage>_<format>_<ranks>r_{kills,mid_write,identical,repaired} and, with
--fsync-cost, fsync_cost_<case>_{ratio,ms_per_chunk}.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import yaml

from output import publish

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
CACHE = {"teacher.arch": "cnn", "teacher.epochs": 0, "cache.chunk_samples": 64, "cache.batch_size": 32,
         "cache.num_views": 8, "num_workers": 0}


@dataclass
class Trial:
    stage: str
    fmt: str
    ranks: int
    moment: str  # "random" (a random time in the work) or "at a write" (as the store's files changed)
    killed_with_done: int  # chunks marked done when killed
    mid_write: bool  # some chunk's data was in the files but not marked done
    marked_unreadable: int  # chunks marked done whose data does not read back (must be 0)
    repaired: int  # chunks the resume said it recomputed (must be 0 after process kills)
    identical: bool  # the resumed result equals the uninterrupted one bit for bit


def kd(*args, ranks: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "stages.cli"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "stages.cli"]
    return [*launcher, *args]


def write_params(path: Path, overrides: dict) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def remove(path: Path) -> None:
    """Delete a store: a zarr folder or an HDF5 file."""
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def run(cmd: list[str]) -> str:
    """Run to the end; its stdout and stderr together."""
    result = subprocess.run(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}")
    return result.stdout


def start(cmd: list[str]) -> subprocess.Popen:
    """Start `cmd` and return once it reports progress (tqdm's count above 0: the stage is at work)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    while not re.search(rb" [1-9]\d*/\d+ \[", seen):
        seen += proc.stdout.read() or b""
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} ended before its work began:\n{seen.decode()[-2000:]}")
        time.sleep(0.01)
    return proc


def work_seconds(cmd: list[str]) -> float:
    """Run `cmd` to its end; the seconds from its first progress to its end."""
    proc = start(cmd)
    started = time.monotonic()
    os.set_blocking(proc.stdout.fileno(), True)
    proc.stdout.read()
    proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return time.monotonic() - started


def run_killed(cmd: list[str], moment: str, rng: random.Random, work_s: float, changes) -> bool:
    """Start `cmd` and SIGKILL it and every process it started: at a random time within its first `work_s` seconds
    of work, or ("at a write") as soon as `changes()` has changed j times, j random in 1..12. False when it ended
    before the kill."""
    import psutil

    proc = start(cmd)
    processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    if moment == "random":
        deadline = time.monotonic() + rng.uniform(0, work_s)
        while time.monotonic() < deadline and proc.poll() is None:
            proc.stdout.read()  # keep the pipe from filling (the stage would wait on it)
            time.sleep(0.005)
    else:
        writes, last = rng.randint(1, 12), changes()
        while writes and proc.poll() is None:
            now = changes()
            if now != last:
                writes, last = writes - 1, now
            proc.stdout.read()
            time.sleep(0.0002)
    for p in processes:  # every process at once, as a power cut would
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(processes[1:], timeout=30)
    proc.stdout.close()
    return proc.returncode == -signal.SIGKILL


# ---- kd cache ----------------------------------------------------------------------------------------------------

def store_files_state(partial: Path, fmt: str):
    """What changes when a chunk reaches the files: zarr, the set of logits chunk files; HDF5, the file's size."""
    if fmt == "zarr":  # the files, not their folders: zarr makes a chunk's folder before its file
        return sum(1 for _ in (partial / "logits" / "c").glob("*/0/0"))
    return partial.stat().st_size if partial.exists() else 0


def inspect_partial(partial: Path, fmt: str, meta_rows: int) -> tuple[int, bool, int]:
    """(chunks marked done, whether some chunk's data is in the files unmarked, chunks marked done that fail to
    read back) of a killed run's partial store."""
    import h5py
    import zarr

    if not partial.exists():
        return 0, False, 0
    group = zarr.open_group(str(partial), mode="r") if fmt == "zarr" else h5py.File(partial, "r")
    try:
        done = np.asarray(group["chunks_done"][:])
        logits = group["logits"]
        if fmt == "zarr":
            written = [(partial / "logits" / "c" / str(k) / "0" / "0").is_file() for k in range(len(done))]
        else:
            written = [logits.id.get_chunk_info_by_coord((k * meta_rows, 0, 0)).byte_offset is not None
                       for k in range(len(done))]
        unreadable = 0
        for k in np.flatnonzero(done):
            try:
                unreadable += not np.isfinite(logits[k * meta_rows:(k + 1) * meta_rows]).all()
            except (OSError, ValueError, RuntimeError):
                unreadable += 1
        return int(done.sum()), any(w and not d for w, d in zip(written, done)), unreadable
    finally:
        if fmt == "hdf5":
            group.close()


def same_store(a: Path, b: Path, fmt: str) -> bool:
    import h5py
    import zarr

    def contents(path):
        if fmt == "zarr":
            g = zarr.open_group(str(path), mode="r")
            return g["logits"][:], g["labels"][:], {k: str(v) for k, v in g.attrs.items()}
        with h5py.File(path, "r") as f:
            return f["logits"][:], f["labels"][:], {k: str(v) for k, v in f.attrs.items()}

    (x, xl, xa), (y, yl, ya) = contents(a), contents(b)
    return x.tobytes() == y.tobytes() and np.array_equal(xl, yl) and xa == ya


def soak_cache(work: Path, fmt: str, ranks: int, kills: int, rng: random.Random) -> list[Trial]:
    """Kill `kd cache` `kills` times (each on a fresh store, then resumed once) and check each result."""
    params = write_params(work / f"cache-{fmt}.yaml", {**CACHE, "cache.format": fmt})
    teacher = work / "teacher.pt"
    if not teacher.exists():
        run(kd("teacher", "--params", str(params), "--out", str(teacher)))
    reference = work / f"reference.{fmt}"  # one process and two ranks make the same store (tests/test_resume.py)
    if not reference.exists():
        run(kd("cache", "--params", str(params), "--teacher", str(teacher), "--out", str(reference)))
    trials = []
    work_s = None
    for i in range(kills):
        moment = "random" if i % 2 == 0 else "at a write"
        store = work / f"{fmt}-{ranks}r-{i}.{fmt}"
        partial = store.with_name(store.name + ".partial")
        cmd = kd("cache", "--params", str(params), "--teacher", str(teacher), "--out", str(store), ranks=ranks)
        if work_s is None:  # this configuration's time at work, uninterrupted (its store is then discarded)
            work_s = 0.9 * work_seconds(cmd)
            remove(store)
        while not run_killed(cmd, moment, rng, work_s, lambda: store_files_state(partial, fmt)):
            remove(store)  # it ended first: draw again
        done, mid_write, unreadable = inspect_partial(partial, fmt, CACHE["cache.chunk_samples"])
        out = run(cmd)
        trials.append(Trial("cache", fmt, ranks, moment, done, mid_write, unreadable,
                            len(re.findall(r"recomputing", out)), same_store(reference, store, fmt)))
        print(trials[-1], flush=True)
    return trials


# ---- kd distill ---------------------------------------------------------------------------------------------------

DISTILL = {"distill.student": "mlp", "distill.student_options": {"hidden_sizes": [64], "dropout": 0.5},
           "distill.epochs": 8, "distill.optimizer.lr_milestones": [6], "distill.optimizer.lr_factors": [0.1],
           "memory_mb": 0}  # a dropout student (draws every step) reading the store ahead in a thread


def checkpoint_state(resume: Path) -> tuple[int, bool, bool]:
    """(epochs the checkpoint at `resume` holds, whether a checkpoint write was in progress, whether it is torn)."""
    import torch

    writing = resume.with_name(resume.name + ".tmp").exists()
    if not resume.exists():
        return 0, writing, False
    try:
        return int(torch.load(resume, weights_only=True)["epoch"]), writing, False
    except Exception:  # noqa: BLE001 -- a torn checkpoint is what this counts
        return 0, writing, True


def same_student(a: Path, b: Path) -> bool:
    """The same weights bit for bit, and the same dvclive history (each epoch once, the same values)."""
    import torch

    wa, wb = torch.load(a)["state_dict"], torch.load(b)["state_dict"]
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        return False
    for name in ("loss", "train_acc", "val_acc"):
        ta, tb = ((p.with_suffix(".live") / "plots" / "metrics" / f"{name}.tsv").read_text() for p in (a, b))
        if ta != tb:
            return False
    return True


def soak_distill(work: Path, fmt: str, ranks: int, kills: int, rng: random.Random) -> list[Trial]:
    """Kill `kd distill` `kills` times (each a fresh output, then resumed once) and check each result against an
    uninterrupted run with the same number of ranks (ranks draw their own dropout masks)."""
    params = write_params(work / f"distill-{fmt}.yaml", {**CACHE, **DISTILL, "cache.format": fmt})
    teacher, store = work / "teacher.pt", work / f"distill-store.{fmt}"
    if not teacher.exists():
        run(kd("teacher", "--params", str(params), "--out", str(teacher)))
    if not store.exists():
        run(kd("cache", "--params", str(params), "--teacher", str(teacher), "--out", str(store)))

    def command(out: Path) -> list[str]:
        return kd("distill", "--params", str(params), "--teacher", str(teacher), "--cache", str(store), "--out",
                  str(out), "--live-dir", str(out.with_suffix(".live")), ranks=ranks)

    reference = work / f"reference-{fmt}-{ranks}r.pt"
    work_s = 0.9 * work_seconds(command(reference))
    trials = []
    for i in range(kills):
        moment = "random" if i % 2 == 0 else "at a write"
        out = work / f"student-{fmt}-{ranks}r-{i}.pt"
        resume = out.with_name(out.name + ".resume")

        def checkpoints() -> int:
            return resume.stat().st_mtime_ns if resume.exists() else 0

        while not run_killed(command(out), moment, rng, work_s, checkpoints):
            out.unlink()  # it ended first: draw again
            shutil.rmtree(out.with_suffix(".live"), ignore_errors=True)
        epochs, writing, torn = checkpoint_state(resume)
        text = run(command(out))
        trials.append(Trial("distill", fmt, ranks, moment, epochs, writing, int(torn),
                            len(re.findall(r"cannot be read", text)), same_student(reference, out)))
        print(trials[-1], flush=True)
    return trials


SOAKS = {"cache": soak_cache, "distill": soak_distill}  # stage kind -> soak_<stage>(work, fmt, ranks, kills, rng)


# ---- what fsync costs --------------------------------------------------------------------------------------------

class Fsyncs:
    """Within `with Fsyncs(enabled) as f:`, os.fsync is timed (f.seconds, f.calls), or a no-op when not `enabled`."""

    def __init__(self, enabled: bool):
        self.enabled, self.seconds, self.calls = enabled, 0.0, 0

    def __enter__(self):
        self.real = os.fsync

        def fsync(fd):
            started = time.perf_counter()
            if self.enabled:
                self.real(fd)
            self.seconds += time.perf_counter() - started
            self.calls += 1

        os.fsync = fsync
        return self

    def __exit__(self, *exc):
        os.fsync = self.real


def synthetic_writes(fmt: str, shape: tuple[int, int, int], chunk: int, root: Path) -> None:
    """Write a synthetic float16 store of `shape` (chunks of `chunk` samples) through StoreWriter, then delete it."""
    from pipeline.store import StoreMeta
    from pipeline.writer import StoreWriter

    n, v, c = shape
    meta = StoreMeta(n, v, c, [], [0.0], [1.0], 0, "float16", "full", 0, chunk, "off", "cnn", "t", "d")
    block = np.random.default_rng(0).normal(0, 3, (chunk, v, c)).astype(np.float32)
    path = root / f"s.{fmt}"
    writer = StoreWriter(path, fmt, meta, np.zeros(n, dtype=np.int64))
    for k in writer.pending:
        first, stop = meta.chunk_rows(k)
        writer.write(k, block[:stop - first])
    writer.finish()
    remove(path)


def digits_cache(root: Path) -> None:
    """The default digits `kd cache` (params.yaml as it is; an untrained cnn teacher), in-process, into `root`."""
    import torch

    from pipeline.data import load_dataset
    from pipeline.models import build_model
    from pipeline.params import load_params
    from pipeline.cache import cache_teacher_logits

    params = load_params(ROOT / "params.yaml")
    data = load_dataset(params.data)
    torch.manual_seed(0)
    teacher = build_model("cnn", 1, data.num_classes)
    out = root / f"digits.{params.cache.format}"
    cache_teacher_logits(out, params.cache, teacher, "cnn", data.train, data.num_classes, params.augment,
                         data.mean, data.std, torch.device("cpu"), params.num_workers)
    remove(out)


def measure_fsync_cost(repeats: int, out, json_path) -> None:
    """Each case with and without fsyncs, alternated; medians. The time inside fsync is the direct measure (the
    cache writes in a background thread while the teacher computes, so it is hidden there unless writes dominate)."""
    cases = {  # name: (run it into a folder, chunks written)
        "digits_kd_cache": (digits_cache, 2),
        **{f"synthetic_{fmt}_{n}x8x{c}": ((lambda root, fmt=fmt, n=n, c=c, rows=rows:
                                           synthetic_writes(fmt, (n, 8, c), rows, root)), n // rows)
           for n, c, rows in ((65536, 10, 1024), (8192, 1000, 256)) for fmt in ("zarr", "hdf5")},
    }
    lines = ["| case | chunks | with fsync (s) | without (s) | ratio | inside fsync (s) | fsyncs | ms per chunk |",
             "|---|---|---|---|---|---|---|---|"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:  # /tmp must be a real disk here, not a tmpfs (fsync is free there)
        for name, (case, chunks) in cases.items():
            times, inside, calls = {True: [], False: []}, [], 0
            for _ in range(repeats):
                for enabled in (True, False):  # alternated: noise hits both alike
                    with Fsyncs(enabled) as f:
                        started = time.perf_counter()
                        case(Path(tmp))
                        times[enabled].append(time.perf_counter() - started)
                    if enabled:
                        inside.append(f.seconds)
                        calls = f.calls
            on, off, spent = statistics.median(times[True]), statistics.median(times[False]), statistics.median(inside)
            lines.append(f"| {name} | {chunks} | {on:.3f} | {off:.3f} | {on / off:.2f}x | {spent:.3f} | {calls} | "
                         f"{spent / chunks * 1e3:.2f} |")
            print(lines[-1], flush=True)
            results[f"fsync_cost_{name}_ratio"] = on / off
            results[f"fsync_cost_{name}_ms_per_chunk"] = spent / chunks * 1e3
    publish(["", "## The cache's fsync per chunk", "",
             f"`python bench/fault_soak.py --fsync-cost --repeats {repeats}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): medians of {repeats} alternated "
             "runs; 'inside fsync' is the time spent in os.fsync (creation, chunks, marks, completion)", "", *lines],
            results, append_to=out, json_path=json_path)


# ---- the command -------------------------------------------------------------------------------------------------

@click.command()
@click.option("--stage", "stages", default="cache", show_default=True, help="Stage kinds to soak, comma-separated.")
@click.option("--kills", default=5, show_default=True, help="Kills per configuration (format x ranks).")
@click.option("--formats", default="zarr,hdf5", show_default=True)
@click.option("--ranks", "ranks_list", default="1,2", show_default=True, help="Process counts (2+: torchrun, CPU).")
@click.option("--seed", default=0, show_default=True, help="Seeds the kill moments.")
@click.option("--fsync-cost", is_flag=True, help="Measure what the cache's fsyncs cost instead.")
@click.option("--repeats", default=3, show_default=True, help="--fsync-cost: alternated repeats.")
@click.option("--append", "out", default=None, help="Append the markdown table to this file.")
@click.option("--json", "json_path", default=None, help="Merge the counts into this flat JSON object.")
def main(stages, kills, formats, ranks_list, seed, fsync_cost, repeats, out, json_path):
    if fsync_cost:
        measure_fsync_cost(repeats, out, json_path)
        return
    rng = random.Random(seed)
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages.split(","):
            for fmt in formats.split(","):
                for ranks in map(int, ranks_list.split(",")):
                    trials += SOAKS[stage](Path(tmp), fmt, ranks, kills, rng)
    lines = ["| stage | format | ranks | kills (random / at a write) | landed mid-write | chunks done when killed "
             "(mean) | marked but unreadable | repaired on resume | resumed identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    results = {}
    for key in dict.fromkeys((t.stage, t.fmt, t.ranks) for t in trials):
        group = [t for t in trials if (t.stage, t.fmt, t.ranks) == key]
        random_kills = sum(t.moment == "random" for t in group)
        row = {"kills": len(group), "mid_write": sum(t.mid_write for t in group),
               "unreadable": sum(t.marked_unreadable for t in group), "repaired": sum(t.repaired for t in group),
               "identical": sum(t.identical for t in group)}
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(group)} ({random_kills} / {len(group) - random_kills}) "
                     f"| {row['mid_write']} | {statistics.mean(t.killed_with_done for t in group):.1f} | "
                     f"{row['unreadable']} | {row['repaired']} | {row['identical']} of {len(group)} |")
        prefix = f"fault_soak_{key[0]}_{key[1]}_{key[2]}r_"
        results.update({prefix + name: float(row[name]) for name in ("kills", "mid_write", "identical", "repaired")})
    intro = ["", "## Fault-injection soak", "",
             f"`python bench/fault_soak.py --kills {kills} --formats {formats} --ranks {ranks_list} --seed {seed}` "
             f"--stage {stages} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): each kill SIGKILLs the "
             "stage and all its processes, then the same command finishes it (the store; the student), compared bit "
             "for bit with an uninterrupted run.",
             ""]
    publish(intro + lines, results, append_to=out, json_path=json_path)
    bad = [t for t in trials if not t.identical or t.marked_unreadable or t.repaired]
    if bad:
        sys.exit(f"{len(bad)} of {len(trials)} trials went wrong: {bad}")


if __name__ == "__main__":
    main()
