"""Shared fixtures: tiny params files, a small teacher and real zarr / HDF5 stores made from it."""

from __future__ import annotations

from pathlib import Path

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
def teacher(dataset):
    """A CNN teacher trained for two epochs: logits on a realistic scale (eval mode)."""
    model = build_model("cnn", 1, dataset.num_classes)
    return train_teacher(model, dataset.train, dataset.val, TRANSFORM, EVAL, epochs=2, batch_size=64, optim=ADAM,
                         seed=0, device=torch.device("cpu"))


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
