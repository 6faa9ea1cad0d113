"""The training recipe users bring (`pipeline.step`): mixed precision, channels-last, torch.compile, the EMA of the
weights, AdamW, warm-up and gradient clipping; and a step that never waits for the device but still stops a run
within FINITE_EVERY steps of a non-finite loss."""

import copy
import dataclasses

import pytest
import torch

from conftest import EVAL, TRANSFORM, make_store, write_params
from pipeline import train
from pipeline.loss import kd_loss
from pipeline.models import build_model, load_checkpoint, save_checkpoint
from pipeline.params import load_params
from pipeline.step import FINITE_EVERY, DivergedError, Step, resolve_train_amp
from pipeline.store import LogitStore
from pipeline.train import distill, online_targets, store_targets

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """2 epochs of tiny_cnn in batches of 16 (6 steps an epoch on 96 samples), T = 4, λ = 1."""
    path = write_params(tmp_path_factory.mktemp("recipe") / "p.yaml", **{
        "distill.temperature": 4.0, "distill.kd_weight": 1.0, "distill.batch_size": 16})
    return load_params(path).distill


@pytest.fixture(scope="module")
def float32_store(teacher, train_subset, tmp_path_factory):
    return LogitStore(make_store(tmp_path_factory.mktemp("recipe") / "s.zarr", "zarr", "float32", teacher,
                                 train_subset))


def weights(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(cfg, targets, train_subset, dataset, log=None, **changes):
    student = build_model("tiny_cnn", 1, 10, seed=0)
    kwargs = {"log": log} if log else {}
    return distill(student, train_subset, dataset.val, targets, TRANSFORM, EVAL, 7, 3,
                   dataclasses.replace(cfg, **changes), kd_weight=cfg.kd_weight, seed=0, device=CPU, **kwargs)


def assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_mixed_precision_from_a_float32_store_equals_the_live_teacher_bit_for_bit(
        amp, cfg, float32_store, teacher, train_subset, dataset):
    """distill.amp on the CPU: the student's forward under autocast; the live teacher stays outside it (its own
    cache.amp, off here), so the store's float32 logits are exactly the live ones and the students are equal."""
    cached = weights(run(cfg, store_targets(float32_store), train_subset, dataset, amp=amp))
    live = weights(run(cfg, online_targets(teacher, CPU, "off"), train_subset, dataset, amp=amp))
    assert_equal_weights(cached, live)
    full = weights(run(cfg, store_targets(float32_store), train_subset, dataset, amp="off"))
    assert any(not torch.equal(cached[k], full[k]) for k in full)  # the autocast did change the arithmetic


def test_the_kd_loss_is_float32_under_autocast_and_accurate_at_large_temperature():
    """Logits from a bfloat16 forward are upcast before the softmaxes: the loss equals the float32 loss of the same
    (bfloat16-rounded) logits, at T = 100 too."""
    torch.manual_seed(0)
    student = torch.nn.Linear(16, 10)
    x, y, t = torch.randn(32, 16), torch.randint(10, (32,)), torch.randn(32, 10) * 5
    step = Step(student, student, torch.optim.SGD(student.parameters(), lr=0.1), "bfloat16", CPU)
    logits = step.forward(x)
    assert logits.dtype == torch.bfloat16
    for temperature in (4.0, 100.0):
        loss = kd_loss(logits.float(), t, y, temperature, 1.0)
        assert loss.dtype == torch.float32
        reference = kd_loss(logits.detach().double(), t.double(), y, temperature, 1.0)
        assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item())


def test_auto_precision_is_off_on_the_cpu_and_bfloat16_on_cuda():
    assert resolve_train_amp("auto", CPU) == "off"
    assert resolve_train_amp("float16", CPU) == "float16"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_train_amp("auto", torch.device("cuda")) == "bfloat16"


