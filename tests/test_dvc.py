"""Real DVC on a copy of the project: repro, no-op repro, and T changes that reuse teacher and cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, write_params

BIN = Path(sys.executable).parent


def run(args, cwd):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project's pipeline and code in a fresh git + DVC repository, with tiny params, reproduced once."""
    root = tmp_path_factory.mktemp("project")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml", **{"distill.epochs": 1, "distill.lr_milestones": [], "distill.lr_factors": []})
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    out = run([str(BIN / "dvc"), "repro"], root)
    return root, out


def test_repro_runs_every_stage(project):
    root, out = project
    for stage in ("teacher", "cache", "distill", "baseline", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert (root / "cache/teacher_logits.zarr/zarr.json").is_file()
    metrics = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], root))
    assert "student_acc" in json.dumps(metrics)


def test_second_repro_does_nothing(project):
    root, _ = project
    out = run([str(BIN / "dvc"), "repro"], root)
    assert "Running stage" not in out


def test_changing_temperature_reruns_only_distill_and_evaluate(project):
    root, _ = project
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "reproduced"], root)
    out = run([str(BIN / "dvc"), "exp", "run", "-S", "distill.temperature=7.5", "-S", "distill.kd_weight=0.3"], root)
    assert "Running stage 'distill'" in out and "Running stage 'evaluate'" in out
    for reused in ("teacher", "cache", "baseline"):
        assert f"Running stage '{reused}'" not in out
