"""A `kd cache` killed with SIGKILL at any moment, or dying at a chosen point of a chunk's write, resumes where
it stopped and ends bit-identical to a run that was never interrupted; chunks damaged on disk after their mark are
computed again; a second writer of the same store is refused (real subprocesses, real zarr and HDF5 files)."""

import os
import re
import signal
import socket
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

import kd_process
from conftest import write_params

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
VIEWS = 8  # ~3 s of teacher work: the kills land mid-way, not after the run ends
FAST = {"teacher.arch": "cnn", "teacher.epochs": 0, "cache.chunk_samples": 64, "cache.batch_size": 32,
        "cache.num_views": 2}  # the same 17 chunks, in a quarter of the time: these kills need no slow teacher
CHUNKS = 17


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An untrained (seeded) cnn teacher: slow enough (~8 s for the cache) to be killed mid-way. `kd teacher` with
    0 epochs only builds and saves it, so it runs in this process (no interpreter to start)."""
    from click.testing import CliRunner

    from stages.cli import kd

    root = tmp_path_factory.mktemp("resume")
    params = write_params(root / "params.yaml", **{"teacher.arch": "cnn", "teacher.epochs": 0,
                                                   "cache.chunk_samples": 64, "cache.batch_size": 32,
                                                   "cache.num_views": VIEWS})
    result = CliRunner().invoke(kd, ["teacher", "--params", str(params), "--out", str(root / "teacher.pt")])
    assert result.exit_code == 0, result.output
    return root, params


@pytest.fixture(scope="module")
def references(setup, tmp_path_factory):
    """(fmt, views) -> (params, an uninterrupted `kd cache` run's store), each made on first use and shared by the
    tests that compare with it: the kill tests with VIEWS views (for time to land mid-way), the others with 2."""
    root, _ = setup
    made = {}

    def reference(fmt, views=2):
        if (fmt, views) not in made:
            folder = tmp_path_factory.mktemp(f"reference-{fmt}-{views}")
            params = write_params(folder / "params.yaml", **{**FAST, "cache.format": fmt, "cache.num_views": views})
            cache(params, root, folder / f"reference.{fmt}")
            made[fmt, views] = params, folder / f"reference.{fmt}"
        return made[fmt, views]

    return reference


def cache(params, root, out, kill_at=None, ranks=1):
    """Run `kd cache` (under torchrun with `ranks` > 1); with `kill_at` (views done), SIGKILL it and all its
    processes once tqdm reports that many. Returns its output (stdout and stderr)."""
    proc = start(params, root, out, ranks)
    seen = read_until(proc, kill_at)
    if kill_at is not None:
        kill_tree(proc.pid)
    proc.wait()
    if kill_at is None:
        assert proc.returncode == 0, seen[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    return seen


def start(params, root, out, ranks=1) -> kd_process.Process:
    """Start `kd cache` (under torchrun, which starts each rank as `python -m stages.cli`, with `ranks` > 1), its
    stdout and stderr in one text pipe. tests/kd_process.py: a real process, forked from a preloaded fork server."""
    args = ["cache", "--params", params, "--teacher", root / "teacher.pt", "--out", out]
    if ranks == 1:
        return kd_process.Process(args, ENV, new_session=True)
    return kd_process.Process(["--standalone", f"--nproc_per_node={ranks}", "-m", "stages.cli", *args], ENV,
                              new_session=True, script="-m torch.distributed.run")


def read_until(proc, views=None) -> str:
    """Read `proc`'s output until tqdm reports `views` views done (or to its end); return what was read."""
    seen = ""
    while True:
        char = proc.stdout.read(1)
        if not char:
            return seen
        seen += char
        if views is not None and char == "[":  # tqdm: "cache:  40%|####  | 864/2154 [00:03<..."
            done = re.findall(r"(\d+)/\d+ \[$", seen)
            if done and int(done[-1]) >= views:
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
def test_killed_cache_resumes_to_the_same_store_bit_for_bit(setup, references, fmt, tmp_path):
    root, _ = setup
    params, reference = references(fmt, VIEWS)
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
    result = kd_process.run(["cache", "--params", other, "--teacher", root / "teacher.pt", "--out", store], ENV)
    assert result.returncode == 1
    assert "made with other parameters" in result.stderr and "seed: 0 vs 3" in result.stderr, result.stderr


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_two_ranks_write_the_same_store_and_resume_with_any_number_of_ranks(setup, references, fmt, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same store bit for bit as one process; a killed 2-rank run
    resumes with 1 rank, and a killed 1-rank run with 2 ranks. Between them 2 ranks write every chunk: the first
    ones in the first run, the last ones in the second; each store ends equal to one process's, logits, labels and
    attributes."""
    root, _ = setup
    params, reference = references(fmt, VIEWS)
    first = contents(reference, fmt)
    for kill_ranks, resume_ranks in ((2, 1), (1, 2)):
        store = tmp_path / f"resumed-{kill_ranks}-{resume_ranks}.{fmt}"
        cache(params, root, store, kill_at=600, ranks=kill_ranks)
        partial = store.with_name(store.name + ".partial")
        assert partial.exists()
        done = int(contents_done(partial, fmt).sum())
        out = cache(params, root, store, ranks=resume_ranks)
        assert 0 < done < 17 and f"Resumed an interrupted run: {done} of 17 chunks were already done" in out, out
        resumed = contents(store, fmt)
        assert np.array_equal(resumed[0].view(np.uint16), first[0].view(np.uint16))
        assert np.array_equal(resumed[1], first[1])
        assert {k: str(v) for k, v in resumed[2].items()} == {k: str(v) for k, v in first[2].items()}


# `kd cache`, dying (os._exit(9): no cleanup, as abrupt as SIGKILL) at a chosen point of chunk N's write: "data",
# right after its logits are written and before its mark; "mark", right after its mark. zarr puts each write in
# its file at once; h5py only at the next flush, so there the process dies right after that flush.
DIE_AT = """
import os, sys
import h5py, zarr

moment, chunk, first_row = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
reached = []


def target(name, key):
    if moment == "mark":
        return name.endswith("chunks_done") and not isinstance(key, slice) and int(key) == chunk
    return name.endswith("logits") and isinstance(key, slice) and key.start == first_row


def after(cls, method, then):
    original = getattr(cls, method)

    def patched(self, *args):
        result = original(self, *args)
        then(self, *args)
        return result

    setattr(cls, method, patched)


def zarr_written(array, key, value):
    if target(array.path, key):
        os._exit(9)


def hdf5_written(dataset, key, value):
    if target(dataset.name, key):
        reached.append(True)


def hdf5_flushed(file):
    if reached:
        os._exit(9)


after(zarr.Array, "__setitem__", zarr_written)
after(h5py.Dataset, "__setitem__", hdf5_written)
after(h5py.File, "flush", hdf5_flushed)
from stages.cli import kd

kd(sys.argv[4:])
"""


def die_at(moment: str, k: int, params, root, out) -> None:
    """Run `kd cache` until it dies at `moment` ("data" or "mark") of chunk k."""
    result = kd_process.run([moment, k, k * 64, "cache", "--params", params, "--teacher", root / "teacher.pt", "--out",
                             out], ENV, script=DIE_AT)
    assert result.returncode == 9, result.stderr[-2000:]


def chunk_on_disk(partial, fmt, k) -> bool:
    """Whether chunk k of `logits` has been written to the partial store's files."""
    if fmt == "zarr":
        return (partial / "logits" / "c" / str(k) / "0" / "0").is_file()
    with h5py.File(partial, "r") as f:
        return f["logits"].id.get_chunk_info_by_coord((k * 64, 0, 0)).byte_offset is not None


def marked_but_unreadable(partial, fmt) -> list[int]:
    """The chunks marked done whose logits do not read back (failed checksum, or fill values: never written)."""
    group = zarr.open_group(str(partial), mode="r") if fmt == "zarr" else h5py.File(partial, "r")
    try:
        bad = []
        for k in np.flatnonzero(group["chunks_done"][:]):
            try:
                if not np.isfinite(group["logits"][k * 64:(k + 1) * 64]).all():
                    bad.append(int(k))
            except (OSError, ValueError, RuntimeError):
                bad.append(int(k))
        return bad
    finally:
        if fmt == "hdf5":
            group.close()


def assert_same_store(a, b, fmt) -> None:
    (a_logits, a_labels, a_attrs), (b_logits, b_labels, b_attrs) = contents(a, fmt), contents(b, fmt)
    assert np.array_equal(a_logits.view(np.uint16), b_logits.view(np.uint16))  # bit for bit
    assert np.array_equal(a_labels, b_labels)
    assert {k: str(v) for k, v in a_attrs.items()} == {k: str(v) for k, v in b_attrs.items()}


@pytest.mark.parametrize("moment", ["data", "mark"])
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_writer_dying_between_a_chunks_data_and_its_mark_resumes_bit_for_bit(setup, references, fmt, moment,
                                                                              tmp_path):
    """Dead right after chunk 5's data (before its mark), or right after its mark: chunks 0-4 (0-5) are marked,
    every marked chunk reads back, and the same `kd cache` finishes the store without repairing anything."""
    root, _ = setup
    params, reference = references(fmt)
    store = tmp_path / f"s.{fmt}"
    partial = store.with_name(store.name + ".partial")
    die_at(moment, 5, params, root, store)
    done = contents_done(partial, fmt)
    marked = 6 if moment == "mark" else 5
    assert done.tolist() == [True] * marked + [False] * (CHUNKS - marked)
    assert marked_but_unreadable(partial, fmt) == []  # a mark never comes before its data
    assert chunk_on_disk(partial, fmt, 5)  # the write had happened: the process died between data and mark
    out = cache(params, root, store)
    assert f"Resumed an interrupted run: {marked} of {CHUNKS} chunks were already done" in out, out
    assert "recomputing" not in out, out
    assert_same_store(reference, store, fmt)


def damage(partial, fmt) -> dict[int, str]:
    """Damage chunks 1-4 of a partial store whose chunks 0-6 are marked done (as a machine crash or a bad disk
    would); return chunk -> the words `kd cache` must say about it."""
    if fmt == "hdf5":
        with h5py.File(partial, "r") as f:
            where = {k: f["logits"].id.get_chunk_info_by_coord((k * 64, 0, 0)) for k in (1, 3)}
        with open(partial, "r+b") as f:
            for info in where.values():  # one byte flipped in the middle of each chunk
                f.seek(info.byte_offset + info.size // 2)
                byte = f.read(1)[0]
                f.seek(info.byte_offset + info.size // 2)
                f.write(bytes([byte ^ 0xFF]))
        return {1: "marked done but failed its checksum", 3: "marked done but failed its checksum"}
    chunk = partial / "logits" / "c"
    flipped = bytearray((chunk / "1" / "0" / "0").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    (chunk / "1" / "0" / "0").write_bytes(bytes(flipped))
    torn = (chunk / "2" / "0" / "0").read_bytes()
    (chunk / "2" / "0" / "0").write_bytes(torn[:len(torn) // 2])
    (chunk / "3" / "0" / "0").write_bytes(b"")  # a new file whose data never reached the disk
    (chunk / "4" / "0" / "0").unlink()  # a file whose folder entry never did
    (partial / "chunks_done" / "c" / "5").write_bytes(b"\x28\xb5\x2f")  # a torn mark: zstd's magic, cut short
    return {1: "marked done but failed its checksum", 2: "marked done but failed its checksum",
            3: "marked done but failed its checksum", 4: "marked done but holds 1280 fill values",
            5: "done mark cannot be read"}


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_chunks_damaged_on_disk_after_their_mark_are_recomputed_on_resume(setup, references, fmt, tmp_path):
    root, _ = setup
    params, reference = references(fmt)
    store = tmp_path / f"s.{fmt}"
    partial = store.with_name(store.name + ".partial")
    die_at("mark", 6, params, root, store)
    said = damage(partial, fmt)
    out = cache(params, root, store)
    for k, words in said.items():
        assert re.search(rf"chunk {k}\b.*{words}.*: recomputing", out), (k, out)
    assert f"Resumed an interrupted run: {7 - len(said)} of {CHUNKS} chunks were already done" in out, out
    assert_same_store(reference, store, fmt)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_each_chunk_is_fsynced_before_its_mark_and_the_mark_after(fmt, tmp_path, monkeypatch):
    """What a machine crash can keep: a chunk's files (zarr: `logits/c/<k>/0/0` and the folders naming it; HDF5:
    the whole file) are fsynced before its `chunks_done` mark is written, and the mark is fsynced after it."""
    from pipeline.store import StoreMeta
    from pipeline.writer import StoreWriter

    events = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsync(fd), events.append(Path(os.readlink(f"/proc/self/fd/{fd}")))))
    for cls in (zarr.Array, h5py.Dataset):
        def noted(self, key, value, original=cls.__setitem__):
            original(self, key, value)
            events.append(("write", self.name.strip("/"), key))
        monkeypatch.setattr(cls, "__setitem__", noted)
    meta = StoreMeta(10, 2, 3, [], [0.0], [1.0], 0, "float16", "full", 0, 4, "off", "cnn", "t", "d")
    writer = StoreWriter(tmp_path / f"s.{fmt}", fmt, meta, np.arange(10))
    partial = tmp_path / f"s.{fmt}.partial"
    for k in range(meta.num_chunks):
        first, stop = meta.chunk_rows(k)
        events.clear()
        writer.write(k, np.full((stop - first, 2, 3), k, dtype=np.float32))
        assert events[0] == ("write", "logits", slice(first, stop, None))
        mark = events.index(("write", "chunks_done", k))
        before, after = set(events[1:mark]), set(events[mark + 1:])
        if fmt == "zarr":
            data, done = partial / "logits" / "c" / str(k) / "0", partial / "chunks_done" / "c"
            assert {data / "0", data, data.parent, data.parent.parent} <= before, events
            assert {done / str(k), done} <= after, events
        else:
            assert partial in before and partial in after, events
    writer.finish()


def test_a_second_cache_on_one_store_is_refused_at_once_and_a_killed_holder_blocks_no_one(setup, references,
                                                                                          tmp_path):
    """While one `kd cache` writes a store, a second on the same --out exits 1 at once naming the first (pid,
    host, lock file) and leaves its work alone; SIGKILLed, the first leaves its lock file, which stops no one."""
    root, _ = setup
    params, reference = references("zarr")
    store = tmp_path / "s.zarr"
    lock = tmp_path / "s.zarr.lock"
    first = start(params, root, store)
    try:
        read_until(first, 200)  # into its work, holding the lock
        os.kill(first.pid, signal.SIGSTOP)  # and it stays there, however slow the second is to start
        started = time.monotonic()
        second = kd_process.run(["cache", "--params", params, "--teacher", root / "teacher.pt", "--out", store], ENV)
        assert first.poll() is None  # the first still holds the lock: the second was refused while it did
    finally:  # never leave a stopped process behind, whatever failed
        kill_tree(first.pid)
    assert second.returncode == 1, second.stderr
    assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr, second.stderr
    assert str(lock) in second.stderr and "another `kd cache` is writing this store" in second.stderr
    assert "cache:" not in second.stderr  # refused before any work: no teacher ran
    assert time.monotonic() - started < 60
    first.wait()
    assert lock.exists()  # a dead holder's file: flock released by the kernel
    out = cache(params, root, store)
    assert "Resumed an interrupted run" in out and not lock.exists()
    assert_same_store(reference, store, "zarr")
