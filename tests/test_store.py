"""The store: real zarr v3 and HDF5 files, complete or refused with a clear error."""

import h5py
import numpy as np
import pytest
import torch
import zarr

from pipeline.data import fingerprint
from pipeline.models import weights_fingerprint
from pipeline.replay import replay_view
from pipeline import h5raw, store as store_module, zarrraw
from pipeline.h5raw import RawChunks, fletcher32
from pipeline.store import LogitStore, StoreError, StoreMeta
from pipeline.writer import StoreWriter, write_store
from pipeline.cache import teacher_forward
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


def meta(num_samples=96, chunk_samples=32, dtype="float16", **changes) -> StoreMeta:
    fields = dict(num_samples=num_samples, num_views=2, num_classes=10, augment=[], mean=[0.0], std=[1.0], seed=0,
                  dtype=dtype, storage="full", top_k=0, chunk_samples=chunk_samples, amp="off", teacher_arch="cnn",
                  teacher_fingerprint="t", dataset_fingerprint="d")
    return StoreMeta(**{**fields, **changes})


def logits(rows, seed=0):
    return np.random.default_rng(seed).normal(0, 3, (rows, 2, 10)).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupted_write_keeps_its_progress_and_resumes(fmt, tmp_path):
    path = tmp_path / f"s.{fmt}"

    def chunks():
        yield 0, logits(32)
        raise KeyboardInterrupt  # killed mid-way

    with pytest.raises(KeyboardInterrupt):
        write_store(path, fmt, meta(), np.zeros(96, np.int64), chunks())
    assert not path.exists()  # nothing that looks finished
    with pytest.raises(StoreError, match=r"incomplete \(1 of 3 chunks written.*run the `kd cache` command"):
        LogitStore(path.with_name(path.name + ".partial"))
    writer = StoreWriter(path, fmt, meta(), np.zeros(96, np.int64))
    assert writer.pending == [1, 2]  # chunk 0 is not computed again
    for k in writer.pending:
        writer.write(k, logits(32, seed=k))
    writer.finish()
    store = LogitStore(path)
    assert np.array_equal(store.read(np.arange(32), np.zeros(32, int)), logits(32)[:, 0].astype(np.float16))
    assert not path.with_name(path.name + ".partial").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_resuming_with_other_parameters_is_refused(fmt, tmp_path):
    path = tmp_path / f"s.{fmt}"
    with pytest.raises(KeyboardInterrupt):
        write_store(path, fmt, meta(), np.zeros(96, np.int64), _then_interrupt([(0, logits(32))]))
    with pytest.raises(StoreError, match=r"other parameters.*\n  seed: 0 vs 5\n  teacher_fingerprint: t vs u"):
        StoreWriter(path, fmt, meta(teacher_fingerprint="u", seed=5), np.zeros(96, np.int64))


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


def test_store_missing_chunks_is_never_marked_complete(tmp_path):
    with pytest.raises(StoreError, match="2 of 3 chunks not written"):
        write_store(tmp_path / "s.zarr", "zarr", meta(num_samples=10, chunk_samples=4), np.zeros(10, np.int64),
                    [(0, logits(4))])
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_new_store_replaces_the_old_only_when_complete(fmt, tmp_path):
    path = tmp_path / f"s.{fmt}"
    write_store(path, fmt, meta(num_samples=4, chunk_samples=4), np.zeros(4, np.int64), [(0, logits(4))])
    with pytest.raises(KeyboardInterrupt):
        write_store(path, fmt, meta(num_samples=8, chunk_samples=4), np.zeros(8, np.int64),
                    _then_interrupt([(0, logits(4, seed=1))]))
    assert LogitStore(path).meta.num_samples == 4  # the old store is whole and in place