@pytest.mark.parametrize("option", ["channels_last", "compile"])
def test_channels_last_and_compile_change_nothing_beyond_floating_point_order(
        option, cfg, float32_store, train_subset, dataset):
    plain = weights(run(cfg, store_targets(float32_store), train_subset, dataset))
    other = weights(run(cfg, store_targets(float32_store), train_subset, dataset, **{option: True}))
    for name in plain:
        torch.testing.assert_close(other[name].contiguous(), plain[name], rtol=1e-4, atol=1e-5)


def test_the_ema_is_validated_returned_and_saved_as_the_student(cfg, float32_store, train_subset, dataset, tmp_path):
    """distill.ema d: W_ema <- d W_ema + (1 - d) W after every step (parameters and BatchNorm buffers); the model
    returned, validated each epoch and saved is the EMA's, and the checkpoint says so."""
    decay = 0.9
    logs = []
    plain = run(cfg, store_targets(float32_store), train_subset, dataset)
    ema = run(cfg, store_targets(float32_store), train_subset, dataset, log=lambda e, m: logs.append(m), ema=decay)
    # the same training (the EMA never feeds back), so the EMA is rebuilt from a run's own steps:
    student = build_model("tiny_cnn", 1, 10, seed=0)
    averaged = {k: v.detach().clone().float() for k, v in student.state_dict().items()}
    steps = []

    class Recorder(Step):
        def update(self, loss):
            super().update(loss)
            steps.append({k: v.detach().clone() for k, v in self.weights.state_dict().items()})

    original = train.Step
    train.Step = Recorder
    try:
        distill(student, train_subset, dataset.val, store_targets(float32_store), TRANSFORM, EVAL, 7, 3, cfg,
                kd_weight=cfg.kd_weight, seed=0, device=CPU)
    finally:
        train.Step = original
    assert len(steps) == 2 * 6
    for k, w in enumerate(steps):
        for name in averaged:
            averaged[name] = w[name].float() if k == 0 else decay * averaged[name] + (1 - decay) * w[name].float()
    for name, value in ema.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, averaged[name], rtol=1e-5, atol=1e-6)
    assert_equal_weights(weights(student), weights(plain))  # the trained weights are the plain run's
    assert any(not torch.equal(ema.state_dict()[k], plain.state_dict()[k]) for k in plain.state_dict())
    assert logs[-1]["val_acc"] == train.accuracy(ema, dataset.val, EVAL)
    path = tmp_path / "student.pt"
    save_checkpoint(ema, "tiny_cnn", 1, 10, path, ema=decay)
    model, ckpt = load_checkpoint(path)
    assert ckpt["weights"] == {"ema": decay}
    assert_equal_weights(weights(model), weights(ema))


def test_adamw_decouples_weight_decay_and_clipping_bounds_the_gradient_norm(cfg):
    opt = dataclasses.replace(cfg.optimizer, name="adamw", weight_decay=0.1)
    model = torch.nn.Linear(4, 3)
    optimizer, _ = train.make_optimizer(model, opt, 4)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 0.1
    torch.manual_seed(0)
    step = Step(model, model, optimizer, "off", CPU, clip_grad_norm=0.5)
    x, y = torch.randn(8, 4) * 100, torch.randint(3, (8,))
    step.update(torch.nn.functional.cross_entropy(step.forward(x), y))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert norm <= 0.5 + 1e-5


@pytest.mark.parametrize("nan_at", [0, 5, FINITE_EVERY - 1, FINITE_EVERY, 40, 50])
def test_a_nan_loss_stops_the_run_within_finite_every_steps(nan_at, cfg, float32_store, train_subset, dataset):
    """No host synchronisation per step, yet a NaN loss at step k stops the run with the diverged message before
    step k + FINITE_EVERY: at most FINITE_EVERY - 1 more optimiser steps (fewer at an epoch's end, also checked)."""
    calls, real_loss = [0], train.kd_loss
    long = dataclasses.replace(cfg, batch_size=2)  # 48 steps an epoch

    def nan_at_step(*args, **kwargs):
        calls[0] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls[0] == nan_at + 1 else loss

    train.kd_loss = nan_at_step
    try:
        with pytest.raises(DivergedError, match=r"distillation diverged: the loss became nan in epoch \d"):
            run(long, store_targets(float32_store), train_subset, dataset)
    finally:
        train.kd_loss = real_loss
    steps_after = calls[0] - (nan_at + 1)
    assert 0 <= steps_after <= FINITE_EVERY - 1


