"""The logit store: one zarr (v3) group or one HDF5 file holding a teacher's raw logits per view.

Layout (the same names in both formats):
  logits       (num_samples, num_views, num_classes)  float16 | float32, chunked (chunk_samples, V, C),
               each chunk with a checksum (zarr: crc32c codec; HDF5: fletcher32 filter), fill value NaN
  labels       (num_samples,)                          int64
  chunks_done  (num_chunks,)                           bool: chunk k's logits are written and durable
  attributes: format_version, num_samples, num_views, num_classes, augment (JSON text),
              mean, std (input normalization), seed, dtype, chunk_samples, amp, replay, teacher_arch,
              teacher_fingerprint, dataset_fingerprint, mix (JSON text), and `complete: true`, written last.

Writing (chunk by chunk, resumable) is `pipeline.writer`; this module owns the layout and the reader.

Row i, view v holds the teacher's logits (before temperature) for `replay_view(train image i, ...,
seed, i, v)`. A store is written under `<path>.partial`, chunk by chunk; each chunk is marked done
only after its data is written and made durable (fsynced), so a killed writer resumes where it stopped (same
parameters only). Only a store whose every chunk is done gets `complete` and is renamed into place.
Readers never pass a fill value off as a logit: a missing chunk reads as NaN, and NaN or infinite
logits are refused, as is a chunk whose checksum fails.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline import KDError, topk
from pipeline import h5raw, zarrraw

FORMAT_VERSION = 7  # 2: mean, std; 3: checksums, NaN fill, chunks_done, chunk_samples; 4: amp; 5: storage, top_k;
# 6: replay; 7: mix (older stores read as mix none: they hold unmixed views)
FLOAT16_MAX = 65504.0
RAW_HDF5 = True  # read an HDF5 store's chunks raw where its layout allows (pipeline.h5raw); False: through h5py
RAW_ZARR = True  # read a local zarr store's chunks raw where its layout allows (pipeline.zarrraw); False: through zarr


class StoreError(KDError):
    """The store is missing, incomplete, malformed, or made from another teacher or dataset."""


@dataclass(frozen=True)
class StoreMeta:
    num_samples: int
    num_views: int
    num_classes: int
    augment: list  # the augmentation spec, as in params.yaml
    mean: list  # per-channel normalization applied after the augmentation
    std: list
    seed: int
    dtype: str
    storage: str  # full | topk (pipeline.topk)
    top_k: int  # logits kept per view when storage is topk (0 for full)
    chunk_samples: int
    amp: str  # the teacher's autocast precision: off | float16 | bfloat16
    teacher_arch: str
    teacher_fingerprint: str
    dataset_fingerprint: str
    replay: str = "cpu"  # the device whose arithmetic made the views (`pipeline.replay.replay_device`)
    mix: dict = field(default_factory=lambda: {"mode": "none"})  # MixUp/CutMix of the views (`pipeline.mix`)
    format_version: int = FORMAT_VERSION

    def to_attrs(self) -> dict:
        attrs = asdict(self)
        attrs["augment"] = json.dumps(self.augment)
        attrs["mix"] = json.dumps(self.mix)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict, path: Path) -> "StoreMeta":
        names = [f for f in cls.__dataclass_fields__]
        attrs = {"mix": json.dumps({"mode": "none"}), **attrs}  # format < 7: views were never mixed
        missing = [n for n in names if n not in attrs]
        if missing:
            raise StoreError(f"{path}: store metadata lacks {', '.join(missing)}; rebuild it with `kd cache`")
        values = {n: attrs[n] for n in names}
        values["augment"] = json.loads(values["augment"])
        values["mix"] = json.loads(values["mix"])
        values["mean"] = [float(m) for m in values["mean"]]
        values["std"] = [float(m) for m in values["std"]]
        for n in ("num_samples", "num_views", "num_classes", "seed", "top_k", "chunk_samples", "format_version"):
            values[n] = int(values[n])
        for n in ("dtype", "storage", "amp", "replay", "teacher_arch", "teacher_fingerprint", "dataset_fingerprint"):
            values[n] = str(values[n])
        return cls(**values)


    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_samples)

    def arrays(self) -> dict[str, tuple[int, str]]:
        """The per-(sample, view) arrays of this store: name -> (width, dtype)."""
        return {name: (width, dtype or self.dtype)
                for name, (width, dtype) in topk.fields(self.storage, self.num_classes, self.top_k).items()}

    def chunk_rows(self, k: int) -> tuple[int, int]:
        """First row and one past the last row of chunk k."""
        return k * self.chunk_samples, min(self.num_samples, (k + 1) * self.chunk_samples)

    def differences(self, other: "StoreMeta") -> list[str]:
        """`field: <self's value> vs <other's>` for every field that differs."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {_short(mine[k])} vs {_short(theirs[k])}" for k in mine if mine[k] != theirs[k]]


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


