"""Training and evaluation loops: teacher training and distillation, their optimisers and end-of-epoch checkpoints.

`distill` takes the teacher's logits through a `targets(x, samples, views)` callable, so the
same loop runs from the store (`store_targets`) or with the teacher live (`online_targets`), and from several
teachers at once (`pipeline.ensemble.Ensemble` of either).
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import closing
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import KDError, distributed
from pipeline.cache import prepare_teacher, teacher_forward
from pipeline.data import Split, ViewDataset
from pipeline.loaders import RankBatches, Targets, close_loader, make_loader, prefetched
from pipeline.loss import kd_loss
from pipeline.params import DistillParams, OptimParams
from pipeline.resume import Resume, capture, restore
from pipeline.replay import EpochSampler, ReplayDataset, epoch_pairs
from pipeline.store import LogitStore

EpochLog = Callable[[int, dict], None]


class StoreTargets:
    """Teacher logits read from a store for a batch's (sample, view) pairs (a top-K store's rebuilt for
    `temperature`, the run's T, with `tail`: `pipeline.topk.decode`): `targets(x, samples, views)`.

    In a DataLoader worker process it reads through its own handle, opened on first use there (h5py handles
    must not cross a fork), with `worker_budget` bytes of chunk cache.
    """

    def __init__(self, store: LogitStore, temperature: float = 1.0, worker_budget: int = 0, tail: str = "summary"):
        self.store, self.temperature, self.worker_budget, self.tail = store, temperature, worker_budget, tail
        self._pid = os.getpid()

    @property
    def in_memory(self) -> bool:
        return self.store.in_memory

    def in_workers(self, num_workers: int) -> "StoreTargets":
        """The same targets for `num_workers` DataLoader workers, each with a 1/num_workers share of the budget."""
        return StoreTargets(self.store, self.temperature, self.store.max_memory_bytes // num_workers, self.tail)

    def read(self, samples: np.ndarray, views: np.ndarray) -> np.ndarray:
        if os.getpid() != self._pid:  # a forked worker: its own handle and chunk cache
            self.store, self._pid = LogitStore(self.store.path, self.worker_budget), os.getpid()
        return self.store.read(samples, views, self.temperature, self.tail)

    def __call__(self, x, samples: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.read(samples.numpy(), views.numpy()))


def store_targets(store: LogitStore, temperature: float = 1.0, tail: str = "summary") -> StoreTargets:
    """`StoreTargets` of `store` at `temperature` (and, for a top-K store, `tail`: distill.topk_tail)."""
    return StoreTargets(store, temperature, tail=tail)


def online_targets(teacher: nn.Module, device: torch.device, amp: str = "auto") -> Targets:
    """Teacher logits computed live on the batch's replayed views (the reference the cache must match)."""
    teacher = prepare_teacher(teacher, device)
    return lambda x, samples, views: teacher_forward(teacher, x, device, amp)


def eval_loader(split: Split, transform, num_workers: int = 0, batch_size: int = 512) -> DataLoader:
    """Batches `(x, y)` of `split` through the deterministic `transform`, in order; workers (if any) persist,
    so one loader serves every epoch's validation."""
    return DataLoader(ViewDataset(split, transform), batch_size=batch_size, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split | DataLoader, transform=None, device: torch.device = torch.device("cpu"),
             num_workers: int = 0, batch_size: int = 512) -> float:
    """Fraction of `split` classified correctly, inputs through the deterministic `transform`; or of an
    `eval_loader`'s batches (then `transform` and `num_workers` are the loader's)."""
    model.eval()
    loader = split if isinstance(split, DataLoader) else eval_loader(split, transform, num_workers, batch_size)
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / total


def make_optimizer(model: nn.Module, cfg: OptimParams, epochs: int):
    """Adam or SGD with a step or cosine schedule; the scheduler steps once per epoch.

    step: from epoch lr_milestones[k] on, lr = base lr * lr_factors[k]. cosine: lr = base lr *
    (1 + cos(pi * epoch / epochs)) / 2 (lr_milestones and lr_factors unused).
    """
    if cfg.name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay)

    def factor(epoch: int) -> float:
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
        passed = [f for m, f in zip(cfg.lr_milestones, cfg.lr_factors) if epoch >= m]
        return passed[-1] if passed else 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


TEACHER_VIEWS = 1 << 32  # teacher epoch e draws its views as replay "view" 2^32 + e: never a cached view id


