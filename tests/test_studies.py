"""The studies (studies/README.md): each is a DVC pipeline of kd commands over its rows and seeds, its kd params files
validate, its table writer gives RESULTS.md's rows from the runs' numbers, and a study run end to end (tiny, on the
digits) is skipped by DVC once done and re-runs only the stages a changed setting reaches."""

import importlib.util
import json
import shutil

import pytest
import yaml

from conftest import ROOT
from test_dvc import BIN, run

STUDIES = ("views", "views-long", "mnist-views", "ensemble", "default-run")
OUTPUTS = ("params", "models", "stores", "live", "eval", "dvc.lock", "table.md", "table.csv", "metrics.json",
           "targets.txt", "__pycache__")


def helper(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def study_repo(root, name: str):
    """The study in a fresh git + DVC repository, with what it reaches outside its folder (the helpers, the recipes,
    the default params and the two scripts of default-run in studies/scripts/) at the same relative paths."""
    shutil.copytree(ROOT / "studies" / name, root / "studies" / name, ignore=shutil.ignore_patterns(*OUTPUTS))
    for path in ("studies/kd_params.py", "studies/table.py", "params.yaml", "studies/scripts/test_accuracy.py",
                 "studies/scripts/digits_teacher_targets.py"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, root / path)
    for folder in ("recipes", "data"):
        shutil.copytree(ROOT / folder, root / folder)
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)  # dvclive (kd's --live-dir) wants a commit
    return root / "studies" / name


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_is_a_pipeline_with_a_student_per_row_and_seed_and_a_table(tmp_path, name):
    study = study_repo(tmp_path, name)
    params = yaml.safe_load((study / "params.yaml").read_text())
    stages = {line.split()[0] for line in run([str(BIN / "dvc"), "stage", "list"], study).splitlines()}
    runs = {f"{row}-{seed}" for row in params["rows"] for seed in params["seeds"]}
    students = [stage.split("@", 1)[1] for stage in stages if stage.split("@")[0].startswith("distill")
                or stage.split("@")[0] in ("online", "ensemble")]
    assert sorted(students) == sorted(runs)  # each run once
    if name != "default-run":  # validation only there
        assert sorted(stage.split("@", 1)[1] for stage in stages if stage.startswith("evaluate")) == sorted(runs)
    assert {"params", "table"} <= stages
    run([str(BIN / "dvc"), "dag"], study)  # the graph builds: every dep found as an output or a file


@pytest.mark.parametrize("name", STUDIES)
def test_every_kd_params_file_of_a_study_validates(tmp_path, monkeypatch, name):
    study = study_repo(tmp_path, name)
    monkeypatch.chdir(study)
    helper("kd_params").main()
    params = yaml.safe_load((study / "params.yaml").read_text())
    for row in params["rows"]:
        for seed in params["seeds"]:
            assert yaml.safe_load((study / f"params/{row}-{seed}.yaml").read_text())["seed"] == seed


def test_the_one_teacher_studies_share_one_dvc_yaml():
    text = (ROOT / "studies/views/dvc.yaml").read_text()
    assert (ROOT / "studies/views-long/dvc.yaml").read_text() == text
    assert (ROOT / "studies/mnist-views/dvc.yaml").read_text() == text


def test_a_row_set_over_the_recipe_keeps_the_recipes_other_keys():
    merged = helper("kd_params").merged({"distill": {"epochs": 10, "student_options": {}}, "seed": 0},
                                        {"distill": {"student_options": {"hidden_sizes": [32]}}})
    assert merged == {"distill": {"epochs": 10, "student_options": {"hidden_sizes": [32]}}, "seed": 0}


def write_runs(folder, name: str, row: str, label: str, kd: dict, runs: list[tuple]) -> None:
    """Study `name`'s params.yaml with one row, and that row's files as its stages would write them: per seed
    (seed, validation accuracy, test accuracy, test errors), fractions."""
    table = yaml.safe_load((ROOT / "studies" / name / "params.yaml").read_text())["table"]
    study = {"rows": {row: {"label": label}}, "seeds": [r[0] for r in runs], "table": table}
    (folder / "params.yaml").write_text(yaml.safe_dump(study, allow_unicode=True, sort_keys=False))
    (folder / "params").mkdir()
    for seed, val, test, errors in runs:
        (folder / f"params/{row}-{seed}.yaml").write_text(yaml.safe_dump({**kd, "seed": seed}))
        for where, metrics in (("live", {"val_acc": val}),
                               ("eval", {"student_acc": test, "student_errors": errors, "teacher_acc": 0.6131})):
            (folder / where / f"{row}-{seed}").mkdir(parents=True)
            (folder / where / f"{row}-{seed}/metrics.json").write_text(json.dumps(metrics))


