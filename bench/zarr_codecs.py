"""How fast a zarr chunk of logits decodes under each codec choice, and how much each saves on disk: the reason
the store's float arrays carry only a crc32c checksum (pipeline/writer.py `_zarr_codecs`).

For each codec list, one array shaped like the out-of-core benchmark's store (chunks of 1024 samples x 8 views x
100 classes, float16: 1.6 MB) is written, then every chunk is read whole, alternating codecs, `--repeats` times;
milliseconds per chunk are medians. Logits: random normal x 3 (incompressible, as real logits nearly are) and,
with --store, a real store's logits for the size ratio.

Usage: python bench/zarr_codecs.py [--repeats 5] [--store runs/cifar10/logits.zarr] [--append BENCHMARKS.md]
"""

import statistics
import tempfile
import time

import click
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from output import publish

CODECS = {
    "crc32c": lambda: [Crc32cCodec()],
    "zstd-1 + crc32c": lambda: [ZstdCodec(level=1), Crc32cCodec()],
    "blosc-lz4 (shuffle) + crc32c": lambda: [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"), Crc32cCodec()],
    "none": lambda: None,
}


@click.command()
@click.option("--repeats", default=5, show_default=True)
@click.option("--store", "store_path", default=None, help="A real zarr store whose logits give the size ratios.")
@click.option("--append", "out", default=None)
@click.option("--json", "json_path", default="bench/results.json", show_default=True)
def main(repeats, store_path, out, json_path):
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((16 * 1024, 8, 100))).astype(np.float16)
    real = zarr.open_group(store_path, mode="r")["logits"][:] if store_path else None
    ms, ratio, real_ratio = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {}
        for i, (name, codecs) in enumerate(CODECS.items()):
            a = zarr.create_array(f"{tmp}/a{i}", shape=x.shape, chunks=(1024, 8, 100), dtype="float16",
                                  compressors=codecs())
            a[:] = x
            arrays[name], ratio[name] = a, a.nbytes_stored() / a.nbytes
            if real is not None:
                r = zarr.create_array(f"{tmp}/r{i}", shape=real.shape, chunks=(1024, *real.shape[1:]),
                                      dtype=real.dtype, compressors=codecs())
                r[:] = real
                real_ratio[name] = r.nbytes_stored() / r.nbytes
        times = {name: [] for name in CODECS}
        for _ in range(repeats):
            for name, a in arrays.items():
                start = time.perf_counter()
                for k in range(16):
                    a[k * 1024:(k + 1) * 1024]
                times[name].append((time.perf_counter() - start) / 16 * 1e3)
        ms = {name: statistics.median(v) for name, v in times.items()}
    lines = ["", "## zarr codecs for the logits: decode time against size", "",
             f"`python bench/zarr_codecs.py --repeats {repeats}" + (f" --store {store_path}" if store_path else "")
             + f"` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): milliseconds to read one whole chunk "
             f"(1024 samples x 8 views x 100 classes, float16, 1.6 MB), medians of {repeats} alternated repeats of "
             "16 chunks; stored size / raw size.", "",
             "| codecs | ms per chunk | x crc32c alone | size, random logits |"
             + (" size, real logits |" if real is not None else ""), "|---|---|---|---|" + ("---|" if real is not None else "")]
    for name in CODECS:
        lines.append(f"| {name} | {ms[name]:.2f} | {ms[name] / ms['crc32c']:.2f}x | {ratio[name]:.3f} |"
                     + (f" {real_ratio[name]:.3f} |" if real is not None else ""))
    results = {f"zarr_chunk_ms_{name.split(' ')[0].replace('-', '')}": v for name, v in ms.items()}
    publish(lines, results, out, json_path)


if __name__ == "__main__":
    main()