CROP_FLIP = [{"RandomCrop": {"size": 8, "padding": 1}}, {"RandomHorizontalFlip": {}}]


def test_crops_and_flips_replay_beside_the_step_and_nothing_else_does(train_subset):
    """Only a batched replay of crops and flips with no worker processes runs in the batches-ahead thread: its draws
    use a generator of their own. Affine transforms (view by view), a RandomResizedCrop (its own make_params on the
    global generator) and worker processes stay as they were."""
    from pipeline.data import input_transform
    from pipeline.loaders import make_loader, resident, thread_safe
    from pipeline.replay import EpochSampler, ReplayDataset
    from pipeline.augment import build_augment

    def loader(augment, workers=0):
        transform = input_transform(build_augment(augment), (0.0,), (1.0,))
        dataset = ReplayDataset(train_subset.images, train_subset.labels, transform, 0)
        return make_loader(dataset, EpochSampler(lambda e: [(0, 0)], 1), 1, workers, CPU)

    assert thread_safe(loader(CROP_FLIP)) and thread_safe(loader([]))
    assert not thread_safe(loader(CROP_FLIP, workers=1))
    assert not thread_safe(loader([{"RandomAffine": {"degrees": 10}}]))
    assert not thread_safe(loader([{"RandomResizedCrop": {"size": 8}}]))
    assert not resident(train_subset.images, CPU, 0)  # on the CPU the images already are where the step runs


def test_replaying_beside_the_step_trains_the_same_dropout_student_bit_for_bit(cfg, float32_store, train_subset,
                                                                               dataset):
    """A dropout student draws its masks from the global generator every step while the thread replays the next
    batches (groups of them at once, the store's logits read with them): the weights equal those of the same run
    replaying in the training thread, and a batch at a time."""
    from pipeline.data import input_transform
    from pipeline.augment import build_augment

    transform = input_transform(build_augment(CROP_FLIP), (0.0,), (1.0,))

    def trained():
        student = build_model("mlp", 1, 10, {"hidden_sizes": [32], "dropout": 0.5, "input_dropout": 0.2}, 8, seed=0)
        return weights(distill(student, train_subset, dataset.val, store_targets(float32_store), transform, EVAL, 7,
                               3, dataclasses.replace(cfg, epochs=3), kd_weight=1.0, seed=0, device=CPU))

    threads = []
    original = train.ahead

    def counting(*args, **kwargs):
        threads.append(1)
        return original(*args, **kwargs)

    train.ahead = counting
    try:
        beside = trained()
    finally:
        train.ahead = original
    assert len(threads) == 3  # one per epoch
    original_safe, original_group = train.thread_safe, train.replay_group
    train.thread_safe = lambda loader: False
    try:
        in_line = trained()  # replayed in groups of batches, in the training thread, logits read in line
        train.replay_group = lambda *args: 1
        one_by_one = trained()  # a batch at a time, as before issue 23
    finally:
        train.thread_safe, train.replay_group = original_safe, original_group
    assert_equal_weights(beside, in_line)
    assert_equal_weights(beside, one_by_one)


def test_a_failure_making_a_batch_ahead_is_raised_in_the_training_thread():
    import threading

    from pipeline.loaders import ahead

    def items():
        yield 1
        raise ValueError("bad batch")

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for item in ahead(items(), 2):
            got.append(item)
    assert got == [1]
    assert not [t for t in threading.enumerate() if t.name == "kd-batches-ahead"]