def test_table_gives_the_mnist_views_row_of_results_md(tmp_path, monkeypatch):
    """RESULTS.md's first MNIST views row, from its per-seed numbers as the runs would have written them."""
    monkeypatch.chdir(tmp_path)
    kd = {"data": {"train_subset": None}, "cache": {"format": "zarr", "num_views": 1},
          "distill": {"kd_weight": 0.0, "teacher_source": "cache", "epochs": 20}}
    write_runs(tmp_path, "mnist-views", "alone", "student alone, plain images", kd,
               [(0, 0.9840, 0.9853, 147), (1, 0.9854, 0.9849, 151), (2, 0.9854, 0.9848, 152)])
    helper("table").main()
    assert ("| student alone, plain images | 0,1,2 | 98.40 / 98.54 / 98.54 (98.49) | 98.53 / 98.49 / 98.48 (98.50 ± "
            "0.03) | 147 / 151 / 152 (150.0) |") in (tmp_path / "table.md").read_text()
    assert (tmp_path / "table.csv").read_text().count("\n") == 4  # a header and one line per seed
    assert json.loads((tmp_path / "metrics.json").read_text())["alone"]["test_acc"] == pytest.approx(98.5)


def test_table_gives_the_fresh_view_row_of_results_md_with_the_teacher_views_it_computed(tmp_path, monkeypatch):
    """views-long's fresh-view row: the teacher live on 500 images x 40 epochs, no store."""
    monkeypatch.chdir(tmp_path)
    kd = {"data": {"train_subset": 500}, "cache": {"format": "zarr", "num_views": 4},
          "distill": {"kd_weight": 4.0, "teacher_source": "online", "epochs": 40}}
    write_runs(tmp_path, "views-long", "fresh", "teacher live, a fresh view every epoch", kd,
               [(0, 0.4320, 0.4408, 5592), (1, 0.4268, 0.4214, 5786)])
    helper("table").main()
    assert ("| teacher live, a fresh view every epoch | - | 0,1 | 42.94 ± 0.37 | 44.08 / 42.14 | 43.11 ± 1.37 | - | "
            "20000 |") in (tmp_path / "table.md").read_text()


def test_a_tiny_one_teacher_study_runs_then_is_skipped_then_reruns_only_a_changed_row(tmp_path):
    """studies/views' dvc.yaml on the digits: a stored row and the student alone, kd evaluate, the table; a second
    `dvc repro` runs nothing, and a new temperature for the stored row re-runs only its student and what follows."""
    study = study_repo(tmp_path, "views")
    params = yaml.safe_load((study / "params.yaml").read_text())
    tiny = {"distill": {"epochs": 2, "optimizer": {"lr_milestones": [], "lr_factors": []}}}
    params.update(recipe="../../params.yaml", kd={"data": {"root": "../../data", "train_subset": 300}, **tiny},
                  teacher={"teacher": {"epochs": 1}}, seeds=[0], stored=["plain-V2"], online=["alone"],
                  rows={"alone": params["rows"]["alone"], "plain-V2": {"label": "from a store of V views",
                                                                       "kd": {"cache": {"num_views": 2}}}})
    (study / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    dvc = str(BIN / "dvc")
    assert ran(run([dvc, "repro"], study)) == {"params", "teacher", "cache@plain-V2", "distill@plain-V2-0",
                                                "online@alone-0", "evaluate@alone-0", "evaluate@plain-V2-0", "table"}
    table = (study / "table.md").read_text().splitlines()
    assert len(table) == 2 + 2 and table[1].count("|") == 9
    alone, stored = table[2].split(" | "), table[3].split(" | ")
    assert stored[1] == "2" and int(stored[6]) > 0 and stored[7] == "600 |"  # 300 images x 2 views, stored
    assert alone[1] == "-" and alone[7] == "- |"  # the student alone has no store and runs no teacher
    assert ran(run([dvc, "repro"], study)) == set()
    params["rows"]["plain-V2"]["kd"]["distill"] = {"temperature": 3.0}
    (study / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    assert ran(run([dvc, "repro"], study)) == {"params", "distill@plain-V2-0", "evaluate@plain-V2-0", "table"}


def committed_locks() -> list[str]:
    """The studies whose dvc.lock git tracks (a study running in this working tree writes an untracked one as its
    stages end; outside a git checkout: every study with a dvc.lock)."""
    import subprocess

    try:
        tracked = subprocess.run(["git", "ls-files", "studies/*/dvc.lock"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # no git, or no checkout
        return [name for name in STUDIES if (ROOT / "studies" / name / "dvc.lock").is_file()]
    return [name for name in STUDIES if f"studies/{name}/dvc.lock" in tracked]


@pytest.mark.parametrize("name", committed_locks())
def test_a_committed_study_lock_is_up_to_date_with_its_files(tmp_path, name):
    """`dvc status` of a study's committed dvc.lock where no stage has run: only missing files differ (an edited
    command, params value, helper or recipe shows as changed: run `dvc repro` in the study, which re-runs only what
    changed, and commit its dvc.lock with its table)."""
    study = study_repo(tmp_path, name)
    shutil.copy(ROOT / "studies" / name / "dvc.lock", study / "dvc.lock")
    out = run([str(BIN / "dvc"), "status", "--json"], study)
    stale = [(stage, change) for stage, changes in json.loads(out[out.index("{"):]).items() for change in changes
             if isinstance(change, str) or any(state != "deleted" for kind in ("changed deps", "changed params")
                                                for state in change.get(kind, {}).values())]
    assert not stale
