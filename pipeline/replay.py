"""Deterministic augmentation replay: view v of training sample i is a pure function of (seed, i, v).

The cache stage stores the teacher's logits for `replay_view(image_i, transform, seed, i, v)`,
and the distill stage feeds the student the very same tensor, by calling the very same function.
Nothing depends on epoch order, batch composition, worker process or how many draws came before.

How it works: torchvision.transforms.v2 draws all its randomness from torch's default CPU
generator. `replay_view` seeds that generator with `view_seed(seed, i, v)`, applies the
transform, and restores the generator's previous state, so the caller's random stream is
untouched. To rebuild a view without this package:

    seed64 = np.random.SeedSequence([seed, i, v]).generate_state(1, np.uint64)[0]
    state = torch.default_generator.get_state(); torch.default_generator.manual_seed(int(seed64))
    x = transform(image_i); torch.default_generator.set_state(state)

where `image_i` is the uint8 (C, H, W) image and `transform` is `pipeline.data.input_transform`:
`v2.Compose([ToDtype(float32, scale=True), *[getattr(v2, name)(**kwargs) for {name: kwargs} in augment],
Normalize(mean, std)])` (the first and last steps draw no random numbers).
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from pipeline import KDError
from pipeline.augment import check_augment


def owns_generator() -> None:
    """Refuse to replay outside a process's main thread. Replay reseeds and restores torch's global CPU generator,
    which every thread of the process shares: in a second thread it could interleave with the training step's
    dropout draws, and both the views and the masks would change with timing. In the main thread (and in
    DataLoader worker processes, whose main thread replays) nothing else draws while it runs."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"replay ran in thread {threading.current_thread().name!r}: it reseeds torch's global "
                           "generator, which the training thread draws from, so it must run in the process's main "
                           "thread (or a DataLoader worker process); read only the store in other threads")


def view_seed(seed: int, index: int, view: int) -> int:
    """The 64-bit generator seed for view `view` of sample `index` under replay seed `seed`."""
    return int(np.random.SeedSequence([seed, index, view]).generate_state(1, np.uint64)[0])


# numpy's SeedSequence constants (numpy/random/bit_generator.pyx, after Melissa O'Neill's seed_seq_fe)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _MASK32 = 0xCA01F9DD, 0x4973F715, np.uint64(0xFFFFFFFF)


def view_seeds(seed: int, samples, views) -> np.ndarray:
    """`view_seed(seed, i, v)` for every (i, v) of the arrays `samples`, `views` at once: (B,) uint64, equal to
    numpy's `SeedSequence([seed, i, v]).generate_state(1, np.uint64)[0]` (tests/test_replay.py holds it to that),
    computed as SeedSequence does (a pool of 4 uint32 words, hashmix and mix, then generate_state) on whole
    columns: ~3 us a view against ~20 us through SeedSequence. Entries whose seed, sample or view do not fit in
    32 bits (SeedSequence then splits them into several words) go through `view_seed`."""
    samples, views = np.asarray(samples, dtype=np.int64), np.asarray(views, dtype=np.int64)
    out = np.empty(len(samples), dtype=np.uint64)
    small = (samples >= 0) & (samples < 1 << 32) & (views >= 0) & (views < 1 << 32) & (0 <= seed < 1 << 32)
    for k in np.flatnonzero(~small):
        out[k] = view_seed(seed, int(samples[k]), int(views[k]))
    if not small.any():
        return out
    u64 = np.uint64
    words = [np.full(int(small.sum()), seed, u64), samples[small].astype(u64), views[small].astype(u64),
             np.zeros(int(small.sum()), u64)]  # 3 words of entropy; the pool's 4th hashes 0
    hash_const = [u64(_INIT_A)]

    def hashmix(value):
        value = (value ^ hash_const[0]) & _MASK32
        hash_const[0] = (hash_const[0] * u64(_MULT_A)) & _MASK32
        value = (value * hash_const[0]) & _MASK32
        return value ^ (value >> u64(16))

    def mix(x, y):
        r = (u64(_MIX_MULT_L) * x - u64(_MIX_MULT_R) * y) & _MASK32
        return r ^ (r >> u64(16))

    pool = [hashmix(w) for w in words]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    state, h = [], u64(_INIT_B)
    for k in range(2):  # one uint64: two uint32 words, low first
        d = (pool[k] ^ h) & _MASK32
        h = (h * u64(_MULT_B)) & _MASK32
        d = (d * h) & _MASK32
        state.append(d ^ (d >> u64(16)))
    out[small] = state[0] | (state[1] << u64(32))
    return out


