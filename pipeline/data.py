"""The dataset, its fixed seeded train/validation/test split, and the input transforms.

Images stay uint8 `(C, H, W)` until the transform: in memory as one `(N, C, H, W)` tensor, or as
`ImageFiles` decoded lazily per sample (image folders). The input a model sees is

    to_float (x / 255)  ->  augmentation (training views only)  ->  Normalize(mean, std)

the same for teacher, cache, student and evaluation. Training images far from the named set's statistics
(data.name: mnist on Fashion-MNIST files) are a warning on stderr. Sample index i in the cache and in
distillation always means row i of the *training* split. The test split is only read by
`kd evaluate`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline import KDError
from pipeline.params import DataParams
from pipeline.sources import ImageFiles, fingerprint_images, load_source

# Per-dataset channel statistics for `data.normalize: auto` (computed on each training set).
NORMALIZE = {
    "digits": ((0.0,), (1.0,)),  # as the pipeline always used it: pixel values in [0, 1]
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}

# Sets whose training images are checked against their NORMALIZE mean (`statistics_warning`), so that files of
# another set under this name (Fashion-MNIST files named mnist) do not train silently: the mean per channel of the
# first STATISTICS_SAMPLE images, in [0, 1]. The tolerance sits far from both errors: a sample of a few hundred images
# or more of the named set has a mean within about 0.01 of the full set's (one image's mean spreads by roughly 0.05
# on MNIST, 0.1 on CIFAR: the sample's by that over the square root of its size), while the closest known sets with
# as many channels, MNIST and Fashion-MNIST, are 0.155 apart. CIFAR-10 and CIFAR-100 (0.016 apart) are not told
# apart: their files differ anyway.
CHECKED_STATISTICS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
STATISTICS_SAMPLE = 10_000
MEAN_TOLERANCE = 0.03

Images = "torch.Tensor | ImageFiles"


@dataclass(frozen=True)
class Split:
    images: Images  # uint8: (N, C, H, W) tensor, or ImageFiles; images[i] is (C, H, W)
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows) -> "Split":
        rows = np.asarray(rows, dtype=np.int64)
        images = self.images[torch.from_numpy(rows)] if isinstance(self.images, torch.Tensor) \
            else self.images.subset(rows)
        return Split(images, self.labels[torch.from_numpy(rows)])


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images[0].shape)


def load_dataset(params: DataParams) -> Dataset:
    """Load `params.name` from `params.root` and split it, stratified and seeded (same seed, same split).

    Sources with a test split keep it as the test split and carve `val_fraction` of their training
    set for validation; sources without one (digits, an image folder without `test/`) first hold out
    `test_fraction` of all samples. `train_subset` keeps that many training samples (stratified).
    An image folder without `image_size` must hold images of one size: a file of another size than the first
    training file is refused when decoded (`ImageFiles.same_size`).
    """
    from sklearn.model_selection import train_test_split

    source = load_source(params.name, params.root, params.image_size)
    if isinstance(source.train_images, ImageFiles) and params.image_size is None:  # batches need one image size
        source = replace(source, train_images=source.train_images.same_size())
        if source.test_images is not None:
            source = replace(source, test_images=source.test_images.same_size(source.train_images.first))
    warning = statistics_warning(params, source.train_images)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    everything = Split(source.train_images, torch.as_tensor(source.train_labels, dtype=torch.int64))
    labels = everything.labels.numpy()
    seed = params.split_seed
    index = np.arange(len(labels))
    try:
        if source.test_images is None:
            index, test_rows = train_test_split(index, test_size=params.test_fraction, stratify=labels,
                                                random_state=seed)
            test = everything.subset(np.sort(test_rows))
        else:
            test = Split(source.test_images, torch.as_tensor(source.test_labels, dtype=torch.int64))
        train_rows, val_rows = train_test_split(index, test_size=params.val_fraction, stratify=labels[index],
                                                random_state=seed)
        if params.train_subset is not None and params.train_subset < len(train_rows):
            train_rows, _ = train_test_split(train_rows, train_size=params.train_subset,
                                             stratify=labels[train_rows], random_state=seed)
    except ValueError as e:  # e.g. a class with a single sample cannot be stratified
        raise KDError(f"data: cannot split {params.name} at {params.root} with val_fraction "
                      f"{params.val_fraction}, test_fraction {params.test_fraction}, train_subset "
                      f"{params.train_subset}: {e}") from None
    mean, std = normalization(params, source.train_images[0].shape[0])
    return Dataset(everything.subset(np.sort(train_rows)), everything.subset(np.sort(val_rows)), test,
                   num_classes=len(source.classes), classes=list(source.classes), mean=mean, std=std)


def statistics_warning(params: DataParams, images: Images) -> str | None:
    """A warning when the mean per channel of `images` (the training images, uint8 (N, C, H, W)) is more than
    MEAN_TOLERANCE from that of `params.name` (CHECKED_STATISTICS only; else None), naming the likely fix: the known
    set they fit, or else the data's own statistics in `data.normalize` (silent when data.normalize already gives
    them: a set of one's own in the named set's format)."""
    name = params.name
    if name not in CHECKED_STATISTICS or not isinstance(images, torch.Tensor):
        return None
    sample = images[:STATISTICS_SAMPLE]
    measured = (sample.sum(dim=(0, 2, 3)).double() / (sample[:, 0].numel() * 255)).tolist()  # integer sums: exact

    def distance(other: str) -> float:
        expected = NORMALIZE[other][0]
        return max(abs(a - b) for a, b in zip(measured, expected)) if len(expected) == len(measured) else math.inf

    fits = sorted((distance(other), other) for other in CHECKED_STATISTICS if distance(other) <= MEAN_TOLERANCE)
    if distance(name) <= MEAN_TOLERANCE or not fits and params.normalize != "auto":
        return None
    fix = (f"these look like {fits[0][1]}: set data.name: {fits[0][1]}" if fits else
           "check data.root; for another data set, set data.normalize to its own {mean: [...], std: [...]}")
    classes = ", and named with its classes" if name in ("mnist", "fashion_mnist") else ""
    return (f"Warning: data.name is {name}, but the training images in {params.root} have mean {_rounded(measured)} "
            f"(first {len(sample)} images, pixels in [0, 1]); {name}'s is {_rounded(NORMALIZE[name][0])}. With "
            f"data.normalize: auto they are normalized with {name}'s statistics{classes}: {fix}")


def _rounded(values) -> list[float]:
    return [round(float(v), 4) for v in values]


def normalization(params: DataParams, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel from `data.normalize`: auto (per data set), none, or given values."""
    if params.normalize == "auto":
        mean, std = NORMALIZE[params.name]
    elif params.normalize == "none":
        mean, std = (0.0,), (1.0,)
    else:
        mean, std = tuple(params.normalize["mean"]), tuple(params.normalize["std"])
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels:
        raise KDError(f"data.normalize has {len(mean)} values per statistic; the images have {channels} channels")
    return tuple(map(float, mean)), tuple(map(float, std))


def input_transform(augment, mean, std):
    """uint8 (C, H, W) -> float input: to [0, 1], then `augment` (a v2 transform or None), then Normalize."""
    from torchvision.transforms import v2

    steps = [v2.ToDtype(torch.float32, scale=True)]
    if augment is not None:
        steps.append(augment)
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def fingerprint(split: Split) -> str:
    """SHA-256 naming a split: its images' contents and order (file bytes for image folders) and labels."""
    import hashlib

    h = hashlib.sha256(fingerprint_images(split.images).encode())
    labels = split.labels.contiguous().numpy()
    h.update(str(labels.shape).encode())
    h.update(labels.tobytes())
    return h.hexdigest()


class ViewDataset(torch.utils.data.Dataset):
    """`split[i]` through a deterministic transform (evaluation): yields `(input, label)`."""

    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.transform(self.split.images[i]), self.split.labels[i]
