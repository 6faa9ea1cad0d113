"""Bring your own teacher: weights as users have them (timm, torchvision, training checkpoints) through
`kd teacher` -> `kd cache` -> `kd distill`, and the clear refusals. Every model is built here with random weights
(nothing is downloaded) for the tiny digits data (1 x 8 x 8 images, 10 classes, normalization mean 0, std 1)."""

import argparse
import json
import os
import sys

import pytest
import torch
from click.testing import CliRunner

from pipeline import KDError
from pipeline.checkpoints import load_teacher, strip_prefixes
from pipeline.models import arch_error, build_model, load_checkpoint, save_checkpoint
from pipeline.params import load_params
from stages.cli import kd
from conftest import write_params

FAST = {"data.train_subset": 100, "distill.epochs": 1, "distill.optimizer.lr_milestones": [],
        "distill.optimizer.lr_factors": []}
DIGITS_CFG = {"input_size": [1, 8, 8], "mean": [0.0], "std": [1.0]}  # a pretrained_cfg that fits the data


def invoke(*args):
    return CliRunner().invoke(kd, [str(a) for a in args])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teachers").mkdir()
    return tmp_path


def timm_teacher(num_classes=10):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes, in_chans=1)


def torchvision_teacher(num_classes=10):
    """torchvision's resnet18 as a user adapts it to grey images: its own 7x7 stride-2 stem, one input channel."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model


def save_safetensors(model, path, cfg=None):
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path), metadata={"pretrained_cfg": json.dumps(cfg)} if cfg else None)


def nested(model, prefix="module."):
    """A training framework's checkpoint: prefixed weights beside optimiser state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"epoch": 3, "state_dict": {prefix + k: v for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict()}


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["timm-safetensors", "torchvision-plain", "timm-nested-timm-student"])
def test_a_users_teacher_runs_through_teacher_cache_and_distill(workdir, kind):
    if kind == "timm-safetensors":
        mine, arch, file = timm_teacher(), "timm:test_resnet", "teachers/model.safetensors"
        save_safetensors(mine, file, DIGITS_CFG)
    elif kind == "torchvision-plain":
        mine, arch, file = torchvision_teacher(), "resnet18", "teachers/resnet18.pth"
        torch.save(mine.state_dict(), file)
    else:
        mine, arch, file = timm_teacher(), "timm:test_resnet", "teachers/last.ckpt"
        torch.save(nested(mine), file)
    student = "timm:test_resnet" if kind.endswith("timm-student") else "tiny_cnn"
    params = write_params(workdir / "params.yaml", **FAST, **{"teacher.checkpoint": file, "teacher.arch": arch,
                                                             "distill.student": student})
    result = invoke("teacher", "--params", params, "--out", "models/teacher.pt")
    assert result.exit_code == 0, result.output
    assert f"Teacher ({arch}) validation accuracy" in result.output
    if kind.startswith("timm-nested"):
        assert result.output.count("stripped the prefix 'module.'") == 1
        assert "weights taken from key 'state_dict'; ignored: epoch, optimizer" in result.output
    copied = torch.load("models/teacher.pt", weights_only=True)
    assert (copied["arch"], copied["in_channels"], copied["num_classes"], copied["image_size"]) == (arch, 1, 10, 8)
    rebuilt, _ = load_checkpoint("models/teacher.pt")
    assert same_weights(rebuilt, mine)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), mine.eval()(x))
    result = invoke("cache", "--params", params, "--teacher", "models/teacher.pt", "--out", "cache/logits.zarr")
    assert result.exit_code == 0, result.output
    result = invoke("distill", "--params", params, "--cache", "cache/logits.zarr", "--out", "models/student.pt")
    assert result.exit_code == 0, result.output
    assert load_checkpoint("models/student.pt")[1]["arch"] == student


def test_our_own_archs_load_from_a_plain_state_dict_in_safetensors(dataset, tmp_path):
    mine = build_model("cnn", 1, 10, seed=1)
    save_safetensors(mine, tmp_path / "cnn.safetensors")
    model, ckpt, notes = load_teacher(tmp_path / "cnn.safetensors", "cnn", {}, dataset)
    assert same_weights(model, mine) and ckpt["arch"] == "cnn" and notes == []


@pytest.mark.parametrize("keys, stripped", [
    (["module.a.weight", "module.b.bias"], "module."),
    (["model.a.weight", "model.b.bias"], "model."),
    (["module._orig_mod.a.weight", "module._orig_mod.b.bias"], "module._orig_mod."),
    (["student.a.weight", "teacher.b.bias"], ""),
    (["module.a.weight", "b.bias"], ""),  # not every name: left alone
])
def test_common_prefixes_are_stripped_from_every_name(keys, stripped):
    state_dict, removed = strip_prefixes({k: torch.zeros(1) for k in keys}, ["a.weight", "b.bias"])
    assert removed == stripped and list(state_dict) == [k[len(stripped):] for k in keys]


def test_a_prefix_the_model_itself_has_is_kept():
    state_dict, removed = strip_prefixes({"model.fc.weight": torch.zeros(1)}, ["model.fc.weight"])
    assert removed == "" and list(state_dict) == ["model.fc.weight"]


