"""The examples as committed: examples/ensemble's dvc.lock belongs to its dvc.yaml, kd.yaml and params.yaml (an edit
of one without `dvc repro` there shows here, before any stage runs), and its report scores every teacher the student
learned from, in the same order."""

import json
import os
import shutil
import subprocess

import yaml

from conftest import ROOT
from test_dvc import BIN, run

EXAMPLE = ROOT / "examples/ensemble"


def teacher_flags(cmd: str) -> list[str]:
    words = cmd.split()
    return [words[i + 1] for i, word in enumerate(words) if word == "--teacher"]


def test_ensemble_example_evaluates_every_teacher_in_the_order_it_distills_from():
    stages = yaml.safe_load((EXAMPLE / "dvc.yaml").read_text())["stages"]
    teachers = [f"models/{name}.pt" for name in yaml.safe_load((EXAMPLE / "params.yaml").read_text())["teachers"]]
    for stage in ("distill", "evaluate"):
        assert teacher_flags(stages[stage]["cmd"]) == teachers
        assert set(teachers) <= set(stages[stage]["deps"])


def test_ensemble_example_lock_is_up_to_date_with_its_files(tmp_path):
    """`dvc status` of the committed dvc.lock where no stage has run: only missing files differ (an edited command,
    params value or kd.yaml would show as changed: run `dvc repro` in examples/ensemble and commit its dvc.lock)."""
    assert (EXAMPLE / "dvc.lock").is_file()
    shutil.copytree(EXAMPLE, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        "__pycache__", "params", "models", "cache", "live", "reports"))
    run(["git", "init", "-q"], tmp_path)
    run([str(BIN / "dvc"), "init", "-q"], tmp_path)
    out = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=tmp_path, capture_output=True, text=True,
                         check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"}).stdout
    stale = [(stage, change) for stage, changes in json.loads(out).items() for change in changes
             if isinstance(change, str) or any(state != "deleted" for kind in ("changed deps", "changed params")
                                                for state in change.get(kind, {}).values())]
    assert not stale
