"""`torchrun kd distill`: DDP over ranks with a global batch. Each rank replays and reads only its share of
every global batch, and the result is one process's up to floating-point order (real processes, gloo on CPU)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import kd_process
from conftest import write_params
from pipeline.loaders import RankBatches

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("total,batch", [(10, 4), (9, 3), (7, 8), (5, 2)])
def test_rank_batches_split_every_global_batch_among_the_ranks(world, total, batch):
    pairs = [(i, i % 3) for i in range(total)]
    ranks = [list(RankBatches(lambda e: pairs, batch, r, world)) for r in range(world)]
    steps = -(-total // batch)
    assert all(len(r) == steps for r in ranks)  # every rank takes every step (DDP's all-reduce needs it)
    for step in range(steps):
        shares = [RankBatches(lambda e: pairs, batch, r, world).share(step, total) for r in range(world)]
        real = [ranks[r][step][:n] for r, (n, _) in enumerate(shares)]
        assert sum(real, []) == pairs[step * batch:(step + 1) * batch]  # the global batch, in order, once
        assert max(n for n, _ in shares) - min(n for n, _ in shares) <= 1
        assert sum(scale for _, scale in shares) / world == pytest.approx(1.0)  # averaged: the batch mean
    if world == 1:  # one process: exactly DataLoader(batch_size=batch)'s batches
        assert ranks[0] == [pairs[s:s + batch] for s in range(0, total, batch)]


def distill(params: Path, root: Path, out: Path, ranks: int) -> str:
    args = ["distill", "--params", params, "--teacher", root / "teacher.pt", "--cache", root / "logits.zarr", "--out",
            out, "--live-dir", out.with_suffix(".live")]
    # tests/kd_process.py: kd (or torchrun, which starts each rank as `python -m stages.cli`) in a process forked
    # from a preloaded fork server
    if ranks == 1:
        result = kd_process.run(args, ENV, timeout=600)
    else:
        result = kd_process.run(["--standalone", f"--nproc_per_node={ranks}", "-m", "stages.cli", *args], ENV,
                                script="-m torch.distributed.run", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A teacher and its store, made by `kd teacher` and `kd cache` in this process: every run compared here reads
    the same two files."""
    from click.testing import CliRunner

    from stages.cli import kd

    root = tmp_path_factory.mktemp("ddp")
    params = write_params(root / "params.yaml", **{"distill.student": "mlp", "distill.epochs": 2,
                                                   "distill.batch_size": 64})
    for stage, args in (("teacher", ["--out", str(root / "teacher.pt")]),
                        ("cache", ["--teacher", str(root / "teacher.pt"), "--out", str(root / "logits.zarr")])):
        result = CliRunner().invoke(kd, [stage, "--params", str(params), *args])
        assert result.exit_code == 0, result.output
    return root


def test_two_ranks_train_the_same_student_as_one_process(run, tmp_path):
    """An MLP student (no BatchNorm, no dropout): 2 ranks x 32 = one process's batch of 64, same weights up to
    floating-point order; only rank 0 writes the checkpoint and the log."""
    params = write_params(tmp_path / "params.yaml", **{"distill.student": "mlp", "distill.epochs": 2,
                                                       "distill.batch_size": 64})
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    distill(params, run, one, 1)
    out = distill(params, run, two, 2)
    assert out.count("validation accuracy") == 1  # rank 0 reports
    a, b = torch.load(one)["state_dict"], torch.load(two)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), (name, (a[name] - b[name]).abs().max())
    logs = [np.loadtxt(p.with_suffix(".live") / "plots" / "metrics" / "loss.tsv", skiprows=1, usecols=-1)
            for p in (one, two)]
    assert np.allclose(logs[0], logs[1], rtol=1e-5)  # the logged loss is the global batch's


def test_two_ranks_reach_one_process_accuracy_with_batchnorm(run, tmp_path):
    """tiny_cnn has BatchNorm, whose statistics stay per rank on CPU: the same accuracy within noise."""
    params = write_params(tmp_path / "params.yaml", **{"distill.student": "tiny_cnn", "distill.epochs": 4,
                                                       "distill.optimizer.lr_milestones": [3]})
    accs = []
    for ranks in (1, 2):
        out = distill(params, run, tmp_path / f"s{ranks}.pt", ranks)
        accs.append(float(out.split("validation accuracy: ")[1].split(" %")[0]))
    assert abs(accs[0] - accs[1]) <= 5.0, accs


RANK_MASKS = r'''
import sys
import torch
from torch import nn
from pipeline import distributed
from pipeline.data import input_transform, load_dataset
from pipeline.models import build_model
from pipeline.params import load_params
from pipeline.augment import build_augment
from pipeline.train import distill

params = load_params(sys.argv[1])
device = distributed.init(torch.device("cpu"))
data = load_dataset(params.data)
student = build_model("mlp", 1, data.num_classes, {"hidden_sizes": [16], "dropout": 0.5}, 8, seed=0)
masks = []
for module in student.modules():
    if isinstance(module, nn.Dropout):
        module.register_forward_hook(lambda m, i, o: masks.append((o == 0).flatten()[:256].clone()))
distill(student, data.train, data.val, None, input_transform(build_augment(params.augment), data.mean, data.std),
        input_transform(None, data.mean, data.std), params.cache.seed, params.cache.num_views, params.distill,
        kd_weight=0.0, seed=params.seed, device=device, progress=False)
torch.save(masks[0], f"{sys.argv[2]}/rank{distributed.rank()}.pt")
distributed.close()
'''


def test_ranks_draw_their_own_dropout_masks(tmp_path):
    """Every rank seeds its generator with its own seed (rank 0 keeps `seed`): two ranks never draw the same
    dropout masks, which they did when every rank seeded with `seed`."""
    from pipeline.distributed import rank_seed

    params = write_params(tmp_path / "params.yaml", **{"distill.epochs": 1, "data.train_subset": 256,
                                                       "distill.optimizer.lr_milestones": [], "distill.optimizer.lr_factors": []})
    script = tmp_path / "masks.py"
    script.write_text(RANK_MASKS)
    result = kd_process.run(["--standalone", "--nproc_per_node=2", script, params, tmp_path], ENV,
                            script="-m torch.distributed.run", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert first.float().mean().item() == pytest.approx(0.5, abs=0.15)
    assert not torch.equal(first, second)
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(8)}) == 8
