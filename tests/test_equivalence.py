"""The cache is exact: loss and gradients from stored logits equal those with the teacher run live."""

import copy

import numpy as np
import pytest
import torch

from pipeline.loss import kd_loss
from pipeline.models import build_model
from pipeline.data import input_transform
from pipeline.replay import EpochSampler, ReplayDataset, replay_view
from pipeline.augment import build_augment
from pipeline.store import LogitStore
from pipeline.train import distill, online_targets, store_targets
from pipeline.cache import teacher_forward
from pipeline.loaders import make_loader
from conftest import EVAL, MEAN, STD, TRANSFORM, make_store, write_params
from pipeline.params import load_params

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
    dataset = ReplayDataset(train_subset.images, train_subset.labels, TRANSFORM, seed=7)
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
    cfg = load_params(write_params(tmp_path / "p.yaml", **{
        "distill.temperature": 4.0, "distill.kd_weight": 1.0, "distill.view_schedule": "random",
        "distill.epochs": 2, "distill.batch_size": 16, "distill.optimizer.lr_milestones": [],
        "distill.optimizer.lr_factors": []})).distill
    store = LogitStore(make_store(tmp_path / "s.zarr", "zarr", "float32", teacher, train_subset))
    torch.manual_seed(0)
    initial = build_model("tiny_cnn", 1, 10)
    runs = {}
    for name, targets in [("cache", store_targets(store)), ("online", online_targets(teacher, CPU))]:
        student = copy.deepcopy(initial)
        distill(student, train_subset, dataset.val, targets, TRANSFORM, EVAL, 7, 3, cfg, kd_weight=1.0, seed=0,
                device=CPU)
        runs[name] = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert _rel(runs["cache"], runs["online"]) <= 1e-4
    assert _rel(runs["cache"], torch.cat([p.detach().flatten() for p in initial.parameters()])) > 1e-3


