"""The store: real zarr v3 and HDF5 files, complete or refused with a clear error."""

import h5py
import numpy as np
import pytest
import torch
import zarr

from pipeline.data import fingerprint
from pipeline.models import weights_fingerprint
from pipeline.replay import build_augment, replay_view
from pipeline.store import LogitStore, StoreError, StoreMeta, write_store
from pipeline.train import teacher_forward
from conftest import AUGMENT, TRANSFORM, make_store

FORMATS = ["zarr", "hdf5"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_store_holds_teacher_logits_of_each_replayed_view(fmt, dtype, teacher, train_subset, tmp_path):
    store = LogitStore(make_store(tmp_path / f"s.{fmt}", fmt, dtype, teacher, train_subset))
    assert store.format == fmt and store.meta.dtype == dtype
    assert (store.meta.num_samples, store.meta.num_views, store.meta.num_classes) == (96, 3, 10)
    assert store.meta.augment == AUGMENT and store.meta.seed == 7
    assert np.array_equal(store.labels, train_subset.labels.numpy())
    transform = TRANSFORM
    for i, v in [(0, 0), (5, 2), (95, 1)]:
        x = replay_view(train_subset.images[i], transform, 7, i, v)[None]
        expected = teacher_forward(teacher, x, torch.device("cpu"))[0].numpy()
        np.testing.assert_allclose(store.read(np.array([i]), np.array([v]))[0].astype(np.float32), expected,
                                   rtol=1e-3 if dtype == "float16" else 1e-5, atol=1e-3 if dtype == "float16" else 1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_read_from_disk_equals_read_from_memory(fmt, teacher, train_subset, tmp_path):
    path = make_store(tmp_path / f"s.{fmt}", fmt, "float32", teacher, train_subset)
    in_memory, on_disk = LogitStore(path), LogitStore(path, max_memory_bytes=0)
    assert in_memory.in_memory and not on_disk.in_memory
    rng = np.random.default_rng(0)
    samples, views = rng.integers(96, size=64), rng.integers(3, size=64)  # unsorted, with repeats
    assert np.array_equal(in_memory.read(samples, views), on_disk.read(samples, views))


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_is_chunked_along_samples(fmt, teacher, train_subset, tmp_path):
    path = make_store(tmp_path / f"s.{fmt}", fmt, "float16", teacher, train_subset, chunk_samples=32)
    if fmt == "zarr":
        assert zarr.open_group(str(path), mode="r")["logits"].chunks == (32, 3, 10)
    else:
        with h5py.File(path, "r") as f:
            assert f["logits"].chunks == (32, 3, 10)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="not found.*kd cache"):
        LogitStore(tmp_path / "nothing.zarr")


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupted_write_leaves_no_store(fmt, teacher, train_subset, tmp_path):
    meta = StoreMeta(96, 2, 10, [], [0.0], [1.0], 0, "float16", "cnn", "t", "d")

    def blocks():
        yield 0, np.zeros((32, 2, 10), np.float32)
        raise KeyboardInterrupt  # killed mid-way

    path = tmp_path / f"s.{fmt}"
    with pytest.raises(KeyboardInterrupt):
        write_store(path, fmt, meta, np.zeros(96, np.int64), blocks(), 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_without_complete_mark_is_refused(fmt, teacher, train_subset, tmp_path):
    path = make_store(tmp_path / f"s.{fmt}", fmt, "float16", teacher, train_subset)
    if fmt == "zarr":
        group = zarr.open_group(str(path), mode="a")
        group.attrs["complete"] = False
    else:
        with h5py.File(path, "a") as f:
            del f.attrs["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        LogitStore(path)


def test_store_missing_rows_is_never_marked_complete(tmp_path):
    meta = StoreMeta(10, 1, 10, [], [0.0], [1.0], 0, "float16", "cnn", "t", "d")
    with pytest.raises(StoreError, match="4 rows unwritten"):
        write_store(tmp_path / "s.zarr", "zarr", meta, np.zeros(10, np.int64),
                    [(0, np.zeros((6, 1, 10), np.float32))], 4)
    assert not (tmp_path / "s.zarr").exists()


def test_not_a_store_is_refused(tmp_path):
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(StoreError, match="not a logit store"):
        LogitStore(tmp_path / "x.h5")


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_from_another_teacher_or_dataset_is_refused(fmt, teacher, train_subset, tmp_path):
    store = LogitStore(make_store(tmp_path / f"s.{fmt}", fmt, "float16", teacher, train_subset))
    store.check_matches(weights_fingerprint(teacher), fingerprint(train_subset))  # the right pair passes
    other = type(teacher)(1, 10)
    with pytest.raises(StoreError, match="another teacher"):
        store.check_matches(weights_fingerprint(other), fingerprint(train_subset))
    shifted = type(train_subset)(train_subset.images.flip(0), train_subset.labels.flip(0))
    with pytest.raises(StoreError, match="another dataset"):
        store.check_matches(weights_fingerprint(teacher), fingerprint(shifted))
