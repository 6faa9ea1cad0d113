"""An HDF5 store's chunks read raw: bytes from the file by `os.pread`, HDF5's Fletcher-32 checksum verified here.

h5py holds the GIL (and its own lock) through a whole read, decode and checksum included, so a thread reading
ahead of the training step stalls the step for as long as each chunk takes (bench/distill_ooc.py --gil). Read
raw, the file read (`os.pread`) and the checksum's numpy reductions run without the GIL.

Only for a dataset laid out as `kd cache` writes it: chunked, one filter, fletcher32 (no compression), a
little-endian dtype, chunks of at least MIN_CHUNK_BYTES. `RawChunks.of` returns None for any other dataset; `read`
returns None for a chunk HDF5 would not read as stored bytes (not allocated, so its fill value; or written with the
filter skipped), and the caller reads those through h5py. A chunk read here equals h5py's read of it, bit for bit
(tests/test_store.py).

fletcher32(data): HDF5's `H5_checksum_fletcher32`, over big-endian 16-bit words w_0..w_{n-1} (an odd last byte is
the high byte of a last word): sum1 = Σ w_i and sum2 = Σ (n - i) w_i, each folded to 16 bits by end-around carry,
which gives x mod 65535 except that a non-zero multiple of 65535 folds to 0xFFFF; the checksum is
sum2 << 16 | sum1, stored after the chunk's bytes as 4 little-endian bytes. (HDF5 also accepts the checksum with
the bytes of each half swapped, written by HDF5 before 1.6.3; so does `read`.)
"""

from __future__ import annotations

import os

import numpy as np

MOD = 65535
BLOCK = 1024  # words a row in the blocked sums below
MIN_CHUNK_BYTES = 256 << 10  # smaller chunks are read through h5py: as fast or faster there (numpy's per-call
# overhead; `python bench/distill_ooc.py --reads-only`), and h5py holds the GIL only briefly for them
NARROW_ROWS = 65536  # up to this many rows of BLOCK words, column sums fit uint32 (each below rows x 65535)


def _fold(total: int, nonzero: bool) -> int:
    rest = total % MOD
    return MOD if rest == 0 and nonzero else rest


def fletcher32(data: bytes) -> int:
    """HDF5's Fletcher-32 checksum of `data` (module docstring), from numpy reductions (which release the GIL).
    Σ i·w_i is taken in blocks of BLOCK words: Σ_b Σ_j (b·BLOCK + j) w_bj = BLOCK Σ_b b s_b + Σ_j j c_j with s_b
    the block sums and c_j the column sums, every product reduced mod 65535 so that int64 never overflows. The sums
    themselves run in uint32 on the words in native order (exact: a block sum is below BLOCK x 65535, a column sum
    below NARROW_ROWS x 65535 < 2**32; int64 past that)."""
    words = np.frombuffer(data, ">u2", count=len(data) // 2).astype("=u2")  # native order once: sums run 2-3x faster
    n = len(words) + len(data) % 2
    whole = len(words) // BLOCK * BLOCK
    grid = words[:whole].reshape(-1, BLOCK)
    tail = words[whole:].astype(np.int64)
    if len(data) % 2:
        tail = np.append(tail, np.int64(data[-1]) << 8)
    block_sums = grid.sum(axis=1, dtype=np.uint32).astype(np.int64)  # exact: each below BLOCK * 65535 < 2**32
    column_sums = grid.sum(axis=0, dtype=np.uint32 if len(grid) <= NARROW_ROWS else np.int64).astype(np.int64) % MOD
    blocks = np.arange(len(grid), dtype=np.int64) % MOD
    positions = np.arange(whole, whole + len(tail), dtype=np.int64) % MOD
    sum1 = int(block_sums.sum()) + int(tail.sum())  # Σ w_i, exact
    nonzero = sum1 > 0
    block_sums %= MOD
    weighted = (BLOCK * int(np.dot(blocks, block_sums) % MOD) + int(np.dot(np.arange(BLOCK) % MOD, column_sums))
                + int(np.dot(positions, tail % MOD)))  # Σ i·w_i, mod 65535 per term
    sum1 = _fold(sum1, nonzero)
    return _fold(n * sum1 - weighted, nonzero) << 16 | sum1  # sum1 ≡ Σ w_i, so n·sum1 - Σ i·w_i ≡ Σ (n - i) w_i


def _halves_swapped(checksum: int) -> int:
    b = checksum.to_bytes(4, "little")
    return int.from_bytes(bytes([b[1], b[0], b[3], b[2]]), "little")


class RawChunks:
    """Chunks of one chunked HDF5 dataset (shape (N, ...), chunked along the first axis only), read raw."""

    def __init__(self, path, dataset):
        self.path, self.dataset = str(path), dataset
        self.rows = dataset.chunks[0]
        self.shape, self.dtype = dataset.shape, dataset.dtype
        self.nbytes = int(np.prod(dataset.chunks)) * dataset.dtype.itemsize
        self._where: dict[int, tuple] = {}
        self._fd, self._pid = None, None

    @classmethod
    def of(cls, path, dataset) -> "RawChunks | None":
        """A raw reader of `dataset`, or None when its layout is not the one this reads (module docstring)."""
        import h5py

        chunks = dataset.chunks
        if chunks is None or tuple(chunks[1:]) != tuple(dataset.shape[1:]):
            return None
        plist = dataset.id.get_create_plist()
        if plist.get_nfilters() != 1 or plist.get_filter(0)[0] != h5py.h5z.FILTER_FLETCHER32:
            return None
        if dataset.dtype.str[0] not in "<|" or not hasattr(dataset.id, "get_chunk_info_by_coord"):
            return None  # big-endian values, or an h5py without HDF5 1.10.5's chunk queries
        reader = cls(path, dataset)
        return reader if reader.nbytes >= MIN_CHUNK_BYTES else None

    def read(self, first: int) -> np.ndarray | None:
        """The chunk whose first row is `first` (its rows within the dataset only), read-only; None where h5py must
        read it (module docstring). A checksum that fails or a short read raises ValueError."""
        where = self._where.get(first)
        if where is None:
            info = self.dataset.id.get_chunk_info_by_coord((first,) + (0,) * (len(self.shape) - 1))
            where = self._where[first] = (info.byte_offset, info.size, info.filter_mask)
        offset, size, mask = where
        if offset is None or mask != 0:
            return None
        if size != self.nbytes + 4:
            raise ValueError(f"chunk at row {first} holds {size} bytes on disk, expected {self.nbytes} and a "
                             "4-byte checksum")
        raw = os.pread(self._file(), size, offset)
        if len(raw) != size:
            raise ValueError(f"chunk at row {first}: read {len(raw)} of its {size} bytes (the file is truncated)")
        stored, computed = int.from_bytes(raw[-4:], "little"), fletcher32(raw[:-4])
        if stored != computed and stored != _halves_swapped(computed):
            raise ValueError(f"chunk at row {first}: Fletcher-32 checksum {computed:#010x} != stored "
                             f"{stored:#010x} (data corrupted)")
        block = np.frombuffer(raw, self.dtype, count=self.nbytes // self.dtype.itemsize)
        return block.reshape(self.rows, *self.shape[1:])[: min(self.rows, self.shape[0] - first)]

    def _file(self) -> int:
        if self._pid != os.getpid():  # opened per process: a forked DataLoader worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
