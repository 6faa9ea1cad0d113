"""Stores on a real S3 server: moto's server mode on 127.0.0.1 (as s3fs's own tests use it), reached through the
standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), nothing of it in params files.
`kd cache --out s3://...` killed with SIGKILL resumes, `kd cache verify` checks it, `kd distill` reads it through the
chunk cache within a budget smaller than the store, `kd evaluate` reports it; its arrays equal a local store's bit
for bit and the students trained from both are identical. A second writer is refused through a lock object that S3
creates only if absent."""

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import kd_process
from conftest import write_params

pytest.importorskip("moto", reason="the S3 server for these tests: pip install -e '.[test]'")
pytest.importorskip("s3fs", reason="S3 stores need s3fs: pip install -e '.[s3]'")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "kd-cache"
VIEWS = 4  # ~4 s of teacher work: a kill lands mid-way


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 with one bucket; the environment (this process's and `env`, for commands) points
    every client at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    settings = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def made(s3, tmp_path_factory):
    """An untrained (seeded) cnn teacher, params with small chunks and a memory budget of 0 (every read through the
    chunk cache), and the same store written locally (the reference)."""
    root = tmp_path_factory.mktemp("s3")
    params = write_params(root / "params.yaml", **{
        "teacher.arch": "cnn", "teacher.epochs": 0, "cache.chunk_samples": 64, "cache.batch_size": 32,
        "cache.num_views": VIEWS, "memory_mb": 0, "distill.epochs": 1, "distill.optimizer.lr_milestones": [],
        "distill.optimizer.lr_factors": []})
    run(s3, "teacher", "--params", params, "--out", root / "teacher.pt")
    run(s3, "cache", "--params", params, "--teacher", root / "teacher.pt", "--out", root / "local.zarr")
    return root, params


def run(env, *args, check=True) -> subprocess.CompletedProcess:
    done = kd_process.run(args, env, cwd=ROOT)  # tests/kd_process.py: a real process, started quickly
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


def killed_midway(env, params, root, out) -> None:
    """Start `kd cache --out OUT`, SIGKILL it once tqdm reports a third of the views done."""
    proc = kd_process.Process(["cache", "--params", params, "--teacher", root / "teacher.pt", "--out", out], env,
                              cwd=ROOT)
    seen, third = "", 1077 * VIEWS // 3
    while char := proc.stdout.read(1):
        seen += char
        done = re.findall(r"(\d+)/\d+ \[$", seen) if char == "[" else None
        if done and int(done[-1]) >= third:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, seen[-2000:]


def arrays(url) -> dict:
    group = zarr.open_group(str(url), mode="r")
    return {name: group[name][:] for name in ("logits", "labels", "chunks_done")} | {"attrs": dict(group.attrs)}


@pytest.fixture(scope="module")
def resumed(s3, made):
    """`kd cache --out s3://...` SIGKILLed a third of the way, then the same command again: (url, its output, whether
    the killed writer's lock object was there before the second run, the chunks done then)."""
    import fsspec

    root, params = made
    url = f"s3://{BUCKET}/resumed.zarr"
    killed_midway(s3, params, root, url)
    left = fsspec.filesystem("s3").exists(f"{BUCKET}/resumed.zarr.lock")
    done = arrays(url)["chunks_done"]
    out = run(s3, "cache", "--params", params, "--teacher", root / "teacher.pt", "--out", url).stdout
    return url, out, left, done


def test_a_store_on_s3_resumes_after_sigkill_and_equals_a_local_store_bit_for_bit(s3, made, resumed):
    import fsspec

    root, params = made
    url, out, lock_left, done_when_killed = resumed
    assert lock_left and not done_when_killed.all()  # killed midway, its lock (this host, a dead pid) left behind
    assert "Resumed an interrupted run" in out
    assert not fsspec.filesystem("s3").exists(f"{BUCKET}/resumed.zarr.lock")
    local, remote = arrays(root / "local.zarr"), arrays(url)
    assert np.array_equal(local["logits"].view(np.uint16), remote["logits"].view(np.uint16))  # bit for bit
    assert np.array_equal(local["labels"], remote["labels"]) and local["attrs"] == remote["attrs"]
    verified = run(s3, "cache", "verify", url, "--params", params, "--teacher", root / "teacher.pt").stdout
    assert "entries agree" in verified


def test_students_from_the_s3_store_and_the_local_store_are_identical_and_evaluate_reads_it(s3, made, resumed):
    root, params = made
    url = resumed[0]
    for name, store in (("local", root / "local.zarr"), ("s3", url)):
        done = run(s3, "distill", "--params", params, "--teacher", root / "teacher.pt", "--cache", store, "--out",
                   root / f"student_{name}.pt")
        assert "memory_mb (0) holds 2 decoded chunks" in done.stderr  # read through the chunk cache, not whole
    a, b = (torch.load(root / f"student_{n}.pt", weights_only=True)["state_dict"] for n in ("local", "s3"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run(s3, "distill", "--params", params, "--teacher", root / "teacher.pt", "--cache", url, "--baseline", "--out",
        root / "baseline.pt")
    out = run(s3, "evaluate", "--params", params, "--teacher", root / "teacher.pt", "--student",
              root / "student_s3.pt", "--baseline", root / "baseline.pt", "--metrics", root / "metrics.json",
              "--report", root / "report.md", "--html", root / "report.html", "--confusion", root / "c.csv",
              "--figures", root / "figures").stdout
    assert f"store of {root / 'student_s3.pt'}: {url} (recorded in" in out
    assert url in (root / "report.md").read_text()


def test_a_second_writer_of_an_s3_store_is_refused_naming_the_first(s3, made):
    import fsspec

    from pipeline.store import StoreError
    from pipeline.writer import url_lock

    root, params = made
    url = f"s3://{BUCKET}/locked.zarr"
    with url_lock(url):  # held by this (live) process: a second holder is refused, here and from a command
        with pytest.raises(StoreError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            with url_lock(url):
                pass
        done = run(s3, "cache", "--params", params, "--teacher", root / "teacher.pt", "--out", url, check=False)
        assert done.returncode == 1 and "another `kd cache` is writing this store" in done.stderr
        assert f"lock object {url}.lock" in done.stderr and "cache:" not in done.stderr  # refused before any work
    fs = fsspec.filesystem("s3")
    assert not fs.exists(f"{BUCKET}/locked.zarr.lock")  # released on leaving
    fs.pipe_file(f"{BUCKET}/locked.zarr.lock", b"pid 1 on host another-host, started 2026-12-01 10:00:00 UTC")
    done = run(s3, "cache", "--params", params, "--teacher", root / "teacher.pt", "--out", url, check=False)
    assert done.returncode == 1 and "pid 1 on host another-host" in done.stderr
    assert "If that writer is gone" in done.stderr and "rm('s3://kd-cache/locked.zarr.lock')" in done.stderr


def test_a_team_shares_teacher_and_store_through_a_dvc_remote_on_s3(s3, tmp_path):
    """One member runs teacher and cache and `dvc push`es them to a DVC remote on the S3 server; a fresh clone
    `dvc pull`s them, finds both stages up to date (nothing recomputed) and runs only what follows them."""
    pytest.importorskip("dvc_s3", reason="a DVC remote on S3 needs dvc-s3: pip install -e '.[test]'")
    from test_dvc import BIN, new_project, ran, run as shell

    dvc = str(BIN / "dvc")
    first = new_project(tmp_path / "first", **{"data.train_subset": 200})
    assert ran(shell([dvc, "repro", "cache"], first)) == {"teacher", "cache"}
    shell([dvc, "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc-remote"], first)  # no endpoint, no keys in it
    assert "127.0.0.1" not in (first / ".dvc/config").read_text()
    shell([dvc, "push"], first)
    shell(["git", "add", "-A"], first)
    shell(["git", "commit", "-qm", "teacher and store, pushed"], first)

    shell(["git", "clone", "-q", str(first), str(tmp_path / "clone")], tmp_path)
    clone = tmp_path / "clone"
    shell([dvc, "pull", "--with-deps", "cache"], clone)
    assert (clone / "cache/teacher_logits.zarr/zarr.json").is_file() and (clone / "models/teacher.pt").is_file()
    assert ran(shell([dvc, "repro", "cache"], clone)) == set()  # up to date: nothing recomputed
    assert ran(shell([dvc, "repro", "distill"], clone)) == {"distill"}  # what follows runs, from the pulled store


def two_nodes(env, *args) -> list[str]:
    """`torchrun --nnodes=2` launched as two separate commands, one per node (node ranks 0 and 1, one process
    each), meeting at a c10d rendezvous on 127.0.0.1: the multi-node commands of docs/scale.md, on one machine."""
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "-m", "stages.cli", *map(str, args)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return outputs


def test_two_nodes_cache_into_one_s3_store_and_train_one_student_from_it(s3, made, tmp_path):
    root, params = made
    url = f"s3://{BUCKET}/two-nodes.zarr"
    outputs = two_nodes(s3, "cache", "--params", params, "--teacher", root / "teacher.pt", "--out", url)
    assert sum(o.count("Wrote s3://") for o in outputs) == 1
    local, remote = arrays(root / "local.zarr"), arrays(url)
    assert np.array_equal(local["logits"].view(np.uint16), remote["logits"].view(np.uint16))  # one process's, exactly
    mlp = write_params(tmp_path / "mlp.yaml", **{
        "teacher.arch": "cnn", "cache.chunk_samples": 64, "cache.batch_size": 32, "cache.num_views": VIEWS,
        "memory_mb": 0, "distill.student": "mlp", "distill.epochs": 1, "distill.batch_size": 64,
        "distill.optimizer.lr_milestones": [], "distill.optimizer.lr_factors": []})
    run(s3, "distill", "--params", mlp, "--teacher", root / "teacher.pt", "--cache", url, "--out", tmp_path / "one.pt")
    outputs = two_nodes(s3, "distill", "--params", mlp, "--teacher", root / "teacher.pt", "--cache", url, "--out",
                        tmp_path / "two.pt")
    assert sum(o.count("validation accuracy") for o in outputs) == 1  # one world of two: only its rank 0 reports
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["state_dict"] for n in ("one", "two"))
    assert a.keys() == b.keys()
    for name in a:  # DDP over the two nodes: one process's student up to floating-point order (as on one node)
        assert torch.allclose(a[name], b[name], atol=1e-5), (name, (a[name] - b[name]).abs().max())


def test_a_batch_across_chunks_of_an_s3_store_reads_what_memory_holds(s3, made, resumed):
    """Out of core, the chunks a batch needs are fetched a run of consecutive ones per read (concurrently, by
    zarr): the values equal the whole store's in memory, in any order of samples and views."""
    from pipeline.store import LogitStore

    root, params = made
    url = resumed[0]
    whole = LogitStore(root / "local.zarr")
    rng = np.random.default_rng(0)
    for budget_chunks in (3, 6):
        store = LogitStore(url, max_memory_bytes=budget_chunks * 64 * VIEWS * 10 * 2)
        assert not store.in_memory and store.chunk_capacity == budget_chunks
        for first in (0, 3, 5):  # batches over chunks first..first+3, some cached, some not
            samples = rng.integers(first * 64, (first + 4) * 64, size=256)
            views = rng.integers(VIEWS, size=256)
            assert np.array_equal(store.read(samples, views).view(np.uint16), whole.read(samples, views).view(np.uint16))
