"""Writing a logit store (layout in `pipeline.store`): chunk by chunk under `<path>.partial`, resumable, one writer
at a time.

Chunk k is marked done in `chunks_done` only once its arrays are on disk: written, then (a local store) fsynced
together with the folders that name them, before the mark is written and fsynced in turn. So whether the writer is
killed (SIGKILL included) or the machine crashes, a chunk marked done was durable before its mark. Resuming still
reads every chunk marked done (checksums verify on decode; a fill value means the data is missing) and computes
again any that fail, saying which on stderr. Only a store whose every chunk is done is marked complete and renamed
into place; an existing store at the path is moved aside first and deleted only after the new one is in place.
At a URL (object storage has no rename) the store is written in place, the `complete` mark, written last, is the
guard, and a completed PUT is durable: there is nothing to fsync. `store_lock` keeps a second writer off a store:
an flock for a local one, a lock object created only if absent (S3's conditional write) at a URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline import topk
from pipeline.store import FLOAT16_MAX, StoreError, StoreMeta, is_url, open_zarr


def check_logits(block: np.ndarray, first_row: int, dtype: str, where) -> None:
    """Refuse NaN / infinite logits, and logits float16 cannot hold, naming the first (sample, view)."""
    bad = ~np.isfinite(block)
    if bad.any():
        i, v, _ = np.argwhere(bad)[0]
        raise StoreError(f"{where}: the teacher's logits for sample {first_row + i}, view {v} are not finite "
                         f"({block[i, v][bad[i, v]][0]}); {int(bad.any(axis=2).sum())} (sample, view) pairs in rows "
                         f"{first_row}..{first_row + len(block) - 1} are affected; check the teacher checkpoint "
                         "(NaN weights?)")
    if dtype == "float16":
        over = np.abs(block) > FLOAT16_MAX
        if over.any():
            i, v, _ = np.argwhere(over)[0]
            raise StoreError(f"{where}: logit {np.abs(block[i, v]).max():.4g} for sample {first_row + i}, view {v} "
                             f"exceeds float16's range (±{FLOAT16_MAX:g}); set cache.dtype: float32")


class StoreWriter:
    """Writes a store chunk by chunk under `<path>.partial`, resuming an interrupted one with the same metadata.

    `pending` lists the chunks still to write (on resuming, also those marked done that no longer read back);
    `write(k, logits)` writes chunk k, makes it durable, then marks it done; `finish()` marks the store complete and
    renames it into place (an existing store at `path` is replaced only by a complete one, never deleted first).
    """

    def __init__(self, path: str | Path, fmt: str, meta: StoreMeta, labels: np.ndarray):
        if fmt not in ("zarr", "hdf5"):
            raise StoreError(f"unknown store format {fmt!r}; expected zarr or hdf5")
        self.fmt, self.meta, self.url = fmt, meta, is_url(path)
        self._file = None
        if self.url:  # object storage has no rename: written in place, the `complete` mark is the guard
            if fmt != "zarr":
                raise StoreError(f"{path}: only zarr stores can live at a URL; use cache.format: zarr or a local path")
            self.path = self.tmp = str(path)
            # what to fsync: a file:// URL is a local folder; elsewhere a completed PUT is durable
            self._local = Path(self.tmp[len("file://"):]) if self.tmp.startswith("file://") else None
        else:
            self.path = Path(path)
            self.tmp = self._local = self.path.with_name(self.path.name + ".partial")
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
        if self._exists(self.tmp):
            self._resume()
        else:
            self._create(np.asarray(labels, dtype=np.int64))
        self.pending = np.flatnonzero(~np.asarray(self._done[:])).tolist()  # one read, not one per chunk

    def _create(self, labels: np.ndarray) -> None:
        meta = self.meta
        rows = max(1, min(meta.chunk_samples, meta.num_samples))
        attrs = {**meta.to_attrs(), "complete": False}
        if self.fmt == "zarr":
            group = open_zarr(self.tmp, mode="w")
            group.attrs.update(attrs)
            self._arrays = {name: group.create_array(name, shape=(meta.num_samples, meta.num_views, width),
                                                     chunks=(rows, meta.num_views, width), dtype=dtype,
                                                     fill_value=_fill(dtype),
                                                     compressors=_zarr_codecs(dtype))
                            for name, (width, dtype) in meta.arrays().items()}
            group.create_array("labels", data=labels)
            self._done = group.create_array("chunks_done", shape=(meta.num_chunks,), chunks=(1,), dtype=bool,
                                            fill_value=False)
            if self._local is not None:  # every file and folder of the new store, and its entry in its folder
                _fsync_tree(self._local)
        else:
            import h5py

            self._file = f = h5py.File(self.tmp, "w")
            f.attrs.update(attrs)
            self._arrays = {name: f.create_dataset(name, shape=(meta.num_samples, meta.num_views, width),
                                                   chunks=(rows, meta.num_views, width), dtype=dtype,
                                                   fillvalue=_fill(dtype), fletcher32=True)
                            for name, (width, dtype) in meta.arrays().items()}
            f.create_dataset("labels", data=labels)
            self._done = f.create_dataset("chunks_done", shape=(meta.num_chunks,), dtype=bool, fillvalue=False)
            self._sync([])
            fsync_path(self.tmp.parent)

    def _exists(self, where) -> bool:
        if not self.url:
            return Path(where).exists()
        try:
            open_zarr(where, mode="r")
            return True
        except FileNotFoundError:
            return False

    def _resume(self) -> None:
        try:
            attrs, get = self._open_partial()
            found = StoreMeta.from_attrs(attrs, self.tmp)
            self._arrays = {name: get(name) for name in found.arrays()}
            self._done = get("chunks_done")
        except (StoreError, KeyError, OSError, ValueError) as e:
            raise StoreError(f"{self.tmp}: an interrupted store that cannot be resumed ({e}); delete it to start "
                             "over") from None
        differences = found.differences(self.meta)
        if differences:
            self.close()
            raise StoreError(f"{self.tmp}: an interrupted store made with other parameters; refusing to mix them "
                             "in. Differences (interrupted vs now):\n  " + "\n  ".join(differences) +
                             f"\nRun with the same parameters to resume it, or delete {self.tmp} to start over")
        from pipeline import distributed

        if distributed.rank() == 0:  # under torchrun the other ranks open the partial rank 0 has just checked
            self._recheck_done()

    def _open_partial(self):
        if self.fmt == "zarr":
            group = open_zarr(self.tmp, mode="r+")
            return dict(group.attrs), group.__getitem__
        import h5py

        self._file = f = h5py.File(self.tmp, "r+")
        return dict(f.attrs), f.__getitem__

    def _recheck_done(self) -> None:
        """Read back every chunk marked done and un-mark (durably) each that fails, saying which and why on stderr,
        so that it is computed again: a machine crash can leave a mark whose data never reached the disk, or a disk
        can damage a chunk. Checksums verify on decode; a fill value (NaN logits, class index -1) is missing data."""
        try:
            done = np.asarray(self._done[:])
        except Exception:  # noqa: BLE001 -- a torn mark: read the marks one by one
            done = np.zeros(self.meta.num_chunks, dtype=bool)
            for k in range(self.meta.num_chunks):
                try:
                    done[k] = bool(self._done[k])
                except Exception as e:  # noqa: BLE001 -- whatever the damage, the chunk is computed again
                    self._unmark(k, f"chunk {k}'s done mark cannot be read ({type(e).__name__}: {str(e)[:100]})")
        for k in np.flatnonzero(done).tolist():
            reason = self._fault(k)
            if reason:
                self._unmark(k, f"chunk {k} marked done but {reason}")

    def _fault(self, k: int) -> str | None:
        """Why chunk k does not read back as written data, or None when it does."""
        first, stop = self.meta.chunk_rows(k)
        for name, array in self._arrays.items():
            try:
                values = np.asarray(array[first:stop])
            except Exception as e:  # noqa: BLE001 -- zarr, numcodecs and h5py raise various errors for damage
                return f"failed its checksum or cannot be decoded ({name}: {type(e).__name__}: {str(e)[:100]})"
            missing = ~np.isfinite(values) if values.dtype.kind == "f" else values < 0
            if missing.any():
                return (f"holds {int(missing.sum())} fill values ({name} reads as {values[missing][0]}): "
                        "its data never reached the disk")
        return None

    def _unmark(self, k: int, why: str) -> None:
        print(f"{self.tmp}: {why}: recomputing", file=sys.stderr, flush=True)
        self._done[k] = False
        self._sync(self._mark_files(k))

    @property
    def chunks_done(self) -> int:
        return int(np.asarray(self._done[:]).sum())

    def write(self, k: int, logits: np.ndarray) -> None:
        """Write chunk k (`logits`: its rows, (rows, V, C) float32), make it durable, then mark it done (durably)."""
        first, stop = self.meta.chunk_rows(k)
        expected = (stop - first, self.meta.num_views, self.meta.num_classes)
        if logits.shape != expected:
            raise StoreError(f"chunk {k} has shape {logits.shape}; expected {expected}")
        check_logits(logits, first, self.meta.dtype, self.tmp)
        encoded = topk.encode(self.meta.storage, logits, self.meta.top_k)
        for name, array in self._arrays.items():
            array[first:stop] = encoded[name].astype(array.dtype)
        self._sync(self._chunk_files(k))  # the data is on disk before the mark says so
        self._done[k] = True
        self._sync(self._mark_files(k))

    def _chunk_files(self, k: int) -> list[Path]:
        """The files holding chunk k of every array of a local zarr store (none for HDF5 and object storage)."""
        if self.fmt != "zarr" or self._local is None:
            return []
        return [self._local / name / array.metadata.encode_chunk_key((k,) + (0,) * (array.ndim - 1))
                for name, array in self._arrays.items()]

    def _mark_files(self, k: int) -> list[Path]:
        if self.fmt != "zarr" or self._local is None:
            return []
        return [self._local / "chunks_done" / self._done.metadata.encode_chunk_key((k,))]

    def _sync(self, files: list[Path]) -> None:
        """Make what was written durable: HDF5, flush the file and fsync it; a local zarr store, fsync `files` and
        every folder from theirs up to their array's (new chunks add entries to each); at a URL, nothing."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.id.get_vfd_handle())
            return
        folders = set()
        for file in files:
            fsync_path(file)
            folder = file.parent
            while folder != self._local:
                folders.add(folder)
                folder = folder.parent
        for folder in sorted(folders, key=lambda p: -len(p.parts)):  # deepest first
            fsync_path(folder)

    def finish(self) -> None:
        """Mark complete (every chunk must be done) and rename into place, replacing `path` atomically enough:
        an existing store is moved aside first and deleted only after the new one is in place."""
        done = np.asarray(self._done[:])
        if not done.all():
            missing = np.flatnonzero(~done)
            raise StoreError(f"{self.tmp}: {len(missing)} of {len(done)} chunks not written "
                             f"(first missing: chunk {missing[0]}); run `kd cache` again to finish it")
        if self.fmt == "zarr":
            open_zarr(self.tmp, mode="r+").attrs["complete"] = True
            if self._local is not None:  # zarr.json is replaced by a rename: the file and its folder
                fsync_path(self._local / "zarr.json")
                fsync_path(self._local)
        else:
            self._file.attrs["complete"] = True
            self._sync([])
        self.close()
        if self.url:
            return
        old = self.path.with_name(self.path.name + ".old")
        _remove(old)
        if self.path.exists():
            self.path.rename(old)
        self.tmp.rename(self.path)
        fsync_path(self.path.parent)  # the renames
        _remove(old)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_store(path: str | Path, fmt: str, meta: StoreMeta, labels: np.ndarray,
                chunks: Iterable[tuple[int, np.ndarray]]) -> None:
    """Write (or finish) the store at `path` from `(chunk index, logits of its rows)` pairs, then mark it complete.

    An error leaves `<path>.partial` with the chunks written so far, to resume from; `path` is left as it was.
    """
    writer = StoreWriter(path, fmt, meta, labels)
    try:
        for k, logits in chunks:
            writer.write(k, logits)
        writer.finish()
    finally:
        writer.close()


