"""MixUp and CutMix as part of a view: a mixed view is a pure function of (seed, i, v) and the data, whatever the
batch, order, workers or ranks; the store holds the teacher's logits on the mixed input, and a student trained
from it equals one trained with the teacher live on the same mixed views, bit for bit."""

import os

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import kd_process
from conftest import EVAL, MEAN, ROOT, STD, TRANSFORM, make_store, write_params
from pipeline import mix as mixing
from pipeline.data import input_transform
from pipeline.loaders import RankBatches, make_loader
from pipeline.models import build_model
from pipeline.params import MixParams, ParamsError, load_params
from pipeline.replay import EpochSampler, ReplayDataset, epoch_views, replay_view
from pipeline.augment import build_augment
from pipeline.store import LogitStore, StoreError
from pipeline.train import distill, online_targets, store_targets

CPU = torch.device("cpu")
CROP_FLIP = [{"RandomCrop": {"size": 8, "padding": 1}}, {"RandomHorizontalFlip": {}}]
MIXUP = MixParams(mode="mixup", mixup_alpha=1.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
CUTMIX = MixParams(mode="cutmix", mixup_alpha=1.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
BOTH = MixParams(mode="both", mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.5)
MIXES = {"mixup": MIXUP, "cutmix": CUTMIX, "both": BOTH}


def _views(dataset, pairs, batch):
    """The views and labels of `pairs`, fetched `batch` pairs at a time as a loader would."""
    xs, ys = [], []
    for s in range(0, len(pairs), batch):
        x, y, *_ = dataset.collate(dataset.__getitems__(pairs[s:s + batch])) if dataset.batched is not None \
            else torch.utils.data.default_collate(dataset.__getitems__(pairs[s:s + batch]))
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def test_the_draws_of_a_view_follow_from_its_seed_alone():
    draws = [mixing.draw(BOTH, 7, i, v, 96, 8, 8) for i in range(96) for v in range(3)]
    assert draws == [mixing.draw(BOTH, 7, i, v, 96, 8, 8) for i in range(96) for v in range(3)]
    kinds = {d.kind for d in draws}
    assert kinds == {"none", "mixup", "cutmix"}  # prob 0.7, switch 0.5: all three occur
    assert all(d.partner != i for d, (i, _) in zip(draws, [(i, v) for i in range(96) for v in range(3)])
               if d.kind != "none")
    assert all(0 <= d.lam <= 1 for d in draws)
    for d in draws:
        if d.kind == "cutmix":  # the ratio is the share of the view the box leaves
            y1, y2, x1, x2 = d.box
            assert d.lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 64)
    assert mixing.draw(BOTH, 8, 0, 0, 96, 8, 8) != mixing.draw(BOTH, 7, 0, 0, 96, 8, 8)  # the seed decides
    never = MixParams(mode="mixup", mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0, switch_prob=0.5)
    assert {mixing.draw(never, 7, i, 0, 96, 8, 8).kind for i in range(50)} == {"none"}


def test_the_pixels_and_labels_are_torchvisions_mixup_and_cutmix():
    """torchvision's MixUp/CutMix mix a batch with itself rolled by one: for the batch [x_i, x_j] its row 0 is our
    pair (i, j). With its parameters set to our draw, the bits agree."""
    torch.manual_seed(0)
    x_i, x_j = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    batch, labels = torch.stack([x_i, x_j]), torch.tensor([2, 5])
    mixup = mixing.MixDraw("mixup", 1, 0.3125)
    tv = v2.MixUp(num_classes=10)
    tv.make_params = lambda flat: {"lam": mixup.lam}
    x, y = tv(batch, labels)
    assert torch.equal(mixing.mix_pixels(x_i, x_j, mixup), x[0])
    np.testing.assert_array_equal(mixing.soft_labels([2], [mixup], [5], 10)[0], y[0].numpy())
    cut = mixing.draw(CUTMIX, 3, 0, 0, 2, 8, 8)
    assert cut.kind == "cutmix" and cut.partner == 1
    y1, y2, x1, x2 = cut.box
    tv = v2.CutMix(num_classes=10)
    tv.make_params = lambda flat: {"box": (x1, y1, x2, y2), "lam_adjusted": cut.lam}
    x, y = tv(batch, labels)
    assert torch.equal(mixing.mix_pixels(x_i, x_j, cut), x[0])
    np.testing.assert_allclose(mixing.soft_labels([2], [cut], [5], 10)[0], y[0].numpy(), rtol=1e-6)


@pytest.mark.parametrize("mode", ["mixup", "cutmix", "both"])
@pytest.mark.parametrize("augment", ["crop_flip", "affine"])
def test_a_mixed_view_is_the_same_whatever_the_batch_order_path_or_workers(train_subset, mode, augment):
    """Crops and flips replay a batch at a time (partners replayed beside the batch), the affine family view by
    view: either way, with batches of 1, 7 or 32, in another order, and in 2 DataLoader workers, every mixed view and
    its mixed label are the same bits."""
    transform = input_transform(build_augment(CROP_FLIP), MEAN, STD) if augment == "crop_flip" else TRANSFORM
    images, labels = train_subset.images, train_subset.labels
    pairs = [(i, v) for i in range(96) for v in range(2)]
    reference = ReplayDataset(images, labels, transform, 7, batched=False, mix=MIXES[mode], num_classes=10)
    x_ref, y_ref = _views(reference, pairs, 1)
    assert x_ref.shape == (192, 1, 8, 8) and y_ref.shape == (192, 10)
    assert torch.allclose(y_ref.sum(1), torch.ones(192))
    plain = torch.stack([replay_view(images[i], transform, 7, i, v) for i, v in pairs])
    assert not torch.equal(plain, x_ref)  # mixing changed the views
    dataset = ReplayDataset(images, labels, transform, 7, mix=MIXES[mode], num_classes=10)
    assert (dataset.batched is not None) == (augment == "crop_flip")
    for batch in (7, 32):
        x, y = _views(dataset, pairs, batch)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    order = np.random.default_rng(1).permutation(len(pairs))
    x, y = _views(dataset, [pairs[k] for k in order], 16)
    assert torch.equal(x, x_ref[order]) and torch.equal(y, y_ref[order])
    sampler = EpochSampler(lambda e: pairs, len(pairs))
    x = torch.cat([b[0] for b in make_loader(dataset, sampler, 32, 2, CPU)])
    assert torch.equal(x, x_ref)
    one = dataset[pairs[5]]  # one view by index, on either path
    assert torch.equal(one[0], x_ref[5]) and torch.equal(one[1], y_ref[5]) and one[2:] == pairs[5]


def test_mode_none_leaves_every_view_and_label_as_without_mixing(train_subset):
    none = MixParams(mode="none", mixup_alpha=1.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
    pairs = [(i, 0) for i in range(32)]
    a = ReplayDataset(train_subset.images, train_subset.labels, TRANSFORM, 7, mix=none, num_classes=10)
    b = ReplayDataset(train_subset.images, train_subset.labels, TRANSFORM, 7)
    (xa, ya), (xb, yb) = _views(a, pairs, 8), _views(b, pairs, 8)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.int64


RANK_VIEWS = """
import sys, torch
from pipeline import distributed
from pipeline.data import input_transform
from pipeline.loaders import RankBatches
from pipeline.params import MixParams
from pipeline.replay import ReplayDataset
from pipeline.augment import build_augment
torch.distributed.init_process_group("gloo")
me, world = distributed.rank(), distributed.world_size()
images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
labels = torch.arange(40) % 10
transform = input_transform(build_augment([{"RandomCrop": {"size": 8, "padding": 1}}, {"RandomHorizontalFlip": {}}]),
                            (0.0,), (1.0,))
mix = MixParams(mode="both", mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5)
dataset = ReplayDataset(images, labels, transform, 7, mix=mix, num_classes=10)
pairs = [(int(i), int(i) % 3) for i in torch.randperm(40, generator=torch.Generator().manual_seed(1))]
out = []
for share in RankBatches(lambda e: pairs, 16, me, world):
    x, y, samples, views = dataset.collate(dataset.__getitems__(share))
    out.append((x, y, samples))
torch.save(out, f"{sys.argv[1]}/rank{me}.pt")
torch.distributed.destroy_process_group()
"""


def test_two_ranks_replay_the_mixed_views_of_one_process(tmp_path):
    """Under torchrun each rank replays only its share of a global batch: the shares, joined, are one process's
    batches bit for bit (views, mixed labels, samples)."""
    script = tmp_path / "views.py"
    script.write_text(RANK_VIEWS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for ranks, folder in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        folder.mkdir()
        result = kd_process.run(["--standalone", f"--nproc_per_node={ranks}", script, folder], env,
                                script="-m torch.distributed.run", timeout=300)  # tests/kd_process.py
        assert result.returncode == 0, result.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    two = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 3
    for step, (x, y, samples) in enumerate(one):
        joined = [torch.cat([two[0][step][k], two[1][step][k]]) for k in range(3)]
        assert torch.equal(joined[0], x) and torch.equal(joined[1], y) and torch.equal(joined[2], samples)


@pytest.mark.parametrize("augment", ["crop_flip", "affine"])
def test_a_student_from_a_mixed_store_equals_one_taught_live_on_the_same_mixed_views(
        augment, teacher, train_subset, dataset, tmp_path):
    """The store holds the teacher's logits on the mixed inputs: training from it (in memory, and from disk through
    2 DataLoader workers) gives the student that the live teacher on the same mixed views gives, bit for bit; the
    hard-label term takes the mixed labels (`distill.ce_weight` 1 here; 0 is pure function matching)."""
    spec = CROP_FLIP if augment == "crop_flip" else None
    transform = input_transform(build_augment(CROP_FLIP), MEAN, STD) if spec else TRANSFORM
    path = make_store(tmp_path / "s.zarr", "zarr", "float32", teacher, train_subset, chunk_samples=16,
                      mix=BOTH, **({"augment": spec} if spec else {}))
    store = LogitStore(path)
    assert store.meta.mix == mixing.as_spec(BOTH)
    cfg = load_params(write_params(tmp_path / "p.yaml", **{
        "distill.epochs": 2, "distill.batch_size": 16, "distill.view_schedule": "random",
        "distill.optimizer.lr_milestones": [], "distill.optimizer.lr_factors": []})).distill
    weights = {}
    for name, targets, workers in [("memory", store_targets(store), 0),
                                   ("disk, 2 workers", store_targets(LogitStore(path, max_memory_bytes=0)), 2),
                                   ("online", online_targets(teacher, CPU), 0)]:
        student = build_model("tiny_cnn", 1, 10, seed=0)
        distill(student, train_subset, dataset.val, targets, transform, EVAL, 7, 3, cfg, kd_weight=1.0, seed=0,
                device=CPU, chunk_samples=16, num_workers=workers, mix=BOTH, num_classes=10)
        weights[name] = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert all(torch.equal(weights["memory"], w) for w in weights.values()), list(weights)
    unmixed = build_model("tiny_cnn", 1, 10, seed=0)
    distill(unmixed, train_subset, dataset.val, online_targets(teacher, CPU), transform, EVAL, 7, 3, cfg,
            kd_weight=1.0, seed=0, device=CPU)
    assert not torch.equal(torch.cat([p.detach().flatten() for p in unmixed.parameters()]), weights["memory"])


def test_a_top_k_store_of_mixed_views_holds_the_top_logits_of_the_full_store(teacher, train_subset, tmp_path):
    full = LogitStore(make_store(tmp_path / "f.zarr", "zarr", "float32", teacher, train_subset, mix=MIXUP))
    top = LogitStore(make_store(tmp_path / "t.zarr", "zarr", "float32", teacher, train_subset, mix=MIXUP,
                                storage="topk", top_k=3))
    samples, views = np.arange(96), np.arange(96) % 3
    from pipeline import topk

    expected = topk.decode("topk", topk.encode("topk", full.read(samples, views), 3), 1.0, 10, "none")
    np.testing.assert_array_equal(top.read(samples, views, 1.0, "none"), expected)


def test_a_store_of_other_mixing_is_refused_by_name(teacher, train_subset, dataset, tmp_path):
    from stages.common import open_run_store

    path = make_store(tmp_path / "s.zarr", "zarr", "float32", teacher, train_subset, num_views=2, mix=MIXUP)

    class Data:  # the run's data: the store's training split
        train, num_classes, mean, std = train_subset, 10, MEAN, STD

    from conftest import AUGMENT

    open_run_store(path, 64, teacher, Data, AUGMENT, 7, 2, 32, mix=MIXUP)  # the same mixing: accepted
    for other in (None, CUTMIX):
        with pytest.raises(StoreError, match="mix: store"):
            open_run_store(path, 64, teacher, Data, AUGMENT, 7, 2, 32, mix=other)


def test_mix_params_are_checked_and_fresh_views_need_the_live_teacher(tmp_path):
    params = write_params(tmp_path / "p.yaml", **{"mix.mode": "mixp", "mix.prob": 1.5, "mix.mixup_alpha": 0})
    with pytest.raises(ParamsError) as e:
        load_params(params)
    for key in ("mix.mode", "mix.prob", "mix.mixup_alpha"):
        assert key in str(e.value)
    params = write_params(tmp_path / "q.yaml", **{"distill.view_schedule": "fresh"})
    with pytest.raises(ParamsError, match="teacher_source: online"):
        load_params(params)
    assert load_params(write_params(tmp_path / "r.yaml", **{"distill.view_schedule": "fresh",
                                                            "distill.teacher_source": "online"}))
    assert list(epoch_views("fresh", 4, 3, 9, 0)) == [9, 9, 9]  # epoch e: view e, never a stored one's bound


def test_fresh_views_with_mixing_through_the_stages(tmp_path):
    """`kd distill` online with view_schedule fresh and mixing: each epoch a new mixed view of every sample."""
    from click.testing import CliRunner

    from stages.cli import kd as command

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    params = write_params(tmp_path / "p.yaml", **{
        "data.train_subset": 200, "distill.view_schedule": "fresh", "distill.teacher_source": "online",
        "mix.mode": "both", "distill.ce_weight": 0.0})

    def kd(*args):
        result = kd_process.run([*args, "--params", params], env, cwd=tmp_path, timeout=300)  # tests/kd_process.py
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout

    teacher = CliRunner().invoke(command, ["teacher", "--params", str(params), "--out", str(tmp_path / "t.pt")])
    assert teacher.exit_code == 0, teacher.output  # the teacher made in this process; `kd distill` in its own
    out = kd("distill", "--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "s.pt"))
    assert "validation accuracy" in out
