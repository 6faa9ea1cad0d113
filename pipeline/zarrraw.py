"""A local zarr store's chunks read raw: each chunk's file read whole, its crc32c checksum verified here.

zarr (v3) reads a chunk through its event loop thread and a pool of worker threads, ~0.7 ms a chunk of a few KB
(`python bench/distill_ooc.py`), all of it Python that contends for the GIL with the training step beside it.
Read raw, a chunk costs one file read (which releases the GIL) and one crc32c (the C routine zarr's own codec
calls, `google_crc32c.value`): ~0.06 ms.

Only for an array laid out as `kd cache` writes it on a local disk: chunked along the first axis only, codecs
exactly [bytes (little-endian), crc32c] (no compression, no sharding). `RawChunks.of` returns None for any other
array; `read` returns None for a chunk that has no file (never written: zarr reads its fill value), and the caller
reads those through zarr, which gives the fill value the store refuses. A chunk read here equals zarr's read of it,
bit for bit (tests/test_store.py).

A chunk's file holds the chunk's full shape (an edge chunk padded to it) as little-endian bytes in C order, then
the crc32c of those bytes as 4 little-endian bytes (the zarr v3 `bytes` and `crc32c` codecs).
"""

from __future__ import annotations

from pathlib import Path

import google_crc32c  # zarr's own crc32c codec calls it
import numpy as np


class RawChunks:
    """Chunks of one local zarr v3 array (shape (N, ...), chunked along the first axis only), read raw."""

    def __init__(self, folder: Path, array):
        self.folder, self.array = str(folder), array
        self.rows = array.chunks[0]
        self.shape, self.dtype = array.shape, np.dtype(array.dtype)
        self.nbytes = int(np.prod(array.chunks)) * self.dtype.itemsize

    @classmethod
    def of(cls, root, array) -> "RawChunks | None":
        """A raw reader of `array` (a member of the local zarr group at `root`), or None when its layout is not
        the one this reads (module docstring)."""
        from zarr.codecs import BytesCodec, Crc32cCodec

        metadata = array.metadata
        codecs = getattr(metadata, "codecs", None)
        if getattr(metadata, "zarr_format", None) != 3 or codecs is None or len(codecs) != 2:
            return None
        if not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], Crc32cCodec):
            return None  # compressed, sharded, transposed, or another checksum
        little = codecs[0].endian is None or codecs[0].endian.value == "little"
        if not little or np.dtype(array.dtype).str[0] not in "<|":
            return None
        chunks = array.chunks
        if len(chunks) != len(array.shape) or tuple(chunks[1:]) != tuple(array.shape[1:]):
            return None
        folder = Path(root) / array.path
        if not (folder / "zarr.json").is_file():
            return None  # not the folder layout of a local store
        return cls(folder, array)

    def read(self, first: int) -> np.ndarray | None:
        """The chunk whose first row is `first` (its rows within the array only), read-only; None where zarr must
        read it (no file: a chunk never written). A checksum that fails or a file of the wrong size raises
        ValueError."""
        k = first // self.rows
        key = self.array.metadata.encode_chunk_key((k,) + (0,) * (len(self.shape) - 1))
        try:
            with open(f"{self.folder}/{key}", "rb", buffering=0) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        if len(raw) != self.nbytes + 4:
            raise ValueError(f"chunk {key} holds {len(raw)} bytes, expected {self.nbytes} and a 4-byte checksum "
                             "(the file is truncated or not this array's)")
        computed = int(google_crc32c.value(np.frombuffer(raw, np.uint8)[:-4]))  # no copy
        stored = int.from_bytes(raw[-4:], "little")
        if stored != computed:
            raise ValueError(f"chunk {key}: crc32c checksum {computed:#010x} != stored {stored:#010x} "
                             "(data corrupted)")
        block = np.frombuffer(raw, self.dtype, count=self.nbytes // self.dtype.itemsize)
        return block.reshape(self.rows, *self.shape[1:])[: min(self.rows, self.shape[0] - first)]