# torch's CPU generator: MT19937 (ATen/core/MT19937RNGEngine.h), seeded with the low 32 bits of manual_seed's value
_MT_M, _MT_INIT, _MT_MATRIX = 397, 1812433253, 0x9908B0DF
_ONE_WORD = 1 << 24  # randint(0, n) takes one word for n up to this at least (torch 2.14: below 2**28; then two)
COMPUTED_FROM = 128  # views: `BatchReplay.draw` computes the words of at least this many at once (bench/draws.py:
#                      ~2 ms a call whatever its size: 64 views are faster through torch's calls, 1,024 7.5x faster)


def mt19937_words(seeds, count: int) -> np.ndarray:
    """The first `count` (< 227) 32-bit words of `torch.Generator().manual_seed(s)` for every seed `s` of `seeds`
    at once: (B, count) uint32. A generator's word k is what its k-th `random()` gives, and each
    `torch.randint(0, n, ())` (n <= _ONE_WORD: the word modulo n) and float32 `torch.rand(1)` (the word's low 24
    bits over 2**24) takes exactly one word. Computed as MT19937 computes them (the Knuth initialisation of the
    624-word state, then the twist and tempering of the words read), on whole columns: word k needs state words k,
    k + 1 and k + 397, so the initialisation runs to word 396 + count. ~1 us a view (for a thousand views at once)
    against ~5 us a call through torch; `mt19937_is_torchs` checks it against torch itself."""
    u32 = np.uint32
    x = (np.asarray(seeds, np.uint64) & np.uint64(0xFFFFFFFF)).astype(u32)
    head, tail = [x], []
    for j in range(1, _MT_M + count):
        x = u32(_MT_INIT) * (x ^ (x >> u32(30))) + u32(j)
        if j <= count:
            head.append(x)
        elif j >= _MT_M:
            tail.append(x)
    out = np.empty((len(x), count), u32)
    for k in range(count):
        u, v = head[k], head[k + 1]
        y = (u & u32(0x80000000)) | (v & u32(0x7FFFFFFF))
        y = tail[k] ^ (y >> u32(1)) ^ np.where(v & u32(1), u32(_MT_MATRIX), u32(0))
        y ^= y >> u32(11)
        y ^= (y << u32(7)) & u32(0x9D2C5680)
        y ^= (y << u32(15)) & u32(0xEFC60000)
        out[:, k] = y ^ (y >> u32(18))
    return out


@functools.cache
def mt19937_is_torchs() -> bool:
    """Whether `mt19937_words` gives this torch's numbers (checked once per process against torch's own calls, for
    seeds small and past 32 bits): True for every torch we know; otherwise `BatchReplay.draw` makes the calls
    through torch, view by view (the same numbers, slower)."""
    seeds = [0, 1, 5489, 2**32 - 1, 2**32 + 3, 2**63 + 11, 2**64 - 1]
    words = mt19937_words(np.array(seeds, np.uint64), 3)
    generator = torch.Generator()
    for seed, (a, b, c) in zip(seeds, words.tolist()):
        generator.manual_seed(seed)
        flip = bool(torch.rand(1, generator=generator) < 0.3)
        crop = int(torch.randint(0, 37, size=(), generator=generator))
        wide = int(torch.randint(0, _ONE_WORD, size=(), generator=generator))
        if (flip, crop, wide) != ((a & 0xFFFFFF) < np.float32(0.3) * (1 << 24), b % 37, c % _ONE_WORD):
            return False
    return True


