"""Batches for training and caching: DataLoaders over (sample, view) pairs, a rank's share of a global batch, and
the read-ahead of a store's logits beside the training step (a thread that only reads the store).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

Targets = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_loader(dataset, sampler, batch_size: int | None, num_workers: int, device: torch.device,
                collated: bool = False, pin: bool = True, group: int = 1):
    """A DataLoader over `sampler`'s pairs in batches of `batch_size` (None: `sampler` yields whole batches);
    workers (if any) live as long as the loader. Batches are `(x, y, samples, views[, logits])`.

    Its own generator keeps the loader from drawing on the global RNG, so the number of workers
    never changes a result (the views themselves are seeded per (sample, view) by the replay). Where the
    dataset replays `batched` (crops and flips of in-memory images), the workers send uint8 images and the
    drawn parameters, and x is replayed on `device` (`BatchReplay.apply`; the same tensors as view by view).
    `collated`: the dataset's `__getitems__` returns whole batches, passed on as they are. `pin` False: no pinned
    memory (the dataset's images are already on the device: `resident`). `group` k > 1 (a batch sampler, a batched
    replay, no workers): k consecutive batches are fetched and replayed as one (each op's overhead paid once for
    k batches), then cut back into the sampler's batches: the same tensors, row for row (`replay_group`).
    """
    replayed = not collated and getattr(dataset, "batched", None) is not None
    grouped = _Grouped(sampler, group) if group > 1 and batch_size is None and replayed and num_workers == 0 else None
    batching = ({"batch_sampler": grouped or sampler} if batch_size is None
                else {"sampler": sampler, "batch_size": batch_size})
    loader = DataLoader(dataset, **batching, num_workers=num_workers, persistent_workers=num_workers > 0,
                        pin_memory=pin and device.type == "cuda", generator=torch.Generator(),
                        **({"collate_fn": _as_is} if replayed or collated else {}))
    return _Replayed(loader, device, grouped) if replayed else loader


GROUP_BYTES = 32 << 20  # the most float32 view bytes one grouped replay makes at once (`replay_group`)
GROUP_BATCHES = 16  # the most batches one grouped replay makes at once


def replays_anywhere(dataset, num_workers: int) -> bool:
    """Whether batches of `dataset` may be made outside the training thread: with no worker processes, by a
    ReplayDataset replayed a batch at a time (`batched`) by crops and flips only, whose draws use a generator of
    their own (`BatchReplay.draw`); a RandomResizedCrop or view-by-view replay reseed the global generator, which the
    training thread's dropout draws from, so they stay in the training thread."""
    plan = getattr(dataset, "batched", None)
    return num_workers == 0 and plan is not None and plan.resized is None


def replay_group(dataset, batch_size: int, num_workers: int) -> int:
    """How many batches to replay as one (`make_loader(group=...)`): up to GROUP_BATCHES, within GROUP_BYTES of
    views, where the batches may be made beside the step (`replays_anywhere`); else 1."""
    if not replays_anywhere(dataset, num_workers) or not len(dataset.images):
        return 1
    view_bytes = 4 * dataset.images[0].numel()  # float32; crops only shrink it
    return max(1, min(GROUP_BATCHES, GROUP_BYTES // max(1, batch_size * view_bytes)))


class _Grouped(torch.utils.data.Sampler):
    """The batches of the batch sampler `batches`, `k` consecutive ones joined into one list of pairs; each join's
    batch sizes are queued in `sizes` for `_Replayed` to cut the replayed group back (no workers: in order)."""

    def __init__(self, batches, k: int):
        import collections

        self.batches, self.k, self.sizes = batches, k, collections.deque()

    def __iter__(self):
        self.sizes.clear()
        group = []
        for batch in self.batches:
            group.append(batch)
            if len(group) == self.k:
                yield self._join(group)
                group = []
        if group:
            yield self._join(group)

    def _join(self, group: list) -> list:
        self.sizes.append([len(b) for b in group])
        return [pair for batch in group for pair in batch]


RESIDENT_SHARE = 0.25  # in-memory images move to the GPU when they take at most this share of its free memory


def resident(images, device: torch.device, num_workers: int) -> bool:
    """Whether a run on `device` keeps `images` there for the whole run (each batch then gathered on the device, no
    per-batch host copy): on CUDA, with num_workers 0 (workers cannot hold CUDA tensors), for an in-memory uint8
    tensor (arrays such as CIFAR's 150 MB) taking at most RESIDENT_SHARE of the device's free memory. Elsewhere the
    images stay where they are (on the CPU they are already where the step runs)."""
    if device.type != "cuda" or num_workers > 0 or not isinstance(images, torch.Tensor):
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() <= RESIDENT_SHARE * free


def _as_is(batch):
    return batch


class _Replayed:
    """A loader of `batched` ReplayDataset batches, each replayed on `device` as it is taken (a group of batches at
    once, then cut into them, with `grouped`)."""

    def __init__(self, loader: DataLoader, device: torch.device, grouped: "_Grouped | None" = None):
        self.loader, self.device, self.grouped = loader, device, grouped

    def __len__(self) -> int:
        return len(self.loader.batch_sampler.batches if self.grouped is not None else self.loader)

    def __iter__(self):
        for items in self.loader:
            batch = self.loader.dataset.collate(items, self.device)
            if self.grouped is None:
                yield batch
                continue
            first = 0
            for size in self.grouped.sizes.popleft():
                yield tuple(t[first:first + size] for t in batch)
                first += size


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

    def reads():
        for batch_pairs in pairs:
            samples = np.fromiter((p[0] for p in batch_pairs), np.int64, len(batch_pairs))
            views = np.fromiter((p[1] for p in batch_pairs), np.int64, len(batch_pairs))
            yield samples, targets.read(samples, views)

    read = ahead(reads(), depth, "kd-read-ahead")
    try:
        for batch in batches:
            item = next(read, None)
            if item is None or not np.array_equal(item[0], np.asarray(batch[2])):
                raise RuntimeError("read-ahead out of step with the loader: the batch sampler and the loader "
                                   "disagree on a batch's samples")
            yield batch, torch.from_numpy(item[1])
    finally:
        read.close()


def ahead(items, depth: int, name: str = "kd-batches-ahead"):
    """Yield the items of the iterable `items`, made up to `depth` ahead by a background thread called `name`.

    An exception raised making an item is raised here, in its place. Whatever ends the iteration (the last item, an
    exception here or in the caller, `close()`), the thread is told to stop and joined before this generator
    returns: no put or get waits without a timeout on the other side, so nothing is left behind and nothing hangs.
    depth 0: the items are made in line, in the caller's thread (no thread).
    """
    if depth <= 0:
        yield from items
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
            for item in items:
                if not offer(item):
                    return
            offer(done)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consuming thread
            offer(e)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = box.get(timeout=0.05)
            except queue.Empty:
                if not thread.is_alive() and box.empty():
                    raise RuntimeError(f"the {name} thread ended without a result") from None
                continue
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def thread_safe(loader) -> bool:
    """Whether `loader` (a `make_loader` result) may be iterated in a thread other than the training thread
    (`replays_anywhere` of its dataset)."""
    inner = getattr(loader, "loader", loader)
    return replays_anywhere(getattr(inner, "dataset", None), inner.num_workers)


def close_loader(loader) -> None:
    """End the worker processes of `loader` (a `make_loader` result) now, not when it is garbage-collected: a
    stage that fails leaves no worker behind."""
    loader = getattr(loader, "loader", loader)
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if hasattr(loader, "_iterator"):
        loader._iterator = None
