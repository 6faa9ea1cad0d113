"""The dataset: seeded stratified splits for every source, uint8 until the transform, one normalization,
and a fingerprint that follows every pixel, label and the order. Real files, written here."""

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from pipeline import KDError
from pipeline.data import Split, fingerprint, input_transform, load_dataset
from pipeline.params import load_params
from pipeline.replay import replay_view
from pipeline.augment import build_augment
from conftest import ROOT
from test_sources import write_mnist


def data_params(**overrides):
    return dataclasses.replace(load_params(ROOT / "params.yaml").data, **overrides)


def write_image_folder(root, per_class=6, test=True, size=12):
    """root/train/<3 classes>/*.png (and test/ when asked): random RGB images; returns root."""
    g = torch.Generator().manual_seed(0)
    for split, n in [("train", per_class)] + ([("test", 2)] if test else []):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                write_png(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
                          str(root / split / c / f"{k:03d}.png"))
    return root


def test_digits_split_is_stratified_seeded_and_disjoint():
    data = load_dataset(data_params())
    assert (len(data.train), len(data.val), len(data.test)) == (1077, 360, 360)
    assert data.train.images.dtype == torch.uint8 and data.image_shape == (1, 8, 8)
    again = load_dataset(data_params())
    assert torch.equal(again.val.labels, data.val.labels) and torch.equal(again.val.images, data.val.images)
    other = load_dataset(data_params(split_seed=1))
    assert not torch.equal(other.val.images, data.val.images)
    counts = np.bincount(data.val.labels.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class


def test_mnist_keeps_its_test_split_and_carves_validation_from_train(tmp_path):
    arrays = write_mnist(tmp_path / "mnist", gz=True, train=40, test=7)
    arrays["train"] = (np.tile(arrays["train"][0], (1, 1, 1)), np.tile(np.arange(10), 4))  # labels: 4 per class
    from test_sources import write_idx
    write_idx(tmp_path / "mnist/train-labels-idx1-ubyte.gz", arrays["train"][1])
    data = load_dataset(data_params(name="mnist", root=str(tmp_path / "mnist"), val_fraction=0.25))
    assert len(data.test) == 7 and (len(data.train), len(data.val)) == (30, 10)
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(arrays["t10k"][0].astype(np.uint8)))
    assert sorted(data.val.labels.tolist()) == list(range(10))  # one per class
    assert data.mean == (0.1307,) and data.std == (0.3081,)  # MNIST's own statistics (auto)
    subset = load_dataset(data_params(name="mnist", root=str(tmp_path / "mnist"), val_fraction=0.25,
                                      train_subset=20))
    assert len(subset.train) == 20 and torch.equal(subset.val.images, data.val.images)


def test_image_folder_is_never_loaded_whole(tmp_path):
    from pipeline.sources import ImageFiles

    root = write_image_folder(tmp_path / "images")
    data = load_dataset(data_params(name="imagefolder", root=str(root), val_fraction=1 / 3))
    assert isinstance(data.train.images, ImageFiles) and isinstance(data.test.images, ImageFiles)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 6)
    assert data.classes == ["ant", "bee", "cat"] and data.image_shape == (3, 12, 12)
    no_test = write_image_folder(tmp_path / "no_test", per_class=10, test=False)
    data = load_dataset(data_params(name="imagefolder", root=str(no_test), val_fraction=0.25, test_fraction=0.2))
    assert (len(data.train), len(data.val), len(data.test)) == (18, 6, 6)