def _draws_of(plan) -> int:
    """How many generator words one view's draws take under `BatchReplay.draw`'s `plan`."""
    return sum(1 if kind == "flip" else (a > 1) + (b > 1) for _, kind, a, b in plan)


def replay_view(image: torch.Tensor, transform, seed: int, index: int, view: int) -> torch.Tensor:
    """The augmented input for (sample `index`, view `view`): `transform(image)` under a fixed seed.

    image: uint8 (C, H, W) as stored. Returns the transformed tensor; the global RNG is left as it was.
    Runs only in a process's main thread (`owns_generator`): the generator it reseeds is the one a training step
    draws dropout masks from, so replay in another thread could interleave with those draws.
    """
    owns_generator()
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(view_seed(seed, index, view))  # ~1 us; torch.manual_seed costs ~100x more
    try:
        return transform(image)
    finally:
        generator.set_state(state)


class BatchReplay:
    """`replay_view` for a whole batch at once, where the augmentation is only crops and flips: a batch's views
    are then equal, bit for bit, to `torch.stack([replay_view(...) for each view])` (tests/test_replay.py).

    Supported: `input_transform(augment, ...)` whose `augment` is any sequence of RandomCrop (constant zero fill,
    any padding, pad_if_needed), RandomHorizontalFlip and RandomVerticalFlip, or a RandomResizedCrop (any size,
    scale, ratio, interpolation, antialias: the ImageNet family) followed only by flips; `BatchReplay.of(transform)`
    is None for anything else (callers then replay view by view). The random draws are replay_view's own: each
    view's generator is seeded with `view_seed`, and each step draws what its `forward` draws (a flip's
    `torch.rand(1) >= p`, a crop's `make_params`), on the CPU (`draw`: ~3 us a view for a thousand views at once,
    ~20 us a view below COMPUTED_FROM, against ~75 us for a whole 3x32x32 view through replay_view). The pixels
    then move in one gather on the batch's own device (`apply`), then the transform's own ToDtype and Normalize run
    on the batch: a view costs a few microseconds on the CPU and almost nothing on a GPU, and uint8 images cross to
    the GPU instead of float32 ones.

    How: each view's crops and flips compose into a row index map and a column index map into the image with
    one fill row and column appended (index H or W = fill): a crop with padding (l, t, r, b) at (top, left)
    maps cols to (fill x l, cols, fill x r)[left:left + w], a horizontal flip reverses cols. The RandomResizedCrop
    family runs view by view on the float images, as replay_view runs it (`F.resized_crop` with the drawn box, the
    transform's size, interpolation and antialias, then the drawn flips), on the batch's device, each distinct image
    converted to float once (`_resized`). The images of a batch share one size (`data.image_size`, or same-size
    files).
    """

    def __init__(self, to_float, steps, normalize, resized=None):
        self.to_float, self.steps, self.normalize, self.resized = to_float, steps, normalize, resized

    @classmethod
    def of(cls, transform) -> "BatchReplay | None":
        """The batched form of `transform` (an `input_transform`), or None where it has other steps."""
        from torchvision.transforms import v2

        parts = list(getattr(transform, "transforms", ()))
        if len(parts) not in (2, 3) or not isinstance(parts[0], v2.ToDtype) or not isinstance(parts[-1], v2.Normalize):
            return None
        augment = parts[1] if len(parts) == 3 else v2.Identity()
        steps = list(augment.transforms) if isinstance(augment, v2.Compose) else [augment]
        steps = [s for s in steps if not isinstance(s, v2.Identity)]
        resized = steps.pop(0) if steps and type(steps[0]) is v2.RandomResizedCrop else None
        for s in steps:
            if type(s) in (v2.RandomHorizontalFlip, v2.RandomVerticalFlip):
                continue
            if type(s) is v2.RandomCrop and s.padding_mode == "constant" and _zero_fill(s) and resized is None:
                continue
            return None
        return cls(parts[0], steps, parts[-1], resized)

    def draw(self, seed: int, samples, views, shape) -> np.ndarray:
        """The random parameters of each view (B, 4 + 2 x steps) int64, drawn as `replay_view` draws them: the
        resized crop's (top, left, height, width) (zeros without one), then (top, left) for a crop, (flipped, 0)
        for a flip. shape: the images' (C, H, W).

        Crops and flips draw from a generator of this call's own, seeded per view with `view_seed` (`view_seeds`,
        for the whole batch at once), making the very calls their `make_params` / `forward` make on the global
        generator (`torch.randint(0, n, ())` for each cropped axis, `torch.rand(1) < p` for a flip): the same numbers,
        and the global generator is never touched, so this may run in any thread. For COMPUTED_FROM views or more,
        those calls' words are computed for the whole batch at once (`mt19937_words`: ~3 us a view for 1,024,
        against ~22 us for the calls: bench/draws.py), where `mt19937_is_torchs`; else made through torch, view by
        view. A RandomResizedCrop draws through its own `make_params` on the global generator (restored after), in
        the main thread only."""
        from torchvision.transforms import v2

        if self.resized is not None:
            return self._draw_resized(seed, samples, views, shape)
        plan, h, w = [], shape[-2], shape[-1]
        for k, s in enumerate(self.steps, start=2):
            if type(s) is v2.RandomCrop:
                left, top, right, bottom = _crop_padding(s, h, w)
                padded_h, padded_w = h + top + bottom, w + left + right
                if padded_h < s.size[0] or padded_w < s.size[1]:
                    raise KDError(f"RandomCrop{tuple(s.size)} is larger than the padded image ({padded_h}, "
                                  f"{padded_w}): lower its size or pad more")
                plan.append((2 * k, "crop", padded_h - s.size[0] + 1, padded_w - s.size[1] + 1))
                h, w = s.size
            else:
                plan.append((2 * k, "flip", s.p, None))
        out = np.zeros((len(samples), 4 + 2 * len(self.steps)), dtype=np.int64)
        if not plan:
            return out
        if (len(samples) >= COMPUTED_FROM and mt19937_is_torchs()
                and all(kind == "flip" or max(a, b) <= _ONE_WORD for _, kind, a, b in plan)):
            # torch's own calls, computed for the whole batch at once: the same numbers
            words = iter(mt19937_words(view_seeds(seed, samples, views), _draws_of(plan)).T)
            for column, kind, a, b in plan:
                if kind == "flip":  # torch.rand(1) < p: a float32 from the word's low 24 bits, against float32(p)
                    out[:, column] = (next(words) & 0xFFFFFF) < np.float64(np.float32(a)) * (1 << 24)
                    continue
                if a > 1:  # torch.randint(0, a, ()): the word modulo a
                    out[:, column] = next(words) % np.uint32(a)
                if b > 1:
                    out[:, column + 1] = next(words) % np.uint32(b)
            return out
        generator = torch.Generator()
        for row, view in enumerate(view_seeds(seed, samples, views).tolist()):
            generator.manual_seed(view)
            for column, kind, a, b in plan:
                if kind == "flip":
                    out[row, column] = bool(torch.rand(1, generator=generator) < a)
                    continue
                if a > 1:
                    out[row, column] = int(torch.randint(0, a, size=(), generator=generator))
                if b > 1:
                    out[row, column + 1] = int(torch.randint(0, b, size=(), generator=generator))
        return out

    def _draw_resized(self, seed: int, samples, views, shape) -> np.ndarray:
        """`draw` with a RandomResizedCrop first: its `make_params` and the flips on the global generator."""
        owns_generator()
        generator = torch.default_generator
        state = generator.get_state()
        image = torch.empty((shape[0], shape[-2], shape[-1]), dtype=torch.uint8)
        out = np.zeros((len(samples), 4 + 2 * len(self.steps)), dtype=np.int64)
        try:
            for row, view in enumerate(view_seeds(seed, samples, views).tolist()):
                generator.manual_seed(view)
                p = self.resized.make_params([image])
                out[row, :4] = (p["top"], p["left"], p["height"], p["width"])
                for k, s in enumerate(self.steps, start=2):
                    out[row, 2 * k] = bool(torch.rand(1) < s.p)
        finally:
            generator.set_state(state)
        return out

    def apply(self, images: torch.Tensor, params, which=None) -> torch.Tensor:
        """uint8 images and their `draw`n params -> the views (B, C, h, w) float32, contiguous, on the images'
        device. images: (B, C, H, W), one per view, or with `which` (B,) the distinct images (U, C, H, W) and which
        one each view takes."""
        from torchvision.transforms import v2

        if self.resized is not None:
            return self._resized(images, params, which)
        if which is not None:
            images = images[torch.as_tensor(which, device=images.device)]
        b, _, height, width = images.shape
        device = images.device
        params = torch.as_tensor(params[:, 4:], device=device)
        rows = torch.arange(height, device=device).expand(b, height)
        cols = torch.arange(width, device=device).expand(b, width)
        for k, s in enumerate(self.steps):
            if type(s) is v2.RandomCrop:
                pad_left, pad_top, pad_right, pad_bottom = _crop_padding(s, rows.shape[1], cols.shape[1])
                rows = _crop_map(rows, pad_top, pad_bottom, params[:, 2 * k], s.size[0], height)
                cols = _crop_map(cols, pad_left, pad_right, params[:, 2 * k + 1], s.size[1], width)
            elif type(s) is v2.RandomHorizontalFlip:
                cols = torch.where(params[:, 2 * k, None].bool(), cols.flip(1), cols)
            else:
                rows = torch.where(params[:, 2 * k, None].bool(), rows.flip(1), rows)
        filled = torch.nn.functional.pad(images, (0, 1, 0, 1))  # index H / W: the fill (0)
        channels, h, w = images.shape[1], rows.shape[1], cols.shape[1]
        x = filled.gather(2, rows[:, None, :, None].expand(b, channels, h, width + 1))
        x = x.gather(3, cols[:, None, None, :].expand(b, channels, h, w))
        return self.normalize(self.to_float(x)).contiguous()

    def _resized(self, images: torch.Tensor, params, which) -> torch.Tensor:
        """The RandomResizedCrop family, view by view on the float images exactly as replay_view runs it (each
        distinct image converted to float once): `F.resized_crop` with the drawn box, then the drawn flips; the
        batch normalised at once. Measured on the CPU (1 thread, 256 px images, 224 crops): ~2.2-2.7 ms a view
        against 2.3-4.3 ms view by view through replay_view, and 5.6-6.8 ms for index-map gathers of the floats."""
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as F

        r = self.resized
        floats = self.to_float(images)
        which = range(len(params)) if which is None else np.asarray(which).tolist()
        views = []
        for i, row in zip(which, np.asarray(params).tolist()):
            x = F.resized_crop(floats[i], *row[:4], size=r.size, interpolation=r.interpolation, antialias=r.antialias)
            for k, s in enumerate(self.steps, start=2):
                if row[2 * k]:
                    x = x.flip(-1) if type(s) is v2.RandomHorizontalFlip else x.flip(-2)
            views.append(x)
        return self.normalize(torch.stack(views)).contiguous()


