"""Writing a logit store (layout in `pipeline.store`): chunk by chunk under `<path>.partial`, resumable.

Each chunk is marked done in `chunks_done` only after its arrays are written and flushed, so a writer killed
at any moment (SIGKILL included) resumes where it stopped, with the same metadata only. Only a store whose
every chunk is done is marked complete and renamed into place; an existing store at the path is moved aside
first and deleted only after the new one is in place. At a URL (object storage has no rename) the store is
written in place and the `complete` mark, written last, is the guard.
"""

from __future__ import annotations

import shutil
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

    `pending` lists the chunks still to write; `write(k, logits)` writes chunk k and marks it done after
    flushing; `finish()` marks the store complete and renames it into place (an existing store at `path` is
    replaced only by a complete one, never deleted first).
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
        else:
            self.path = Path(path)
            self.tmp = self.path.with_name(self.path.name + ".partial")
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
            f.flush()

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

    def _open_partial(self):
        if self.fmt == "zarr":
            group = open_zarr(self.tmp, mode="r+")
            return dict(group.attrs), group.__getitem__
        import h5py

        self._file = f = h5py.File(self.tmp, "r+")
        return dict(f.attrs), f.__getitem__

    @property
    def chunks_done(self) -> int:
        return int(np.asarray(self._done[:]).sum())

    def write(self, k: int, logits: np.ndarray) -> None:
        """Write chunk k (`logits`: its rows, (rows, V, C) float32), flush, then mark it done."""
        first, stop = self.meta.chunk_rows(k)
        expected = (stop - first, self.meta.num_views, self.meta.num_classes)
        if logits.shape != expected:
            raise StoreError(f"chunk {k} has shape {logits.shape}; expected {expected}")
        check_logits(logits, first, self.meta.dtype, self.tmp)
        encoded = topk.encode(self.meta.storage, logits, self.meta.top_k)
        for name, array in self._arrays.items():
            array[first:stop] = encoded[name].astype(array.dtype)
        self._flush()
        self._done[k] = True
        self._flush()

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()

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
        else:
            self._file.attrs["complete"] = True
        self.close()
        if self.url:
            return
        old = self.path.with_name(self.path.name + ".old")
        _remove(old)
        if self.path.exists():
            self.path.rename(old)
        self.tmp.rename(self.path)
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
