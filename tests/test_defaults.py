"""One convention for what a command reads when not told: a store is where `kd cache` writes it by default
(`cache/teacher_logits.<cache.format>`, as in dvc.yaml); `kd evaluate` takes the training curves and the store that
the checkpoints it is given record, and kd search's default outputs, and prints which it used."""

import json

import pytest
from click.testing import CliRunner

from conftest import write_params
from stages.cli import kd

FAST = {"data.train_subset": 100, "distill.epochs": 1, "distill.optimizer.lr_milestones": [],
        "distill.optimizer.lr_factors": [], "search.trials": 1, "search.refine_trials": 0, "search.epochs": 1,
        "search.processes": 1}


def invoke(*args):
    result = CliRunner().invoke(kd, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_run_by_hand_finds_what_belongs_to_its_models(workdir):
    params = write_params(workdir / "params.yaml", **FAST)
    invoke("teacher", "--params", params, "--live-dir", "logs/teacher")
    invoke("cache", "--params", params)  # no --out: where dvc.yaml puts it
    assert (workdir / "cache/teacher_logits.zarr").is_dir()
    invoke("distill", "--params", params, "--live-dir", "logs/student")  # no --cache: the same default
    invoke("distill", "--params", params, "--baseline", "--out", "models/baseline.pt")  # no curves logged
    output = invoke("evaluate", "--params", params)
    assert "training curves of models/teacher.pt: logs/teacher (recorded in models/teacher.pt)" in output
    assert "training curves of models/student.pt: logs/student (recorded in models/student.pt)" in output
    assert "training curves of models/baseline.pt: none recorded in models/baseline.pt: left out" in output
    assert "store of models/student.pt: cache/teacher_logits.zarr (recorded in models/student.pt)" in output
    assert "search: none (reports/search.csv not found: no search has run)" in output
    metrics = json.loads((workdir / "reports/metrics.json").read_text())
    assert metrics["cache"]["path"] == "cache/teacher_logits.zarr" and metrics["search"] is None

    invoke("search", "--params", params)  # its default outputs are evaluate's default inputs
    (workdir / "models/student.pt").rename(workdir / "models/moved.pt")
    output = invoke("evaluate", "--params", params, "--student", "models/moved.pt", "--student-live", "logs/student")
    assert "search: reports/search.csv, reports/search.png" in output
    assert "training curves of models/moved.pt: logs/student (given)" in output
    report = (workdir / "reports/report.md").read_text()
    assert "No search has run" not in report and "1 trial in 1 round" in report


def test_hdf5_runs_default_to_the_hdf5_store(workdir):
    params = write_params(workdir / "params.yaml", **FAST, **{"cache.format": "hdf5"})
    invoke("teacher", "--params", params)
    invoke("cache", "--params", params)
    assert (workdir / "cache/teacher_logits.hdf5").is_file()
    invoke("search", "--params", params)
    assert (workdir / "reports/search.csv").is_file()