def _resized_size(crop) -> tuple[int, int]:
    """The (height, width) a RandomResizedCrop outputs."""
    size = crop.size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def _zero_fill(crop) -> bool:
    fill = crop._fill.get(torch.Tensor, crop._fill.get("others"))
    values = fill if isinstance(fill, (list, tuple)) else [fill]
    return all(f is None or float(f) == 0 for f in values)


def _crop_padding(crop, height: int, width: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) padding a RandomCrop applies to a height x width image (as its make_params)."""
    left, right, top, bottom = crop.padding if crop.padding is not None else (0, 0, 0, 0)
    if crop.pad_if_needed:
        if height + top + bottom < crop.size[0]:
            diff = crop.size[0] - (height + top + bottom)
            top, bottom = top + diff, bottom + diff
        if width + left + right < crop.size[1]:
            diff = crop.size[1] - (width + left + right)
            left, right = left + diff, right + diff
    return left, top, right, bottom


def _crop_map(index: torch.Tensor, before: int, after: int, start: torch.Tensor, size: int, fill: int):
    """Index map (B, n) padded by `before`/`after` fill entries, then cut to [start, start + size) per row."""
    b = index.shape[0]
    padded = torch.cat([index.new_full((b, before), fill), index, index.new_full((b, after), fill)], dim=1)
    return padded.gather(1, start[:, None] + torch.arange(size, device=index.device))


def one_size(images) -> bool:
    """True when every image of `images` has one size, so a batch of them stacks: arrays, and image folders that
    `load_dataset` resizes (data.image_size) or holds to the first file's size."""
    return isinstance(images, torch.Tensor) or (getattr(images, "image_size", None) is not None
                                                or getattr(images, "first", None) is not None)


