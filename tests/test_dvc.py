"""Real DVC on a copy of the project: repro, no-op repro, and T changes that reuse teacher and cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_params

BIN = Path(sys.executable).parent


def run(args, cwd):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def new_project(root: Path, **overrides) -> Path:
    """The project's pipeline and code in a fresh git + DVC repository, with tiny params."""
    for name in ("pipeline", "stages", "data", "teachers"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml", **{"distill.epochs": 1, "distill.optimizer.lr_milestones": [],
                                          "distill.optimizer.lr_factors": [], "search.trials": 2,
                                          "search.refine_trials": 1, "search.epochs": 1, "search.processes": 1,
                                          **overrides})
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh project reproduced once (on 200 training samples: what is tested here is what DVC runs)."""
    root = new_project(tmp_path_factory.mktemp("project"), **{"data.train_subset": 200})
    return root, run([str(BIN / "dvc"), "repro"], root)


def test_repro_runs_every_stage(project):
    root, out = project
    for stage in ("teacher", "cache", "distill", "baseline", "search", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert (root / "cache/teacher_logits.zarr/zarr.json").is_file()
    metrics = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], root))
    assert "student_acc" in json.dumps(metrics)


def test_second_repro_does_nothing(project):
    root, _ = project
    out = run([str(BIN / "dvc"), "repro"], root)
    assert "Running stage" not in out


def test_an_interrupted_search_resumes_under_dvc_repro(project):
    """persist: true keeps reports/search.csv when the stage re-runs, so finished trials are not run again."""
    root, _ = project
    csv = root / "reports/search.csv"
    full = csv.read_text().splitlines()
    csv.write_text("\n".join(full[:3]) + "\n")  # as if stopped after two trials
    out = run([str(BIN / "dvc"), "repro"], root)
    # the search resumes, and nothing upstream re-runs; the report, which embeds the search's table, is rebuilt
    # when the table changed (a trial re-run can give the same rounded seconds, and then the same table)
    assert "search" in ran(out) and ran(out) <= {"search", "evaluate"}
    assert "2 of 3 trials kept from an earlier run, 1 run now" in out
    strip = lambda lines: [line.rsplit(",", 2)[0::2] for line in lines]  # noqa: E731
    assert strip(csv.read_text().splitlines()) == strip(full)  # all but the seconds column
    assert "Running stage" not in run([str(BIN / "dvc"), "repro"], root)


def test_changing_temperature_reruns_only_distill_and_evaluate(project):
    root, _ = project
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "reproduced"], root)
    out = run([str(BIN / "dvc"), "exp", "run", "-S", "distill.temperature=7.5", "-S", "distill.kd_weight=0.3"], root)
    assert "Running stage 'distill'" in out and "Running stage 'evaluate'" in out
    for reused in ("teacher", "cache", "baseline", "search"):
        assert f"Running stage '{reused}'" not in out


def ran(out: str) -> set[str]:
    return {stage for stage in ("teacher", "cache", "distill", "baseline", "search", "evaluate")
            if f"Running stage '{stage}'" in out}


def test_users_teacher_and_image_folder_under_dvc_repro(tmp_path):
    """A user's checkpoint and image folder: `dvc repro` runs, and replacing either re-runs what reads it."""
    from pipeline.models import build_model, save_checkpoint
    from test_data import write_image_folder
    from torchvision.io import write_png

    images = write_image_folder(tmp_path / "images", per_class=6, size=8)
    root = tmp_path / "project"
    root.mkdir()
    (root / "teachers").mkdir()
    save_checkpoint(build_model("tiny_cnn", 3, 3, seed=1), "tiny_cnn", 3, 3, root / "teachers/mine.pt")
    new_project(root, **{"teacher.checkpoint": "teachers/mine.pt", "data.name": "imagefolder",
                         "data.root": str(images), "data.val_fraction": 1 / 3, "augment": [],
                         "cache.num_views": 1})
    dvc = str(BIN / "dvc")
    assert ran(run([dvc, "repro"], root)) == {"teacher", "cache", "distill", "baseline", "search", "evaluate"}
    assert (root / "reports/live/teacher/metrics.json").is_file()
    assert ran(run([dvc, "repro"], root)) == set()
    # each change reproduced up to the students: every stage it reaches runs, and no other (search and evaluate,
    # further down the same chain, are left out to keep the test short)
    save_checkpoint(build_model("tiny_cnn", 3, 3, seed=2), "tiny_cnn", 3, 3, root / "teachers/mine.pt")
    assert ran(run([dvc, "repro", "distill", "baseline"], root)) == {"teacher", "cache", "distill", "baseline"}
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(images / "train/ant/new.png"))
    assert ran(run([dvc, "repro", "distill", "baseline"], root)) == {"teacher", "cache", "distill", "baseline"}