def _then_interrupt(chunks):
    yield from chunks
    raise KeyboardInterrupt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logits_are_refused_at_write_naming_sample_and_view(fmt, bad, tmp_path):
    block = logits(4)
    block[2, 1, 5] = bad
    with pytest.raises(StoreError, match="sample 2, view 1 are not finite"):
        write_store(tmp_path / f"s.{fmt}", fmt, meta(num_samples=4, chunk_samples=4), np.zeros(4, np.int64),
                    [(0, block)])


def test_logits_beyond_float16_are_refused_not_stored_as_inf(tmp_path):
    block = logits(4)
    block[3, 0, 0] = 7e4
    with pytest.raises(StoreError, match="sample 3, view 0 exceeds float16's range.*cache.dtype: float32"):
        write_store(tmp_path / "s.zarr", "zarr", meta(num_samples=4, chunk_samples=4), np.zeros(4, np.int64),
                    [(0, block)])
    write_store(tmp_path / "s32.zarr", "zarr", meta(num_samples=4, chunk_samples=4, dtype="float32"),
                np.zeros(4, np.int64), [(0, block)])  # float32 holds it


def complete_store(path, fmt, num_samples=8, chunk_samples=4):
    write_store(path, fmt, meta(num_samples=num_samples, chunk_samples=chunk_samples), np.zeros(num_samples, np.int64),
                [(k, logits(chunk_samples, seed=k)) for k in range(num_samples // chunk_samples)])
    return path


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_deleted_zarr_chunk_is_refused_never_read_as_zeros(in_memory, tmp_path):
    path = complete_store(tmp_path / "s.zarr", "zarr")
    (path / "logits/c/1/0/0").unlink()
    with pytest.raises(StoreError, match="sample 4 are not finite.*chunk is missing"):
        LogitStore(path, max_memory_bytes=1 << 30 if in_memory else 0).read(np.arange(8), np.zeros(8, int))


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_truncated_zarr_chunk_is_a_clear_error(in_memory, tmp_path):
    path = complete_store(tmp_path / "s.zarr", "zarr")
    chunk = path / "logits/c/0/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(StoreError, match="corrupt or truncated"):
        LogitStore(path, max_memory_bytes=1 << 30 if in_memory else 0).read(np.arange(8), np.zeros(8, int))


def test_a_flipped_byte_fails_the_zarr_checksum(tmp_path):
    path = complete_store(tmp_path / "s.zarr", "zarr")
    chunk = path / "logits/c/1/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="chunk 1 .*corrupt.*crc32c checksum"):
        LogitStore(path, max_memory_bytes=0).verify_chunks()
    with pytest.raises(StoreError, match="all rows of logits.*corrupt"):
        LogitStore(path).read(np.arange(8), np.zeros(8, int))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_zarr_chunks_read_raw_equal_zarrs_reads_bit_for_bit(dtype, tmp_path):
    import google_crc32c

    path = tmp_path / "s.zarr"
    write_store(path, "zarr", meta(num_samples=10, chunk_samples=4, dtype=dtype), np.zeros(10, np.int64),
                [(k, logits(4 if k < 2 else 2, seed=k)) for k in range(3)])  # a last chunk of 2 rows
    store = LogitStore(path, max_memory_bytes=0)
    assert store._raw is not None  # the layout `kd cache` writes is read raw
    array = zarr.open_group(str(path), mode="r")["logits"]
    for k, first in enumerate([0, 4, 8]):
        raw = store._raw["logits"].read(first)
        expected = array[first:first + 4]
        assert raw.dtype == expected.dtype and raw.shape == expected.shape
        assert raw.tobytes() == expected.tobytes()
        chunk = (path / f"logits/c/{k}/0/0").read_bytes()
        assert google_crc32c.value(chunk[:-4]) == int.from_bytes(chunk[-4:], "little")  # the checksum zarr wrote
    samples, views = np.random.default_rng(1).integers(10, size=40), np.random.default_rng(2).integers(2, size=40)
    assert np.array_equal(store.read(samples, views), LogitStore(path).read(samples, views))


@pytest.mark.filterwarnings("ignore:Combining a `sharding_indexed`")
def test_other_zarr_layouts_are_read_through_zarr(tmp_path, monkeypatch):
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

    group = zarr.open_group(str(tmp_path / "x.zarr"), mode="w")
    kinds = {"crc32c": {}, "zstd": {"compressors": [ZstdCodec(), Crc32cCodec()]}, "no checksum": {"compressors": []},
             "by views": {"chunks": (4, 1, 10)}, "big-endian": {"serializer": BytesCodec(endian="big")},
             "sharded": {"serializer": ShardingCodec(chunk_shape=(2, 3, 10)), "chunks": (4, 3, 10)}}
    readers = {name: zarrraw.RawChunks.of(tmp_path / "x.zarr", group.create_array(
        name, **{"shape": (8, 3, 10), "chunks": (4, 3, 10), "dtype": "<f4", "compressors": [Crc32cCodec()],
                 **options})) for name, options in kinds.items()}
    assert [name for name, r in readers.items() if r is not None] == ["crc32c"]
    path = complete_store(tmp_path / "s.zarr", "zarr")
    assert LogitStore(f"file://{path}", max_memory_bytes=0)._raw is None  # a URL: read through zarr (fsspec)
    monkeypatch.setattr(store_module, "RAW_ZARR", False)
    through_zarr = LogitStore(path, max_memory_bytes=0)
    assert through_zarr._raw is None
    assert np.array_equal(through_zarr.read(np.arange(8), np.ones(8, int)),
                          LogitStore(path).read(np.arange(8), np.ones(8, int)))


def test_a_truncated_hdf5_file_is_a_clear_error(tmp_path):
    path = complete_store(tmp_path / "s.hdf5", "hdf5", num_samples=400, chunk_samples=100)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StoreError, match="s.hdf5.*(truncated or damaged|corrupt or truncated)"):
        LogitStore(path).read(np.arange(8), np.zeros(8, int))


def test_nan_in_a_stored_hdf5_chunk_is_refused_at_read(tmp_path):
    path = complete_store(tmp_path / "s.hdf5", "hdf5")
    with h5py.File(path, "a") as f:
        f["logits"][5, 1, 3] = np.nan
    with pytest.raises(StoreError, match="sample 5 are not finite"):
        LogitStore(path, max_memory_bytes=0).read(np.array([0, 5]), np.array([0, 1]))


def hdf5_fletcher32(data: bytes) -> int:
    """HDF5's H5_checksum_fletcher32 (H5checksum.c), line by line: the reference for pipeline.h5raw."""
    words, sum1, sum2, i = len(data) // 2, 0, 0, 0
    while words:
        block = min(words, 360)
        words -= block
        for _ in range(block):
            sum1 += data[i] << 8 | data[i + 1]
            sum2 += sum1
            i += 2
        sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    if len(data) % 2:
        sum1 += data[i] << 8
        sum2 += sum1
        sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1, sum2 = (sum1 & 0xFFFF) + (sum1 >> 16), (sum2 & 0xFFFF) + (sum2 >> 16)
    return sum2 << 16 | sum1


@pytest.mark.parametrize("narrow_rows", [65536, 1])  # 1: column sums in int64, as for chunks over 128 MiB
def test_fletcher32_is_hdf5s_checksum(narrow_rows, monkeypatch):
    from pipeline import h5raw

    monkeypatch.setattr(h5raw, "NARROW_ROWS", narrow_rows)
    rng = np.random.default_rng(0)
    cases = [b"", b"\x00", b"\x01", b"\x00" * 5000, b"\xff" * 4097, b"\xff\xff" * 65535, b"\x00\x01\xff\xfe"]
    cases += [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in rng.integers(0, 6000, 100)]
    cases += [rng.integers(0, 256, 300_001, dtype=np.uint8).tobytes(), b"\xff" * 300_000]  # 146 blocks of words
    assert [fletcher32(c) for c in cases] == [hdf5_fletcher32(c) for c in cases]


@pytest.fixture
def raw_small_chunks(monkeypatch):
    """Small HDF5 chunks read raw too (by default those under h5raw.MIN_CHUNK_BYTES go through h5py)."""
    monkeypatch.setattr(h5raw, "MIN_CHUNK_BYTES", 0)


def test_hdf5_chunks_under_the_raw_minimum_are_read_through_h5py(tmp_path):
    small, large = tmp_path / "small.hdf5", tmp_path / "large.hdf5"
    complete_store(small, "hdf5")  # chunks of 4 x 2 x 10 float16
    wide = np.random.default_rng(0).normal(0, 3, (8, 2, 8192)).astype(np.float32)
    write_store(large, "hdf5", meta(num_samples=8, chunk_samples=4, dtype="float32", num_classes=8192),
                np.zeros(8, np.int64), [(0, wide[:4]), (1, wide[4:])])  # chunks of 256 KiB
    assert LogitStore(small, max_memory_bytes=0)._raw is None
    store = LogitStore(large, max_memory_bytes=0)
    assert store._raw is not None and store._raw["logits"].nbytes == h5raw.MIN_CHUNK_BYTES
    assert np.array_equal(store.read(np.arange(8), np.ones(8, int)), wide[:, 1])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_hdf5_chunks_read_raw_equal_h5pys_reads_bit_for_bit(dtype, tmp_path, raw_small_chunks):
    path = tmp_path / "s.hdf5"
    write_store(path, "hdf5", meta(num_samples=10, chunk_samples=4, dtype=dtype), np.zeros(10, np.int64),
                [(k, logits(4 if k < 2 else 2, seed=k)) for k in range(3)])  # a last chunk of 2 rows
    store = LogitStore(path, max_memory_bytes=0)
    assert store._raw is not None  # the layout `kd cache` writes is read raw
    with h5py.File(path, "r") as f:
        for k, first in enumerate([0, 4, 8]):
            raw = store._raw["logits"].read(first)
            expected = f["logits"][first:first + 4]
            assert raw.dtype == expected.dtype and raw.shape == expected.shape
            assert raw.tobytes() == expected.tobytes()
            info = f["logits"].id.get_chunk_info_by_coord((first, 0, 0))
            with open(path, "rb") as file:
                file.seek(info.byte_offset)
                chunk = file.read(info.size)
            assert fletcher32(chunk[:-4]) == int.from_bytes(chunk[-4:], "little")  # the checksum HDF5 wrote
    samples, views = np.random.default_rng(1).integers(10, size=40), np.random.default_rng(2).integers(2, size=40)
    assert np.array_equal(store.read(samples, views), LogitStore(path).read(samples, views))


def test_other_hdf5_layouts_are_read_through_h5py(tmp_path, raw_small_chunks):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        kinds = {"fletcher32": {"fletcher32": True}, "gzip": {"fletcher32": True, "compression": "gzip"},
                 "none": {}, "by views": {"fletcher32": True, "chunks": (4, 1, 10)},
                 "big-endian": {"fletcher32": True, "dtype": ">f4"}}
        readers = {name: RawChunks.of(tmp_path / "x.h5", f.create_dataset(
            name, shape=(8, 3, 10), **{"chunks": (4, 3, 10), "dtype": "<f4", **options}))
            for name, options in kinds.items()}
    assert [name for name, r in readers.items() if r is not None] == ["fletcher32"]


@pytest.mark.parametrize("in_memory", [True, False])
def test_an_unwritten_hdf5_chunk_is_refused_never_read_as_zeros(in_memory, tmp_path, raw_small_chunks):
    path = complete_store(tmp_path / "s.hdf5", "hdf5")  # 8 samples, chunks of 4
    with h5py.File(path, "a") as f:
        old = f["logits"][:]
        del f["logits"]
        f.create_dataset("logits", shape=old.shape, chunks=(4, *old.shape[1:]), dtype=old.dtype, fillvalue=np.nan,
                         fletcher32=True)[:4] = old[:4]  # chunk 1 never written: HDF5 has no bytes for it
    if not in_memory:
        assert LogitStore(path, max_memory_bytes=0)._raw is not None  # read raw, the unwritten chunk through h5py
    with pytest.raises(StoreError, match="sample 4 are not finite.*chunk is missing"):
        LogitStore(path, max_memory_bytes=1 << 30 if in_memory else 0).read(np.arange(8), np.zeros(8, int))


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_flipped_byte_fails_the_hdf5_checksum(in_memory, tmp_path, raw_small_chunks):
    path = complete_store(tmp_path / "s.hdf5", "hdf5")
    with h5py.File(path, "r") as f:
        info = f["logits"].id.get_chunk_info_by_coord((4, 0, 0))
    data = bytearray(path.read_bytes())
    data[info.byte_offset + 17] ^= 0xFF
    path.write_bytes(bytes(data))
    match = "all rows of logits.*corrupt" if in_memory else "chunk 1 .*corrupt"
    with pytest.raises(StoreError, match=match):
        LogitStore(path, max_memory_bytes=1 << 30 if in_memory else 0).read(np.arange(8), np.zeros(8, int))
    if not in_memory:
        with pytest.raises(StoreError, match="chunk 1 .*Fletcher-32 checksum"):
            LogitStore(path, max_memory_bytes=0).verify_chunks()


def test_not_a_store_is_refused(tmp_path):
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(StoreError, match="not a logit store"):
        LogitStore(tmp_path / "x.h5")


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_from_another_teacher_dataset_or_augmentation_is_refused_naming_each_field(fmt, teacher, train_subset,
                                                                                        tmp_path):
    store = LogitStore(make_store(tmp_path / f"s.{fmt}", fmt, "float16", teacher, train_subset))
    right = dict(teacher_fingerprint=weights_fingerprint(teacher), dataset_fingerprint=fingerprint(train_subset),
                 augment=AUGMENT, seed=7, num_views=3)
    store.check_run(**right)  # the right run passes
    other = type(teacher)(1, 10)
    shifted = type(train_subset)(train_subset.images.flip(0), train_subset.labels.flip(0))
    with pytest.raises(StoreError) as e:
        store.check_run(**{**right, "teacher_fingerprint": weights_fingerprint(other),
                           "dataset_fingerprint": fingerprint(shifted), "augment": [], "seed": 8, "num_views": 4})
    for field in ("teacher_fingerprint", "dataset_fingerprint", "augment: store [", "seed: store 7, this run 8",
                  "num_views: store 3, this run 4"):
        assert field in str(e.value)


@pytest.mark.parametrize("url", ["memory://kd-test/s.zarr", "file://{tmp}/url/s.zarr"])
def test_a_zarr_store_at_a_url_is_written_in_place_resumed_and_read(url, tmp_path):
    """Object storage (s3://, gs://) has no rename: a store at a URL is written in place, the `complete` mark
    last, and resumed from its chunks_done like a local one (fsspec's memory and file systems stand in here)."""
    url = url.format(tmp=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        write_store(url, "zarr", meta(), np.zeros(96, np.int64), _then_interrupt([(0, logits(32))]))
    with pytest.raises(StoreError, match="incomplete"):
        LogitStore(url)
    writer = StoreWriter(url, "zarr", meta(), np.zeros(96, np.int64))
    assert writer.pending == [1, 2]
    for k in writer.pending:
        writer.write(k, logits(32, seed=k))
    writer.finish()
    store = LogitStore(url)
    assert np.array_equal(store.read(np.arange(32, 64), np.ones(32, int)), logits(32, seed=1)[:, 1].astype(np.float16))
    with pytest.raises(StoreError, match="only zarr stores can live at a URL"):
        StoreWriter(url.replace("s.zarr", "s.h5"), "hdf5", meta(), np.zeros(96, np.int64))