@contextlib.contextmanager
def store_lock(path: str | Path):
    """Hold `<path>.lock`, beside the store, for the block: a second writer of the same store is refused at once,
    naming the holder (pid, host, start time: the lock's text). A local store: an flock, so a holder that dies however
    it dies (SIGKILL included) releases it; the file is removed on leaving. A URL store: `url_lock`."""
    if is_url(path) and not str(path).startswith("file://"):
        with url_lock(str(path)):
            yield
        return
    path = Path(str(path).removeprefix("file://"))
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1000).decode(errors="replace").strip() or "a process that has not written its name yet"
            os.close(fd)
            raise StoreError(f"{path}: another `kd cache` is writing this store: {holder} (lock file {lock}); wait "
                             "for it to end or stop it, then run this command again") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder we waited on removed this file as we opened it: lock the one at the path now
    os.ftruncate(fd, 0)
    os.write(fd, f"{_holder()}\n".encode())
    try:
        yield
    finally:
        os.unlink(lock)  # before unlocking: who opens the path next gets a new file, never this unlocked one
        os.close(fd)


def _holder() -> str:
    return (f"pid {os.getpid()} on host {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")


@contextlib.contextmanager
def url_lock(url: str):
    """Hold the object `<url>.lock` for the block, created only if absent: S3's conditional write (PUT with
    `If-None-Match: *`, fsspec's `mode="create"`), which AWS S3, MinIO and other S3-compatible servers decide
    atomically, so of two writers starting together exactly one gets it. The other is refused, naming the holder
    (pid, host, start time: the object's text). The object is deleted on leaving.

    Limits: an object store cannot tell that a holder died. A lock left by a writer killed on this host (its pid no
    longer runs) is taken over, so the same command resumes after a SIGKILL; one left by another host is refused
    with the command that deletes it, to run once that writer is known to be gone. A file system that cannot create
    conditionally (fsspec's in-memory one: one process only) writes without a lock, saying so."""
    import fsspec

    lock = f"{url}.lock"
    fs, where = fsspec.core.url_to_fs(lock)
    for attempt in range(2):
        try:
            fs.pipe_file(where, _holder().encode(), mode="create")
            break
        except FileExistsError:
            holder = fs.cat_file(where).decode(errors="replace").strip()
            if attempt == 0 and _dead_here(holder):
                fs.rm_file(where)  # our own host's writer, killed: take its place (a race is settled by create)
                continue
            raise StoreError(f"{url}: another `kd cache` is writing this store: {holder} (lock object {lock}); wait "
                             "for it to end or stop it, then run this command again. If that writer is gone (a crashed "
                             f"host leaves its lock behind), delete the lock: python -c \"import fsspec; "
                             f"fsspec.open('{lock}').fs.rm('{lock}')\"") from None
        except (NotImplementedError, TypeError, ValueError):  # no conditional create on this file system
            print(f"note: {url}: this file system cannot create an object only if absent, so no lock keeps a second "
                  "`kd cache` off this store", file=sys.stderr)
            yield
            return
    try:
        yield
    finally:
        fs.rm_file(where)


def _dead_here(holder: str) -> bool:
    """True when a lock's text names a process of this host that no longer runs."""
    words = holder.split()
    if len(words) < 5 or words[0] != "pid" or words[4].rstrip(",") != socket.gethostname():
        return False
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def fsync_path(path: Path) -> None:
    """fsync a file or folder (a chunk zarr did not write, being all fill values, is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, `root` itself and its parent folder."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))
    fsync_path(root.parent)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _fill(dtype: str):
    """The fill value of never-written chunks: NaN for logits, -1 for class indices (both refused on read)."""
    return np.nan if np.dtype(dtype).kind == "f" else -1


def _zarr_codecs(dtype: str) -> list:
    """A zarr array's codecs: always a crc32c checksum; zstd only for integer arrays (top-K class indices shrink to
    ~0.3x). Logits hardly compress (float16 logits of real teachers to 0.88-0.93x), and zstd makes each chunk 3.2x
    slower to decode, which a store read from disk pays every epoch (`python bench/zarr_codecs.py`)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [Crc32cCodec()] if np.dtype(dtype).kind == "f" else [ZstdCodec(level=1), Crc32cCodec()]
