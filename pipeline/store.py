"""The logit store: one zarr (v3) group or one HDF5 file holding a teacher's raw logits per view.

Layout (the same names in both formats):
  logits  (num_samples, num_views, num_classes)  float16 | float32, chunked (chunk_samples, V, C)
  labels  (num_samples,)                          int64
  attributes: format_version, num_samples, num_views, num_classes, augment (JSON text),
              mean, std (input normalization), seed, dtype, teacher_arch, teacher_fingerprint, dataset_fingerprint,
              and `complete: true`, written last.

Row i, view v holds the teacher's logits (before temperature) for `replay_view(train image i, ...,
seed, i, v)`. A store is written under `<path>.partial` and renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline import KDError

FORMAT_VERSION = 2  # 2: adds mean and std (the input normalization)


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
    teacher_arch: str
    teacher_fingerprint: str
    dataset_fingerprint: str
    format_version: int = FORMAT_VERSION

    def to_attrs(self) -> dict:
        attrs = asdict(self)
        attrs["augment"] = json.dumps(self.augment)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict, path: Path) -> "StoreMeta":
        names = [f for f in cls.__dataclass_fields__]
        missing = [n for n in names if n not in attrs]
        if missing:
            raise StoreError(f"{path}: store metadata lacks {', '.join(missing)}; rebuild it with `kd cache`")
        values = {n: attrs[n] for n in names}
        values["augment"] = json.loads(values["augment"])
        values["mean"] = [float(m) for m in values["mean"]]
        values["std"] = [float(m) for m in values["std"]]
        for n in ("num_samples", "num_views", "num_classes", "seed", "format_version"):
            values[n] = int(values[n])
        for n in ("dtype", "teacher_arch", "teacher_fingerprint", "dataset_fingerprint"):
            values[n] = str(values[n])
        return cls(**values)


def write_store(path: str | Path, fmt: str, meta: StoreMeta, labels: np.ndarray,
                blocks: Iterable[tuple[int, np.ndarray]], chunk_samples: int) -> None:
    """Write a complete store at `path` from `blocks` of `(first_row, logits[rows, V, C])`.

    The blocks must cover every row. Written to `<path>.partial`, marked complete, then renamed;
    on any error the partial store is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    _remove(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shape = (meta.num_samples, meta.num_views, meta.num_classes)
    chunks = (max(1, min(chunk_samples, meta.num_samples)), meta.num_views, meta.num_classes)
    written = np.zeros(meta.num_samples, dtype=bool)
    try:
        if fmt == "zarr":
            import zarr

            group = zarr.open_group(str(tmp), mode="w")
            logits = group.create_array("logits", shape=shape, chunks=chunks, dtype=meta.dtype)
            group.create_array("labels", data=np.asarray(labels, dtype=np.int64))
            _fill(logits, blocks, written)
            group.attrs.update(meta.to_attrs())
            group.attrs["complete"] = True  # last: marks the store as finished
        elif fmt == "hdf5":
            import h5py

            with h5py.File(tmp, "w") as f:
                logits = f.create_dataset("logits", shape=shape, chunks=chunks, dtype=meta.dtype)
                f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
                _fill(logits, blocks, written)
                f.attrs.update(meta.to_attrs())
                f.attrs["complete"] = True
        else:
            raise StoreError(f"unknown store format {fmt!r}; expected zarr or hdf5")
        _remove(path)
        tmp.rename(path)
    except BaseException:
        _remove(tmp)
        raise


def _fill(array, blocks: Iterable[tuple[int, np.ndarray]], written: np.ndarray) -> None:
    for start, block in blocks:
        array[start:start + len(block)] = block.astype(array.dtype, copy=False)
        written[start:start + len(block)] = True
    if not written.all():
        raise StoreError(f"store blocks left {int((~written).sum())} rows unwritten")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class LogitStore:
    """A validated, read-only store. `read(samples, views)` gathers a batch in one sorted read.

    When the logits fit in `max_memory_bytes` they are loaded into memory once on open.
    """

    def __init__(self, path: str | Path, max_memory_bytes: int = 4 << 30):
        self.path = path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: logit store not found; run `kd cache` (or `dvc repro cache`) first")
        if path.is_dir() and (path / "zarr.json").is_file():
            import zarr

            group = zarr.open_group(str(path), mode="r")
            attrs, self.format = dict(group.attrs), "zarr"
            get = group.__getitem__
        elif path.is_file() and _is_hdf5(path):
            import h5py

            self._file = h5py.File(path, "r")
            attrs, self.format = dict(self._file.attrs), "hdf5"
            get = self._file.__getitem__
        else:
            raise StoreError(f"{path}: not a logit store (expected a zarr v3 group or an HDF5 file)")
        if not attrs.get("complete", False):
            raise StoreError(f"{path}: store is incomplete (no `complete` mark: its writer was interrupted); "
                             "delete it and run `kd cache` again")
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise StoreError(f"{path}: store format_version is {version}, this code reads {FORMAT_VERSION}; "
                             "rebuild it with `kd cache`")
        self.meta = meta = StoreMeta.from_attrs(attrs, path)
        try:
            logits, labels = get("logits"), get("labels")
        except KeyError as e:
            raise StoreError(f"{path}: store lacks array {e}; rebuild it with `kd cache`") from None
        expected = (meta.num_samples, meta.num_views, meta.num_classes)
        if tuple(logits.shape) != expected or tuple(labels.shape) != (meta.num_samples,):
            raise StoreError(f"{path}: logits shape {tuple(logits.shape)} / labels shape {tuple(labels.shape)} "
                             f"disagree with the metadata {expected}")
        self.labels = np.asarray(labels[:])
        nbytes = int(np.prod(expected)) * np.dtype(meta.dtype).itemsize
        self.in_memory = nbytes <= max_memory_bytes
        self._logits = np.asarray(logits[:]) if self.in_memory else logits

    def read(self, samples: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Logits (B, C) in the store's dtype for pairs (samples[b], views[b]); one sorted read per batch."""
        samples, views = np.asarray(samples), np.asarray(views)
        if self.in_memory:
            return self._logits[samples, views]
        unique, inverse = np.unique(samples, return_inverse=True)  # sorted: one pass over the chunks
        rows = self._logits.oindex[unique] if self.format == "zarr" else self._logits[unique]
        return rows[inverse, views]

    def check_matches(self, teacher_fingerprint: str, dataset_fingerprint: str) -> None:
        """Raise StoreError unless the store was made by this teacher from this dataset."""
        if self.meta.dataset_fingerprint != dataset_fingerprint:
            raise StoreError(f"{self.path}: store was made from another dataset or split "
                             f"(fingerprint {self.meta.dataset_fingerprint[:12]}..., current "
                             f"{dataset_fingerprint[:12]}...); rebuild it with `kd cache`")
        if self.meta.teacher_fingerprint != teacher_fingerprint:
            raise StoreError(f"{self.path}: store was made by another teacher (weights fingerprint "
                             f"{self.meta.teacher_fingerprint[:12]}..., given teacher {teacher_fingerprint[:12]}...); "
                             "rebuild it with `kd cache` or pass the teacher that made it")


def _is_hdf5(path: Path) -> bool:
    import h5py

    return h5py.is_hdf5(path)