def train_teacher(model: nn.Module, train: Split, val: Split, transform, eval_transform, epochs: int,
                  batch_size: int, optim: OptimParams, seed: int, device: torch.device, num_workers: int = 0,
                  log: EpochLog = lambda e, m: None, resume: Resume | None = None) -> nn.Module:
    """Plain CE training with a fresh augmented view of every sample each epoch (seeded, so deterministic).

    `resume`: continue from its checkpoint when it holds one of this run, and save one after every epoch
    (`pipeline.resume`; the weights end bit-identical to an uninterrupted run's)."""
    torch.manual_seed(seed)
    model.to(device)
    optimizer, schedule = make_optimizer(model, optim, epochs)
    start, history = _resumed(resume, model, optimizer, schedule, log)
    dataset = ReplayDataset(train.images, train.labels, transform, seed)

    def pairs(epoch: int) -> list[tuple[int, int]]:
        order = np.random.default_rng([seed, epoch, 2]).permutation(len(train))
        return [(int(i), TEACHER_VIEWS + epoch) for i in order]

    sampler = EpochSampler(pairs, len(train))
    loader = make_loader(dataset, sampler, batch_size, num_workers, device)
    val_loader = eval_loader(val, eval_transform, num_workers)
    try:
        for epoch in tqdm(range(start, epochs), desc="teacher", unit="epoch", initial=start, total=epochs):
            model.train()
            sampler.epoch = epoch
            loss_sum = correct = seen = 0
            for x, y, _, _ in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += _finite_loss(loss.item(), epoch, "teacher training", optim.lr) * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
            schedule.step()
            metrics = {"loss": loss_sum / seen, "train_acc": correct / seen,
                       "val_acc": accuracy(model, val_loader, device=device)}
            _end_epoch(resume, model, optimizer, schedule, epoch, metrics, history, log)
    finally:
        close_loader(loader)
        close_loader(val_loader)
    return model.eval()


def _resumed(resume: Resume | None, model: nn.Module, optimizer, schedule, log: EpochLog) -> tuple[int, list[dict]]:
    """(first epoch to run, metrics of the epochs before it): from `resume`'s checkpoint of this run, whose logged
    metrics are replayed into `log` (so a dvclive history holds each epoch once), or (0, [])."""
    state = resume.load() if resume is not None else None
    if state is None:
        return 0, []
    start, history = restore(state, model, optimizer, schedule)
    if distributed.rank() == 0:
        print(f"Resuming from {resume.path} after epoch {start - 1}", file=sys.stderr)
    for epoch, metrics in enumerate(history):
        log(epoch, metrics)
    return start, history


def _end_epoch(resume: Resume | None, model: nn.Module, optimizer, schedule, epoch: int, metrics: dict,
               history: list[dict], log: EpochLog) -> None:
    """Log the epoch's metrics, then checkpoint (a run killed between the two re-runs this epoch, and its
    history still holds the epoch once: the log is rebuilt from the checkpoint on resume)."""
    log(epoch, metrics)
    history.append(metrics)
    if resume is not None:
        resume.save(capture(model, optimizer, schedule, epoch, history))


class DivergedError(KDError):
    """Training diverged: the loss became NaN or infinite."""


def _finite_loss(loss: float, epoch: int, what: str, lr: float) -> float:
    """`loss`, or a DivergedError if training diverged (a NaN/inf loss would otherwise train a model of chance
    accuracy)."""
    if not math.isfinite(loss):
        raise DivergedError(f"{what} diverged: the loss became {loss} in epoch {epoch}; lower the learning rate "
                            f"(now {lr:g}) or, when distilling, kd_weight or temperature")
    return loss


