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
from pipeline.loaders import (RankBatches, Targets, ahead, close_loader, make_loader, prefetched, replay_group,
                             resident, thread_safe)
from pipeline.loss import kd_loss
from pipeline.params import DistillParams, OptimParams
from pipeline.resume import Resume, capture, restore
from pipeline.replay import EpochSampler, ReplayDataset, epoch_pairs
from pipeline.step import FINITE_EVERY, DivergedError, Step, Totals
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
    so one loader serves every epoch's validation. Its own generator: starting its workers never draws on the
    global one (else a run resumed with workers would draw their seed in another epoch than an uninterrupted one,
    and its dropout masks would differ from there on)."""
    return DataLoader(ViewDataset(split, transform), batch_size=batch_size, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator())


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
    """Adam, AdamW (decoupled weight decay) or SGD with a step or cosine schedule and a linear warm-up; the
    scheduler steps once per epoch.

    The learning rate in epoch e is base lr x warm(e) x main(e). step: main(e) = lr_factors[k] from epoch
    lr_milestones[k] on (1 before the first; a fraction of `epochs` is epoch round(fraction x epochs),
    `pipeline.params.milestone_epochs`). cosine: main(e) = (1 + cos(pi e / epochs)) / 2. warm-up over
    W = warmup_epochs epochs: warm(e) = min(1, (e + 1) / (W + 1)), rising linearly into the main schedule, which
    it reaches at epoch W (W = 0: warm = 1, today's schedules exactly).
    """
    if cfg.name in ("adam", "adamw"):
        kind = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        optimizer = kind(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay)

    from pipeline.params import milestone_epochs

    milestones = milestone_epochs(cfg.lr_milestones, epochs)

    def factor(epoch: int) -> float:
        if cfg.schedule == "cosine":
            main = 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
        else:
            passed = [f for m, f in zip(milestones, cfg.lr_factors) if epoch >= m]
            main = passed[-1] if passed else 1.0
        if epoch < cfg.warmup_epochs:
            return main * (epoch + 1) / (cfg.warmup_epochs + 1)
        return main

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


BATCHES_AHEAD = 2  # batches replayed ahead of the step in a thread, where the replay may leave the main thread
TEACHER_VIEWS = 1 << 32  # teacher epoch e draws its views as replay "view" 2^32 + e: never a cached view id


def train_teacher(model: nn.Module, train: Split, val: Split, transform, eval_transform, epochs: int,
                  batch_size: int, optim: OptimParams, seed: int, device: torch.device, num_workers: int = 0,
                  log: EpochLog = lambda e, m: None, resume: Resume | None = None, amp: str = "off",
                  ema: float | None = None) -> nn.Module:
    """Plain CE training with a fresh augmented view of every sample each epoch (seeded, so deterministic).

    `amp` and `ema`: teacher.amp and teacher.ema (`pipeline.step`); with an EMA, the returned (and validated)
    model is the EMA's copy. `optim.clip_grad_norm` clips the gradient's norm.
    `resume`: continue from its checkpoint when it holds one of this run, and save one after every epoch
    (`pipeline.resume`; the weights end bit-identical to an uninterrupted run's)."""
    torch.manual_seed(seed)
    model.to(device)
    optimizer, schedule = make_optimizer(model, optim, epochs)
    step = Step(model, model, optimizer, amp, device, optim.clip_grad_norm, ema)
    start, history = _resumed(resume, model, optimizer, schedule, log, step)
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
            totals = Totals(device, "teacher training", epoch, optim.lr)
            with closing(_beside(loader)) as batches:
                for x, y, _, _ in batches:
                    y = y.to(device, non_blocking=True)
                    logits = step.forward(x)
                    loss = nn.functional.cross_entropy(logits.float(), y)
                    step.update(loss)
                    totals.add(loss, logits, y)
            schedule.step()
            loss_sum, correct, seen = totals.values()
            metrics = {"loss": loss_sum / seen, "train_acc": correct / seen,
                       "val_acc": accuracy(step.result, val_loader, device=device)}
            _end_epoch(resume, model, optimizer, schedule, epoch, metrics, history, log, step)
    finally:
        close_loader(loader)
        close_loader(val_loader)
    return step.result.eval()


def _stored(targets) -> bool:
    """Whether `targets` are a store's (or an ensemble of stores') logits, which the batches-ahead thread reads with
    the views (a group of batches at once; a store larger than memory through its chunk cache)."""
    members = getattr(targets, "members", [targets])  # a `pipeline.ensemble.Ensemble`: its teachers
    return all(isinstance(m, StoreTargets) for m in members)


def _beside(loader):
    """`loader`'s batches made BATCHES_AHEAD ahead in a thread where that is safe (`pipeline.loaders.thread_safe`),
    else in line (`ahead` with depth 0); close() ends the thread (joined) either way."""
    return ahead(loader, BATCHES_AHEAD if thread_safe(loader) else 0)


def _resumed(resume: Resume | None, model: nn.Module, optimizer, schedule, log: EpochLog,
             step: Step) -> tuple[int, list[dict]]:
    """(first epoch to run, metrics of the epochs before it): from `resume`'s checkpoint of this run, whose logged
    metrics are replayed into `log` (so a dvclive history holds each epoch once), or (0, [])."""
    state = resume.load() if resume is not None else None
    if state is None:
        return 0, []
    start, history = restore(state, model, optimizer, schedule)
    step.load(state.get("step", {}))
    if distributed.rank() == 0:
        print(f"Resuming from {resume.path} after epoch {start - 1}", file=sys.stderr)
    for epoch, metrics in enumerate(history):
        log(epoch, metrics)
    return start, history


def _end_epoch(resume: Resume | None, model: nn.Module, optimizer, schedule, epoch: int, metrics: dict,
               history: list[dict], log: EpochLog, step: Step) -> None:
    """Log the epoch's metrics, then checkpoint (a run killed between the two re-runs this epoch, and its
    history still holds the epoch once: the log is rebuilt from the checkpoint on resume)."""
    log(epoch, metrics)
    history.append(metrics)
    if resume is not None:
        resume.save({**capture(model, optimizer, schedule, epoch, history), "step": step.state()})


def distill_step(student: nn.Module, optimizer, targets: Targets | None, x: torch.Tensor, y: torch.Tensor,
                 samples: torch.Tensor, views: torch.Tensor, temperature: float, kd_weight: float,
                 device: torch.device, ce_weight: float = 1.0, teacher_logits: torch.Tensor | None = None,
                 scale: float = 1.0, real: int | None = None, step: Step | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on `kd_loss` for a batch of views; returns (loss, student logits), both on the device.

    `step` (`pipeline.step.Step`) runs the forward under the run's autocast and the update with its scaler,
    clipping and EMA; None: float32, a plain optimiser step. The loss is computed in float32 outside the autocast,
    and the teacher's logits are computed (`targets`, when run live) outside it too.
    The teacher's logits are `teacher_logits` when given (read ahead), else `targets(x, samples, views)`.
    The gradient is that of `scale` x loss (a rank's share of a global batch under torchrun; 1 alone).
    `real` 0: this rank's share of the global batch is empty and x holds a stand-in (`RankBatches`): the rank
    still steps with the others (DDP's all-reduce needs every rank) with a zero gradient; under SyncBatchNorm it
    forwards an empty batch, so the stand-in never enters the global batch statistics (empty inputs count 0).
    """
    step = step or Step(student, student, optimizer, "off", device)
    if real == 0:
        if any(isinstance(m, nn.SyncBatchNorm) for m in student.modules()):
            x = x[:0]
        logits = step.forward(x)
        step.update(logits.float().sum() * 0.0)
        return torch.zeros((), device=logits.device), logits.detach()
    if kd_weight and teacher_logits is None:
        teacher_logits = targets(x, samples, views)
    teacher_logits = teacher_logits.to(device, non_blocking=True) if kd_weight else None
    y = y.to(device, non_blocking=True)
    logits = step.forward(x)
    loss = kd_loss(logits.float(), teacher_logits, y, temperature, kd_weight, ce_weight)
    step.update(loss * scale if scale != 1.0 else loss)
    return loss.detach(), logits.detach()


def distill(student: nn.Module, train: Split, val: Split, targets: Targets, transform, eval_transform,
            replay_seed: int, num_views: int, cfg: DistillParams, *, kd_weight: float, seed: int,
            device: torch.device, num_workers: int = 0, chunk_samples: int = 0, prefetch: int = 0,
            log: EpochLog = lambda e, m: None, progress: bool = True, resume: Resume | None = None, mix=None,
            num_classes: int = 0, finite_every: int = FINITE_EVERY) -> nn.Module:
    """Train `student` on `kd_loss` over replayed views; log loss, train_acc and val_acc per epoch.

    The step's recipe (`pipeline.step`): cfg.amp (autocast of the student's forward; the loss in float32),
    cfg.channels_last, cfg.compile (`torch.compile` of the student's forward), cfg.optimizer.clip_grad_norm, and
    cfg.ema (the EMA of the weights is validated every epoch and returned). The running loss and accuracy stay on
    the device; a NaN or infinite loss stops the run within `finite_every` steps (`pipeline.step.FINITE_EVERY`).
    On a GPU with num_workers 0, in-memory images that fit (`pipeline.loaders.resident`) are moved there once and
    each batch's images are gathered there. With num_workers 0 and views replayed a batch at a time by crops and
    flips (`pipeline.loaders.thread_safe`), the next BATCHES_AHEAD batches are replayed in a thread beside the
    step (`pipeline.loaders.ahead`; the same batches: those draws never touch the global generator).

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
    if cfg.channels_last:
        student.to(memory_format=torch.channels_last)
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
    if cfg.compile:
        model = torch.compile(model)
    step = Step(model, student, optimizer, cfg.amp, device, cfg.optimizer.clip_grad_norm, cfg.ema, cfg.channels_last)
    start, history = _resumed(resume, student, optimizer, schedule, log, step)
    # a store larger than memory is read in the DataLoader workers, beside the training step, when there are any
    in_workers = bool(kd_weight and num_workers > 0 and hasattr(targets, "in_workers") and not targets.in_memory)
    dataset = ReplayDataset(train.images, train.labels, transform, replay_seed,
                            targets.in_workers(num_workers) if in_workers else None, mix=mix, num_classes=num_classes,
                            memo_views=num_views if cfg.view_schedule != "fresh" else 0)
    on_device = dataset.batched is not None and resident(train.images, device, num_workers)
    if on_device:  # each batch's images gathered on the device: no per-batch host copy
        dataset.images = train.images.to(device)
    window = cfg.shuffle_chunks * chunk_samples
    batches = RankBatches(lambda e: epoch_pairs(cfg.view_schedule, num_views, len(train), e, seed, window),
                          cfg.batch_size, me, world)
    group = replay_group(dataset, cfg.batch_size, num_workers)
    loader = make_loader(dataset, batches, None, num_workers, device, pin=not on_device, group=group)
    beside = kd_weight and not in_workers and thread_safe(loader) and _stored(targets)
    if beside:  # the logits read with the views, in the batches-ahead thread
        dataset.targets = targets
    logits_in_batch = in_workers or beside
    read_ahead = bool(kd_weight and not logits_in_batch and prefetch > 0)
    what = "distillation" if kd_weight else "baseline training"
    val_loader = eval_loader(val, eval_transform, num_workers) if me == 0 else None
    try:
        for epoch in tqdm(range(start, cfg.epochs), desc="distill" if kd_weight else "baseline", unit="epoch",
                          initial=start, total=cfg.epochs, disable=me != 0 or not progress):
            model.train()
            batches.epoch = epoch
            totals = Totals(device, what, epoch, cfg.optimizer.lr, finite_every)  # this rank's real samples
            source = _beside(loader)
            with closing(source), closing(prefetched(source, targets if kd_weight and not logits_in_batch else None,
                                                     prefetch if read_ahead else 0, batches)) as items:
                for index, (batch, teacher_logits) in enumerate(items):
                    x, y, samples, views = batch[:4]
                    if logits_in_batch:
                        teacher_logits = batch[4]
                    real, scale = batches.share(index, len(train)) if world > 1 else (len(y), 1.0)
                    loss, logits = distill_step(model, optimizer, targets, x, y, samples, views, cfg.temperature,
                                                kd_weight, device, cfg.ce_weight, teacher_logits, scale, real, step)
                    if real:
                        y = (y.argmax(1) if y.ndim == 2 else y).to(device, non_blocking=True)  # mixed: larger class
                        totals.add(loss, logits, y)
            schedule.step()
            sums = torch.tensor(totals.values(), dtype=torch.float64)  # loss sum, correct, seen
            if world > 1:
                sums = distributed.all_sum(sums)
            loss_sum, correct, seen = sums.tolist()
            val_acc = accuracy(step.result, val_loader, device=device) if me == 0 else float("nan")
            _end_epoch(resume, student, optimizer, schedule, epoch,
                       {"loss": loss_sum / seen, "train_acc": correct / seen, "val_acc": val_acc}, history, log, step)
    finally:
        close_loader(loader)
        if val_loader is not None:
            close_loader(val_loader)
    return step.result.eval()
