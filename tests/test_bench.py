"""The benchmark runs end to end (smoke run: the numbers are meaningless, the code path is not)."""

import subprocess
import sys

from conftest import ROOT


def test_benchmark_smoke_run_writes_its_tables(tmp_path):
    out = tmp_path / "bench.md"
    subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--quick", "--out", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    text = out.read_text()
    for row in ("CE only, no teacher (floor)", "zarr store, in-memory", "hdf5 store, on-disk", "online teacher"):
        assert row in text