def distill_step(student: nn.Module, optimizer, targets: Targets | None, x: torch.Tensor, y: torch.Tensor,
                 samples: torch.Tensor, views: torch.Tensor, temperature: float, kd_weight: float,
                 device: torch.device, ce_weight: float = 1.0, teacher_logits: torch.Tensor | None = None,
                 scale: float = 1.0, real: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on `kd_loss` for a batch of views; returns (loss, student logits).

    The teacher's logits are `teacher_logits` when given (read ahead), else `targets(x, samples, views)`.
    The gradient is that of `scale` x loss (a rank's share of a global batch under torchrun; 1 alone).
    `real` 0: this rank's share of the global batch is empty and x holds a stand-in (`RankBatches`): the rank
    still steps with the others (DDP's all-reduce needs every rank) with a zero gradient; under SyncBatchNorm it
    forwards an empty batch, so the stand-in never enters the global batch statistics (empty inputs count 0).
    """
    if real == 0:
        x = x.to(device, non_blocking=True)
        if any(isinstance(m, nn.SyncBatchNorm) for m in student.modules()):
            x = x[:0]
        logits = student(x)
        loss = logits.sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), logits.detach()
    if kd_weight and teacher_logits is None:
        teacher_logits = targets(x, samples, views)
    teacher_logits = teacher_logits.to(device, non_blocking=True) if kd_weight else None
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    logits = student(x)
    loss = kd_loss(logits, teacher_logits, y, temperature, kd_weight, ce_weight)
    optimizer.zero_grad(set_to_none=True)
    (loss * scale if scale != 1.0 else loss).backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def distill(student: nn.Module, train: Split, val: Split, targets: Targets, transform, eval_transform,
            replay_seed: int, num_views: int, cfg: DistillParams, *, kd_weight: float, seed: int,
            device: torch.device, num_workers: int = 0, chunk_samples: int = 0, prefetch: int = 0,
            log: EpochLog = lambda e, m: None, progress: bool = True, resume: Resume | None = None, mix=None,
            num_classes: int = 0) -> nn.Module:
    """Train `student` on `kd_loss` over replayed views; log loss, train_acc and val_acc per epoch.

    In epoch e, every sample i appears once, as view `epoch_views(cfg.view_schedule, ...)[i]`, built by
    `replay_view(..., replay_seed, i, v)`; `targets` gives the teacher's logits for exactly that view.
    `kd_weight` overrides cfg.kd_weight (0 for the student-alone baseline: `targets` is never called).
    `mix` (`pipeline.mix`, with the data's `num_classes`): each view mixed with a partner's, as the store's views
    were; the hard-label term then takes the mixed labels, and train_acc counts the mixed label's larger class.
    With cfg.shuffle_chunks N > 0, samples are shuffled within windows of N x `chunk_samples` rows.
    `prefetch` > 0 reads that many batches' targets ahead in a background thread (same values). With
    `num_workers` > 0 and a `StoreTargets` store larger than memory, the workers read the logits with the views
    (each through its own handle and a 1/num_workers share of the store's memory budget).

    Under torchrun (world size N > 1) the student is wrapped in DistributedDataParallel (SyncBatchNorm on
    CUDA); cfg.batch_size is the global batch: every rank replays and reads only its near-equal share of each
    global batch, and its loss is scaled so that the averaged gradient is the global batch mean. The result
    matches one process up to floating-point order (on CPU, BatchNorm statistics stay per rank; dropout draws
    differ). `log` gets the global training loss and accuracy; validation runs on rank 0 only (others get
    val_acc NaN). `progress` False hides the per-epoch progress bar (a search shows one bar over its trials).
    """
    me, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(distributed.rank_seed(seed, me))  # each rank its own dropout masks; rank 0 keeps `seed`
    student.to(device)
    model = student
    if world > 1:
        if cfg.batch_size < world:
            raise KDError(f"distill.batch_size is {cfg.batch_size}, smaller than the {world} ranks; it is the "
                          "global batch, split among the ranks: make it at least the number of processes")
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, schedule = make_optimizer(student, cfg.optimizer, cfg.epochs)
    start, history = _resumed(resume, student, optimizer, schedule, log)
    # a store larger than memory is read in the DataLoader workers, beside the training step, when there are any
    in_workers = bool(kd_weight and num_workers > 0 and hasattr(targets, "in_workers") and not targets.in_memory)
    dataset = ReplayDataset(train.images, train.labels, transform, replay_seed,
                            targets.in_workers(num_workers) if in_workers else None, mix=mix, num_classes=num_classes)
    window = cfg.shuffle_chunks * chunk_samples
    batches = RankBatches(lambda e: epoch_pairs(cfg.view_schedule, num_views, len(train), e, seed, window),
                          cfg.batch_size, me, world)
    loader = make_loader(dataset, batches, None, num_workers, device)
    what = "distillation" if kd_weight else "baseline training"
    val_loader = eval_loader(val, eval_transform, num_workers) if me == 0 else None
    read_ahead = bool(kd_weight and not in_workers and prefetch > 0)
    try:
        for epoch in tqdm(range(start, cfg.epochs), desc="distill" if kd_weight else "baseline", unit="epoch",
                          initial=start, total=cfg.epochs, disable=me != 0 or not progress):
            model.train()
            batches.epoch = epoch
            totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, seen (this rank's real samples)
            with closing(prefetched(loader, targets if kd_weight and not in_workers else None,
                                    prefetch if read_ahead else 0, batches)) as items:
                for step, (batch, teacher_logits) in enumerate(items):
                    x, y, samples, views = batch[:4]
                    if in_workers:
                        teacher_logits = batch[4]
                    real, scale = batches.share(step, len(train)) if world > 1 else (len(y), 1.0)
                    loss, logits = distill_step(model, optimizer, targets, x, y, samples, views, cfg.temperature,
                                                kd_weight, device, cfg.ce_weight, teacher_logits, scale, real)
                    if real:
                        y = (y.argmax(1) if y.ndim == 2 else y).to(device)  # a mixed label: its larger class
                        totals += torch.tensor([_finite_loss(loss.item(), epoch, what, cfg.optimizer.lr) * len(y),
                                                (logits.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
            schedule.step()
            if world > 1:
                totals = distributed.all_sum(totals)
            loss_sum, correct, seen = totals.tolist()
            val_acc = accuracy(student, val_loader, device=device) if me == 0 else float("nan")
            _end_epoch(resume, student, optimizer, schedule, epoch,
                       {"loss": loss_sum / seen, "train_acc": correct / seen, "val_acc": val_acc}, history, log)
    finally:
        close_loader(loader)
        if val_loader is not None:
            close_loader(val_loader)
    return student.eval()