def test_a_torchvision_stem_changed_for_small_images_needs_stem_small(dataset, tmp_path):
    import torchvision

    mine = torchvision.models.resnet18(num_classes=10)
    mine.conv1, mine.maxpool = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    torch.save({"model": nested(mine, "model.")["state_dict"]}, tmp_path / "cifar_style.pt")
    with pytest.raises(KDError, match=r"conv1.weight: file \(64, 1, 3, 3\), model \(64, 1, 7, 7\).*stem"):
        load_teacher(tmp_path / "cifar_style.pt", "resnet18", {}, dataset)
    model, ckpt, _ = load_teacher(tmp_path / "cifar_style.pt", "resnet18", {"stem": "small"}, dataset)
    assert same_weights(model, mine) and ckpt["options"] == {"stem": "small"}


def run_teacher(workdir, file, arch, **overrides):
    params = write_params(workdir / "params.yaml", **{"teacher.checkpoint": file, "teacher.arch": arch, **overrides})
    result = invoke("teacher", "--params", params, "--out", "models/teacher.pt")
    assert not (workdir / "models/teacher.pt").exists() or result.exit_code == 0
    return result


def test_a_teacher_for_another_number_of_classes_is_refused_naming_both(workdir):
    torch.save(torchvision_teacher(num_classes=7).state_dict(), "teachers/t.pth")
    result = run_teacher(workdir, "teachers/t.pth", "resnet18")
    assert result.exit_code == 1, result.output
    assert "teachers/t.pth: the teacher predicts 7 classes (its classifier fc.weight" in result.output
    assert "the dataset has 10 classes" in result.output


def test_weights_of_another_architecture_are_refused_naming_keys_and_shapes(workdir):
    state_dict = build_model("cnn", 1, 10).state_dict()
    state_dict["extra.weight"] = state_dict.pop("head.bias")
    state_dict["features.0.0.weight"] = torch.zeros(64, 1, 5, 5)
    torch.save(state_dict, "teachers/t.pt")
    result = run_teacher(workdir, "teachers/t.pt", "cnn")
    assert result.exit_code == 1, result.output
    for text in ["teachers/t.pt: the weights do not fit 'cnn'", "1 missing (head.bias)", "1 unexpected (extra.weight)",
                 "features.0.0.weight: file (64, 1, 5, 5), model (64, 1, 3, 3)", "set teacher.arch"]:
        assert text in result.output


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(workdir):
    marker = workdir / "ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"state_dict": build_model("cnn", 1, 10).state_dict(), "args": argparse.Namespace(lr=0.1),
                "payload": Payload()}, "teachers/t.pth")
    result = run_teacher(workdir, "teachers/t.pth", "cnn")
    assert result.exit_code == 1, result.output
    assert "teachers/t.pth: refused: loading it would run Python code" in result.output
    assert "weights_only=True" in result.output and not marker.exists()


def test_another_normalization_is_refused_and_another_image_size_warned(workdir):
    save_safetensors(timm_teacher(), "teachers/t.safetensors", {"input_size": [1, 224, 224], "mean": [0.5],
                                                                  "std": [0.5]})
    result = run_teacher(workdir, "teachers/t.safetensors", "timm:test_resnet")
    assert result.exit_code == 1, result.output
    assert "normalized with mean [0.5], std [0.5] (its safetensors metadata); data.normalize gives mean [0.0]" \
        in result.output and "set data.normalize: {mean: [0.5], std: [0.5]}" in result.output
    result = run_teacher(workdir, "teachers/t.safetensors", "timm:test_resnet",
                         **{"data.normalize": {"mean": [0.5], "std": [0.5]}})
    assert result.exit_code == 0, result.output
    assert "Warning: teachers/t.safetensors: the teacher was trained on 224x224 images" in result.output


def test_a_hugging_face_folder_config_json_gives_the_pretrained_cfg(dataset, tmp_path):
    save_safetensors(timm_teacher(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_resnet", "pretrained_cfg": {
        "input_size": [1, 8, 8], "mean": [0.485], "std": [0.229]}}))
    with pytest.raises(KDError, match=r"mean \[0.485\], std \[0.229\] \(.*config.json\)"):
        load_teacher(tmp_path / "model.safetensors", "timm:test_resnet", {}, dataset)


def test_without_timm_a_timm_arch_says_how_to_install_it(workdir, monkeypatch):
    model = timm_teacher()
    save_checkpoint(model, "timm:test_resnet", 1, 10, "models/teacher.pt")
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    message = arch_error("timm:test_resnet", {})
    assert "timm is not installed" in message and "pip install -e '.[timm]'" in message
    with pytest.raises(KDError, match=r"teacher.arch: .*pip install -e '\.\[timm\]'"):
        load_params(write_params(workdir / "params.yaml", **{"teacher.arch": "timm:test_resnet"}))
    with pytest.raises(KDError, match=r"distill.student: .*timm is not installed"):
        load_params(write_params(workdir / "params.yaml", **{"distill.student": "timm:test_resnet"}))
    with pytest.raises(KDError, match=r"models/teacher.pt: .*timm is not installed"):
        load_checkpoint("models/teacher.pt")


def test_timm_archs_are_checked_by_name_and_never_download():
    pytest.importorskip("timm")
    assert arch_error("timm:test_resnet", {"drop_rate": 0.1}) is None
    assert "unknown timm model 'no_such_net'" in arch_error("timm:no_such_net", {})
    assert "has no option 'pretrained'" in arch_error("timm:test_resnet", {"pretrained": True})
    a, b = (build_model("timm:test_resnet", 1, 10, seed=3) for _ in range(2))
    assert same_weights(a, b)