class LogitStore:
    """A validated, read-only store. `read(samples, views)` gathers a batch in one sorted read.

    When the logits fit in `max_memory_bytes` they are loaded into memory once on open (and checked
    whole). Every read refuses NaN or infinite values (a missing chunk reads as NaN) and chunks whose
    checksum fails, naming the store and the rows.
    """

    def __init__(self, path: str | Path, max_memory_bytes: int = 4 << 30):
        if is_url(path):
            self.path = path
            try:
                group = open_zarr(path, mode="r")
            except FileNotFoundError:
                raise StoreError(f"{path}: logit store not found; run `kd cache --out {path}` first") from None
            self._open(dict(group.attrs), "zarr", group.__getitem__, max_memory_bytes)
            return
        self.path = path = Path(path)
        if not path.exists():
            hint = ""
            if path.with_name(path.name + ".old").exists():
                hint = f" ({path.name}.old is the store it was replacing when that was interrupted)"
            if path.with_name(path.name + ".partial").exists():
                hint = f" ({path.name}.partial is an interrupted `kd cache`: run the same command again to finish it)"
            raise StoreError(f"{path}: logit store not found{hint}; run `kd cache` (or `dvc repro cache`) first")
        if path.is_dir() and (path / "zarr.json").is_file():
            import zarr

            group = zarr.open_group(str(path), mode="r")
            attrs, self.format = dict(group.attrs), "zarr"
            get = group.__getitem__
        elif path.is_file() and _is_hdf5(path):
            import h5py

            try:
                self._file = h5py.File(path, "r")
            except OSError as e:
                raise StoreError(f"{path}: HDF5 file cannot be opened ({e}); it is truncated or damaged: rebuild it "
                                 "with `kd cache`") from None
            attrs, self.format = dict(self._file.attrs), "hdf5"
            get = self._file.__getitem__
        else:
            raise StoreError(f"{path}: not a logit store (expected a zarr v3 group or an HDF5 file)")
        self._open(attrs, self.format, get, max_memory_bytes)

    def _open(self, attrs: dict, fmt: str, get, max_memory_bytes: int) -> None:
        path, self.format = self.path, fmt
        version = int(attrs.get("format_version", -1))
        if version not in (6, FORMAT_VERSION):  # 6 differs only in lacking `mix` (its views are unmixed)
            raise StoreError(f"{path}: store format_version is {version}, this code reads 6 and {FORMAT_VERSION}; "
                             "rebuild it with `kd cache`")
        if not attrs.get("complete", False):
            try:
                done = np.asarray(get("chunks_done")[:])
                progress = f"{int(done.sum())} of {len(done)} chunks written"
            except Exception:  # noqa: BLE001 -- only for the message
                progress = "progress unknown"
            raise StoreError(f"{path}: store is incomplete ({progress}; no `complete` mark: its writer was "
                             "interrupted); run the `kd cache` command that made it again to finish it")
        self.meta = meta = StoreMeta.from_attrs(attrs, path)
        try:
            arrays, labels = {name: get(name) for name in meta.arrays()}, get("labels")
        except KeyError as e:
            raise StoreError(f"{path}: store lacks array {e}; rebuild it with `kd cache`") from None
        for name, array in arrays.items():
            expected = (meta.num_samples, meta.num_views, meta.arrays()[name][0])
            if tuple(array.shape) != expected or tuple(labels.shape) != (meta.num_samples,):
                raise StoreError(f"{path}: {name} shape {tuple(array.shape)} / labels shape {tuple(labels.shape)} "
                                 f"disagree with the metadata {expected}")
        self.labels = np.asarray(self._guarded(lambda: labels[:], "labels"))
        nbytes = sum(meta.num_samples * meta.num_views * width * np.dtype(dtype).itemsize
                     for width, dtype in meta.arrays().values())
        self.in_memory = nbytes <= max_memory_bytes
        self.max_memory_bytes = max_memory_bytes
        self._arrays = arrays
        chunk_bytes = nbytes / max(1, meta.num_chunks)
        self._chunks: OrderedDict[int, dict] = OrderedDict()  # decoded chunks, least recently used first
        self.chunk_capacity = max(2, int(max_memory_bytes // max(1.0, chunk_bytes)))  # decoded chunks kept
        self._raw = None  # a local store's chunks read raw, past h5py's and zarr's Python (h5raw, zarrraw)
        if self.in_memory:
            self._arrays = {name: np.asarray(self._guarded(lambda a=a: a[:], f"all rows of {name}"))
                            for name, a in arrays.items()}
            self._check_finite(self._arrays, np.arange(meta.num_samples))
        elif (fmt == "hdf5" and RAW_HDF5) or (fmt == "zarr" and RAW_ZARR and not is_url(path)):
            reader = h5raw.RawChunks if fmt == "hdf5" else zarrraw.RawChunks
            raw = {name: reader.of(path, a) for name, a in arrays.items()}
            if all(r is not None and r.rows == meta.chunk_samples for r in raw.values()):
                self._raw = raw

    def _guarded(self, read, rows: str):
        """Run `read()`, turning a failed checksum, truncated chunk or I/O error into a StoreError."""
        try:
            return read()
        except (OSError, RuntimeError, ValueError) as e:
            raise StoreError(f"{self.path}: cannot read {rows}: a chunk is corrupt or truncated "
                             f"({type(e).__name__}: {str(e)[:200]}); rebuild the store with `kd cache` "
                             "(`kd cache verify` checks every chunk)") from None

    def _check_finite(self, arrays: dict[str, np.ndarray], samples: np.ndarray) -> None:
        """Refuse NaN/inf (a missing float chunk reads as NaN) and negative class indices (a missing index chunk)."""
        for name, values in arrays.items():
            bad = ~np.isfinite(values) if values.dtype.kind == "f" else values < 0
            if bad.any():
                where = np.argwhere(bad)[0]
                raise StoreError(f"{self.path}: logits of sample {int(samples[where[0]])} are not finite "
                                 f"({name} holds {values[tuple(where)]}): a chunk is missing (it reads as a fill "
                                 "value) or the store holds NaN/inf; rebuild it with `kd cache`")

    def read(self, samples: np.ndarray, views: np.ndarray, temperature: float = 1.0,
             tail: str = "summary") -> np.ndarray:
        """Teacher logits (B, C) for pairs (samples[b], views[b]), one sorted read per batch: the stored logits
        (in the store's dtype), or for a top-K store the logits `pipeline.topk.decode` rebuilds for `temperature`
        with `tail`."""
        samples, views = np.asarray(samples), np.asarray(views)
        if self.in_memory:
            stored = {name: a[samples, views] for name, a in self._arrays.items()}
        else:
            stored = self._read_through_chunks(samples, views)
            self._check_finite(stored, samples)
        return topk.decode(self.meta.storage, stored, temperature, self.meta.num_classes, tail)

    def _read_through_chunks(self, samples: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """Gather from whole decoded chunks, kept in an LRU cache within the memory budget: with the windowed
        sampler (`distill.shuffle_chunks`) every chunk is decoded about once per epoch. A batch's rows are
        gathered chunk by chunk, grouped by one stable argsort (not a mask per chunk: `distill_ooc.py --reads`)."""
        size = self.meta.chunk_samples
        out = {name: np.empty((len(samples), a.shape[2]), dtype=a.dtype) for name, a in self._arrays.items()}
        if not len(samples):
            return out
        chunk_of = samples // size
        low = int(chunk_of.min())
        present = np.zeros(int(chunk_of.max()) - low + 1, bool)  # a window's few chunks (np.unique sorts: slower)
        present[chunk_of - low] = True
        chunks, which = np.flatnonzero(present) + low, (np.cumsum(present) - 1)[chunk_of - low]
        self._load([int(k) for k in chunks if k not in self._chunks])
        if len(chunks) == 1:
            block = self._chunk(int(chunks[0]))
            return {name: values[samples - chunks[0] * size, views] for name, values in block.items()}
        order, ends = np.argsort(which, kind="stable"), np.cumsum(np.bincount(which)).tolist()
        for k, start, end in zip(chunks.tolist(), [0] + ends[:-1], ends):  # the batch's rows chunk by chunk
            block, at = self._chunk(k), order[start:end]
            rows, cols = samples[at] - k * size, views[at]
            for name in out:
                out[name][at] = block[name][rows, cols]
        return out

    def _load(self, missing: list[int]) -> None:
        """Decode the chunks `missing` (sorted) into the cache, each run of consecutive chunks (at most the cache's
        capacity) in one read: zarr fetches the chunks of one read concurrently, so a batch that needs a window of
        chunks from object storage waits for about one request's latency, not one per chunk. The values are those
        chunk by chunk reads give (the same decoded chunks, split at their boundaries)."""
        if self._raw is not None:  # a local file: a read per chunk costs no more than one per run
            for k in missing:
                self._keep(k, self._decode(k))
            return
        runs, capacity = [], max(1, self.chunk_capacity - 1)
        for k in missing:
            if runs and k == runs[-1][-1] + 1 and len(runs[-1]) < capacity:
                runs[-1].append(k)
            else:
                runs.append([k])
        for run in (r for r in runs if len(r) > 1):
            first, stop = self.meta.chunk_rows(run[0])[0], self.meta.chunk_rows(run[-1])[1]
            where = f"chunks {run[0]}..{run[-1]} (rows {first}..{stop - 1})"
            blocks = {name: np.asarray(self._guarded(lambda a=a: a[first:stop], where))
                      for name, a in self._arrays.items()}
            for k in run:
                start, end = (row - first for row in self.meta.chunk_rows(k))
                self._keep(k, {name: block[start:end].copy() for name, block in blocks.items()})  # own memory

    def _keep(self, k: int, block: dict[str, np.ndarray]) -> None:
        self._chunks[k] = block
        while len(self._chunks) > self.chunk_capacity:
            self._chunks.popitem(last=False)

    def _chunk(self, k: int) -> dict[str, np.ndarray]:
        if k in self._chunks:
            self._chunks.move_to_end(k)
            return self._chunks[k]
        block = self._decode(k)
        self._keep(k, block)
        return block

    def _decode(self, k: int) -> dict[str, np.ndarray]:
        """Chunk k of every array, its checksum verified: read raw where it can be, else through zarr or h5py."""
        first, stop = self.meta.chunk_rows(k)
        where = f"chunk {k} (rows {first}..{stop - 1})"
        block = {}
        for name, a in self._arrays.items():
            raw = None if self._raw is None else self._guarded(lambda r=self._raw[name]: r.read(first), where)
            block[name] = raw if raw is not None else np.asarray(self._guarded(lambda a=a: a[first:stop], where))
        return block

    def verify_chunks(self) -> int:
        """Read every chunk (checksums are verified on decode) and check its values; return the chunk count."""
        for k in range(self.meta.num_chunks):
            first, stop = self.meta.chunk_rows(k)
            self._check_finite(self._decode(k), np.arange(first, stop))
        return self.meta.num_chunks

    def check_run(self, **expected) -> None:
        """Raise StoreError naming each field (of StoreMeta) where the store differs from this run's value."""
        mine = asdict(self.meta)
        differences = [f"{k}: store {_short(mine[k])}, this run {_short(v)}" for k, v in expected.items()
                       if mine[k] != v]
        if differences:
            raise StoreError(f"{self.path}: the store does not belong to this run; differing fields:\n  " +
                             "\n  ".join(differences) + "\nRebuild it with `kd cache` (or `dvc repro cache`), or "
                             "run with the params, teacher and data that made it")


def open_zarr(where, mode: str):
    """zarr.open_group for a local path or a URL (fsspec's local file system is told to make its folders)."""
    import zarr

    options = {"storage_options": {"auto_mkdir": True}} if str(where).startswith("file://") else {}
    return zarr.open_group(str(where), mode=mode, **options)


def is_url(path) -> bool:
    """A store location zarr opens through fsspec (s3://, gs://, memory://, file://, ...), not a local path."""
    return "://" in str(path)


def _is_hdf5(path: Path) -> bool:
    import h5py

    return h5py.is_hdf5(path)
