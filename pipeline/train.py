"""Training and evaluation loops: teacher training, teacher inference for the cache, distillation.

`distill` takes the teacher's logits through a `targets(x, samples, views)` callable, so the
same loop runs from the store (`store_targets`) or with the teacher live (`online_targets`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import KDError, distributed
from pipeline.data import Split, ViewDataset, fingerprint, input_transform
from pipeline.loss import kd_loss
from pipeline.models import weights_fingerprint
from pipeline.params import CacheParams, DistillParams, OptimParams
from pipeline.replay import EpochSampler, ReplayDataset, build_augment, epoch_pairs
from pipeline.store import LogitStore, StoreMeta
from pipeline.writer import StoreWriter

Targets = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EpochLog = Callable[[int, dict], None]


@torch.no_grad()
def teacher_forward(teacher: nn.Module, x: torch.Tensor, device: torch.device, amp: str = "auto") -> torch.Tensor:
    """Raw teacher logits (B, C) float32 on CPU; eval mode, no gradients, autocast per `resolve_amp(amp, device)`.

    The one forward of the cache stage and of the online teacher, so the two agree under every setting. On CUDA
    the input goes channels-last (pair it with `prepare_teacher`).
    """
    teacher.eval()
    precision = resolve_amp(amp, device)
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=getattr(torch, precision, None), enabled=precision != "off"):
        return teacher(x).float().cpu()


def resolve_amp(amp: str, device: torch.device) -> str:
    """`cache.amp`: auto -> float16 on CUDA, off elsewhere; off | float16 | bfloat16 as given."""
    if amp == "auto":
        return "float16" if device.type == "cuda" else "off"
    return amp


def prepare_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The teacher on `device` in eval mode (channels-last on CUDA, where convolutions run faster so)."""
    teacher = teacher.to(device).eval()
    return teacher.to(memory_format=torch.channels_last) if device.type == "cuda" else teacher


def make_loader(dataset, sampler, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """A DataLoader over `sampler`'s pairs; workers (if any) live as long as the loader.

    Its own generator keeps the loader from drawing on the global RNG, so the number of workers
    never changes a result (the views themselves are seeded per (sample, view) by the replay).
    """
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=device.type == "cuda",
                      generator=torch.Generator())


