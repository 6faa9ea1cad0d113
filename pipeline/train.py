"""Training and evaluation loops: teacher training, teacher inference for the cache, distillation.

`distill` takes the teacher's logits through a `targets(x, samples, views)` callable, so the
same loop runs from the store (`store_targets`) or with the teacher live (`online_targets`).
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import closing
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
from pipeline.resume import Resume, capture, restore
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


def make_loader(dataset, sampler, batch_size: int | None, num_workers: int, device: torch.device,
                collated: bool = False):
    """A DataLoader over `sampler`'s pairs in batches of `batch_size` (None: `sampler` yields whole batches);
    workers (if any) live as long as the loader. Batches are `(x, y, samples, views[, logits])`.

    Its own generator keeps the loader from drawing on the global RNG, so the number of workers
    never changes a result (the views themselves are seeded per (sample, view) by the replay). Where the
    dataset replays `batched` (crops and flips of in-memory images), the workers send uint8 images and the
    drawn parameters, and x is replayed on `device` (`BatchReplay.apply`; the same tensors as view by view).
    `collated`: the dataset's `__getitems__` returns whole batches, passed on as they are.
    """
    batching = {"batch_sampler": sampler} if batch_size is None else {"sampler": sampler, "batch_size": batch_size}
    replayed = not collated and getattr(dataset, "batched", None) is not None
    loader = DataLoader(dataset, **batching, num_workers=num_workers, persistent_workers=num_workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator(),
                        **({"collate_fn": _as_is} if replayed or collated else {}))
    return _Replayed(loader, device) if replayed else loader


def _as_is(batch):
    return batch


class _Replayed:
    """A loader of `batched` ReplayDataset batches, each replayed on `device` as it is taken."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for items in self.loader:
            yield self.loader.dataset.collate(items, self.device)


class RankBatches(torch.utils.data.Sampler):
    """This rank's share of each global batch of `pairs_of(epoch)` (set `epoch` before each pass).

    The epoch's pairs are cut into global batches of `batch_size` in order; rank r of `world` takes the r-th
    of `np.array_split(batch, world)` (near-equal parts). A rank whose part is empty (a last batch smaller than
    the world) gets the batch's first pair as a stand-in, which `share` weighs 0. One process: the batches are
    exactly `DataLoader(batch_size=...)`'s.
    """

    def __init__(self, pairs_of, batch_size: int, rank: int = 0, world: int = 1):
        self.pairs_of, self.batch_size, self.rank, self.world, self.epoch = pairs_of, batch_size, rank, world, 0

    def __iter__(self):
        pairs = self.pairs_of(self.epoch)
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start:start + self.batch_size]
            first, stop = _share_bounds(len(batch), self.rank, self.world)
            yield batch[first:stop] if stop > first else batch[:1]

    def share(self, step: int, total: int) -> tuple[int, float]:
        """(this rank's real samples in global step `step` of an epoch of `total` pairs, its loss scale
        samples x world / global batch): scaled so, the ranks' averaged gradients are the global batch mean's."""
        size = min(self.batch_size, total - step * self.batch_size)
        first, stop = _share_bounds(size, self.rank, self.world)
        return stop - first, (stop - first) * self.world / size


def _share_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[first, stop) of rank's part of `size` items, as np.array_split cuts them."""
    base, extra = divmod(size, world)
    first = rank * base + min(rank, extra)
    return first, first + base + (rank < extra)


PREFETCH = 4  # batches read ahead from a store larger than memory (`kd distill`); in-memory stores read in line