def test_changing_temperature_keeps_cache(teacher, train_subset, tmp_path):
    """T and λ act only on the loss: the stored logits are raw, before temperature."""
    store = LogitStore(make_store(tmp_path / "s.zarr", "zarr", "float32", teacher, train_subset))
    raw = store.read(np.arange(4), np.zeros(4, dtype=int))
    x = torch.stack([ReplayDataset(train_subset.images, train_subset.labels, TRANSFORM, 7)[(i, 0)][0]
                     for i in range(4)])
    np.testing.assert_allclose(raw, teacher(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_worker_processes_never_change_the_student(teacher, train_subset, dataset, tmp_path):
    """num_workers is no stage parameter: views are seeded per (sample, view), and the training and validation
    loaders draw their worker seeds from generators of their own, so dropout's random stream is the same with or
    without workers, in every epoch (a persistent validation loader with workers is started once, one without
    every epoch: either would shift the global stream from the second epoch on if it drew from it)."""
    store = LogitStore(make_store(tmp_path / "s.zarr", "zarr", "float32", teacher, train_subset))
    cfg = load_params(write_params(tmp_path / "p.yaml", **{
        "distill.epochs": 3, "distill.batch_size": 16, "distill.view_schedule": "random",
        "distill.optimizer.lr_milestones": [], "distill.optimizer.lr_factors": []})).distill
    weights = []
    for workers in (0, 2):
        student = build_model("mlp", 1, 10, {"hidden_sizes": [32], "dropout": 0.5}, 8, seed=0)
        distill(student, train_subset, dataset.val, store_targets(store), TRANSFORM, EVAL, 7, 3, cfg, kd_weight=1.0,
                seed=0, device=CPU, num_workers=workers)
        weights.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_worker_processes_never_change_the_teacher(train_subset, dataset):
    """The same for `kd teacher`'s training: a dropout teacher over 3 epochs, with 0 and 2 workers."""
    from conftest import ADAM
    from pipeline.train import train_teacher

    weights = []
    for workers in (0, 2):
        model = build_model("mlp", 1, 10, {"hidden_sizes": [32], "dropout": 0.5}, 8, seed=0)
        train_teacher(model, train_subset, dataset.val, TRANSFORM, EVAL, epochs=3, batch_size=16, optim=ADAM, seed=0,
                      device=CPU, num_workers=workers)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_cache_and_online_teacher_share_one_forward_under_autocast(teacher, train_subset, tmp_path):
    """cache.amp: the store and the online teacher run the same `teacher_forward`, so under bfloat16 autocast
    (runnable on CPU) they still agree, and the precision is recorded in the store."""
    from pipeline.params import CacheParams
    from pipeline.cache import cache_teacher_logits, resolve_amp

    cfg = CacheParams(num_views=2, seed=7, format="zarr", dtype="float32", storage="full", top_k=1, chunk_samples=32,
                      batch_size=40, amp="bfloat16")
    cache_teacher_logits(tmp_path / "s.zarr", cfg, teacher, "cnn", train_subset, 10, [], (0.0,), (1.0,), CPU)
    store = LogitStore(tmp_path / "s.zarr")
    assert store.meta.amp == "bfloat16"
    dataset = ReplayDataset(train_subset.images, train_subset.labels, EVAL, seed=7)
    x, _, samples, views = torch.utils.data.default_collate([dataset[(i, i % 2)] for i in range(40)])
    online = online_targets(teacher, CPU, "bfloat16")(x, samples, views)
    full = online_targets(teacher, CPU, "off")(x, samples, views)
    cached = torch.from_numpy(store.read(samples.numpy(), views.numpy()))
    assert torch.equal(cached, online)  # same batch composition as the cache's first chunk: same arithmetic
    assert not torch.equal(online, full)  # bfloat16 really ran
    assert resolve_amp("auto", torch.device("cuda")) == "float16" and resolve_amp("auto", CPU) == "off"


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_windowed_shuffle_visits_every_sample_once_and_reads_the_same_from_disk_as_from_memory(
        teacher, train_subset, dataset, tmp_path, fmt):
    """distill.shuffle_chunks: batches stay within windows of whole chunks, every (sample, view) of the epoch is
    visited once, and a student trained through the chunk cache (store on disk) equals one trained from memory."""
    from pipeline.replay import epoch_pairs

    pairs = epoch_pairs("random", 3, 96, epoch=4, seed=0, window=32)
    assert sorted(i for i, _ in pairs) == list(range(96))
    assert [len({i // 32 for i, _ in pairs[s:s + 32]}) for s in range(0, 96, 32)] == [1, 1, 1]
    path = make_store(tmp_path / f"s.{fmt}", fmt, "float16", teacher, train_subset, chunk_samples=16)
    cfg = load_params(write_params(tmp_path / "p.yaml", **{
        "distill.epochs": 2, "distill.batch_size": 16, "distill.shuffle_chunks": 2,
        "distill.optimizer.lr_milestones": [], "distill.optimizer.lr_factors": []})).distill
    weights = []
    # whole store in memory; on disk through a 2-chunk cache, read in line, read ahead in a thread, and read by
    # two DataLoader workers (each through its own handle)
    for budget, prefetch, workers in ((1 << 30, 0, 0), (0, 0, 0), (0, 3, 0), (0, 0, 2)):
        store = LogitStore(path, max_memory_bytes=budget)
        assert store.in_memory == bool(budget)
        student = build_model("tiny_cnn", 1, 10, seed=0)
        distill(student, train_subset, dataset.val, store_targets(store), TRANSFORM, EVAL, 7, 3, cfg, kd_weight=1.0,
                seed=0, device=CPU, chunk_samples=16, prefetch=prefetch, num_workers=workers)
        weights.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert all(torch.equal(weights[0], w) for w in weights[1:])


CROP_FLIP = [{"RandomCrop": {"size": 8, "padding": 1}}, {"RandomHorizontalFlip": {}}]


def test_batched_replay_stores_the_logits_of_replay_views(teacher, train_subset, tmp_path):
    """Crops and flips are replayed a batch at a time (`BatchReplay`): the store holds the teacher's logits for
    exactly `replay_view`'s inputs, bit for bit (same batches of 40, in the cache's order)."""
    transform = input_transform(build_augment(CROP_FLIP), MEAN, STD)
    assert ReplayDataset(train_subset.images, train_subset.labels, transform, 7).batched is not None
    store = LogitStore(make_store(tmp_path / "s.zarr", "zarr", "float32", teacher, train_subset, augment=CROP_FLIP))
    pairs = [(i, v) for i in range(96) for v in range(3)]
    x = torch.stack([replay_view(train_subset.images[i], transform, 7, i, v) for i, v in pairs])
    expected = torch.cat([teacher_forward(teacher, x[s:s + 40], CPU) for s in range(0, len(x), 40)])
    stored = store.read(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    np.testing.assert_array_equal(stored, expected.numpy())


@pytest.mark.parametrize("workers", [0, 1])
def test_batched_replay_feeds_the_student_the_same_batches(train_subset, workers):
    transform = input_transform(build_augment(CROP_FLIP), MEAN, STD)
    order = np.random.default_rng(0).permutation(96)
    sampler = EpochSampler(lambda e: [(int(i), int(e + i) % 3) for i in order], 96)
    got = {}
    for batched in (True, False):
        dataset = ReplayDataset(train_subset.images, train_subset.labels, transform, 7, batched=batched)
        assert (dataset.batched is not None) == batched
        got[batched] = [list(b) for b in make_loader(dataset, sampler, 16, workers, CPU)]
    assert len(got[True]) == 6
    for a, b in zip(got[True], got[False]):
        for u, w in zip(a, b):
            assert torch.equal(u, w)


@pytest.mark.parametrize("augment", ["affine", "crop_flip"])
def test_cache_workers_running_the_teacher_write_the_same_store(teacher, train_subset, tmp_path, augment):
    """On the CPU with num_workers > 0, the workers replay and run the teacher (one torch thread each): the
    store is the one the main process alone writes, bit for bit."""
    from conftest import AUGMENT
    from pipeline.params import CacheParams
    from pipeline.cache import cache_teacher_logits

    spec = AUGMENT if augment == "affine" else CROP_FLIP
    cfg = CacheParams(num_views=2, seed=3, format="zarr", dtype="float32", storage="full", top_k=1,
                      chunk_samples=32, batch_size=40, amp="auto")
    stored = []
    for workers in (0, 2):
        path = tmp_path / f"w{workers}.zarr"
        cache_teacher_logits(path, cfg, teacher, "cnn", train_subset, 10, spec, MEAN, STD, CPU, num_workers=workers)
        stored.append(LogitStore(path).read(np.repeat(np.arange(96), 2), np.tile(np.arange(2), 96)))
    np.testing.assert_array_equal(stored[0], stored[1])


@pytest.mark.parametrize("student", ["mlp_dropout", "tiny_cnn"])
def test_every_read_path_and_the_live_teacher_train_the_same_student_bit_for_bit(
        student, teacher, train_subset, dataset, tmp_path):
    """The promise "same bits, whatever the path": a student with dropout (draws on torch's generator every step)
    and one with BatchNorm, trained from a float32 store in memory, read in line from disk, read ahead in a thread
    (which only reads the store: replay stays in the training thread), read by two DataLoader workers, and with
    the teacher run live on the same views: all equal, bit for bit, and again when run a second time."""
    path = make_store(tmp_path / "s.zarr", "zarr", "float32", teacher, train_subset, chunk_samples=16)
    cfg = load_params(write_params(tmp_path / "p.yaml", **{
        "distill.epochs": 2, "distill.batch_size": 16, "distill.shuffle_chunks": 2, "distill.view_schedule": "random",
        "distill.optimizer.lr_milestones": [], "distill.optimizer.lr_factors": []})).distill
    paths = [("memory", 1 << 30, 0, 0), ("in line", 0, 0, 0), ("read ahead", 0, 4, 0), ("2 workers", 0, 0, 2),
             ("online", None, 0, 0)]
    weights = {}
    for name, budget, prefetch, workers in paths:
        for attempt in range(2):
            if budget is None:
                targets = online_targets(teacher, CPU)
            else:
                store = LogitStore(path, max_memory_bytes=budget)
                assert store.in_memory == bool(budget)
                targets = store_targets(store)
            model = (build_model("mlp", 1, 10, {"hidden_sizes": [32], "dropout": 0.5, "input_dropout": 0.2}, 8, seed=0)
                     if student == "mlp_dropout" else build_model("tiny_cnn", 1, 10, seed=0))
            distill(model, train_subset, dataset.val, targets, TRANSFORM, EVAL, 7, 3, cfg, kd_weight=1.0, seed=0,
                    device=CPU, chunk_samples=16, prefetch=prefetch, num_workers=workers)
            weights[name, attempt] = torch.cat([p.detach().flatten() for p in model.parameters()])
    reference = weights["memory", 0]
    different = [key for key, w in weights.items() if not torch.equal(w, reference)]
    assert not different, different


def test_replay_refuses_to_run_outside_the_main_thread(train_subset):
    """Replay reseeds torch's global generator: in a second thread it could interleave with the training step's
    dropout draws, so it is refused there by construction, not left to timing."""
    import threading

    errors = []

    def replay():
        try:
            replay_view(train_subset.images[0], TRANSFORM, 7, 0, 0)
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=replay, name="reader")
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]


def test_a_compiled_teacher_writes_the_store_within_float32_rounding(teacher, train_subset, tmp_path):
    """cache.compile: the same views through `torch.compile(teacher)`, run in this process (workers only replay):
    the logits agree with the eager store within float32 rounding."""
    import dataclasses

    from pipeline.cache import cache_teacher_logits
    from pipeline.params import CacheParams

    cfg = CacheParams(num_views=2, seed=3, format="zarr", dtype="float32", storage="full", top_k=1, chunk_samples=48,
                      batch_size=48, amp="auto")
    pairs = np.repeat(np.arange(96), 2), np.tile(np.arange(2), 96)
    stored = {}
    for compiled, workers in ((False, 0), (True, 1)):
        path = tmp_path / f"c{compiled}.zarr"
        cache_teacher_logits(path, dataclasses.replace(cfg, compile=compiled), teacher, "cnn", train_subset, 10,
                             CROP_FLIP, MEAN, STD, CPU, num_workers=workers)
        stored[compiled] = LogitStore(path).read(*pairs)
    np.testing.assert_allclose(stored[True], stored[False], rtol=1e-5, atol=1e-5 * np.abs(stored[False]).max())
