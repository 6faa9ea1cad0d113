"""The ImageNet family from JPEG folders: each image decoded once per cache run, RandomResizedCrop (+ flips) replayed
a batch at a time with replay_view's own draws (bit for bit on the CPU), and a student from such a store equal to
one trained with the teacher live on replay_view's views. The device that made the views is in the store."""

import copy

import numpy as np
import pytest
import torch
from torchvision.io import write_jpeg
from torchvision.transforms import InterpolationMode

import pipeline.replay as replay
from pipeline.data import input_transform, load_dataset
from pipeline.models import build_model
from pipeline.params import CacheParams, DataParams, load_params
from pipeline.replay import BatchReplay, replay_view
from pipeline.augment import build_augment
from pipeline.sources import ImageFiles
from pipeline.store import LogitStore
from pipeline.train import distill, online_targets, store_targets
from pipeline.cache import cache_teacher_logits
from conftest import write_params

CPU = torch.device("cpu")
IMAGENET = [{"RandomResizedCrop": {"size": 24}}, {"RandomHorizontalFlip": {}}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A JPEG folder of 3 classes x 8 images of different sizes (made one size by data.image_size: 32)."""
    root = tmp_path_factory.mktemp("jpegs")
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for k in range(8):
            h, w = 36 + 4 * k, 40 + 2 * c
            image = (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)
            write_jpeg(image, str(root / "train" / f"c{c}" / f"{k}.jpg"), quality=90)
    params = DataParams(name="imagefolder", root=str(root), image_size=32, normalize="auto", split_seed=0,
                        val_fraction=0.25, test_fraction=0.25, train_subset=None)
    return load_dataset(params), root


@pytest.mark.parametrize("crop", [
    {"size": 24},
    {"size": [20, 28], "scale": [0.3, 0.9], "ratio": [0.5, 2.0], "interpolation": InterpolationMode.BICUBIC},
    {"size": 16, "interpolation": InterpolationMode.NEAREST, "antialias": False},
    {"size": 24, "scale": [0.9, 1.0], "antialias": False},
])
def test_resized_crops_and_flips_replay_a_batch_exactly_as_view_by_view(crop):
    images = torch.randint(0, 256, (6, 3, 32, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    augment = [{"RandomResizedCrop": crop}, {"RandomHorizontalFlip": {}}, {"RandomVerticalFlip": {"p": 0.3}}]
    transform = input_transform(build_augment(augment), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    plan = BatchReplay.of(transform)
    assert plan is not None and plan.resized is not None
    samples = np.repeat(np.arange(6), 5)
    views = np.tile(np.arange(5), 6)
    params = plan.draw(7, samples, views, images.shape[1:])
    expected = torch.stack([replay_view(images[i], transform, 7, int(i), int(v)) for i, v in zip(samples, views)])
    assert torch.equal(plan.apply(images[samples], params), expected)  # one image per view
    assert torch.equal(plan.apply(images, params, samples), expected)  # the distinct images and which view takes which


@pytest.mark.parametrize("augment", [[{"RandomHorizontalFlip": {}}, {"RandomResizedCrop": {"size": 8}}],
                                     [{"RandomResizedCrop": {"size": 8}}, {"RandomCrop": {"size": 6}}]])
def test_other_orders_replay_view_by_view(augment):
    """Batched: a RandomResizedCrop first and flips after it; anything else goes view by view (still exact)."""
    assert BatchReplay.of(input_transform(build_augment(augment), (0.0,), (1.0,))) is None


def counting_decodes(monkeypatch, path):
    """Count every image decode (also in DataLoader workers: one line per decode appended to `path`)."""
    decode = ImageFiles.__getitem__

    def counted(self, i):
        with open(path, "a") as f:
            f.write(f"{i}\n")
        return decode(self, i)

    monkeypatch.setattr(ImageFiles, "__getitem__", counted)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_cache_decodes_each_image_once(folder, tmp_path, monkeypatch, workers):
    data, _ = folder
    counter = tmp_path / "decodes.txt"
    counting_decodes(monkeypatch, counter)
    cfg = CacheParams(num_views=5, seed=3, format="zarr", dtype="float32", storage="full", top_k=1, chunk_samples=4,
                      batch_size=12, amp="auto")
    teacher = build_model("tiny_cnn", 3, 3, seed=0)
    counter.write_text("")
    cache_teacher_logits(tmp_path / "s.zarr", cfg, teacher, "tiny_cnn", data.train, 3, IMAGENET, data.mean,
                         data.std, CPU, num_workers=workers)
    decoded = [int(line) for line in counter.read_text().split()]
    # one decode per sample, plus the one-image check of the augmentation when the dataset is built
    assert sorted(set(decoded)) == list(range(len(data.train)))
    assert len(decoded) <= len(data.train) + 1, (len(decoded), len(data.train))
    assert LogitStore(tmp_path / "s.zarr").meta.replay == "cpu"


def test_a_student_from_a_batched_imagefolder_store_equals_one_taught_live_on_replay_view(folder, tmp_path,
                                                                                         monkeypatch):
    """The store is written through the batched path (one decode per image, views in a batch); the live teacher
    here runs on replay_view's own views (batched replay switched off): the same student, bit for bit."""
    data, _ = folder
    teacher = build_model("tiny_cnn", 3, 3, seed=1)
    cfg = CacheParams(num_views=3, seed=5, format="zarr", dtype="float32", storage="full", top_k=1, chunk_samples=8,
                      batch_size=9, amp="auto")
    cache_teacher_logits(tmp_path / "s.zarr", cfg, teacher, "tiny_cnn", data.train, 3, IMAGENET, data.mean, data.std,
                         CPU)
    transform = input_transform(build_augment(IMAGENET), data.mean, data.std)
    evaluate = input_transform(None, data.mean, data.std)
    run = load_params(write_params(tmp_path / "p.yaml", **{
        "distill.epochs": 2, "distill.batch_size": 5, "distill.view_schedule": "random",
        "distill.optimizer.lr_milestones": [], "distill.optimizer.lr_factors": []})).distill
    initial = build_model("tiny_cnn", 3, 3, seed=0)  # BatchNorm; sizes differ between training and validation
    cached, live = copy.deepcopy(initial), copy.deepcopy(initial)
    distill(cached, data.train, data.val, store_targets(LogitStore(tmp_path / "s.zarr")), transform, evaluate, 5, 3,
            run, kd_weight=1.0, seed=0, device=CPU)
    monkeypatch.setattr(BatchReplay, "of", classmethod(lambda cls, t: None))  # view by view: replay_view
    distill(live, data.train, data.val, online_targets(teacher, CPU), transform, evaluate, 5, 3, run, kd_weight=1.0,
            seed=0, device=CPU)
    for a, b in zip(cached.parameters(), live.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(cached.parameters(), initial.parameters()))


def test_the_replay_device_is_recorded_and_a_run_on_another_is_warned(folder):
    data, _ = folder
    transform = input_transform(build_augment(IMAGENET), data.mean, data.std)
    assert replay.replay_device(data.train.images, transform, torch.device("cuda")) == "cuda"
    assert replay.replay_device(data.train.images, transform, CPU) == "cpu"
    crops = input_transform(build_augment([{"RandomCrop": {"size": 28, "padding": 2}}]), data.mean, data.std)
    assert replay.replay_device(data.train.images, crops, torch.device("cuda")) == "cpu"  # pixel moves are exact