def prefetched(batches, targets: Targets | None, depth: int, pairs=None):
    """Yield `(batch, teacher logits or None)` for each batch `(x, y, samples, views)` of `batches`.

    depth 0: the targets are read in line, `targets(x, samples, views)`. depth > 0 (`targets` a `StoreTargets`):
    a background thread reads the logits of up to `depth` batches ahead, from `pairs`, an iterable of each batch's
    list of (sample, view) pairs in the loader's order (its batch sampler). That thread only reads the store: it
    never touches the loader, so replay, which reseeds torch's global generator, stays in this (the training)
    thread, and a dropout mask drawn here can never interleave with it. Each batch's samples are checked against
    the logits read for it. The values are the same as in line.

    Whatever ends the iteration (the last batch, an exception in the caller's step, a failed read), the thread is
    told to stop and joined before this generator returns: no put or get waits without a timeout on the other
    side, so nothing is left behind and nothing hangs. Close it (`contextlib.closing`) to end it at once.
    """
    if depth <= 0 or targets is None:
        for batch in batches:
            yield batch, (targets(batch[0], batch[2], batch[3]) if targets is not None else None)
        return
    import queue
    import threading

    box: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for batch_pairs in pairs:
                samples = np.fromiter((p[0] for p in batch_pairs), np.int64, len(batch_pairs))
                views = np.fromiter((p[1] for p in batch_pairs), np.int64, len(batch_pairs))
                if not offer((samples, targets.read(samples, views))):
                    return
            offer(done)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the training thread
            offer(e)

    thread = threading.Thread(target=work, name="kd-read-ahead", daemon=True)
    thread.start()
    try:
        for batch in batches:
            while True:
                try:
                    item = box.get(timeout=0.05)
                    break
                except queue.Empty:
                    if not thread.is_alive():
                        raise RuntimeError("the read-ahead thread ended without a result") from None
            if isinstance(item, BaseException):
                raise item
            if item is done or not np.array_equal(item[0], np.asarray(batch[2])):
                raise RuntimeError("read-ahead out of step with the loader: the batch sampler and the loader "
                                   "disagree on a batch's samples")
            yield batch, torch.from_numpy(item[1])
    finally:
        stop.set()
        thread.join()


def close_loader(loader) -> None:
    """End the worker processes of `loader` (a `make_loader` result) now, not when it is garbage-collected: a
    stage that fails leaves no worker behind."""
    loader = getattr(loader, "loader", loader)
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if hasattr(loader, "_iterator"):
        loader._iterator = None


def teacher_logit_chunks(teacher: nn.Module, images, transform, meta: StoreMeta, chunks: list[int], batch_size: int,
                         device: torch.device, num_workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(k, logits[rows of chunk k, V, C])` float32 for each chunk index in `chunks`, in that order.

    View v of sample i is `replay_view(images[i], transform, meta.seed, i, v)`. One pass of the loader runs
    over all the chunks' views (batches cross chunk boundaries, so the workers never drain between chunks);
    a chunk is yielded as soon as its last view is in, so at most two chunks are held at a time. On the CPU
    with `num_workers` > 0 each worker also runs the teacher on the batches it replays (one torch thread each, so
    replay and forward share the cores without contending); elsewhere the workers replay and the teacher runs
    here, a batch ahead of the copy back.
    """
    dataset = ReplayDataset(images, torch.zeros(len(images), dtype=torch.long), transform, meta.seed)
    views = meta.num_views
    on_workers = device.type == "cpu" and num_workers > 0

    def pairs(_epoch):
        for k in chunks:
            for i in range(*meta.chunk_rows(k)):
                for v in range(views):
                    yield i, v

    sampler = EpochSampler(pairs, len(images))
    if on_workers:  # each worker replays and runs the teacher (one torch thread each): the cores share both
        loader = make_loader(_TeacherViews(dataset, teacher, meta.amp), sampler, batch_size, num_workers, device,
                             collated=True)
        logits_of = iter(loader)
    else:
        logits_of = _one_batch_ahead(make_loader(dataset, sampler, batch_size, num_workers, device), teacher,
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


class StoreTargets:
    """Teacher logits read from a store for a batch's (sample, view) pairs (a top-K store's rebuilt for
    `temperature`, the run's T, with `tail`: `pipeline.topk.decode`): `targets(x, samples, views)`.

    In a DataLoader worker process it reads through its own handle, opened on first use there (h5py handles
    must not cross a fork), with `worker_budget` bytes of chunk cache.
    """

    def __init__(self, store: LogitStore, temperature: float = 1.0, worker_budget: int = 0, tail: str = "summary"):
        self.store, self.temperature, self.worker_budget, self.tail = store, temperature, worker_budget, tail
        self._pid = os.getpid()

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
            log: EpochLog = lambda e, m: None, progress: bool = True, resume: Resume | None = None) -> nn.Module:
    """Train `student` on `kd_loss` over replayed views; log loss, train_acc and val_acc per epoch.

    In epoch e, every sample i appears once, as view `epoch_views(cfg.view_schedule, ...)[i]`, built by
    `replay_view(..., replay_seed, i, v)`; `targets` gives the teacher's logits for exactly that view.
    `kd_weight` overrides cfg.kd_weight (0 for the student-alone baseline: `targets` is never called).
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
    in_workers = bool(kd_weight and num_workers > 0 and isinstance(targets, StoreTargets)
                      and not targets.store.in_memory)
    dataset = ReplayDataset(train.images, train.labels, transform, replay_seed,
                            targets.in_workers(num_workers) if in_workers else None)
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
                        y = y.to(device)
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
