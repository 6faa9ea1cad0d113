"""The ensemble example (examples/ensemble) under real DVC: teacher and cache are one stage definition each over
params.yaml's `teachers` (foreach), so changing one teacher re-runs its own stages, distill and evaluate only."""

import json
import shutil

import pytest
import yaml

from conftest import ROOT
from test_dvc import BIN, run

EXAMPLE = ROOT / "examples/ensemble"
TEACHERS = ("a", "b", "c")


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def set_keys(path, **values) -> None:
    """Set dotted keys (`teacher__epochs` for teacher.epochs) in a YAML file."""
    raw = yaml.safe_load(path.read_text())
    for key, value in values.items():
        *sections, last = key.split("__")
        node = raw
        for section in sections:
            node = node[section]
        node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example copied into a fresh git + DVC repository, made tinier still, reproduced once."""
    root = tmp_path_factory.mktemp("ensemble")
    shutil.copytree(EXAMPLE, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        "__pycache__", "dvc.lock", "params", "models", "cache", "live", "reports"))
    set_keys(root / "kd.yaml", teacher__epochs=1, distill__epochs=1, data__train_subset=200)
    dvc = str(BIN / "dvc")
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run([dvc, "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    return root, run([dvc, "repro"], root)


def test_repro_trains_and_caches_every_teacher_and_distills_from_all(example):
    root, out = example
    assert ran(out) == {f"{stage}@{t}" for stage in ("params", "teacher", "cache") for t in TEACHERS} | {
        "distill", "baseline", "evaluate"}
    for t in TEACHERS:
        assert (root / f"models/{t}.pt").is_file() and (root / f"cache/{t}.zarr/zarr.json").is_file()
    assert (root / "models/student.pt").is_file() and (root / "models/baseline.pt").is_file()
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert {f"teacher_acc_{k}" for k in range(len(TEACHERS))} <= metrics.keys() and "ensemble_acc" in metrics
    assert "--cache cache/c.zarr --teacher models/c.pt" in out
    assert yaml.safe_load((root / "params/b.yaml").read_text())["teacher"]["arch"] == "tiny_cnn"
    assert ran(run([str(BIN / "dvc"), "repro"], root)) == set()


def test_changing_one_teacher_reruns_only_its_stages_and_distill(example):
    root, _ = example
    dvc = str(BIN / "dvc")
    set_keys(root / "params.yaml", teachers__b__seed=5)
    status = run([dvc, "status"], root)
    assert "params@b" in status and "params@a" not in status and "params@c" not in status
    assert ran(run([dvc, "repro"], root)) == {"params@b", "teacher@b", "cache@b", "distill", "evaluate"}
    assert yaml.safe_load((root / "params/b.yaml").read_text())["seed"] == 5


def test_changing_the_students_params_reruns_no_teacher(example):
    """kd.yaml is every teacher's base file, but each teacher stage declares only the keys it reads."""
    root, _ = example
    set_keys(root / "kd.yaml", distill__temperature=6.0)
    assert ran(run([str(BIN / "dvc"), "repro"], root)) == {f"params@{t}" for t in TEACHERS} | {"distill", "evaluate"}
