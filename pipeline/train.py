"""Training and evaluation loops: teacher training, teacher inference for the cache, distillation.

`distill` takes the teacher's logits through a `targets(x, samples, views)` callable, so the
same loop runs from the store (`store_targets`) or with the teacher live (`online_targets`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.data import Split, fingerprint
from pipeline.loss import kd_loss
from pipeline.models import weights_fingerprint
from pipeline.replay import ReplayDataset, build_augment, epoch_pairs
from pipeline.store import LogitStore, StoreMeta, write_store

Targets = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EpochLog = Callable[[int, dict], None]


@torch.no_grad()
def teacher_forward(teacher: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Raw teacher logits (B, C) float32 on CPU; eval mode, no gradients, float16 autocast on CUDA."""
    teacher.eval()
    with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        return teacher(x.to(device, non_blocking=True)).float().cpu()


def teacher_logit_blocks(teacher: nn.Module, images: torch.Tensor, transform, seed: int, num_views: int,
                         batch_size: int, block_samples: int, device: torch.device
                         ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(first_row, logits[rows, V, C])` for every training sample and view, block by block.

    View v of sample i is `replay_view(images[i], transform, seed, i, v)`; blocks follow the store's chunks.
    """
    dataset = ReplayDataset(images, torch.zeros(len(images), dtype=torch.long), transform, seed)
    n = len(images)
    with tqdm(total=n * num_views, desc="cache", unit="view") as bar:
        for start in range(0, n, block_samples):
            stop = min(n, start + block_samples)
            pairs = [(i, v) for i in range(start, stop) for v in range(num_views)]
            block = None
            for x, _, i, v in DataLoader(dataset, sampler=pairs, batch_size=batch_size):
                logits = teacher_forward(teacher, x, device).numpy()
                if block is None:
                    block = np.empty((stop - start, num_views, logits.shape[1]), dtype=np.float32)
                block[i.numpy() - start, v.numpy()] = logits
                bar.update(len(x))
            yield start, block


def cache_teacher_logits(path, fmt: str, dtype: str, teacher: nn.Module, teacher_arch: str, train: Split,
                         num_classes: int, augment: list, seed: int, num_views: int, batch_size: int,
                         chunk_samples: int, device: torch.device) -> StoreMeta:
    """Run `teacher` over every (sample, view) of `train` and write the complete store at `path`."""
    meta = StoreMeta(num_samples=len(train), num_views=num_views, num_classes=num_classes, augment=augment,
                     seed=seed, dtype=dtype, teacher_arch=teacher_arch,
                     teacher_fingerprint=weights_fingerprint(teacher), dataset_fingerprint=fingerprint(train))
    blocks = teacher_logit_blocks(teacher.to(device), train.images, build_augment(augment), seed, num_views,
                                  batch_size, chunk_samples, device)
    write_store(path, fmt, meta, train.labels.numpy(), blocks, chunk_samples)
    return meta


def store_targets(store: LogitStore) -> Targets:
    """Teacher logits read from the store for the batch's (sample, view) pairs."""
    return lambda x, samples, views: torch.from_numpy(store.read(samples.numpy(), views.numpy()))


def online_targets(teacher: nn.Module, device: torch.device) -> Targets:
    """Teacher logits computed live on the batch's replayed views (the reference the cache must match)."""
    return lambda x, samples, views: teacher_forward(teacher, x, device)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, device: torch.device, batch_size: int = 512) -> float:
    """Fraction of `split` classified correctly (no augmentation)."""
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        x = split.images[start:start + batch_size].to(device)
        correct += (model(x).argmax(1).cpu() == split.labels[start:start + batch_size]).sum().item()
    return correct / len(split)


def make_optimizer(model: nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                   milestones: list[int] = (), factors: list[float] = ()):
    """Adam and a step schedule: from epoch milestones[k] on, lr = base lr * factors[k]."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)

    def factor(epoch: int) -> float:
        passed = [f for m, f in zip(milestones, factors) if epoch >= m]
        return passed[-1] if passed else 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_teacher(model: nn.Module, train: Split, val: Split, transform, epochs: int, batch_size: int,
                  lr: float, seed: int, device: torch.device, log: EpochLog = lambda e, m: None) -> nn.Module:
    """Plain CE training with fresh random augmentation each epoch (the teacher needs no replay)."""
    torch.manual_seed(seed)
    model.to(device)
    optimizer, _ = make_optimizer(model, lr)
    generator = torch.Generator().manual_seed(seed)
    for epoch in tqdm(range(epochs), desc="teacher", unit="epoch"):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), batch_size):
            rows = order[start:start + batch_size]
            x = torch.stack([transform(img) for img in train.images[rows]]).to(device)
            loss = nn.functional.cross_entropy(model(x), train.labels[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        log(epoch, {"loss": loss.item(), "val_acc": accuracy(model, val, device)})
    return model.eval()


def distill_step(student: nn.Module, optimizer, targets: Targets, x: torch.Tensor, y: torch.Tensor,
                 samples: torch.Tensor, views: torch.Tensor, temperature: float, kd_weight: float,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on `kd_loss` for a batch of views; returns (loss, student logits)."""
    teacher_logits = targets(x, samples, views).to(device) if kd_weight else None
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    logits = student(x)
    loss = kd_loss(logits, teacher_logits, y, temperature, kd_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def distill(student: nn.Module, train: Split, val: Split, targets: Targets, transform, replay_seed: int,
            num_views: int, *, temperature: float, kd_weight: float, view_schedule: str, epochs: int,
            batch_size: int, lr: float, betas, weight_decay: float, lr_milestones: list[int],
            lr_factors: list[float], seed: int, device: torch.device, num_workers: int = 0,
            log: EpochLog = lambda e, m: None) -> nn.Module:
    """Train `student` on `kd_loss` over replayed views; log loss, train_acc and val_acc per epoch.

    In epoch e, every sample i appears once, as view `epoch_views(view_schedule, ...)[i]`, built by
    `replay_view(..., replay_seed, i, v)`; `targets` gives the teacher's logits for exactly that view.
    With kd_weight 0, `targets` is never called (the student-alone baseline).
    """
    torch.manual_seed(seed)
    student.to(device)
    optimizer, schedule = make_optimizer(student, lr, betas, weight_decay, lr_milestones, lr_factors)
    dataset = ReplayDataset(train.images, train.labels, transform, replay_seed)
    for epoch in tqdm(range(epochs), desc="distill" if kd_weight else "baseline", unit="epoch"):
        student.train()
        pairs = epoch_pairs(view_schedule, num_views, len(train), epoch, seed)
        loader = DataLoader(dataset, sampler=pairs, batch_size=batch_size, num_workers=num_workers)
        loss_sum = correct = seen = 0
        for x, y, samples, views in loader:
            loss, logits = distill_step(student, optimizer, targets, x, y, samples, views, temperature, kd_weight,
                                        device)
            y = y.to(device)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        schedule.step()
        log(epoch, {"loss": loss_sum / seen, "train_acc": correct / seen, "val_acc": accuracy(student, val, device)})
    return student.eval()
