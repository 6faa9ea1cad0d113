"""Teachers of the wrong shape and files that are not what they are named: each is refused at the first command that
reads it, naming the file, what it is and what was expected (never a traceback, never a partial store, never a
silently meaningless accuracy); the same input given twice is said, not ignored."""

import os

import pytest
import torch
from click.testing import CliRunner

from conftest import write_params
from pipeline.models import build_model, save_checkpoint
from stages.cli import kd

FAST = {"data.train_subset": 100, "distill.epochs": 1, "distill.optimizer.lr_milestones": [],
        "distill.optimizer.lr_factors": []}


def invoke(*args):
    return CliRunner().invoke(kd, [str(a) for a in args])


def refused(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return True


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A trained teacher (good.pt) and its store, a teacher of 7 classes (seven.pt), params for both."""
    root = tmp_path_factory.mktemp("wrong")
    params = write_params(root / "params.yaml", **FAST)
    assert invoke("teacher", "--params", params, "--out", root / "good.pt").exit_code == 0
    assert invoke("cache", "--params", params, "--teacher", root / "good.pt", "--out", root / "s.zarr").exit_code == 0
    save_checkpoint(build_model("tiny_cnn", 1, 7, seed=0), "tiny_cnn", 1, 7, root / "seven.pt")
    return root, params


SEVEN = "the teacher ('tiny_cnn') takes 1 channels and predicts 7 classes; the data has 1 and 10"


def test_a_teacher_of_another_number_of_classes_is_refused_by_kd_cache_leaving_nothing(project, tmp_path):
    root, params = project
    result = invoke("cache", "--params", params, "--teacher", root / "seven.pt", "--out", tmp_path / "s.zarr")
    assert refused(result, f"{root / 'seven.pt'}: {SEVEN}")
    assert list(tmp_path.iterdir()) == []  # no store, no .partial


@pytest.mark.parametrize("source", ["cache", "online"])
def test_a_teacher_of_another_number_of_classes_is_refused_by_kd_distill(project, tmp_path, source):
    root, params = project
    params = write_params(tmp_path / "p.yaml", **FAST, **{"distill.teacher_source": source})
    store = ["--cache", root / "s.zarr"] if source == "cache" else []
    result = invoke("distill", "--params", params, "--teacher", root / "seven.pt", *store, "--out", tmp_path / "x.pt")
    assert refused(result, SEVEN) and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("teachers", [["seven.pt"], ["good.pt", "seven.pt"]])
def test_a_model_of_another_number_of_classes_is_refused_by_kd_evaluate(project, tmp_path, teachers):
    root, params = project
    result = invoke("evaluate", "--params", params, *[a for t in teachers for a in ("--teacher", root / t)],
                    "--student", root / "good.pt", "--baseline", root / "good.pt", "--metrics", tmp_path / "m.json",
                    "--report", tmp_path / "r.md", "--html", tmp_path / "r.html", "--figures", tmp_path / "f",
                    "--confusion", tmp_path / "c.csv")
    assert refused(result, SEVEN) and not (tmp_path / "m.json").exists()
    result = invoke("evaluate", "--params", params, "--teacher", root / "good.pt", "--student", root / "seven.pt",
                    "--baseline", root / "good.pt", "--metrics", tmp_path / "m.json")
    assert refused(result, "the student ('tiny_cnn') takes 1 channels and predicts 7 classes")


def test_a_teacher_of_another_number_of_classes_is_refused_by_kd_search_and_verify(project, tmp_path):
    root, params = project
    result = invoke("search", "--params", params, "--teacher", root / "seven.pt", "--cache", root / "s.zarr",
                    "--out", tmp_path / "s.csv")
    assert refused(result, SEVEN)
    assert refused(invoke("cache", "verify", root / "s.zarr", "--params", params, "--teacher", root / "seven.pt"),
                   SEVEN)


# ---- weights that are not a teacher's ---------------------------------------------------------------------------

def run_teacher(tmp_path, file, arch="tiny_cnn"):
    params = write_params(tmp_path / "params.yaml", **FAST, **{"teacher.checkpoint": str(file),
                                                                "teacher.arch": arch})
    result = invoke("teacher", "--params", params, "--out", tmp_path / "teacher.pt")
    assert result.exit_code != 0 or (tmp_path / "teacher.pt").exists()
    return result


def test_integer_weights_are_refused_not_cast(tmp_path):
    from safetensors.torch import save_file

    state = build_model("tiny_cnn", 1, 10, seed=0).state_dict()
    save_file({k: (v * 100).to(torch.int64) for k, v in state.items()}, str(tmp_path / "t.safetensors"))
    result = run_teacher(tmp_path, tmp_path / "t.safetensors")
    assert refused(result, "t.safetensors: ", "weights are int64, not floating point", "unquantised")
    assert not (tmp_path / "teacher.pt").exists()


@pytest.mark.parametrize("form", ["ours", "state_dict", "safetensors"])
def test_nan_weights_are_refused_by_kd_teacher(tmp_path, form):
    model = build_model("tiny_cnn", 1, 10, seed=0)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    path = tmp_path / ("t.safetensors" if form == "safetensors" else "t.pt")
    if form == "ours":
        save_checkpoint(model, "tiny_cnn", 1, 10, path)
    elif form == "state_dict":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    result = run_teacher(tmp_path, path)
    assert refused(result, f"{path}: 1 weights hold NaN or infinite values", "bring a teacher whose weights are finite")
    assert not (tmp_path / "teacher.pt").exists()


def test_a_teacher_at_chance_level_is_taken_with_a_warning(teacher_path, tmp_path):
    model = build_model("tiny_cnn", 1, 10, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every logit 0: it always answers class 0
    save_checkpoint(model, "tiny_cnn", 1, 10, tmp_path / "zero.pt")
    result = run_teacher(tmp_path, tmp_path / "zero.pt")
    assert result.exit_code == 0, result.output
    assert "Warning: the teacher is at chance level (10.00 % for 10 classes)" in result.output
    assert "another order than the data's" in result.output
    result = run_teacher(tmp_path, teacher_path)  # a trained teacher: no warning
    assert result.exit_code == 0 and "chance level" not in result.output, result.output


# ---- files that are not what their name says ------------------------------------------------------------------------

class Payload:
    def __reduce__(self):
        return os.system, ("echo ran",)


def write(kind, path):
    if kind == "code":
        torch.save({"state_dict": Payload()}, path)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        save_file(build_model("tiny_cnn", 1, 10).state_dict(), str(path))
    elif kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("teacher weights are on the shared drive\n")
    elif kind == "lfs":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    elif kind == "torch":
        torch.save(build_model("tiny_cnn", 1, 10).state_dict(), path)


@pytest.mark.parametrize("kind, name, says", [
    ("code", "t.pth", f"refused: loading it would run Python code (it pickles {os.system.__module__}.system)"),
    ("safetensors", "t.pth", "is a safetensors file named .pth; rename it to t.safetensors"),
    ("folder", "t.pth", "is a folder, not a checkpoint file"),
    ("empty", "t.pth", "is empty (0 bytes)"),
    ("text", "t.pth", "is a text file (it starts 'teacher weights are on the shared"),
    ("lfs", "t.pth", "is a Git LFS pointer, not the weights; fetch them with `git lfs pull`"),
    ("torch", "t.safetensors", "is a PyTorch checkpoint (torch.save) named .safetensors; rename it to t.pt"),
    ("text", "t.safetensors", "is a text file"),
])
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, kind, name, says):
    path = tmp_path / name
    write(kind, path)
    result = run_teacher(tmp_path, path)
    assert refused(result, f"{path}: {says}")
    assert "False" not in result.output  # never the advice to load with weights_only=False
    assert "ran" not in result.output


# ---- the same input twice, an input that is not read ---------------------------------------------------------------

def test_the_same_store_or_teacher_twice_is_refused(project, tmp_path):
    root, params = project
    good, store = root / "good.pt", root / "s.zarr"
    twice = ["--cache", store, "--teacher", good, "--cache", store, "--teacher", good]
    result = invoke("distill", "--params", params, *twice, "--out", tmp_path / "x.pt")
    assert refused(result, f"--cache {store} is given twice")
    (tmp_path / "copy.pt").write_bytes(good.read_bytes())
    result = invoke("search", "--params", params, "--cache", store, "--teacher", good, "--cache", tmp_path / "s2",
                    "--teacher", tmp_path / "copy.pt", "--out", tmp_path / "s.csv")
    assert refused(result, f"--teacher {tmp_path / 'copy.pt'} holds the same weights as {good}")
    result = invoke("evaluate", "--params", params, "--teacher", good, "--teacher", good, "--student", good,
                    "--baseline", good, "--metrics", tmp_path / "m.json")
    assert refused(result, f"--teacher {good} is given twice")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "m.json").exists()


def test_a_store_given_to_an_online_run_is_refused(project, tmp_path):
    root, _ = project
    params = write_params(tmp_path / "p.yaml", **FAST, **{"distill.teacher_source": "online"})
    result = invoke("distill", "--params", params, "--teacher", root / "good.pt", "--cache", root / "s.zarr",
                    "--out", tmp_path / "x.pt")
    assert refused(result, f"--cache {root / 's.zarr'} is given, but distill.teacher_source is online")


# ---- an error below the progress bar it interrupted -----------------------------------------------------------------

def test_an_error_closes_the_progress_bars_it_interrupted_before_it_is_printed():
    """A bar still open when the error reaches the CLI (held by a thread, a worker, a traceback) would otherwise be
    drawn again when the process exits, after the message: the last line on screen would read like progress."""
    import click
    from tqdm import tqdm

    from pipeline import KDError
    from stages.common import stage

    seen = {}

    @click.command()
    @stage
    def failing():
        seen["bar"] = tqdm(total=10, desc="work")
        seen["bar"].update(10)
        raise KDError("it broke")

    original = click.ClickException.show

    def show(self, file=None):
        seen["closed when shown"] = seen["bar"].disable  # tqdm.close() sets disable
        original(self, file)

    click.ClickException.show = show
    try:
        result = CliRunner().invoke(failing, [], standalone_mode=True)
    finally:
        click.ClickException.show = original
    assert result.exit_code == 1 and "it broke" in result.output
    assert seen["closed when shown"]
