"""The cache is exact: loss and gradients from stored logits equal those with the teacher run live."""

import copy

import numpy as np
import pytest
import torch

from pipeline.loss import kd_loss
from pipeline.models import build_model
from pipeline.replay import ReplayDataset, build_augment, epoch_pairs
from pipeline.store import LogitStore
from pipeline.train import distill, online_targets, store_targets
from conftest import AUGMENT, make_store

CPU = torch.device("cpu")
TOLERANCE = {"float32": 1e-5, "float16": 1e-3}


def _loss_and_grads(student, x, y, teacher_logits, T, lam):
    student.zero_grad()
    loss = kd_loss(student(x), teacher_logits, y, T, lam)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters()])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_loss_equals_online_loss(fmt, dtype, teacher, train_subset, tmp_path):
    store = LogitStore(make_store(tmp_path / f"s.{fmt}", fmt, dtype, teacher, train_subset),
                       max_memory_bytes=0)  # read from disk, batch by batch
    dataset = ReplayDataset(train_subset.images, train_subset.labels, build_augment(AUGMENT), seed=7)
    student = build_model("tiny_cnn", 1, 10)
    cached, online = store_targets(store), online_targets(teacher, CPU)
    rng = np.random.default_rng(0)
    for _ in range(5):  # random batches of (sample, view)
        pairs = list(zip(rng.integers(96, size=24).tolist(), rng.integers(3, size=24).tolist()))
        x, y, samples, views = torch.utils.data.default_collate([dataset[p] for p in pairs])
        for T, lam in [(4.0, 1.0), (43.25, 38.21)]:
            loss_c, grad_c = _loss_and_grads(student, x, y, cached(x, samples, views), T, lam)
            loss_o, grad_o = _loss_and_grads(student, x, y, online(x, samples, views), T, lam)
            assert abs(loss_c - loss_o).item() / loss_o.item() <= TOLERANCE[dtype]
            assert _rel(grad_c, grad_o) <= TOLERANCE[dtype]


def test_training_from_the_cache_matches_training_with_the_live_teacher(teacher, train_subset, dataset, tmp_path):
    store = LogitStore(make_store(tmp_path / "s.zarr", "zarr", "float32", teacher, train_subset))
    torch.manual_seed(0)
    initial = build_model("tiny_cnn", 1, 10)
    runs = {}
    for name, targets in [("cache", store_targets(store)), ("online", online_targets(teacher, CPU))]:
        student = copy.deepcopy(initial)
        distill(student, train_subset, dataset.val, targets, build_augment(AUGMENT), 7, 3, temperature=4.0,
                kd_weight=1.0, view_schedule="random", epochs=2, batch_size=16, lr=1e-3, betas=[0.9, 0.999],
                weight_decay=1e-4, lr_milestones=[], lr_factors=[], seed=0, device=CPU)
        runs[name] = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert _rel(runs["cache"], runs["online"]) <= 1e-4
    assert _rel(runs["cache"], torch.cat([p.detach().flatten() for p in initial.parameters()])) > 1e-3


def test_changing_temperature_keeps_cache(teacher, train_subset, tmp_path):
    """T and λ act only on the loss: the stored logits are raw, before temperature."""
    store = LogitStore(make_store(tmp_path / "s.zarr", "zarr", "float32", teacher, train_subset))
    raw = store.read(np.arange(4), np.zeros(4, dtype=int))
    x = torch.stack([ReplayDataset(train_subset.images, train_subset.labels, build_augment(AUGMENT), 7)[(i, 0)][0]
                     for i in range(4)])
    np.testing.assert_allclose(raw, teacher(x).detach().numpy(), rtol=1e-5, atol=1e-6)