def teacher_logit_chunks(teacher: nn.Module, images, transform, meta: StoreMeta, chunks: list[int], batch_size: int,
                         device: torch.device, num_workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(k, logits[rows of chunk k, V, C])` float32 for each chunk index in `chunks`.

    View v of sample i is `replay_view(images[i], transform, meta.seed, i, v)`.
    """
    dataset = ReplayDataset(images, torch.zeros(len(images), dtype=torch.long), transform, meta.seed)
    pairs = lambda k: [(i, v) for i in range(*meta.chunk_rows(k)) for v in range(meta.num_views)]  # noqa: E731
    sampler = EpochSampler(lambda n: pairs(chunks[n]), len(images))
    loader = make_loader(dataset, sampler, batch_size, num_workers, device)
    total = sum(stop - first for first, stop in map(meta.chunk_rows, chunks)) * meta.num_views
    with tqdm(total=total, desc="cache", unit="view", disable=distributed.rank() != 0) as bar:
        for n, k in enumerate(chunks):
            sampler.epoch = n
            first, stop = meta.chunk_rows(k)
            block = np.empty((stop - first, meta.num_views, meta.num_classes), dtype=np.float32)
            for x, _, i, v in loader:
                block[i.numpy() - first, v.numpy()] = teacher_forward(teacher, x, device, meta.amp).numpy()
                bar.update(len(x))
            yield k, block


def expected_store(cfg: CacheParams, teacher: nn.Module, teacher_arch: str, train: Split, num_classes: int,
                   augment: list, mean, std, device: torch.device) -> StoreMeta:
    """The metadata of the store this teacher, data and `cache` params make on `device`."""
    if cfg.storage == "topk" and cfg.top_k >= num_classes:
        raise KDError(f"cache.top_k is {cfg.top_k} but the data has {num_classes} classes; top-K storage needs "
                      f"top_k < {num_classes} (or cache.storage: full)")
    return StoreMeta(num_samples=len(train), num_views=cfg.num_views, num_classes=num_classes, augment=augment,
                     mean=list(mean), std=list(std), seed=cfg.seed, dtype=cfg.dtype, storage=cfg.storage,
                     top_k=cfg.top_k if cfg.storage == "topk" else 0, chunk_samples=cfg.chunk_samples,
                     amp=resolve_amp(cfg.amp, device), teacher_arch=teacher_arch,
                     teacher_fingerprint=weights_fingerprint(teacher), dataset_fingerprint=fingerprint(train))


def cache_teacher_logits(path, cfg: CacheParams, teacher: nn.Module, teacher_arch: str, train: Split,
                         num_classes: int, augment: list, mean, std, device: torch.device,
                         num_workers: int = 0) -> tuple[StoreMeta, int]:
    """Run `teacher` over `cfg.num_views` replayed views of every sample of `train`; write the store at `path`.

    The input of view v of sample i is `input_transform(augment, mean, std)` replayed with (cfg.seed, i, v).
    An interrupted run left `<path>.partial`: only its unfinished chunks are computed. Replay (in `num_workers`
    DataLoader workers), the teacher's forward and the store writes (in a background thread) overlap.
    Under torchrun, rank r computes every world-size-th unfinished chunk: zarr ranks write their own chunks
    into the one store; for HDF5 (one writer per file) rank 0 writes the chunks every rank sends it.
    Returns (meta, number of chunks that were already done).
    """
    meta = expected_store(cfg, teacher, teacher_arch, train, num_classes, augment, mean, std, device)
    labels, me, world = train.labels.numpy(), distributed.rank(), distributed.world_size()
    writer, error = None, None
    if me == 0:  # rank 0 creates the partial store, or opens an interrupted one (refusing other parameters)
        try:
            writer = StoreWriter(path, cfg.format, meta, labels)
        except KDError as e:
            error = e
    message = distributed.broadcast(str(error) if error else None)
    if error:
        raise error
    if message:
        raise KDError(message)
    try:
        if me != 0 and cfg.format == "zarr":
            writer = StoreWriter(path, cfg.format, meta, labels)  # the partial rank 0 made
        pending = distributed.broadcast(writer.pending if me == 0 else None)
        mine = pending[me::world]
        transform = input_transform(build_augment(augment), mean, std)
        chunks = teacher_logit_chunks(prepare_teacher(teacher, device), train.images, transform, meta, mine,
                                      cfg.batch_size, device, num_workers)
        if cfg.format == "hdf5" and world > 1:  # every rank sends its chunk to rank 0, one round at a time
            for _ in range(-(-len(pending) // world)):
                gathered = distributed.gather(next(chunks, None))
                for item in gathered or []:
                    if item is not None:
                        writer.write(*item)
        else:  # this rank writes what it computes, in a background thread
            with ThreadPoolExecutor(max_workers=1) as background:
                written = None  # at most one chunk being written while the next is computed
                for k, block in chunks:
                    if written is not None:
                        written.result()
                    written = background.submit(writer.write, k, block)
                if written is not None:
                    written.result()
        distributed.barrier()
        if me == 0:
            writer.finish()
    finally:
        if writer is not None:
            writer.close()
    distributed.barrier()
    return meta, meta.num_chunks - len(pending)


def store_targets(store: LogitStore, temperature: float = 1.0) -> Targets:
    """Teacher logits read from the store for the batch's (sample, view) pairs (a top-K store's rebuilt for
    `temperature`, the run's T)."""
    return lambda x, samples, views: torch.from_numpy(store.read(samples.numpy(), views.numpy(), temperature))


def online_targets(teacher: nn.Module, device: torch.device, amp: str = "auto") -> Targets:
    """Teacher logits computed live on the batch's replayed views (the reference the cache must match)."""
    teacher = prepare_teacher(teacher, device)
    return lambda x, samples, views: teacher_forward(teacher, x, device, amp)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, transform, device: torch.device, num_workers: int = 0,
             batch_size: int = 512) -> float:
    """Fraction of `split` classified correctly, inputs through the deterministic `transform`."""
    model.eval()
    correct = 0
    loader = DataLoader(ViewDataset(split, transform), batch_size=batch_size, num_workers=num_workers)
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / len(split)


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
                  log: EpochLog = lambda e, m: None) -> nn.Module:
    """Plain CE training with a fresh augmented view of every sample each epoch (seeded, so deterministic)."""
    torch.manual_seed(seed)
    model.to(device)
    optimizer, schedule = make_optimizer(model, optim, epochs)
    dataset = ReplayDataset(train.images, train.labels, transform, seed)

    def pairs(epoch: int) -> list[tuple[int, int]]:
        order = np.random.default_rng([seed, epoch, 2]).permutation(len(train))
        return [(int(i), TEACHER_VIEWS + epoch) for i in order]

    sampler = EpochSampler(pairs, len(train))
    loader = make_loader(dataset, sampler, batch_size, num_workers, device)
    for epoch in tqdm(range(epochs), desc="teacher", unit="epoch"):
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
        log(epoch, {"loss": loss_sum / seen, "train_acc": correct / seen,
                    "val_acc": accuracy(model, val, eval_transform, device, num_workers)})
    return model.eval()


class DivergedError(KDError):
    """Training diverged: the loss became NaN or infinite."""


def _finite_loss(loss: float, epoch: int, what: str, lr: float) -> float:
    """`loss`, or a DivergedError if training diverged (a NaN/inf loss would otherwise train a model of chance
    accuracy)."""
    if not math.isfinite(loss):
        raise DivergedError(f"{what} diverged: the loss became {loss} in epoch {epoch}; lower the learning rate "
                            f"(now {lr:g}) or, when distilling, kd_weight or temperature")
    return loss


def distill_step(student: nn.Module, optimizer, targets: Targets, x: torch.Tensor, y: torch.Tensor,
                 samples: torch.Tensor, views: torch.Tensor, temperature: float, kd_weight: float,
                 device: torch.device, ce_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on `kd_loss` for a batch of views; returns (loss, student logits)."""
    teacher_logits = targets(x, samples, views).to(device) if kd_weight else None
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    logits = student(x)
    loss = kd_loss(logits, teacher_logits, y, temperature, kd_weight, ce_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def distill(student: nn.Module, train: Split, val: Split, targets: Targets, transform, eval_transform,
            replay_seed: int, num_views: int, cfg: DistillParams, *, kd_weight: float, seed: int,
            device: torch.device, num_workers: int = 0, chunk_samples: int = 0,
            log: EpochLog = lambda e, m: None, progress: bool = True) -> nn.Module:
    """Train `student` on `kd_loss` over replayed views; log loss, train_acc and val_acc per epoch.

    In epoch e, every sample i appears once, as view `epoch_views(cfg.view_schedule, ...)[i]`, built by
    `replay_view(..., replay_seed, i, v)`; `targets` gives the teacher's logits for exactly that view.
    `kd_weight` overrides cfg.kd_weight (0 for the student-alone baseline: `targets` is never called).
    With cfg.shuffle_chunks N > 0, samples are shuffled within windows of N x `chunk_samples` rows.
    `progress` False hides the per-epoch progress bar (a search shows one bar over its trials instead).
    """
    torch.manual_seed(seed)
    student.to(device)
    optimizer, schedule = make_optimizer(student, cfg.optimizer, cfg.epochs)
    dataset = ReplayDataset(train.images, train.labels, transform, replay_seed)
    window = cfg.shuffle_chunks * chunk_samples
    sampler = EpochSampler(lambda e: epoch_pairs(cfg.view_schedule, num_views, len(train), e, seed, window),
                           len(train))
    loader = make_loader(dataset, sampler, cfg.batch_size, num_workers, device)
    for epoch in tqdm(range(cfg.epochs), desc="distill" if kd_weight else "baseline", unit="epoch",
                      disable=not progress):
        student.train()
        sampler.epoch = epoch
        loss_sum = correct = seen = 0
        for x, y, samples, views in loader:
            loss, logits = distill_step(student, optimizer, targets, x, y, samples, views, cfg.temperature,
                                        kd_weight, device, cfg.ce_weight)
            y = y.to(device)
            loss_sum += _finite_loss(loss.item(), epoch, "distillation" if kd_weight else "baseline training",
                                     cfg.optimizer.lr) * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        schedule.step()
        log(epoch, {"loss": loss_sum / seen, "train_acc": correct / seen,
                    "val_acc": accuracy(student, val, eval_transform, device, num_workers)})
    return student.eval()
