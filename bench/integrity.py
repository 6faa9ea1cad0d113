"""What the store's integrity checks cost at read time: chunk checksums (zarr crc32c, HDF5 fletcher32)
and the finite-value check, against the same reads without them, side by side in one run.

Usage: python bench/integrity.py [--repeats 5] [--append BENCHMARKS.md]  (make bench runs it after throughput.py)
Reads are timed in alternation (with, without, with, ...) and the medians compared, so machine noise
hits both alike. Cases: the whole store loaded into memory (what `LogitStore` does when it fits), and
shuffled on-disk batches of 256 samples (one sorted read per batch, as `LogitStore.read`).
"""

import re
import statistics
import tempfile
import time
from pathlib import Path

import click
import h5py
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from output import publish

SHAPES = {"digits-like (50k x 8 views x 10 classes)": (50_000, 8, 10),
          "ImageNet-like rows (5k x 8 views x 1000 classes)": (5_000, 8, 1000)}
CHUNK = 1024
BATCH = 256


def write(root: Path, shape, checksum: bool) -> dict:
    rng = np.random.default_rng(0)
    data = rng.normal(0, 3, shape).astype(np.float16)
    tag = "crc" if checksum else "plain"
    compressors = [Crc32cCodec()] if checksum else None  # as the store's float arrays (pipeline/writer.py)
    group = zarr.open_group(str(root / f"{tag}.zarr"), mode="w")
    z = group.create_array("logits", shape=shape, chunks=(CHUNK, *shape[1:]), dtype="float16", fill_value=np.nan,
                           compressors=compressors)
    z[:] = data
    f = h5py.File(root / f"{tag}.h5", "w")
    f.create_dataset("logits", data=data, chunks=(CHUNK, *shape[1:]), fletcher32=checksum)
    f.close()
    return {"zarr": z, "hdf5": h5py.File(root / f"{tag}.h5", "r")["logits"]}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@click.command()
@click.option("--repeats", default=5, show_default=True)
@click.option("--append", "out", default=None, help="Append the markdown section to this file.")
@click.option("--json", "json_path", default=None,
              help="Merge the ratios into this flat JSON object (keys integrity_ratio_<store>_<format>_<read>).")
def main(repeats, out, json_path):
    results = {}
    lines = ["| store | format | read | with checks (s) | without (s) | ratio | finite check alone (s) |",
             "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            root = Path(tmp) / str(shape[0])
            root.mkdir()
            arrays = {True: write(root, shape, True), False: write(root, shape, False)}
            rng = np.random.default_rng(1)
            batches = [np.unique(rng.choice(shape[0], BATCH, replace=False)) for _ in range(20)]
            for fmt in ("zarr", "hdf5"):
                reads = {
                    "whole store into memory": lambda a: a[:],
                    f"{len(batches)} shuffled batches of {BATCH}":
                        (lambda a: [a.oindex[b] for b in batches]) if fmt == "zarr" else
                        (lambda a: [a[b] for b in batches]),
                }
                for read_name, read in reads.items():
                    times = {True: [], False: []}
                    finite = []
                    for _ in range(repeats):
                        for checksum in (True, False):
                            times[checksum].append(timed(lambda: read(arrays[checksum][fmt])))
                        data = read(arrays[True][fmt])
                        # LogitStore checks what a batch returns: one view per sample (B, C); a whole load once
                        blocks = [b[:, 0] for b in data] if isinstance(data, list) else [data]
                        finite.append(timed(lambda: [np.isfinite(b).all() for b in blocks]))
                    with_, without = statistics.median(times[True]), statistics.median(times[False])
                    fin = statistics.median(finite)
                    lines.append(f"| {name} | {fmt} | {read_name} | {with_ + fin:.4f} | {without:.4f} | "
                                 f"{(with_ + fin) / without:.2f}x | {fin:.4f} |")
                    print(lines[-1], flush=True)
                    results[f"integrity_ratio_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}_{fmt}_{'whole' if read_name.startswith('whole') else 'batches'}"] = \
                        (with_ + fin) / without
            arrays[True]["hdf5"].file.close()
            arrays[False]["hdf5"].file.close()
    intro = ["", "## Cost of the store's integrity checks at read time", "",
             f"`python bench/integrity.py --repeats {repeats}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): "
             "chunk checksums (zarr `crc32c` codec, HDF5 `fletcher32`) plus the finite-value check "
             "`LogitStore` runs, against the same reads without either; float16 stores, chunks of "
             f"{CHUNK} samples, files in the page cache; medians of {repeats} alternated repeats. Shuffled "
             "batches are the per-step cost when reading from disk; a whole-store load happens once per run.",
             ""]
    publish(intro + lines, results, append_to=out, json_path=json_path, quiet=True)  # its rows printed as measured


if __name__ == "__main__":
    main()
