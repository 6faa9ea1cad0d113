"""A `kd cache` killed with SIGKILL at any moment resumes where it stopped and ends bit-identical to a
run that was never interrupted (real subprocesses, real zarr and HDF5 files)."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from conftest import write_params

KD = [sys.executable, "-m", "stages.cli"]
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
VIEWS = 8  # ~3 s of teacher work: the kills land mid-way, not after the run ends


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untrained (seeded) cnn teacher: slow enough (~8 s for the cache) to be killed mid-way."""
    root = tmp_path_factory.mktemp("resume")
    params = write_params(root / "params.yaml", **{"teacher.arch": "cnn", "teacher.epochs": 0,
                                                   "cache.chunk_samples": 64, "cache.batch_size": 32,
                                                   "cache.num_views": VIEWS})
    subprocess.run([*KD, "teacher", "--params", str(params), "--out", str(root / "teacher.pt")], check=True,
                   env=ENV, capture_output=True)
    return root, params


def cache(params, root, out, kill_at=None, ranks=1):
    """Run `kd cache` (under torchrun with `ranks` > 1); with `kill_at` (views done), SIGKILL it and all its
    processes once tqdm reports that many. Returns its output (stdout and stderr)."""
    launcher = KD if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={ranks}", "-m", "stages.cli"]
    args = [*launcher, "cache", "--params", str(params), "--teacher", str(root / "teacher.pt"), "--out", str(out)]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    seen = ""
    while True:
        char = proc.stdout.read(1)
        if not char:
            break
        seen += char
        if kill_at is not None and char == "[":  # tqdm: "cache:  40%|####  | 864/2154 [00:03<..."
            done = re.findall(r"(\d+)/\d+ \[$", seen)
            if done and int(done[-1]) >= kill_at:
                kill_tree(proc.pid)
                break
    proc.wait()
    if kill_at is None:
        assert proc.returncode == 0, seen[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    return seen


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its ranks in sessions of their own), then wait
    until all are gone."""
    import psutil

    parent = psutil.Process(pid)
    descendants = parent.children(recursive=True)
    for p in [parent, *descendants]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=30)  # not the parent: Popen.wait reaps it and reads its status


def contents_done(path, fmt):
    """The chunks_done flags of a partial store."""
    if fmt == "zarr":
        return zarr.open_group(str(path), mode="r")["chunks_done"][:]
    with h5py.File(path, "r") as f:
        return f["chunks_done"][:]


def contents(path, fmt):
    """(logits, labels, attributes) of a finished store."""
    if fmt == "zarr":
        group = zarr.open_group(str(path), mode="r")
        return group["logits"][:], group["labels"][:], dict(group.attrs)
    with h5py.File(path, "r") as f:
        return f["logits"][:], f["labels"][:], {k: v for k, v in f.attrs.items()}


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_killed_cache_resumes_to_the_same_store_bit_for_bit(setup, fmt, tmp_path):
    root, params = setup
    params = write_params(tmp_path / "params.yaml", **{"teacher.arch": "cnn", "teacher.epochs": 0,
                                                       "cache.chunk_samples": 64, "cache.batch_size": 32,
                                                       "cache.format": fmt, "cache.num_views": VIEWS})
    reference = tmp_path / f"reference.{fmt}"
    cache(params, root, reference)
    store = tmp_path / f"resumed.{fmt}"
    total = 1077 * VIEWS
    for kill_at in (total // 5, total // 2):  # killed twice, at different points
        cache(params, root, store, kill_at=kill_at)
        assert not store.exists() and store.with_name(store.name + ".partial").exists()
    out = cache(params, root, store)
    assert not store.with_name(store.name + ".partial").exists()
    views_computed = max(int(n) for n in re.findall(r"(\d+)/(\d+)", out)[-1])
    assert views_computed < total  # finished chunks were not computed again
    (a, a_labels, a_attrs), (b, b_labels, b_attrs) = contents(reference, fmt), contents(store, fmt)
    assert np.array_equal(a.view(np.uint16), b.view(np.uint16))  # bit for bit
    assert np.array_equal(a_labels, b_labels)
    assert {k: str(v) for k, v in a_attrs.items()} == {k: str(v) for k, v in b_attrs.items()}


def test_resuming_with_other_params_is_refused(setup, tmp_path):
    root, params = setup
    store = tmp_path / "s.zarr"
    cache(params, root, store, kill_at=400)
    other = write_params(tmp_path / "other.yaml", **{"teacher.arch": "cnn", "teacher.epochs": 0,
                                                     "cache.chunk_samples": 64, "cache.batch_size": 32,
                                                     "cache.num_views": VIEWS, "cache.seed": 3})
    result = subprocess.run([*KD, "cache", "--params", str(other), "--teacher", str(root / "teacher.pt"),
                             "--out", str(store)], env=ENV, capture_output=True, text=True)
    assert result.returncode == 1
    assert "made with other parameters" in result.stderr and "seed: 0 vs 3" in result.stderr, result.stderr


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_two_ranks_write_the_same_store_and_resume_with_any_number_of_ranks(setup, fmt, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same store bit for bit as one process; a killed 2-rank run
    resumes with 1 rank, and a killed 1-rank run with 2 ranks."""
    root, _ = setup
    params = write_params(tmp_path / "params.yaml", **{"teacher.arch": "cnn", "teacher.epochs": 0,
                                                       "cache.chunk_samples": 64, "cache.batch_size": 32,
                                                       "cache.format": fmt, "cache.num_views": VIEWS})
    reference, two = tmp_path / f"one.{fmt}", tmp_path / f"two.{fmt}"
    cache(params, root, reference)
    cache(params, root, two, ranks=2)
    first, second = contents(reference, fmt), contents(two, fmt)
    assert np.array_equal(first[0].view(np.uint16), second[0].view(np.uint16))
    assert {k: str(v) for k, v in first[2].items()} == {k: str(v) for k, v in second[2].items()}
    for kill_ranks, resume_ranks in ((2, 1), (1, 2)):
        store = tmp_path / f"resumed-{kill_ranks}-{resume_ranks}.{fmt}"
        cache(params, root, store, kill_at=600, ranks=kill_ranks)
        partial = store.with_name(store.name + ".partial")
        assert partial.exists()
        done = int(contents_done(partial, fmt).sum())
        out = cache(params, root, store, ranks=resume_ranks)
        assert done > 0 and f"Resumed an interrupted run: {done} of 17 chunks were already done" in out, out
        assert np.array_equal(contents(store, fmt)[0].view(np.uint16), first[0].view(np.uint16))