def replay_device(images, transform, device: torch.device) -> str:
    """The device whose arithmetic makes the views of `images` under `transform` for a run on `device`, as far as
    it can change their bits: a RandomResizedCrop replayed a batch at a time runs its interpolation on the run's
    device (a GPU's rounding differs from the CPU's); crops, flips and padding only move pixels (exact anywhere),
    and view-by-view replay always runs on the CPU. Recorded in the store (`replay`) and compared by `kd distill`."""
    plan = BatchReplay.of(transform) if one_size(images) else None
    return device.type if plan is not None and plan.resized is not None else "cpu"


MEMO_BYTES = 256 << 20  # the most a ReplayDataset keeps of drawn crop and flip parameters (`memo_views`)


class ReplayDataset(torch.utils.data.Dataset):
    """Indexed by `(sample, view)` pairs; yields `(view tensor, label, sample, view)`.

    Pass a sampler that yields pairs (e.g. `epoch_pairs`); works the same in DataLoader workers. Fetched a
    batch at a time (`__getitems__`, as `pipeline.loaders.make_loader` does), each distinct sample of the batch is
    read (an image file: decoded) once, however many of its views the batch holds: the cache stage's batches hold
    whole samples, so every image is decoded once per run. Where `BatchReplay` supports the augmentation and the
    images share one size (arrays; image folders, whose images `load_dataset` makes one size), a batch is the
    distinct uint8 images, which view takes which, and the drawn parameters, and the loader replays them on the
    training device (`batched`; the same tensors either way). `memo_views` V > 0 (crops and flips only): the drawn
    parameters of views 0..V-1 are kept (int32, at most MEMO_BYTES) once drawn, so a run cycling through a store's V
    views draws each once (the draws cost ~3 us a view in groups of a thousand; a kept row is the same row).
    """

    def __init__(self, images, labels: torch.Tensor, transform, seed: int, targets=None, batched: bool = True,
                 mix=None, num_classes: int = 0, memo_views: int = 0):
        from pipeline import mix as mixing

        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed
        self.targets = targets  # optional: an object with read(samples, views) -> (B, C) teacher logits
        self.batched = BatchReplay.of(transform) if batched and one_size(images) else None
        self.memo = None  # the drawn parameters of views 0..memo_views - 1 of every sample, kept once drawn
        if self.batched is not None and self.batched.resized is None and memo_views > 0:
            columns = 4 + 2 * len(self.batched.steps)
            if len(labels) * memo_views * columns * 4 <= MEMO_BYTES:
                self.memo = (np.zeros((len(labels), memo_views, columns), np.int32),
                             np.zeros((len(labels), memo_views), bool))
        self.mix, self.num_classes, self.view_size = (mixing.as_spec(mix) if mixing.enabled(mix) else None), \
            num_classes, None
        if len(images):  # every stage's replay starts here: refuse a transform the images do not fit, before any work
            check_augment(transform, images[0])
            if self.mix is not None:
                self.view_size = tuple(replay_view(images[0], transform, seed, 0, 0).shape[-2:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, pair: tuple[int, int]):
        index, view = int(pair[0]), int(pair[1])
        if self.mix is not None:  # a mixed view needs its partner's: the batch path, for a batch of one
            items = self.__getitems__([pair])
            if self.batched is None:
                return items[0]
            x, y, *_ = self.collate(items)
            return x[0], y[0], index, view
        x = replay_view(self.images[index], self.transform, self.seed, index, view)
        return x, self.labels[index], index, view

    def __getitems__(self, pairs):
        """A batch's items, each distinct sample read once; with `targets`, each also carries its teacher logits,
        read for the batch at once (so in DataLoader workers the store's reads run beside the training step). With
        `batched`: one tuple (distinct uint8 images, the image of each view, BatchReplay params, mixes, labels,
        samples, views[, logits]) for `collate`, all but the images as numpy arrays: from a worker they then travel
        pickled, where each tensor costs a round trip to the worker for its shared-memory handle (measured on a GPU
        host, that round trip bounded the loader). With `mix`: each view mixed with its partner's view
        (`pipeline.mix`; the partners' views replayed beside the batch's), and labels (B, num_classes) float32,
        the mixed one-hot labels."""
        from pipeline import mix as mixing

        samples = np.fromiter((p[0] for p in pairs), np.int64, len(pairs))
        views = np.fromiter((p[1] for p in pairs), np.int64, len(pairs))
        logits = self.targets.read(samples, views) if self.targets is not None else None
        mixes, labels = None, self.labels.numpy()[samples]
        replayed_samples, replayed_views = samples, views
        if self.mix is not None:
            mixes = mixing.draws(self.mix, self.seed, samples, views, len(self.labels), *self.view_size)
            partners = np.array([d.partner for d in mixes if d.kind != "none"], np.int64)
            replayed_samples = np.concatenate([samples, partners])
            replayed_views = np.concatenate([views, views[[d.kind != "none" for d in mixes]]])
            labels = mixing.soft_labels(labels, mixes, self.labels.numpy()[partners], self.num_classes)
        distinct, which = np.unique(replayed_samples, return_inverse=True)
        if self.batched is not None:
            if isinstance(self.images, torch.Tensor):
                images = self.images[torch.from_numpy(distinct)]
            else:
                images = torch.stack([self.images[int(i)] for i in distinct])
            params = self._draw(replayed_samples, replayed_views, images.shape[1:])
            batch = (images, which, params, mixes, labels, samples, views)
            return batch if logits is None else (*batch, logits)
        read = [self.images[int(i)] for i in distinct]
        x = [replay_view(read[k], self.transform, self.seed, int(i), int(v))
             for k, i, v in zip(which, replayed_samples, replayed_views)]
        if mixes is not None:
            x = self._mixed(x[:len(samples)], x[len(samples):], mixes)
        rows = torch.from_numpy(labels) if mixes is not None else self.labels[torch.from_numpy(samples)]
        items = [(x[k], rows[k], int(i), int(v)) for k, (i, v) in enumerate(zip(samples, views))]
        if logits is None:
            return items
        return [(*item, row) for item, row in zip(items, torch.from_numpy(logits))]

    def _draw(self, samples: np.ndarray, views: np.ndarray, shape) -> np.ndarray:
        """`self.batched.draw`, through the memo where there is one: views below memo_views are drawn once per run
        (a pure function of (seed, sample, view), so a kept row is the row drawn again)."""
        if self.memo is None:
            return self.batched.draw(self.seed, samples, views, shape)
        table, drawn = self.memo
        kept = views < table.shape[1]
        missing = kept.copy()
        missing[kept] = ~drawn[samples[kept], views[kept]]
        if missing.any():
            rows = self.batched.draw(self.seed, samples[missing], views[missing], shape)
            table[samples[missing], views[missing]] = rows
            drawn[samples[missing], views[missing]] = True
        out = np.empty((len(samples), table.shape[2]), np.int64)
        out[kept] = table[samples[kept], views[kept]]
        if not kept.all():
            out[~kept] = self.batched.draw(self.seed, samples[~kept], views[~kept], shape)
        return out

    def _mixed(self, own: list, partners: list, mixes) -> list:
        """Views mixed one by one (`pipeline.mix.mix_pixels`), each checked to have the one size mixing needs."""
        from pipeline import KDError
        from pipeline.mix import mix_pixels

        partners = iter(partners)
        out = []
        for x, d in zip(own, mixes):
            partner = next(partners) if d.kind != "none" else None
            for view in (x, partner):
                if view is not None and tuple(view.shape[-2:]) != self.view_size:
                    raise KDError(f"mix.mode {self.mix['mode']} mixes two views, so every view needs one size, but "
                                  f"views are {self.view_size} and {tuple(view.shape[-2:])}: set data.image_size, "
                                  "or end augment with a crop of one size (RandomCrop, RandomResizedCrop)")
            out.append(mix_pixels(x, partner, d) if partner is not None else x)
        return out

    def collate(self, items, device: torch.device = torch.device("cpu")):
        """A `__getitems__` result as the batch `(x, y, samples, views[, logits])` of tensors, x on `device`
        (replayed there by `BatchReplay.apply` where `batched`, then mixed there by `pipeline.mix.mix_batch`)."""
        if self.batched is None:
            return torch.utils.data.default_collate(items)
        from pipeline.mix import mix_batch

        images, which, params, mixes, labels, samples, *rest = items
        x = self.batched.apply(images.to(device, non_blocking=True), params, which)
        if mixes is not None:
            x = mix_batch(x[:len(samples)], x[len(samples):], mixes).contiguous()
        return (x, *map(torch.from_numpy, (labels, samples, *rest)))


class EpochSampler(torch.utils.data.Sampler):
    """Yields `pairs_of(epoch)` for the current `epoch` (set it before each pass): one sampler, and so
    one set of persistent DataLoader workers, for the whole run."""

    def __init__(self, pairs_of, num_samples: int):
        self.pairs_of, self.num_samples, self.epoch = pairs_of, num_samples, 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        return iter(self.pairs_of(self.epoch))


def epoch_views(schedule: str, num_views: int, num_samples: int, epoch: int, seed: int) -> np.ndarray:
    """The view each sample sees in `epoch`: `cycle` -> epoch mod V for all; `random` -> seeded uniform draw;
    `fresh` -> view `epoch` for all, a view never seen before in every epoch (the teacher run live: `num_views` is
    not a bound, as no store holds them)."""
    if schedule == "fresh":
        return np.full(num_samples, epoch, dtype=np.int64)
    if schedule == "cycle":
        return np.full(num_samples, epoch % num_views, dtype=np.int64)
    if schedule == "random":
        return np.random.default_rng([seed, epoch, 1]).integers(num_views, size=num_samples)
    raise KDError(f"unknown view schedule {schedule!r}; expected cycle, random or fresh")


def epoch_pairs(schedule: str, num_views: int, num_samples: int, epoch: int, seed: int,
                window: int = 0) -> list[tuple[int, int]]:
    """A seeded shuffle of all samples for `epoch`, each paired with its view: the epoch's sampler.

    window 0: a full shuffle. window W: the samples fall into windows of W consecutive rows (aligned to
    W; make W a multiple of the store's chunk rows), visited in shuffled order, samples shuffled within
    each window; so a batch touches the chunks of one or two windows and each chunk is read in one
    stretch of the epoch. Every sample still appears exactly once per epoch.
    """
    views = epoch_views(schedule, num_views, num_samples, epoch, seed)
    rng = np.random.default_rng([seed, epoch, 0])
    if window <= 0 or window >= num_samples:
        order = rng.permutation(num_samples)
    else:
        starts = rng.permutation(np.arange(0, num_samples, window))
        order = np.concatenate([start + rng.permutation(min(window, num_samples - start)) for start in starts])
    return [(int(i), int(views[i])) for i in order]
