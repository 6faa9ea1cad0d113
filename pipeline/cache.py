"""The cache's engine: the teacher run over V replayed views of every training sample, chunks of logits out,
into the store's writer (`kd cache`). Views in, chunks out; resumable, many processes, workers that replay and
run the teacher on the CPU, a batch queued ahead on a GPU. Also the one teacher forward that the online teacher
of `kd distill` shares, so cache and online agree under every precision.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline import KDError, distributed
from pipeline.data import Split, fingerprint, input_transform
from pipeline.loaders import make_loader
from pipeline.models import weights_fingerprint
from pipeline.params import CacheParams
from pipeline.mix import as_spec
from pipeline.replay import EpochSampler, ReplayDataset, replay_device
from pipeline.augment import build_augment
from pipeline.store import StoreMeta
from pipeline.writer import StoreWriter


@torch.no_grad()
def teacher_forward(teacher: nn.Module, x: torch.Tensor, device: torch.device, amp: str = "auto") -> torch.Tensor:
    """Raw teacher logits (B, C) float32 on CPU; eval mode, no gradients, autocast per `resolve_amp(amp, device)`.

    The one forward of the cache stage and of the online teacher, so the two agree under every setting. On CUDA
    the input goes channels-last (pair it with `prepare_teacher`).
    """
    return teacher_logits_on(teacher, x, device, amp).cpu()


@torch.no_grad()
def teacher_logits_on(teacher: nn.Module, x: torch.Tensor, device: torch.device, amp: str = "auto") -> torch.Tensor:
    """`teacher_forward` without the copy back: float32 logits on `device` (on CUDA, queued: the caller may
    queue the next batch before taking these to the host)."""
    teacher.eval()
    precision = resolve_amp(amp, device)
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=getattr(torch, precision, None), enabled=precision != "off"):
        return teacher(x).float()


def resolve_amp(amp: str, device: torch.device) -> str:
    """`cache.amp`: auto -> float16 on CUDA, off elsewhere; off | float16 | bfloat16 as given."""
    if amp == "auto":
        return "float16" if device.type == "cuda" else "off"
    return amp


def prepare_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The teacher on `device` in eval mode (channels-last on CUDA, where convolutions run faster so)."""
    teacher = teacher.to(device).eval()
    return teacher.to(memory_format=torch.channels_last) if device.type == "cuda" else teacher


