"""Shared fixtures: tiny params files, a small teacher and real zarr / HDF5 stores made from it."""

from __future__ import annotations

import os
from pathlib import Path

if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test`'s workers share the cores: one torch thread each, and one for every command they start (read by
    # torch at its import, below, and inherited by kd, dvc and torchrun)
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch
import yaml

from pipeline.data import Split, input_transform, load_dataset
from pipeline.models import build_model, save_checkpoint
from pipeline.params import CacheParams, OptimParams, load_params
from pipeline.augment import build_augment
from pipeline.train import train_teacher
from pipeline.cache import cache_teacher_logits

ROOT = Path(__file__).resolve().parents[1]

# Small and fast, but every part real: 2 views, a real augmentation with several random draws.
TINY = {
    "teacher.arch": "tiny_cnn", "teacher.epochs": 1,
    "cache.num_views": 2, "cache.chunk_samples": 100,
    "distill.epochs": 2, "distill.optimizer.lr_milestones": [1], "distill.optimizer.lr_factors": [0.1],
    "evaluate.threshold": 0.0,
}
AUGMENT = [{"RandomAffine": {"degrees": 15, "translate": [0.125, 0.125]}},
           {"RandomErasing": {"p": 0.5, "scale": [0.02, 0.1]}}]
MEAN, STD = (0.0,), (1.0,)  # digits' normalization (auto)
TRANSFORM = input_transform(build_augment(AUGMENT), MEAN, STD)  # uint8 image -> augmented float input
EVAL = input_transform(None, MEAN, STD)
ADAM = OptimParams(name="adam", lr=1e-3, betas=[0.9, 0.999], momentum=0.9, nesterov=False, weight_decay=0.0,
                   schedule="step", lr_milestones=[], lr_factors=[])

# The files that start many processes (kd commands, torchrun, dvc repro), slowest first. `make test` runs the suite
# on two pytest-xdist workers a file at a time (--dist loadfile --no-loadscope-reorder): these start first and the
# quick files even out the two workers' ends. A plain `pytest` keeps the usual order.
SLOWEST_FILES = ("test_dvc.py", "test_ensemble_dvc.py", "test_resume.py", "test_studies.py", "test_s3.py",
                 "test_resume_training.py", "test_bench.py", "test_distributed.py", "test_ensemble.py", "test_mix.py")


def pytest_collection_modifyitems(items):
    if "PYTEST_XDIST_WORKER" in os.environ:
        rank = {name: k for k, name in enumerate(SLOWEST_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


def write_params(path: Path, **overrides) -> Path:
    """The project's params.yaml with dotted-key overrides (e.g. `**{"distill.temperature": 2.0}`)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in {**TINY, **overrides}.items():
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def params_path(tmp_path) -> Path:
    return write_params(tmp_path / "params.yaml")


@pytest.fixture(scope="session")
def dataset():
    return load_dataset(load_params(ROOT / "params.yaml").data)


@pytest.fixture(scope="session")
def train_subset(dataset) -> Split:
    """The first 96 training samples: enough for several batches, fast to run a teacher over."""
    return Split(dataset.train.images[:96], dataset.train.labels[:96])


@pytest.fixture(scope="session")
def teacher(dataset, tmp_path_factory):
    """A CNN teacher trained for two epochs: logits on a realistic scale (eval mode). Under pytest-xdist (`make
    test`) the first worker to need it trains it and leaves its weights in the run's shared folder; the others load
    them (the same model, bit for bit) instead of training it again."""
    def trained():
        model = build_model("cnn", 1, dataset.num_classes)
        return train_teacher(model, dataset.train, dataset.val, TRANSFORM, EVAL, epochs=2, batch_size=64,
                             optim=ADAM, seed=0, device=torch.device("cpu"))

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return trained()
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "teacher_weights.pt"  # this run's, seen by every worker
    with FileLock(f"{shared}.lock"):
        if shared.exists():
            model = build_model("cnn", 1, dataset.num_classes)
            model.load_state_dict(torch.load(shared, weights_only=True))
            return model.eval()
        model = trained()
        torch.save(model.state_dict(), shared)
        return model


@pytest.fixture(scope="session")
def teacher_path(teacher, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(teacher, "cnn", 1, 10, path)
    return path


def make_store(path: Path, fmt: str, dtype: str, teacher, split: Split, num_views: int = 3, seed: int = 7,
               augment=AUGMENT, chunk_samples: int = 32, storage: str = "full", top_k: int = 1, mix=None) -> Path:
    """Write a real store of `fmt` by running `teacher` over `split`, with the function `kd cache` calls."""
    cfg = CacheParams(num_views=num_views, seed=seed, format=fmt, dtype=dtype, storage=storage, top_k=top_k,
                      chunk_samples=chunk_samples, batch_size=40, amp="auto")
    cache_teacher_logits(path, cfg, teacher, "cnn", split, 10, augment, MEAN, STD, device=torch.device("cpu"), mix=mix)
    return path
