"""The four stages end to end through the `kd` click commands, on tiny settings, and their errors."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.models import build_model, save_checkpoint
from stages.cli import kd
from conftest import write_params


def invoke(*args):
    result = CliRunner().invoke(kd, [str(a) for a in args])
    return result


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("command", ["teacher", "cache", "distill", "search", "evaluate"])
def test_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "--params" in result.output


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_pipeline_end_to_end(workdir, fmt):
    params = write_params(workdir / "params.yaml", **{"cache.format": fmt, "evaluate.threshold": 0.5})
    store = f"cache/logits.{fmt}"
    assert invoke("teacher", "--params", params, "--live-dir", "live/teacher").exit_code == 0
    result = invoke("cache", "--params", params, "--out", store)
    assert result.exit_code == 0, result.output
    assert "2 views" in result.output and not os.path.exists(store + ".partial")
    for extra in ([], ["--baseline"]):
        name = "baseline" if extra else "student"
        result = invoke("distill", "--params", params, "--cache", store, "--out", f"models/{name}.pt",
                        "--live-dir", f"reports/live/{name}", *extra)
        assert result.exit_code == 0, result.output
    result = invoke("evaluate", "--params", params)
    assert result.exit_code == 0, result.output
    assert "Student model test accuracy: " in result.output
    assert "Is above threshold performance? " in result.output
    metrics = json.loads((workdir / "reports/metrics.json").read_text())
    for key in ("teacher_acc", "student_acc", "baseline_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (workdir / "reports/figures/training.png").stat().st_size > 10_000
    assert "| Student (distilled) |" in (workdir / "reports/report.md").read_text()


def test_online_teacher_source_needs_no_store(workdir):
    params = write_params(workdir / "params.yaml", **{"distill.teacher_source": "online"})
    assert invoke("teacher", "--params", params).exit_code == 0
    result = invoke("distill", "--params", params)
    assert result.exit_code == 0, result.output


def test_users_teacher_checkpoint_is_validated_and_copied(workdir):
    mine = build_model("cnn", 1, 10)
    save_checkpoint(mine, "cnn", 1, 10, workdir / "mine.pt")
    params = write_params(workdir / "params.yaml", **{"teacher.checkpoint": "mine.pt"})
    result = invoke("teacher", "--params", params, "--out", "models/teacher.pt")
    assert result.exit_code == 0, result.output
    copied = torch.load(workdir / "models/teacher.pt", weights_only=True)
    assert copied["arch"] == "cnn"
    assert all(torch.equal(copied["state_dict"][k], v) for k, v in mine.state_dict().items())


@pytest.mark.parametrize("content, message", [
    (None, "checkpoint not found"),
    (b"not a checkpoint", "is a text file (it starts 'not a checkpoint'), not a checkpoint"),
    (b"\x80\x02garbage", "not a readable PyTorch checkpoint"),
    ({"state_dict": {}}, "checkpoint must be a dict with keys"),
    ({"arch": "cnn", "in_channels": 1, "num_classes": 10, "state_dict": {"w": torch.zeros(1)}},
     "does not fit architecture 'cnn'"),
    ("wrong-classes", "predicts 7 classes; the data has 1 and 10"),
])
def test_bad_teacher_checkpoint_is_a_clear_error(workdir, content, message):
    path = workdir / "mine.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "wrong-classes":
        save_checkpoint(build_model("cnn", 1, 7), "cnn", 1, 7, path)
    elif content is not None:
        torch.save(content, path)
    params = write_params(workdir / "params.yaml", **{"teacher.checkpoint": "mine.pt"})
    result = invoke("teacher", "--params", params, "--out", "models/teacher.pt")
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (workdir / "models/teacher.pt").exists()


def test_distill_refuses_store_from_another_teacher(workdir):
    params = write_params(workdir / "params.yaml")
    assert invoke("teacher", "--params", params, "--out", "t1.pt").exit_code == 0
    assert invoke("cache", "--params", params, "--teacher", "t1.pt", "--out", "s.zarr").exit_code == 0
    save_checkpoint(build_model("tiny_cnn", 1, 10), "tiny_cnn", 1, 10, workdir / "t2.pt")
    result = invoke("distill", "--params", params, "--teacher", "t2.pt", "--cache", "s.zarr")
    assert result.exit_code == 1 and "does not belong to this run" in result.output
    assert "teacher_fingerprint: store" in result.output
    assert not (workdir / "models/student.pt").exists()


def test_distill_refuses_missing_or_incomplete_store(workdir):
    params = write_params(workdir / "params.yaml")
    assert invoke("teacher", "--params", params).exit_code == 0
    result = invoke("distill", "--params", params, "--cache", "nothing.zarr")
    assert result.exit_code == 1 and "nothing.zarr: logit store not found" in result.output
    from pipeline.store import StoreMeta
    from pipeline.writer import StoreWriter

    meta = StoreMeta(10, 2, 10, [], [0.0], [1.0], 0, "float16", "full", 0, 4, "off", "cnn", "t", "d")
    writer = StoreWriter(workdir / "half.zarr", "zarr", meta, np.zeros(10, np.int64))
    writer.write(0, np.zeros((4, 2, 10), np.float32))  # then killed: never finished
    result = invoke("distill", "--params", params, "--cache", "half.zarr.partial")
    assert result.exit_code == 1 and "store is incomplete (1 of 3 chunks written" in result.output
    result = invoke("distill", "--params", params, "--cache", "half.zarr")
    assert result.exit_code == 1 and "half.zarr.partial is an interrupted `kd cache`" in result.output


def test_failed_cache_leaves_no_store(workdir, monkeypatch):
    """The teacher fails after the first chunk is written: no store appears, and an older one is left as it was.

    (Whether `<out>.partial` is kept, to resume from, is the writer's business; it is never the store.)
    """
    import pipeline.cache
    from pipeline.store import LogitStore

    params = write_params(workdir / "params.yaml", **{"cache.chunk_samples": 100, "cache.batch_size": 200})
    assert invoke("teacher", "--params", params).exit_code == 0
    assert invoke("cache", "--params", params, "--out", "old.zarr").exit_code == 0
    old = LogitStore("old.zarr")
    every_pair = np.repeat(np.arange(old.meta.num_samples), 2), np.tile(np.arange(2), old.meta.num_samples)
    old_meta, old_logits = old.meta, old.read(*every_pair)

    teacher_logits_on, calls = pipeline.cache.teacher_logits_on, []

    def fails_on_the_third_batch(teacher, x, device, amp):  # one batch per chunk: chunk_samples x 2 views
        calls.append(len(x))
        if len(calls) == 3:  # a batch's logits are taken once the next is queued: chunk 1 is being written
            raise RuntimeError("boom")
        return teacher_logits_on(teacher, x, device, amp)

    monkeypatch.setattr(pipeline.cache, "teacher_logits_on", fails_on_the_third_batch)
    reseeded = write_params(workdir / "reseeded.yaml", **{"cache.chunk_samples": 100, "cache.batch_size": 200,
                                                          "cache.seed": 1})  # other logits than old.zarr's
    for out in ("new.zarr", "old.zarr"):
        calls.clear()
        result = invoke("cache", "--params", reseeded, "--out", out)
        assert isinstance(result.exception, RuntimeError) and str(result.exception) == "boom", result.output
        assert result.exit_code != 0 and calls == [200, 200, 200]
    assert not (workdir / "new.zarr").exists()
    kept = LogitStore("old.zarr")
    assert kept.meta == old_meta and np.array_equal(kept.read(*every_pair), old_logits)


def test_same_params_give_the_same_teacher(workdir):
    """DVC's rule for stage code: deterministic. Same seed, same weights, bit for bit."""
    params = write_params(workdir / "params.yaml")
    for name in ("a.pt", "b.pt"):
        assert invoke("teacher", "--params", params, "--out", name).exit_code == 0
    a, b = (torch.load(workdir / n, weights_only=True)["state_dict"] for n in ("a.pt", "b.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_image_folder_pipeline_end_to_end_with_workers(workdir):
    """A user's own JPEG/PNG folder through every stage, decoded lazily in a DataLoader worker."""
    from test_data import write_image_folder

    root = write_image_folder(workdir / "images", per_class=8, size=16)
    params = write_params(workdir / "params.yaml", **{
        "num_workers": 1, "data.name": "imagefolder", "data.root": str(root), "data.val_fraction": 0.25,
        "augment": [{"RandomCrop": {"size": 16, "padding": 2}}, {"RandomHorizontalFlip": {"p": 0.5}}],
        "teacher.arch": "resnet8", "distill.student": "mlp", "distill.student_options": {"hidden_sizes": [32]},
        "distill.optimizer.name": "sgd", "distill.optimizer.lr": 0.01, "distill.optimizer.schedule": "cosine",
        "evaluate.threshold": 0.0})
    assert invoke("teacher", "--params", params, "--live-dir", "live/teacher").exit_code == 0
    result = invoke("cache", "--params", params, "--out", "s.zarr")
    assert result.exit_code == 0 and "18 samples x 2 views x 3 classes" in result.output, result.output
    for extra, name in (([], "student"), (["--baseline"], "baseline")):
        result = invoke("distill", "--params", params, "--cache", "s.zarr", "--out", f"models/{name}.pt",
                        "--live-dir", f"reports/live/{name}", *extra)
        assert result.exit_code == 0, result.output
    result = invoke("evaluate", "--params", params)
    assert result.exit_code == 0 and "Student model test accuracy" in result.output, result.output
    metrics = json.loads((workdir / "reports/metrics.json").read_text())
    assert metrics["test_samples"] == 6 and 0 <= metrics["student_errors"] <= 6
    student = torch.load(workdir / "models/student.pt", weights_only=True)
    assert student["arch"] == "mlp" and student["options"] == {"hidden_sizes": [32]}


def test_corrupt_image_in_a_worker_is_one_clear_message(workdir):
    from test_data import write_image_folder

    root = write_image_folder(workdir / "images", per_class=4)
    for path in (root / "train").rglob("*.png"):
        path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    params = write_params(workdir / "params.yaml", **{
        "num_workers": 1, "data.name": "imagefolder", "data.root": str(root), "data.val_fraction": 0.25,
        "augment": []})
    result = invoke("teacher", "--params", params)
    assert result.exit_code == 1 and "cannot decode image" in result.output and ".png" in result.output
    assert "Traceback" not in result.output and "Original" not in result.output, result.output


def test_teacher_checkpoint_must_lie_in_the_tracked_folder(workdir):
    save_checkpoint(build_model("cnn", 1, 10), "cnn", 1, 10, workdir / "mine.pt")
    (workdir / "teachers").mkdir()
    params = write_params(workdir / "params.yaml", **{"teacher.checkpoint": "mine.pt"})
    result = invoke("teacher", "--params", params, "--checkpoint-dir", "teachers")
    assert result.exit_code == 1 and "outside teachers/" in result.output


def test_malformed_data_file_is_one_clear_message(workdir):
    from test_sources import write_idx, write_mnist

    write_mnist(workdir / "mnist", gz=False)
    write_idx(workdir / "mnist/train-images-idx3-ubyte", np.zeros((5, 28, 28)), magic=0x0801)
    params = write_params(workdir / "params.yaml", **{"data.name": "mnist", "data.root": str(workdir / "mnist")})
    result = invoke("teacher", "--params", params)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "train-images-idx3-ubyte" in result.output and "expected 0x00000803" in result.output, result.output


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_cache_verify_checks_chunks_and_recomputes_entries(workdir, fmt):
    import h5py
    import zarr

    params = write_params(workdir / "params.yaml", **{"cache.format": fmt})
    assert invoke("teacher", "--params", params).exit_code == 0
    store = f"s.{fmt}"
    assert invoke("cache", "--params", params, "--out", store).exit_code == 0
    result = invoke("cache", "verify", store, "--params", params, "--samples", "32")
    assert result.exit_code == 0, result.output
    assert "chunks present, checksums and values valid" in result.output and "32 recomputed" in result.output
    # Logits that are well-formed but not this teacher's (checksums recomputed on write): caught by recomputing.
    if fmt == "zarr":
        logits = zarr.open_group(store, mode="r+")["logits"]
        logits[:] = logits[:] + 1
    else:
        with h5py.File(store, "a") as f:
            f["logits"][:] = f["logits"][:] + 1
    result = invoke("cache", "verify", store, "--params", params, "--samples", "32")
    assert result.exit_code == 1 and "32 of 32 recomputed entries differ" in result.output, result.output


def test_cache_verify_finds_a_missing_chunk(workdir):
    params = write_params(workdir / "params.yaml")
    assert invoke("teacher", "--params", params).exit_code == 0
    assert invoke("cache", "--params", params, "--out", "s.zarr").exit_code == 0
    (workdir / "s.zarr/logits/c/3/0/0").unlink()
    result = invoke("cache", "verify", "s.zarr", "--params", params)
    assert result.exit_code == 1 and "sample 300 are not finite" in result.output, result.output


def test_top_k_store_through_the_stages(workdir):
    params = write_params(workdir / "params.yaml", **{"cache.storage": "topk", "cache.top_k": 3})
    assert invoke("teacher", "--params", params).exit_code == 0
    assert invoke("cache", "--params", params, "--out", "s.zarr").exit_code == 0
    result = invoke("cache", "verify", "s.zarr", "--params", params, "--samples", "16")
    assert result.exit_code == 0 and "16 recomputed" in result.output, result.output
    result = invoke("distill", "--params", params, "--cache", "s.zarr")
    assert result.exit_code == 0, result.output
    too_many = write_params(workdir / "k.yaml", **{"cache.storage": "topk", "cache.top_k": 10})
    result = invoke("cache", "--params", too_many, "--out", "k.zarr")
    assert result.exit_code == 1 and "cache.top_k is 10 but the data has 10 classes" in result.output