def teacher_logit_chunks(teacher: nn.Module, images, transform, meta: StoreMeta, chunks: list[int], batch_size: int,
                         device: torch.device, num_workers: int = 0,
                         teacher_in_workers: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(k, logits[rows of chunk k, V, C])` float32 for each chunk index in `chunks`, in that order.

    View v of sample i is `replay_view(images[i], transform, meta.seed, i, v)`. A batch holds all V views of
    max(1, round(batch_size / V)) whole samples, so each image is read (a file: decoded) once per run, and its
    views are replayed from that one decoded image. One pass of the loader runs
    over all the chunks' views (batches cross chunk boundaries, so the workers never drain between chunks);
    a chunk is yielded as soon as its last view is in, so at most two chunks are held at a time. On the CPU
    with `num_workers` > 0 each worker also runs the teacher on the batches it replays (one torch thread each, so
    replay and forward share the cores without contending; not with `teacher_in_workers` False, e.g. a compiled
    teacher); elsewhere the workers replay and the teacher runs here, a batch ahead of the copy back.
    """
    dataset = ReplayDataset(images, torch.zeros(len(images), dtype=torch.long), transform, meta.seed, mix=meta.mix,
                            num_classes=meta.num_classes)
    views = meta.num_views
    on_workers = device.type == "cpu" and num_workers > 0 and teacher_in_workers

    order = [i for k in chunks for i in range(*meta.chunk_rows(k))]
    per_batch = max(1, round(batch_size / views))  # whole samples: every image is read once

    def whole_samples(_epoch):
        for start in range(0, len(order), per_batch):
            yield [(i, v) for i in order[start:start + per_batch] for v in range(views)]

    sampler = EpochSampler(whole_samples, -(-len(order) // per_batch))
    if on_workers:  # each worker replays and runs the teacher (one torch thread each): the cores share both
        loader = make_loader(_TeacherViews(dataset, teacher, meta.amp), sampler, None, num_workers, device,
                             collated=True)
        logits_of = iter(loader)
    else:
        logits_of = _one_batch_ahead(make_loader(dataset, sampler, None, num_workers, device), teacher,
                                     device, meta.amp)
    total = sum(stop - first for first, stop in map(meta.chunk_rows, chunks)) * views
    held: dict[int, list] = {}  # chunk -> [logits block, views filled]
    ready = iter(chunks)
    waiting = next(ready, None)
    with tqdm(total=total, desc="cache", unit="view", disable=distributed.rank() != 0) as bar:
        for logits, i, v in logits_of:
            of = i // meta.chunk_samples
            for k in np.unique(of):
                first, stop = meta.chunk_rows(int(k))
                entry = held.setdefault(int(k), [np.empty((stop - first, views, meta.num_classes), np.float32), 0])
                rows = of == k
                entry[0][i[rows] - first, v[rows]] = logits[rows]
                entry[1] += int(rows.sum())
            bar.update(len(i))
            while waiting is not None and waiting in held and held[waiting][1] == held[waiting][0].shape[0] * views:
                yield waiting, held.pop(waiting)[0]
                waiting = next(ready, None)


class _TeacherViews(torch.utils.data.Dataset):
    """A batch's views replayed and run through the teacher where the batch is fetched: in a DataLoader worker
    on the CPU (the cache stage with `num_workers` > 0 there). Batches are numpy (logits, samples, views): from a
    worker they travel pickled, where each tensor would cost a round trip to the worker for its memory handle."""

    def __init__(self, views: ReplayDataset, teacher: nn.Module, amp: str):
        self.views, self.teacher, self.amp = views, teacher, amp

    def __len__(self) -> int:
        return len(self.views)

    def __getitems__(self, pairs):
        x, _, i, v = self.views.collate(self.views.__getitems__(pairs))
        return teacher_forward(self.teacher, x, torch.device("cpu"), self.amp).numpy(), i.numpy(), v.numpy()


def _one_batch_ahead(loader, teacher: nn.Module, device: torch.device, amp: str):
    """`(logits, samples, views)` numpy per loader batch, by `teacher_logits_on`; a batch's logits come back to
    the host only once the next batch is queued, so on a GPU its forward overlaps the host's work (same values)."""
    pending = None
    for x, _, i, v in loader:
        logits = teacher_logits_on(teacher, x, device, amp)
        if pending is not None:
            yield pending[0].cpu().numpy(), pending[1], pending[2]
        pending = (logits, i.numpy(), v.numpy())
    if pending is not None:
        yield pending[0].cpu().numpy(), pending[1], pending[2]


def expected_store(cfg: CacheParams, teacher: nn.Module, teacher_arch: str, train: Split, num_classes: int,
                   augment: list, mean, std, device: torch.device, mix=None) -> StoreMeta:
    """The metadata of the store this teacher, data, `cache` and `mix` params make on `device`."""
    if cfg.storage == "topk" and cfg.top_k >= num_classes:
        raise KDError(f"cache.top_k is {cfg.top_k} but the data has {num_classes} classes; top-K storage needs "
                      f"top_k < {num_classes} (or cache.storage: full)")
    return StoreMeta(num_samples=len(train), num_views=cfg.num_views, num_classes=num_classes, augment=augment,
                     mean=list(mean), std=list(std), seed=cfg.seed, dtype=cfg.dtype, storage=cfg.storage,
                     top_k=cfg.top_k if cfg.storage == "topk" else 0, chunk_samples=cfg.chunk_samples,
                     amp=resolve_amp(cfg.amp, device), teacher_arch=teacher_arch,
                     replay=replay_device(train.images, input_transform(build_augment(augment), mean, std), device),
                     teacher_fingerprint=weights_fingerprint(teacher), dataset_fingerprint=fingerprint(train),
                     mix=as_spec(mix))


def cache_teacher_logits(path, cfg: CacheParams, teacher: nn.Module, teacher_arch: str, train: Split,
                         num_classes: int, augment: list, mean, std, device: torch.device,
                         num_workers: int = 0, mix=None) -> tuple[StoreMeta, int]:
    """Run `teacher` over `cfg.num_views` replayed views of every sample of `train`; write the store at `path`.

    The input of view v of sample i is `input_transform(augment, mean, std)` replayed with (cfg.seed, i, v), mixed
    with a partner's view by `mix` (`pipeline.mix`; None or mode none: unmixed).
    An interrupted run left `<path>.partial`: only its unfinished chunks are computed. Replay (in `num_workers`
    DataLoader workers), the teacher's forward and the store writes (in a background thread) overlap.
    `cfg.compile`: the teacher runs under `torch.compile` (in this process; a one-off compile, and one more for a
    last batch of another size), its logits within float32 rounding of the eager ones (bench/teacher_compile.py).
    Under torchrun, rank r computes every world-size-th unfinished chunk: zarr ranks write their own chunks
    into the one store; for HDF5 (one writer per file) rank 0 writes the chunks every rank sends it.
    Returns (meta, number of chunks that were already done).
    """
    meta = expected_store(cfg, teacher, teacher_arch, train, num_classes, augment, mean, std, device, mix)
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
        model = prepare_teacher(teacher, device)
        if cfg.compile:  # compiled once, here: the workers (if any) only replay
            model = torch.compile(model)
        chunks = teacher_logit_chunks(model, train.images, transform, meta, mine, cfg.batch_size, device,
                                      num_workers, teacher_in_workers=not cfg.compile)
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
