"""Nothing lost: `kd distill` and `kd teacher` killed with SIGKILL resume from their last finished epoch and end
with weights bit-identical to a run that was never interrupted, and a dvclive history holding every epoch once
(real subprocesses); and a failing step leaves no thread or worker process behind, at any step of an epoch."""

import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import kd_process
from conftest import write_params

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
DROPOUT_MLP = {"hidden_sizes": [64], "dropout": 0.5, "input_dropout": 0.1}  # draws on the generator every step


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A params file for 8 short epochs of a dropout student and of a teacher, a teacher (trained by `kd teacher`
    in its own process, its log beside it: the uninterrupted run the teacher's resume is held against) and a store
    (written in this process: the runs compared here all read the same one)."""
    from click.testing import CliRunner

    from stages.cli import kd

    root = tmp_path_factory.mktemp("resume_training")
    params = write_params(root / "params.yaml", **{
        "teacher.arch": "mlp", "teacher.arch_options": DROPOUT_MLP, "teacher.epochs": 8,
        "distill.student": "mlp", "distill.student_options": DROPOUT_MLP, "distill.epochs": 8,
        "distill.optimizer.lr_milestones": [5], "distill.optimizer.lr_factors": [0.1]})
    run(["teacher", "--params", params, "--out", root / "teacher.pt", "--live-dir", root / "teacher.live"])
    result = CliRunner().invoke(kd, [str(a) for a in ("cache", "--params", params, "--teacher", root / "teacher.pt",
                                                      "--out", root / "s.zarr")])
    assert result.exit_code == 0, result.output
    return root, params


def run(args, kill_after_epochs=None):
    """Run `kd ARGS`; with `kill_after_epochs` k, SIGKILL it once its progress bar shows k epochs done (so the
    kill lands somewhere in epoch k, after the checkpoint of epoch k - 1). Returns the output."""
    proc = kd_process.Process(args, ENV, new_session=True)  # tests/kd_process.py: a real process, started quickly
    seen = ""
    while char := proc.stdout.read(1):
        seen += char
        if kill_after_epochs is not None and char == "[":  # tqdm: "distill:  25%|##  | 2/8 [00:01<..."
            done = re.findall(r"(\d+)/\d+ \[$", seen)
            if done and int(done[-1]) >= kill_after_epochs:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    proc.wait()
    if kill_after_epochs is None:
        assert proc.returncode == 0, seen[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, seen[-3000:]
    return seen


def history(live: Path) -> dict[str, np.ndarray]:
    """metric -> (steps, values) as dvclive logged them."""
    out = {}
    for name in ("loss", "train_acc", "val_acc"):
        table = np.loadtxt(live / "plots" / "metrics" / f"{name}.tsv", skiprows=1, ndmin=2)  # step, value
        out[name] = table
    return out


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = torch.load(a)["state_dict"], torch.load(b)["state_dict"]
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    ha, hb = history(a.with_suffix(".live")), history(b.with_suffix(".live"))
    for name in ha:
        assert ha[name][:, 0].tolist() == list(range(8)), (name, ha[name][:, 0])  # each epoch once, in order
        np.testing.assert_array_equal(ha[name], hb[name])


def distill_args(root, params, out):
    return ["distill", "--params", params, "--teacher", root / "teacher.pt", "--cache", root / "s.zarr",
            "--out", out, "--live-dir", out.with_suffix(".live")]


def test_a_killed_distill_resumes_to_the_same_weights_and_history(made, tmp_path):
    root, params = made
    whole = tmp_path / "whole.pt"
    run(distill_args(root, params, whole))
    assert not Path(f"{whole}.resume").exists()  # a finished run leaves no checkpoint behind
    resumed = tmp_path / "resumed.pt"
    for k in (1, 3, 6):  # killed in epochs 1, 3 and 6 of 8, each time resumed by the same command
        run(distill_args(root, params, resumed), kill_after_epochs=k)
        assert Path(f"{resumed}.resume").exists() and not resumed.exists()
    out = run(distill_args(root, params, resumed))
    assert "Resuming from" in out and "after epoch 5" in out
    assert_same_run(resumed, whole)
    assert not Path(f"{resumed}.resume").exists()


RECIPE = {"distill.amp": "float16", "distill.ema": 0.9, "distill.optimizer.name": "adamw",
          "distill.optimizer.warmup_epochs": 2, "distill.optimizer.clip_grad_norm": 1.0}


def recipe_params(path: Path, workers: int) -> Path:
    return write_params(path, **{
        "distill.student": "mlp", "distill.student_options": DROPOUT_MLP, "distill.epochs": 8,
        "distill.optimizer.lr_milestones": [5], "distill.optimizer.lr_factors": [0.1], "num_workers": workers,
        **RECIPE})


@pytest.fixture(scope="module")
def recipe_whole(made, tmp_path_factory):
    """The recipe's run uninterrupted, with 0 DataLoader workers."""
    folder = tmp_path_factory.mktemp("recipe_whole")
    whole = folder / "whole.pt"
    run(distill_args(made[0], recipe_params(folder / "params.yaml", 0), whole))
    return whole


@pytest.mark.parametrize("workers", [0, 2])
def test_a_killed_run_with_ema_and_a_grad_scaler_resumes_bit_identical(made, recipe_whole, tmp_path, workers):
    """The EMA's weights and the float16 GradScaler's state are in the checkpoint: a dropout student with AdamW,
    warm-up, clipping, an EMA and float16 autocast, killed twice and resumed, ends bit-identical to an uninterrupted
    run, with 0 and with 2 DataLoader workers (whose validation loader never draws on the global generator): the
    same uninterrupted run with 0 workers for both, since the number of workers never changes a result."""
    root, _ = made
    params = recipe_params(tmp_path / "params.yaml", workers)
    whole, resumed = recipe_whole, tmp_path / "resumed.pt"
    for k in (2, 5):
        run(distill_args(root, params, resumed), kill_after_epochs=k)
    out = run(distill_args(root, params, resumed))
    assert "Resuming from" in out
    assert_same_run(resumed, whole)
    assert torch.load(whole)["weights"] == {"ema": 0.9}


TEACHER_RECIPE = {"teacher.arch": "mlp", "teacher.arch_options": DROPOUT_MLP, "teacher.epochs": 8,
                  "teacher.amp": "bfloat16", "teacher.ema": 0.9, "teacher.optimizer.warmup_epochs": 1,
                  "teacher.optimizer.clip_grad_norm": 1.0}


@pytest.mark.parametrize("recipe", [False, True])
def test_a_killed_teacher_resumes_to_the_same_weights(made, tmp_path, recipe):
    """Killed in epoch 4 and resumed: the same weights; with the recipe (teacher.amp, teacher.ema, the optimiser's
    warm-up and clipping) too, its EMA saved as the teacher."""
    params = write_params(tmp_path / "params.yaml", **TEACHER_RECIPE) if recipe else made[1]
    whole, resumed = tmp_path / "whole.pt", tmp_path / "resumed.pt"
    if recipe:
        run(["teacher", "--params", params, "--out", whole, "--live-dir", whole.with_suffix(".live")])
    else:  # `made` ran this very command, uninterrupted
        whole = made[0] / "teacher.pt"
    run(["teacher", "--params", params, "--out", resumed, "--live-dir", resumed.with_suffix(".live")],
        kill_after_epochs=4)
    out = run(["teacher", "--params", params, "--out", resumed, "--live-dir", resumed.with_suffix(".live")])
    assert "after epoch 3" in out
    assert_same_run(resumed, whole)
    assert torch.load(whole).get("weights") == ({"ema": 0.9} if recipe else None)


def test_a_checkpoint_of_another_run_is_not_used(made, tmp_path):
    """Changed params (here T) make the checkpoint another run's: it starts from epoch 0 and says so."""
    root, params = made
    out = tmp_path / "s.pt"
    run(distill_args(root, params, out), kill_after_epochs=2)
    other = write_params(tmp_path / "other.yaml", **{
        "distill.student": "mlp", "distill.student_options": DROPOUT_MLP, "distill.epochs": 8,
        "distill.optimizer.lr_milestones": [5], "distill.optimizer.lr_factors": [0.1], "distill.temperature": 3.0})
    text = run(distill_args(root, other, out))
    assert "checkpoint of another run" in text and "Resuming" not in text
    fresh = tmp_path / "fresh.pt"
    run(distill_args(root, other, fresh))
    assert_same_run(out, fresh)


def test_a_store_written_anew_makes_the_checkpoint_another_runs(made, tmp_path):
    """The same `kd distill` command after its store was re-cached at the same path with other settings (here
    float32 instead of float16): the checkpoint belongs to the old store's targets, so it is not resumed, and the
    run ends with a fresh run's weights."""
    import shutil

    import yaml

    root, params = made
    store, out, fresh = tmp_path / "s.zarr", tmp_path / "s.pt", tmp_path / "fresh.pt"
    float32 = tmp_path / "float32.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["cache"]["dtype"] = "float32"
    float32.write_text(yaml.safe_dump(raw, sort_keys=False))

    def distill(params_path, output, kill=None):
        return run(["distill", "--params", params_path, "--teacher", root / "teacher.pt", "--cache", store,
                    "--out", output, "--live-dir", output.with_suffix(".live")], kill_after_epochs=kill)

    run(["cache", "--params", params, "--teacher", root / "teacher.pt", "--out", store])
    distill(params, out, kill=2)
    assert Path(f"{out}.resume").exists()
    shutil.rmtree(store)
    run(["cache", "--params", float32, "--teacher", root / "teacher.pt", "--out", store])
    text = distill(float32, out)
    assert "checkpoint of another run" in text and "Resuming" not in text
    distill(float32, fresh)
    assert_same_run(out, fresh)


FAILING_STEP = r'''
import multiprocessing, sys, threading, time
import torch
import pipeline.train as train
from pipeline.data import input_transform, load_dataset
from pipeline.models import build_model
from pipeline.params import load_params
from pipeline.augment import build_augment
from pipeline.store import LogitStore

params = load_params(sys.argv[1])
data = load_dataset(params.data)
transform = input_transform(build_augment(params.augment), data.mean, data.std)
steps = -(-len(data.train) // params.distill.batch_size)
real_loss, calls = train.kd_loss, [0]
for where in sys.argv[3:]:
    workers, prefetch = {"read-ahead": (0, 4), "in-line": (0, 0), "workers": (2, 0), "batches-ahead": (0, 4)}[where]
    if where == "batches-ahead":  # crops and flips: replayed in a thread beside the step, and the store read ahead
        crop_flip = [{"RandomCrop": {"size": 8, "padding": 1}}, {"RandomHorizontalFlip": {}}]
        transform = input_transform(build_augment(crop_flip), data.mean, data.std)
    for position in list(range(6)) + list(range(steps - 6, steps)) + [steps + 2, 2 * steps - 1]:
        calls[0] = 0

        def nan_at(*args, **kwargs):  # the step's loss becomes NaN at one position of the run
            calls[0] += 1
            # the failing step is slow: the read-ahead thread has filled its queue (and, near the epoch's end,
            # read every batch) when it fails; main before this fix hung for good at the 5th batch from the end
            time.sleep(0.3 if calls[0] == position + 1 else 0.005)
            loss = real_loss(*args, **kwargs)
            return loss * float("nan") if calls[0] == position + 1 else loss

        train.kd_loss = nan_at
        store = LogitStore(sys.argv[2], max_memory_bytes=0)
        student = build_model("mlp", 1, data.num_classes, {"hidden_sizes": [16], "dropout": 0.5}, 8, seed=0)
        start = time.time()
        try:
            train.distill(student, data.train, data.val, train.store_targets(store), transform,
                          input_transform(None, data.mean, data.std), params.cache.seed, params.cache.num_views,
                          params.distill, kd_weight=1.0, seed=0, device=torch.device("cpu"), num_workers=workers,
                          chunk_samples=params.cache.chunk_samples, prefetch=prefetch)
            raise SystemExit(f"{where} {position}: no error")
        except train.DivergedError:
            pass
        for _ in range(50):  # queue feeder threads end just after their queue is closed
            left = [t.name for t in threading.enumerate() if t is not threading.main_thread()
                    and t.name not in ("zarr_io", "tqdm_monitor") and not t.name.startswith("asyncio_")]  # pools
            children = multiprocessing.active_children()
            if not left and not children:
                break
            time.sleep(0.1)
        if left or children:
            raise SystemExit(f"{where} {position}: left behind threads {left} processes {children}")
        print(where, position, f"{time.time() - start:.2f}s", flush=True, file=sys.stdout)
print("ok")
'''


@pytest.mark.parametrize("where", ["read-ahead", "workers", "batches-ahead"])
def test_a_step_failing_at_any_position_ends_every_thread_and_worker(made, where):
    """A NaN loss at each of the first and last batches of an epoch (the read-ahead queue full, or draining):
    the run stops with its DivergedError within seconds, and no thread or worker process is left."""
    root, params = made
    result = kd_process.run([params, root / "s.zarr", where], ENV, script=FAILING_STEP, timeout=240)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-3000:]
    times = [float(line.split()[-1].rstrip("s")) for line in result.stdout.splitlines()[:-1]]
    assert len(times) == 14 and max(times) < 30, result.stdout
