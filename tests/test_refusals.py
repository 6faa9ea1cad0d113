"""Nothing silently wrong: each input that once trained on garbage or died in a traceback now stops the stage
with exit status 1 and one message naming the file, key or value (docs/refusals.md, the list of refusals)."""

import shutil

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from pipeline.models import build_model, save_checkpoint
from stages.cli import kd
from conftest import write_params


def invoke(*args):
    return CliRunner().invoke(kd, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A teacher and one complete store of each format, made by the stages."""
    root = tmp_path_factory.mktemp("made")
    params = {}
    for fmt in ("zarr", "hdf5"):
        params[fmt] = write_params(root / f"{fmt}.yaml", **{"cache.format": fmt})
    assert invoke("teacher", "--params", params["zarr"], "--out", root / "teacher.pt").exit_code == 0
    for fmt in ("zarr", "hdf5"):
        result = invoke("cache", "--params", params[fmt], "--teacher", root / "teacher.pt", "--out", root / f"s.{fmt}")
        assert result.exit_code == 0, result.output
    return root, params


@pytest.fixture
def copy(made, tmp_path):
    """A fresh copy of a made store: `copy(fmt)` -> (store path, params path, teacher path)."""
    root, params = made

    def _copy(fmt):
        source, target = root / f"s.{fmt}", tmp_path / f"s.{fmt}"
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
        return target, params[fmt], root / "teacher.pt"

    return _copy


def distill(store, params, teacher, *extra):
    return invoke("distill", "--params", params, "--teacher", teacher, "--cache", store, "--out",
                  store.parent / "student.pt", *extra)


def refused(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return True


def test_a_deleted_chunk_is_refused(copy):
    store, params, teacher = copy("zarr")
    (store / "logits/c/2/0/0").unlink()
    assert refused(distill(store, params, teacher), "are not finite", "chunk is missing")
    assert not (store.parent / "student.pt").exists()


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_nan_in_the_store_is_refused(copy, fmt):
    store, params, teacher = copy(fmt)
    if fmt == "zarr":
        zarr.open_group(str(store), mode="r+")["logits"][7, 1, 3] = np.nan
    else:
        with h5py.File(store, "a") as f:
            f["logits"][7, 1, 3] = np.nan
    assert refused(distill(store, params, teacher), "logits of sample 7 are not finite")


def test_a_truncated_zarr_chunk_is_refused(copy):
    store, params, teacher = copy("zarr")
    chunk = store / "logits/c/1/0/0"
    chunk.write_bytes(chunk.read_bytes()[:50])
    assert refused(distill(store, params, teacher), "corrupt or truncated")


def test_a_truncated_hdf5_file_is_refused(copy):
    store, params, teacher = copy("hdf5")
    store.write_bytes(store.read_bytes()[: store.stat().st_size // 3])
    assert refused(distill(store, params, teacher), "s.hdf5")


def test_a_teacher_with_nan_weights_writes_no_store(tmp_path):
    params = write_params(tmp_path / "params.yaml")
    model = build_model("tiny_cnn", 1, 10)
    with torch.no_grad():
        model.head.bias[3] = float("nan")
    save_checkpoint(model, "tiny_cnn", 1, 10, tmp_path / "nan.pt")
    result = invoke("cache", "--params", params, "--teacher", tmp_path / "nan.pt", "--out", tmp_path / "s.zarr")
    assert refused(result, "sample 0, view 0 are not finite", "NaN weights")
    assert not (tmp_path / "s.zarr").exists()


def test_logits_beyond_float16_are_refused(tmp_path):
    params = write_params(tmp_path / "params.yaml")
    model = build_model("tiny_cnn", 1, 10)
    with torch.no_grad():
        model.head.bias[0] = 1e5
    save_checkpoint(model, "tiny_cnn", 1, 10, tmp_path / "big.pt")
    result = invoke("cache", "--params", params, "--teacher", tmp_path / "big.pt", "--out", tmp_path / "s.zarr")
    assert refused(result, "exceeds float16's range", "cache.dtype: float32")


@pytest.mark.parametrize("override, field", [
    ({"augment": [{"RandomAffine": {"degrees": 30}}]}, "augment: store"),
    ({"cache.num_views": 4}, "num_views: store 2, this run 4"),
    ({"cache.seed": 9}, "seed: store 0, this run 9"),
    ({"data.normalize": {"mean": [0.5], "std": [0.5]}}, "mean: store [0.0], this run [0.5]"),
])
def test_params_that_differ_from_the_store_are_refused_naming_the_field(copy, tmp_path, override, field):
    store, _, teacher = copy("zarr")
    params = write_params(tmp_path / "other.yaml", **override)
    assert refused(distill(store, params, teacher), "does not belong to this run", field)


def test_an_infinite_kd_weight_is_refused(tmp_path):
    params = write_params(tmp_path / "params.yaml", **{"distill.kd_weight": float("inf")})
    assert refused(invoke("distill", "--params", params), "distill.kd_weight is inf")


@pytest.mark.parametrize("device, message", [("tpu", "device is 'tpu'"), ("gpu", "device is 'gpu'")])
def test_an_unknown_device_is_refused_before_any_work(tmp_path, device, message):
    params = write_params(tmp_path / "params.yaml", device=device)
    assert refused(invoke("teacher", "--params", params), message, "expected auto, cpu, cuda")


def test_normalize_with_zero_std_is_refused(tmp_path):
    params = write_params(tmp_path / "params.yaml", **{"data.normalize": {"mean": [0.5], "std": [0.0]}})
    assert refused(invoke("teacher", "--params", params), "data.normalize")


def test_an_output_under_a_folder_that_cannot_be_made_is_refused(tmp_path):
    params = write_params(tmp_path / "params.yaml")
    (tmp_path / "a_file").write_text("not a folder")
    assert refused(invoke("teacher", "--params", params, "--out", tmp_path / "a_file/teacher.pt"), "a_file")


def test_a_diverging_student_stops_with_a_clear_error_not_a_chance_level_model(made, tmp_path):
    root, params = made
    params = write_params(tmp_path / "p.yaml", **{"distill.optimizer.name": "sgd", "distill.optimizer.lr": 1e6})
    result = invoke("distill", "--params", params, "--teacher", root / "teacher.pt", "--cache", root / "s.zarr",
                    "--out", tmp_path / "student.pt")
    assert refused(result, "distillation diverged: the loss became", "lower the learning rate (now 1e+06)")
    assert not (tmp_path / "student.pt").exists()


def test_a_users_checkpoint_without_options_or_image_size_is_taken(tmp_path):
    model = build_model("tiny_cnn", 1, 10, seed=0)
    torch.save({"arch": "tiny_cnn", "in_channels": 1, "num_classes": 10, "state_dict": model.state_dict()},
               tmp_path / "mine.pt")  # docs/teachers.md's minimal dict: no "options", no "image_size"
    params = write_params(tmp_path / "params.yaml", **{"teacher.checkpoint": str(tmp_path / "mine.pt")})
    result = invoke("teacher", "--params", params, "--out", tmp_path / "teacher.pt")
    assert result.exit_code == 0, (result.output, result.exception)
    copied = torch.load(tmp_path / "teacher.pt", weights_only=True)
    assert (copied["options"], copied["image_size"]) == ({}, None)


def test_a_checkpoint_for_another_image_size_is_refused_naming_both_sizes(tmp_path):
    model = build_model("mlp", 1, 10, {"hidden_sizes": [16]}, image_size=16)
    save_checkpoint(model, "mlp", 1, 10, tmp_path / "big.pt", {"hidden_sizes": [16]}, image_size=16)
    params = write_params(tmp_path / "params.yaml", **{"teacher.checkpoint": str(tmp_path / "big.pt")})
    result = invoke("teacher", "--params", params, "--out", tmp_path / "teacher.pt")
    assert refused(result, f"{tmp_path / 'big.pt'}: teacher 'mlp' was made for 16x16 images",
                   "the data's images, 1x8x8", "set data.image_size: 16")
    assert not (tmp_path / "teacher.pt").exists()


CROP_TOO_LARGE = {"augment": [{"RandomHorizontalFlip": {"p": 0.5}}, {"RandomCrop": {"size": 10}}]}


def test_an_augmentation_larger_than_the_images_is_refused_by_the_teacher(tmp_path):
    params = write_params(tmp_path / "params.yaml", **CROP_TOO_LARGE)
    result = invoke("teacher", "--params", params, "--out", tmp_path / "teacher.pt")
    assert refused(result, "augment[1]: RandomCrop(size=(10, 10)", "of size 1x8x8", "data.image_size")
    assert not (tmp_path / "teacher.pt").exists()


def test_an_augmentation_larger_than_the_images_is_refused_with_a_users_checkpoint(made, tmp_path):
    root, _ = made
    params = write_params(tmp_path / "params.yaml", **CROP_TOO_LARGE,
                          **{"teacher.checkpoint": str(root / "teacher.pt")})
    result = invoke("teacher", "--params", params, "--out", tmp_path / "teacher.pt")
    assert refused(result, "augment[1]: RandomCrop(size=(10, 10)", "of size 1x8x8")


def test_an_augmentation_larger_than_the_images_is_refused_by_the_cache(made, tmp_path):
    root, _ = made
    params = write_params(tmp_path / "params.yaml", **CROP_TOO_LARGE)
    result = invoke("cache", "--params", params, "--teacher", root / "teacher.pt", "--out", tmp_path / "s.zarr")
    assert refused(result, "augment[1]: RandomCrop(size=(10, 10)", "of size 1x8x8")
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr.partial").exists()  # nothing begun


def test_verify_with_zero_samples_checks_chunks_and_fingerprints_only(copy):
    store, params, teacher = copy("zarr")
    result = invoke("cache", "verify", store, "--params", params, "--teacher", teacher, "--samples", 0)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "checksums and values valid" in result.output and "fingerprints match" in result.output
    assert "no (sample, view) entries recomputed (--samples 0)" in result.output
    result = invoke("cache", "verify", store, "--params", params, "--teacher", teacher, "--samples", -1)
    assert refused(result, "--samples is -1; expected", ">= 0")


@pytest.fixture(scope="module")
def topk_store(made):
    """A top-3 store of the made teacher, written by `kd cache`."""
    root, _ = made
    params = write_params(root / "topk.yaml", **{"cache.storage": "topk", "cache.top_k": 3})
    result = invoke("cache", "--params", params, "--teacher", root / "teacher.pt", "--out", root / "topk.zarr")
    assert result.exit_code == 0, result.output
    return root / "topk.zarr"


def search(store, params, teacher):
    out = store.parent / "search"
    return invoke("search", "--params", params, "--teacher", teacher, "--cache", store, "--out", out / "s.csv",
                  "--figure", out / "s.png", "--metrics", out / "s.json")


@pytest.mark.parametrize("override, field", [
    ({}, "storage: store topk, this run full"),
    ({"cache.storage": "topk", "cache.top_k": 5}, "top_k: store 3, this run 5"),
    ({"cache.storage": "topk", "cache.top_k": 3, "cache.dtype": "float32"}, "dtype: store float16, this run float32"),
    ({"cache.storage": "topk", "cache.top_k": 3, "cache.amp": "bfloat16"}, "amp: store off, this run bfloat16"),
])
@pytest.mark.parametrize("stage", ["distill", "search"])
def test_a_store_of_other_storage_dtype_or_amp_is_refused_naming_the_field(made, topk_store, tmp_path, override,
                                                                           field, stage):
    root, _ = made
    params = write_params(tmp_path / "params.yaml", **override)
    run = search if stage == "search" else distill
    assert refused(run(topk_store, params, root / "teacher.pt"), "does not belong to this run", field)


def test_amp_auto_accepts_a_store_whatever_precision_it_resolved_to(made, topk_store):
    from pipeline.data import load_dataset
    from pipeline.models import load_checkpoint
    from pipeline.params import load_params
    from stages.common import open_run_store

    root, params = made
    p = load_params(params["zarr"])
    teacher, _ = load_checkpoint(root / "teacher.pt")
    data = load_dataset(p.data)
    c = p.cache
    store = open_run_store(topk_store, 0, teacher, data, p.augment, c.seed, c.num_views, c.chunk_samples,
                           storage="topk", top_k=3, dtype=c.dtype, amp="auto")
    assert store.meta.amp == "off"  # cached on the CPU; a GPU cache (float16) is accepted the same way


def test_the_augmentation_check_leaves_the_global_generator_as_it_was():
    from pipeline.data import input_transform
    from pipeline.augment import check_augment
    from pipeline.augment import build_augment

    transform = input_transform(build_augment([{"RandomAffine": {"degrees": 10}}]), (0.0,), (1.0,))
    state = torch.get_rng_state()
    check_augment(transform, torch.zeros(1, 8, 8, dtype=torch.uint8))
    assert torch.equal(torch.get_rng_state(), state)
