"""Replay: view v of sample i is a pure function of (seed, i, v), wherever and whenever it is computed."""

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import KDError
import numpy as np

from pipeline.data import input_transform
from pipeline.replay import BatchReplay, ReplayDataset, epoch_pairs, epoch_views, replay_view
from pipeline.augment import build_augment

# Every random torchvision v2 transform family a user is likely to configure, as params.yaml would say it.
SPECS = {
    "affine": [{"RandomAffine": {"degrees": 20, "translate": [0.2, 0.2], "scale": [0.8, 1.2], "shear": 10}}],
    "resized_crop_flip": [{"RandomResizedCrop": {"size": 16, "scale": [0.5, 1.0], "antialias": True}},
                          {"RandomHorizontalFlip": {}}, {"RandomVerticalFlip": {}}],
    "crop_padding": [{"RandomCrop": {"size": 16, "padding": 4}}],
    "rotation_perspective": [{"RandomRotation": {"degrees": 30}}, {"RandomPerspective": {"p": 1.0}}],
    "color": [{"ColorJitter": {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.2}},
              {"RandomGrayscale": {"p": 0.5}}, {"RandomAutocontrast": {}}, {"RandomEqualize": {}},
              {"RandomAdjustSharpness": {"sharpness_factor": 2}}],
    "blur_erase_invert": [{"GaussianBlur": {"kernel_size": 3, "sigma": [0.1, 2.0]}},
                          {"RandomErasing": {"p": 1.0}}, {"RandomInvert": {}}],
    "auto_augment": [{"RandAugment": {}}, {"TrivialAugmentWide": {}}, {"AugMix": {}}],
    "elastic_noise": [{"ElasticTransform": {"alpha": 20.0, "sigma": 2.0}}, {"GaussianNoise": {}}],
    "zoom": [{"RandomZoomOut": {"side_range": [1.0, 2.0]}}, {"RandomResizedCrop": {"size": [16, 16], "antialias": True}}],
}


@pytest.fixture
def image():
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", SPECS)
def test_every_v2_random_transform_replays_exactly(name, image):
    transform = build_augment(SPECS[name])
    first = [replay_view(image, transform, 3, i, v) for i in range(3) for v in range(4)]
    torch.rand(100)  # whatever the global stream does in between must not matter
    again = [replay_view(image, transform, 3, i, v) for i in range(3) for v in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(first[0], x) for x in first[1:]), "all views identical: no randomness replayed"


