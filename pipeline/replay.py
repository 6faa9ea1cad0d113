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

import numpy as np
import torch

from pipeline import KDError


# Deterministic preprocessing: evaluation never applies `augment`, so these would make training and test
# inputs differ. They belong in data.image_size / data.normalize.
DETERMINISTIC = {"Resize", "CenterCrop", "Normalize", "ToDtype", "ConvertImageDtype", "Grayscale", "RGB", "Pad",
                 "FiveCrop", "TenCrop", "ToImage", "ToPureTensor", "PILToTensor", "ToPILImage", "Lambda", "Identity",
                 "LinearTransformation"}


def build_augment(spec: list[dict]):
    """`[{ClassName: {kw: value}}, ...]` -> `v2.Compose` of those torchvision.transforms.v2 classes.

    Only random transforms: deterministic preprocessing (Resize, Normalize, ...) is refused, since evaluation
    never applies `augment`.
    """
    from torchvision.transforms import v2

    steps = []
    for i, step in enumerate(spec):
        (name, kwargs), = step.items()
        cls = getattr(v2, name, None)
        if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
            raise KDError(f"augment[{i}]: {name!r} is not a torchvision.transforms.v2 transform "
                          "(names are case-sensitive, e.g. RandomAffine, RandomCrop, ColorJitter)")
        if name in DETERMINISTIC:
            raise KDError(f"augment[{i}]: {name} is deterministic preprocessing, which evaluation never applies "
                          "(test inputs would differ from training ones); use data.image_size and data.normalize "
                          "for preprocessing and keep augment to random transforms")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (kwargs or {}).items()}
        try:
            steps.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise KDError(f"augment[{i}]: {name}({kwargs}) failed: {e}") from None
    return v2.Compose(steps) if steps else v2.Identity()


def view_seed(seed: int, index: int, view: int) -> int:
    """The 64-bit generator seed for view `view` of sample `index` under replay seed `seed`."""
    return int(np.random.SeedSequence([seed, index, view]).generate_state(1, np.uint64)[0])


def replay_view(image: torch.Tensor, transform, seed: int, index: int, view: int) -> torch.Tensor:
    """The augmented input for (sample `index`, view `view`): `transform(image)` under a fixed seed.

    image: uint8 (C, H, W) as stored. Returns the transformed tensor; the global RNG is left as it was.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(view_seed(seed, index, view))  # ~1 us; torch.manual_seed costs ~100x more
    try:
        return transform(image)
    finally:
        generator.set_state(state)


class ReplayDataset(torch.utils.data.Dataset):
    """Indexed by `(sample, view)` pairs; yields `(view tensor, label, sample, view)`.

    Pass a sampler that yields pairs (e.g. `epoch_pairs`); works the same in DataLoader workers.
    """

    def __init__(self, images, labels: torch.Tensor, transform, seed: int, targets=None):
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed
        self.targets = targets  # optional: an object with read(samples, views) -> (B, C) teacher logits

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, pair: tuple[int, int]):
        index, view = int(pair[0]), int(pair[1])
        x = replay_view(self.images[index], self.transform, self.seed, index, view)
        return x, self.labels[index], index, view

    def __getitems__(self, pairs):
        """A batch's items; with `targets`, each also carries its teacher logits, read for the batch at once
        (so in DataLoader workers the store's reads run beside the training step)."""
        items = [self[pair] for pair in pairs]
        if self.targets is None:
            return items
        logits = torch.from_numpy(self.targets.read(np.array([p[0] for p in pairs], dtype=np.int64),
                                                    np.array([p[1] for p in pairs], dtype=np.int64)))
        return [(*item, row) for item, row in zip(items, logits)]


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
    """The view each sample sees in `epoch`: `cycle` -> epoch mod V for all; `random` -> seeded uniform draw."""
    if schedule == "cycle":
        return np.full(num_samples, epoch % num_views, dtype=np.int64)
    if schedule == "random":
        return np.random.default_rng([seed, epoch, 1]).integers(num_views, size=num_samples)
    raise KDError(f"unknown view schedule {schedule!r}; expected cycle or random")


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
