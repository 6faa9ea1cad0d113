"""Top-K storage: the K raw logits kept, the tail's effective logit at every T, and a loss from a top-K store
that equals the documented formula evaluated on the teacher's full logits."""

import numpy as np
import pytest
import torch

from pipeline import topk
from pipeline.loss import kd_loss
from pipeline.replay import ReplayDataset
from pipeline.store import LogitStore
from pipeline.train import online_targets, store_targets
from conftest import TRANSFORM, make_store

CPU = torch.device("cpu")


def softmax(z, T):
    z = np.asarray(z, dtype=np.float64) / T
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0, 3, (50, 100)).astype(np.float32)


@pytest.mark.parametrize("T", topk.TAIL_TEMPERATURES)
def test_at_a_stored_temperature_top_k_probabilities_and_tail_mass_are_exact(logits, T):
    k = 7
    stored = topk.encode("topk", logits, k)
    q, q_hat = softmax(logits, T), softmax(topk.decode("topk", stored, T, 100), T)
    top = stored["topk_indices"].astype(np.int64)
    np.testing.assert_allclose(np.take_along_axis(q_hat, top, -1), np.take_along_axis(q, top, -1), rtol=1e-5)
    tail_mass = 1 - np.take_along_axis(q, top, -1).sum(-1)
    np.testing.assert_allclose(1 - np.take_along_axis(q_hat, top, -1).sum(-1), tail_mass, rtol=1e-4)


def test_top_k_are_the_largest_logits_and_the_tail_level_moves_with_t(logits):
    stored = topk.encode("topk", logits, 5)
    assert np.array_equal(np.sort(stored["topk_logits"], -1), np.sort(np.sort(logits, -1)[:, -5:], -1))
    levels = [topk.tail_logit(stored["tail"], T) for T in (0.5, 1, 1.5, 3, 10, 100, 1e9)]
    assert np.array_equal(levels[0], levels[1])  # below T = 1: the T = 1 value
    for hotter, cooler in zip(levels[1:], levels[:-1]):
        assert (hotter <= cooler + 1e-5).all()  # from the tail's soft maximum down to its mean
    rest = np.sort(logits, -1)[:, :-5]
    np.testing.assert_allclose(levels[-1], rest.mean(-1), rtol=1e-4, atol=1e-4)


def test_full_storage_is_the_identity(logits):
    assert topk.decode("full", topk.encode("full", logits, 0), 4.0, 100) is logits


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_loss_from_a_top_k_store_equals_the_formula_on_the_full_logits(fmt, teacher, train_subset, tmp_path):
    store = LogitStore(make_store(tmp_path / f"s.{fmt}", fmt, "float32", teacher, train_subset, storage="topk",
                                  top_k=3), max_memory_bytes=0)
    assert set(store.meta.arrays()) == {"topk_logits", "topk_indices", "tail"}
    dataset = ReplayDataset(train_subset.images, train_subset.labels, TRANSFORM, seed=7)
    pairs = [(i, (i * 7) % 3) for i in range(0, 96, 4)]
    x, y, samples, views = torch.utils.data.default_collate([dataset[p] for p in pairs])
    student = torch.randn(len(pairs), 10)
    full = online_targets(teacher, CPU)(x, samples, views).numpy()
    for T in (1.0, 3.0, 20.0):
        for tail in topk.TAILS:
            from_store = kd_loss(student, store_targets(store, T, tail)(x, samples, views), y, T, 2.0)
            decoded = topk.decode("topk", topk.encode("topk", full, 3), T, 10, tail)
            formula = kd_loss(student, torch.from_numpy(decoded), y, T, 2.0)
            assert abs(from_store - formula).item() <= 1e-5 * formula.item()


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 100.0])
def test_tail_none_is_the_renormalised_top_k_with_a_finite_loss(logits, T):
    """distill.topk_tail none: the top-K classes keep their probability ratios, the tail gets exactly 0, and the
    KD loss on it is finite and equals KL against the renormalised top K."""
    k = 5
    decoded = topk.decode("topk", topk.encode("topk", logits, k), T, logits.shape[1], "none")
    q = torch.softmax(torch.from_numpy(decoded) / T, dim=1).numpy()
    top = np.argsort(-logits, axis=1)[:, :k]
    expected = np.zeros_like(q, dtype=np.float64)
    np.put_along_axis(expected, top, softmax(np.take_along_axis(logits, top, 1), T), axis=1)
    np.testing.assert_allclose(q, expected, rtol=1e-5, atol=0)
    assert (q[expected == 0] == 0).all()
    student = torch.randn(logits.shape)
    loss = kd_loss(student, torch.from_numpy(decoded), torch.zeros(len(logits), dtype=torch.long), T, 1.0)
    log_qs = torch.log_softmax(student / T, 1).double().numpy()
    kl = (expected * (np.log(np.where(expected > 0, expected, 1)) - log_qs)).sum(1).mean()
    ce = torch.nn.functional.cross_entropy(student, torch.zeros(len(logits), dtype=torch.long)).item()
    assert np.isfinite(loss.item())
    assert abs(loss.item() - (ce + T ** 2 * kl)) <= 1e-4 * loss.item()


def test_top_k_store_is_smaller(teacher, train_subset, tmp_path):
    from pipeline.store import StoreMeta

    meta = StoreMeta(1, 1, 1000, [], [0.0], [1.0], 0, "float16", "topk", 20, 1, "off", "x", "t", "d")
    full = StoreMeta(1, 1, 1000, [], [0.0], [1.0], 0, "float16", "full", 0, 1, "off", "x", "t", "d")

    def bytes_per_view(m):
        return sum(width * np.dtype(dtype).itemsize for width, dtype in m.arrays().values())

    assert bytes_per_view(full) == 2000 and bytes_per_view(meta) == 20 * 2 + 20 * 2 + 6 * 2