def test_different_views_and_samples_differ(image):
    transform = build_augment(SPECS["affine"])
    views = [replay_view(image, transform, 0, 5, v) for v in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert not torch.equal(replay_view(image, transform, 0, 6, 0), views[0])
    assert not torch.equal(replay_view(image, transform, 1, 5, 0), views[0])


def test_replay_leaves_the_global_random_stream_untouched(image):
    transform = build_augment(SPECS["affine"])
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    replay_view(image, transform, 0, 1, 2)
    assert torch.equal(torch.rand(5), expected)


def test_replay_is_identical_in_another_process(image, tmp_path):
    transform = build_augment(SPECS["resized_crop_flip"])
    torch.save(image, tmp_path / "image.pt")
    code = (
        "import sys, torch\n"
        "from pipeline.augment import build_augment\nfrom pipeline.replay import replay_view\n"
        f"t = build_augment({SPECS['resized_crop_flip']!r})\n"
        f"img = torch.load(r'{tmp_path / 'image.pt'}')\n"
        f"torch.save(torch.stack([replay_view(img, t, 9, i, v) for i in range(4) for v in range(3)]), "
        f"r'{tmp_path / 'out.pt'}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    here = torch.stack([replay_view(image, transform, 9, i, v) for i in range(4) for v in range(3)])
    assert torch.equal(torch.load(tmp_path / "out.pt"), here)


def test_replay_is_identical_in_dataloader_workers():
    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12)
    dataset = ReplayDataset(images, labels, build_augment(SPECS["affine"]), seed=4)
    pairs = epoch_pairs("random", 3, 12, epoch=2, seed=0)
    in_main = torch.cat([x for x, *_ in DataLoader(dataset, sampler=pairs, batch_size=5)])
    in_workers = torch.cat([x for x, *_ in DataLoader(dataset, sampler=pairs, batch_size=5, num_workers=2)])
    assert torch.equal(in_main, in_workers)
    assert torch.equal(in_main[0], replay_view(images[pairs[0][0]], dataset.transform, 4, *pairs[0]))


def test_view_schedules():
    assert (epoch_views("cycle", 4, 10, epoch=6, seed=0) == 2).all()
    random_views = epoch_views("random", 4, 1000, epoch=0, seed=0)
    assert set(random_views.tolist()) == {0, 1, 2, 3}
    assert (random_views == epoch_views("random", 4, 1000, epoch=0, seed=0)).all()
    assert not (random_views == epoch_views("random", 4, 1000, epoch=1, seed=0)).all()
    pairs = epoch_pairs("cycle", 4, 10, epoch=1, seed=0)
    assert sorted(i for i, _ in pairs) == list(range(10))


def test_unknown_transform_name_is_a_clear_error():
    with pytest.raises(KDError, match="randomaffine.*not a torchvision.transforms.v2 transform"):
        build_augment([{"randomaffine": {"degrees": 10}}])
    with pytest.raises(KDError, match="RandomAffine"):
        build_augment([{"RandomAffine": {"degres": 10}}])


def test_readme_replay_snippet_rebuilds_the_cached_view():
    """The stand-alone function of docs/store.md gives exactly the view the pipeline replays."""
    import json
    import re

    from pipeline.data import input_transform
    from conftest import ROOT

    readme = (ROOT / "docs/store.md").read_text()
    code = re.search(r"```python\n(import json.*?def replayed_view.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(code, namespace)
    augment = [{"RandomResizedCrop": {"size": 8, "scale": [0.5, 1.0]}}, {"ColorJitter": {"brightness": 0.4}}]
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    ours = replay_view(image, input_transform(build_augment(augment), mean, std), 5, 11, 3)
    theirs = namespace["replayed_view"](image, json.dumps(augment), mean, std, 5, 11, 3)
    assert torch.equal(ours, theirs)


CROPS_AND_FLIPS = {
    "cifar": [{"RandomCrop": {"size": 32, "padding": 4}}, {"RandomHorizontalFlip": {"p": 0.5}}],
    "flip first, uneven padding": [{"RandomHorizontalFlip": {}}, {"RandomCrop": {"size": [28, 30], "padding": [1, 2, 3, 4]}},
                                   {"RandomVerticalFlip": {"p": 0.3}}],
    "two crops, pad if needed": [{"RandomCrop": {"size": 24}}, {"RandomCrop": {"size": 30, "pad_if_needed": True}},
                                 {"RandomHorizontalFlip": {"p": 1.0}}],
    "no augmentation": [],
    "crop without padding": [{"RandomCrop": {"size": 20}}],
}


@pytest.mark.parametrize("name", CROPS_AND_FLIPS)
def test_batched_replay_equals_replay_view_bit_for_bit(name):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    transform = input_transform(build_augment(CROPS_AND_FLIPS[name]), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    plan = BatchReplay.of(transform)
    assert plan is not None
    samples, views = np.repeat(np.arange(6), 4), np.tile(np.arange(4), 6)
    state = torch.default_generator.get_state()
    batch = plan.apply(images[samples], plan.draw(7, samples, views, images.shape[1:]))
    assert torch.equal(torch.default_generator.get_state(), state)
    one_by_one = torch.stack([replay_view(images[i], transform, 7, int(i), int(v)) for i, v in zip(samples, views)])
    assert batch.dtype == one_by_one.dtype and batch.is_contiguous()
    assert torch.equal(batch, one_by_one)
    if CROPS_AND_FLIPS[name]:
        assert len({x.sum().item() for x in batch}) > 4, "views should differ"


@pytest.mark.parametrize("augment", [[{"RandomAffine": {"degrees": 10}}], [{"ColorJitter": {"brightness": 0.2}}],
                                     [{"RandomCrop": {"size": 28, "padding": 2, "padding_mode": "reflect"}}],
                                     [{"RandomCrop": {"size": 28, "padding": 2, "fill": 1}}]])
def test_batched_replay_is_refused_for_other_transforms(augment):
    assert BatchReplay.of(input_transform(build_augment(augment), (0.5,), (0.25,))) is None


def test_view_seeds_equal_numpys_seed_sequence_for_every_pair():
    """`view_seeds` (a whole batch at once) is `view_seed` (numpy's SeedSequence) entry by entry: small and large
    samples and views, views past 2**32 (the teacher's epochs), replay seeds 0 and large."""
    from pipeline.replay import view_seed, view_seeds

    rng = np.random.default_rng(0)
    samples = np.concatenate([np.arange(50), rng.integers(0, 2**32, 300), [0, 1, 2**32 - 1, 2**32 + 5]])
    views = np.concatenate([np.zeros(50, np.int64), rng.integers(0, 2**32, 300), [2**32, 2**32 + 7, 3, 2]])
    for seed in (0, 7, 2**32 - 1, 2**40):
        expected = np.array([view_seed(seed, int(i), int(v)) for i, v in zip(samples, views)], dtype=np.uint64)
        assert np.array_equal(view_seeds(seed, samples, views), expected), seed


def test_batched_crops_and_flips_draw_the_same_in_another_thread_and_leave_the_global_generator():
    """The batched draws of crops and flips use a generator of their own, seeded per view: the same parameters in
    a second thread, for hundreds of views, and the global generator is never touched."""
    import threading

    transform = input_transform(build_augment(CROPS_AND_FLIPS["flip first, uneven padding"]), (0.5,) * 3, (0.2,) * 3)
    plan = BatchReplay.of(transform)
    samples, views = np.repeat(np.arange(100), 4), np.tile(np.arange(4), 100)
    here = plan.draw(3, samples, views, (3, 32, 32))
    there = []
    state = torch.default_generator.get_state()
    thread = threading.Thread(target=lambda: there.append(plan.draw(3, samples, views, (3, 32, 32))))
    thread.start()
    thread.join()
    assert np.array_equal(here, there[0]) and torch.equal(torch.default_generator.get_state(), state)
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    one_by_one = torch.stack([replay_view(images[i], transform, 3, int(i), int(v)) for i, v in zip(samples, views)])
    assert torch.equal(plan.apply(images[samples], here), one_by_one)


def test_kept_draws_are_the_draws_made_again():
    """`memo_views`: a batch's parameters through the memo (first drawn, then kept, and views past the memo drawn
    each time) equal those drawn afresh, for repeated and mixed pairs."""
    from pipeline.replay import ReplayDataset

    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(40) % 10
    transform = input_transform(build_augment(CROPS_AND_FLIPS["cifar"]), (0.5,) * 3, (0.2,) * 3)
    fresh = ReplayDataset(images, labels, transform, 3)
    kept = ReplayDataset(images, labels, transform, 3, memo_views=2)
    assert kept.memo is not None and fresh.memo is None
    rng = np.random.default_rng(0)
    for _ in range(4):
        pairs = list(zip(rng.integers(40, size=30).tolist(), rng.integers(4, size=30).tolist()))  # views 2, 3: past it
        a, b = fresh.__getitems__(pairs), kept.__getitems__(pairs)
        assert np.array_equal(a[2], b[2]) and torch.equal(fresh.collate(a)[0], kept.collate(b)[0])
    assert kept.memo[1].any() and not kept.memo[1].all()


def test_mt19937_words_are_torchs_generator_words():
    """`mt19937_words` (a batch of seeds at once) gives what torch's CPU generator gives after `manual_seed`, call
    by call: `randint` the word modulo n (n up to 2**24), float32 `rand` its low 24 bits; seeds small, past 32 and up to 64 bits; and
    the float32 tie of a flip's p (seed 5254236 draws exactly float32(0.7), which is not < 0.7 in float32)."""
    from pipeline.replay import mt19937_is_torchs, mt19937_words

    odd = np.random.default_rng(0).integers(0, 2**63, 200, dtype=np.uint64) * 2 + 1  # odd, up to 2**64 - 1
    seeds = np.concatenate([np.arange(20, dtype=np.uint64), odd, np.array([2**32, 2**64 - 1, 5254236], np.uint64)])
    assert seeds.dtype == np.uint64 and seeds.max() == 2**64 - 1 and (odd > 2**63).sum() > 50  # no float round trip
    words = mt19937_words(seeds, 5)
    generator = torch.Generator()
    for seed, row in zip(seeds.tolist(), words.tolist()):
        generator.manual_seed(seed)
        drawn = [int(torch.randint(0, n, size=(), generator=generator)) for n in (3, 33, 2**24 - 5)]
        flips = [bool(torch.rand(1, generator=generator) < p) for p in (0.7, 0.5)]
        assert drawn == [row[0] % 3, row[1] % 33, row[2] % (2**24 - 5)], seed
        assert flips == [(word & 0xFFFFFF) < np.float32(p) * 2**24 for word, p in zip(row[3:], (0.7, 0.5))], seed
    generator.manual_seed(5254236)
    assert torch.rand(1, generator=generator).item() == np.float32(0.7) and mt19937_is_torchs()


@pytest.mark.parametrize("name", [n for n in CROPS_AND_FLIPS if CROPS_AND_FLIPS[n]])
def test_batched_draws_equal_torchs_calls_view_by_view(name, monkeypatch):
    """`BatchReplay.draw` computes the generator's words for the whole batch; where that could not be trusted
    (`mt19937_is_torchs` False) it makes torch's calls view by view: both give the same parameters."""
    from pipeline import replay

    transform = input_transform(build_augment(CROPS_AND_FLIPS[name]), (0.5,) * 3, (0.2,) * 3)
    plan = BatchReplay.of(transform)
    samples, views = np.repeat(np.arange(300), 3), np.tile(np.arange(3), 300)
    batched = plan.draw(11, samples, views, (3, 32, 32))
    monkeypatch.setattr(replay, "mt19937_is_torchs", lambda: False)
    assert np.array_equal(batched, plan.draw(11, samples, views, (3, 32, 32)))
