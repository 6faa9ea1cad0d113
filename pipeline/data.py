"""The dataset and its fixed, seeded train/validation/test split.

Images are float32 tensors of shape (N, C, H, W) with values in [0, 1]; labels are int64 (N,).
Sample index i in the cache and in distillation always means row i of the *training* split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.params import DataParams


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def load_dataset(params: DataParams) -> Dataset:
    """Load `params.name` and split it, stratified, with `params.split_seed` (same seed, same split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # ships inside scikit-learn: no download
    images = (digits.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8), pixel values 0..16
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    seed = params.split_seed
    rest, test = train_test_split(index, test_size=params.test_fraction, stratify=labels, random_state=seed)
    val_size = params.val_fraction / (1 - params.test_fraction)
    train, val = train_test_split(rest, test_size=val_size, stratify=labels[rest], random_state=seed)

    def split(rows: np.ndarray) -> Split:
        return Split(torch.from_numpy(images[rows].copy()), torch.from_numpy(labels[rows].copy()))

    return Dataset(split(train), split(val), split(test), num_classes=int(labels.max()) + 1)


def fingerprint(split: Split) -> str:
    """SHA-256 of a split's images and labels (values, shape and order): names the data a store was made from."""
    h = hashlib.sha256()
    for t in (split.images, split.labels):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