def test_normalization_is_one_transform_for_every_stage():
    image = torch.full((3, 4, 4), 255, dtype=torch.uint8)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    x = input_transform(None, mean, std)(image)
    assert x.dtype == torch.float32 and torch.allclose(x[:, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    augment = build_augment([{"RandomHorizontalFlip": {"p": 1.0}}])
    flipped = input_transform(augment, mean, std)(image)
    assert torch.equal(flipped, x)  # flip of a constant image: only the normalization shows
    assert torch.equal(replay_view(image, input_transform(augment, mean, std), 0, 3, 1), x)


def test_bad_normalize_for_the_channels_is_refused():
    with pytest.raises(KDError, match="data.normalize has 3 values per statistic; the images have 1 channels"):
        load_dataset(data_params(normalize={"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]}))


def test_fingerprint_follows_one_pixel_one_label_and_the_order():
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    base = fingerprint(Split(images, labels))
    assert fingerprint(Split(images.clone(), labels.clone())) == base
    pixel = images.clone()
    pixel[3, 0, 2, 1] ^= 1
    assert fingerprint(Split(pixel, labels)) != base
    label = labels.clone()
    label[5] = 0
    assert fingerprint(Split(images, label)) != base
    assert fingerprint(Split(images, labels).subset([1, 0, 2, 3, 4, 5])) != base


def test_image_folder_fingerprint_follows_a_file(tmp_path):
    root = write_image_folder(tmp_path / "images")
    params = data_params(name="imagefolder", root=str(root), val_fraction=1 / 3)
    train = load_dataset(params).train
    before = fingerprint(train)
    write_png(torch.zeros(3, 12, 12, dtype=torch.uint8), str(root / train.images.paths[0]))
    changed = fingerprint(load_dataset(params).train)
    assert changed != before
    assert fingerprint(load_dataset(dataclasses.replace(params, image_size=8)).train) != changed


def write_idx_set(root, pixel: int, train=40, test=4):
    """The four IDX files of a 28x28 set whose images all have value `pixel` (uint8); 4 training images per class."""
    from test_sources import write_idx

    root.mkdir()
    for split, n in (("train", train), ("t10k", test)):
        write_idx(root / f"{split}-images-idx3-ubyte", np.full((n, 28, 28), pixel))
        write_idx(root / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


FASHION_PIXEL, MNIST_PIXEL = 73, 33  # 73 / 255 = 0.286, Fashion-MNIST's mean; 33 / 255 = 0.129, MNIST's


def test_mnist_named_fashion_files_warn_with_the_fix(tmp_path, capsys):
    root = write_idx_set(tmp_path / "fashion", FASHION_PIXEL)
    data = load_dataset(data_params(name="mnist", root=str(root)))
    assert data.mean == (0.1307,)  # still loads, as asked: a warning, not a refusal
    err = capsys.readouterr().err
    assert err.startswith("Warning: data.name is mnist") and str(root) in err
    assert "0.2863" in err and "0.1307" in err  # measured and expected means
    assert "set data.name: fashion_mnist" in err


@pytest.mark.parametrize("name, pixel", [("mnist", MNIST_PIXEL), ("fashion_mnist", FASHION_PIXEL)])
def test_files_that_match_their_name_load_silently(tmp_path, capsys, name, pixel):
    load_dataset(data_params(name=name, root=str(write_idx_set(tmp_path / name, pixel))))
    assert capsys.readouterr().err == ""


def test_rgb_statistics_are_checked_per_channel():
    from pipeline.data import statistics_warning

    cifar10, cifar100 = data_params(name="cifar10", root="data"), data_params(name="cifar100", root="data")
    images = torch.empty(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 0], images[:, 1], images[:, 2] = 125, 123, 114  # CIFAR-10's means x 255, to the nearest pixel value
    assert statistics_warning(cifar10, images) is None
    assert statistics_warning(cifar100, images) is None  # 0.016 apart at most: not told apart
    images[:, 2] = 200  # one channel far off
    warning = statistics_warning(cifar10, images)
    assert "data.name is cifar10" in warning and "0.7843" in warning and "0.4465" in warning
    assert "set data.normalize to its own" in warning  # no known set fits: the fix is the data's own statistics
    own = {"mean": [0.49, 0.48, 0.78], "std": [0.25, 0.25, 0.25]}
    assert statistics_warning(dataclasses.replace(cifar10, normalize=own), images) is None  # already done
    assert statistics_warning(data_params(name="digits"), images[:, :1]) is None
    assert statistics_warning(data_params(name="imagefolder"), images) is None


def test_misnamed_files_warn_even_with_normalize_given(tmp_path, capsys):
    """A set of one's own with its own data.normalize is quiet, but Fashion-MNIST named mnist is still misnamed."""
    root = write_idx_set(tmp_path / "fashion", FASHION_PIXEL)
    load_dataset(data_params(name="mnist", root=str(root), normalize={"mean": [0.286], "std": [0.353]}))
    assert "set data.name: fashion_mnist" in capsys.readouterr().err
