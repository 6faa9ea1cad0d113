"""Several teachers, one student: one store per teacher, mixed at read time (`pipeline.ensemble`)."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import EVAL, TRANSFORM, make_store, write_params
from pipeline import KDError
from pipeline.ensemble import Ensemble, combine, normalized
from pipeline.models import build_model, save_checkpoint
from pipeline.params import load_params
from pipeline.store import LogitStore
from pipeline.train import distill, online_targets, store_targets

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def second_teacher():
    """Another teacher: a differently seeded network (its logits differ from the first teacher's everywhere)."""
    return build_model("tiny_cnn", 1, 10, seed=5).eval()


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _cfg(tmp_path, **overrides):
    return load_params(write_params(tmp_path / "p.yaml", **{
        "distill.epochs": 2, "distill.batch_size": 16, "distill.view_schedule": "random",
        "distill.temperature": 4.0, "distill.optimizer.lr_milestones": [], "distill.optimizer.lr_factors": [],
        **overrides})).distill


def _train(targets, train_subset, dataset, cfg, **kwargs):
    student = build_model("tiny_cnn", 1, 10, seed=0)
    distill(student, train_subset, dataset.val, targets, TRANSFORM, EVAL, 7, 3, cfg, kd_weight=1.0, seed=0,
            device=CPU, chunk_samples=32, **kwargs)
    return _weights(student)


def test_the_rules_are_the_mean_of_the_soft_targets_and_the_mean_logit():
    torch.manual_seed(0)
    a, b = torch.randn(5, 10) * 3, torch.randn(5, 10) * 3
    T = 4.0
    target = combine([a, b], [0.25, 0.75], "probabilities", T)
    expected = 0.25 * torch.softmax(a / T, 1) + 0.75 * torch.softmax(b / T, 1)
    torch.testing.assert_close(torch.softmax(target / T, 1), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(combine([a, b], [0.25, 0.75], "logits", T), 0.25 * a + 0.75 * b)
    assert combine([a], [1.0], "probabilities", T) is a  # one teacher: passed through untouched
    assert normalized(None, 4) == [0.25] * 4 and normalized([1, 3], 2) == [0.25, 0.75]
    with pytest.raises(KDError, match="2 entries but 3 teachers"):
        normalized([1, 1], 3)


def test_an_ensemble_of_one_store_is_that_store_and_of_two_identical_stores_the_same_student(
        teacher, train_subset, dataset, tmp_path):
    store = LogitStore(make_store(tmp_path / "a.zarr", "zarr", "float32", teacher, train_subset))
    twin = LogitStore(make_store(tmp_path / "b.zarr", "zarr", "float32", teacher, train_subset))
    cfg = _cfg(tmp_path)
    alone = _train(store_targets(store, 4.0), train_subset, dataset, cfg)
    one = Ensemble([store_targets(store, 4.0)], [1.0], "probabilities", 4.0)
    assert torch.equal(_train(one, train_subset, dataset, cfg), alone)
    for rule in ("probabilities", "logits"):
        two = Ensemble([store_targets(store, 4.0), store_targets(twin, 4.0)], [0.5, 0.5], rule, 4.0)
        torch.testing.assert_close(_train(two, train_subset, dataset, cfg), alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", ["probabilities", "logits"])
def test_an_ensemble_from_stores_trains_the_student_the_live_teachers_train(
        rule, teacher, second_teacher, train_subset, dataset, tmp_path):
    """Cached = online for an ensemble as for one teacher: bit for bit (float32 stores), from memory, from disk
    read ahead in a thread, and from disk through 2 DataLoader workers."""
    paths = [make_store(tmp_path / f"{k}.zarr", "zarr", "float32", t, train_subset, chunk_samples=16)
             for k, t in enumerate((teacher, second_teacher))]
    cfg = _cfg(tmp_path)
    weights = [0.3, 0.7]

    def stores(budget):
        return Ensemble([store_targets(LogitStore(p, max_memory_bytes=budget), 4.0) for p in paths], weights, rule,
                        4.0)

    live = Ensemble([online_targets(t, CPU) for t in (teacher, second_teacher)], weights, rule, 4.0)
    reference = _train(live, train_subset, dataset, cfg)
    assert torch.equal(_train(stores(1 << 30), train_subset, dataset, cfg), reference)
    assert torch.equal(_train(stores(0), train_subset, dataset, cfg, prefetch=4), reference)
    assert torch.equal(_train(stores(0), train_subset, dataset, cfg, num_workers=2), reference)
    single = _train(store_targets(LogitStore(paths[0]), 4.0), train_subset, dataset, cfg)
    assert not torch.equal(single, reference)


def test_a_top_k_store_and_a_full_store_mix_as_full_logits(teacher, second_teacher, train_subset, tmp_path):
    """Top-K stores are rebuilt as full logits at T (`topk.decode`), then mixed as a full store's."""
    full = LogitStore(make_store(tmp_path / "f.zarr", "zarr", "float32", teacher, train_subset))
    top = LogitStore(make_store(tmp_path / "t.zarr", "zarr", "float32", second_teacher, train_subset,
                                storage="topk", top_k=3))
    samples, views = np.arange(96), np.arange(96) % 3
    mixed = Ensemble([store_targets(full, 4.0, "none"), store_targets(top, 4.0, "none")], [0.5, 0.5],
                     "probabilities", 4.0).read(samples, views)
    expected = combine([torch.from_numpy(full.read(samples, views, 4.0, "none")),
                        torch.from_numpy(top.read(samples, views, 4.0, "none"))], [0.5, 0.5], "probabilities", 4.0)
    np.testing.assert_array_equal(mixed, expected.numpy())
    assert np.isfinite(mixed).all()


def _kd(*args):
    from stages.cli import kd

    return CliRunner().invoke(kd, [str(a) for a in args])


def test_kd_distill_takes_several_stores_and_refuses_what_does_not_pair(teacher, second_teacher, dataset, tmp_path):
    """`kd distill --cache A --teacher TA --cache B --teacher TB`: each store is checked against its teacher and
    the run; a count that does not pair, weights of another length and a store of another teacher are refused."""
    params = write_params(tmp_path / "params.yaml", **{"data.train_subset": 120, "distill.epochs": 1,
                                                       "distill.optimizer.lr_milestones": [],
                                                       "distill.optimizer.lr_factors": []})
    checkpoints = []
    for k, model in enumerate((teacher, second_teacher)):
        arch = "cnn" if k == 0 else "tiny_cnn"
        save_checkpoint(model, arch, 1, 10, tmp_path / f"t{k}.pt")
        checkpoints.append(tmp_path / f"t{k}.pt")
        result = _kd("cache", "--params", params, "--teacher", checkpoints[-1], "--out", tmp_path / f"s{k}.zarr")
        assert result.exit_code == 0, result.output
    pairs = ["--cache", tmp_path / "s0.zarr", "--teacher", checkpoints[0], "--cache", tmp_path / "s1.zarr",
             "--teacher", checkpoints[1]]
    result = _kd("distill", "--params", params, *pairs, "--out", tmp_path / "student.pt")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "student.pt").exists()
    result = _kd("distill", "--params", params, *pairs[:6], "--out", tmp_path / "x.pt")
    assert result.exit_code == 1 and "2 --cache stores but 1 --teacher" in result.output
    swapped = ["--cache", tmp_path / "s0.zarr", "--teacher", checkpoints[1], "--cache", tmp_path / "s1.zarr",
               "--teacher", checkpoints[0]]
    result = _kd("distill", "--params", params, *swapped, "--out", tmp_path / "x.pt")
    assert result.exit_code == 1 and "s0.zarr" in result.output and "teacher_fingerprint" in result.output
    three = write_params(tmp_path / "w.yaml", **{"data.train_subset": 120, "distill.ensemble.weights": [1, 2, 3]})
    result = _kd("distill", "--params", three, *pairs, "--out", tmp_path / "x.pt")
    assert result.exit_code == 1 and "3 entries but 2 teachers" in result.output
    assert not (tmp_path / "x.pt").exists()


def test_ensemble_params_are_checked(tmp_path):
    from pipeline.params import ParamsError

    with pytest.raises(ParamsError) as e:
        load_params(write_params(tmp_path / "p.yaml", **{"distill.ensemble.rule": "median",
                                                         "distill.ensemble.weights": [0, 0]}))
    assert "distill.ensemble.rule" in str(e.value) and "distill.ensemble.weights" in str(e.value)


# ---- kd search and kd evaluate with several teachers ----------------------------------------------------------------

TWO = {"data.train_subset": 120, "search.trials": 1, "search.refine_trials": 0, "search.epochs": 1,
       "search.processes": 1, "distill.optimizer.lr_milestones": [], "distill.optimizer.lr_factors": []}


@pytest.fixture(scope="module")
def two_stores(teacher, second_teacher, tmp_path_factory):
    """Two teachers' checkpoints (t0.pt: cnn, t1.pt: tiny_cnn) and their stores (s0.zarr, s1.zarr) made by
    `kd cache` with the TWO params."""
    root = tmp_path_factory.mktemp("two")
    params = write_params(root / "params.yaml", **TWO)
    for k, (model, arch) in enumerate(((teacher, "cnn"), (second_teacher, "tiny_cnn"))):
        save_checkpoint(model, arch, 1, 10, root / f"t{k}.pt")
        result = _kd("cache", "--params", params, "--teacher", root / f"t{k}.pt", "--out", root / f"s{k}.zarr")
        assert result.exit_code == 0, result.output
    return root


def _pairs(root, count=2):
    return [a for k in range(count) for a in ("--cache", root / f"s{k}.zarr", "--teacher", root / f"t{k}.pt")]


def _search(root, params, out, *pairs):
    result = _kd("search", "--params", params, *pairs, "--out", out / "search.csv", "--figure", out / "search.png",
                 "--metrics", out / "search.json")
    assert result.exit_code == 0, result.output
    from pipeline.search import read_rows

    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_rows(out / "search.csv")]


def test_kd_search_mixes_several_stores_the_same_in_one_process_and_in_two(two_stores, tmp_path):
    rows = {}
    for processes in (1, 2):
        params = write_params(tmp_path / f"p{processes}.yaml", **{**TWO, "search.processes": processes})
        rows[processes] = _search(two_stores, params, tmp_path / str(processes), *_pairs(two_stores))
    assert rows[1] == rows[2] and len(rows[1]) == 1 and 0 <= rows[1][0]["val_acc"] <= 1
    alone = _search(two_stores, tmp_path / "p1.yaml", tmp_path / "alone", *_pairs(two_stores, 1))
    assert alone[0]["config"] != rows[1][0]["config"]  # the config names every store
    result = _kd("search", "--params", tmp_path / "p1.yaml", *_pairs(two_stores)[:6], "--out", tmp_path / "x.csv")
    assert result.exit_code == 1 and "2 --cache stores but 1 --teacher" in result.output


def test_search_trials_read_the_ensemble_and_its_config_holds_stores_weights_and_rule(two_stores, tmp_path):
    import dataclasses

    import pipeline.search
    from pipeline.search import _start_worker, config_hash, trial_targets

    stores = [LogitStore(two_stores / f"s{k}.zarr") for k in range(2)]
    params = load_params(write_params(tmp_path / "p.yaml", **{**TWO, "distill.ensemble.weights": [1, 3]}))
    targets = trial_targets(stores, params.distill, 4.0)
    assert isinstance(targets, Ensemble) and targets.weights == [0.25, 0.75] and targets.temperature == 4.0
    assert not isinstance(trial_targets(stores[0], params.distill, 4.0), Ensemble)

    def config(metas, **ensemble):
        cfg = dataclasses.replace(params.distill, ensemble=dataclasses.replace(params.distill.ensemble, **ensemble))
        return config_hash(metas, cfg, 1, 0, params.data)

    metas = [s.meta for s in stores]
    assert config(metas[0]) == config(metas[:1])  # one store: as passed alone
    assert len({config(metas), config(metas[::-1]), config(metas, rule="logits"), config(metas, weights=None),
                config(metas[:1])}) == 5
    _start_worker([s.path for s in stores], 1 << 30, None, None, params.distill, 0, CPU, 0, 1)
    try:  # a worker opens every store by path, each within its share of the memory budget
        assert [s.max_memory_bytes for s in pipeline.search._WORKER["store"]] == [1 << 29, 1 << 29]
    finally:
        pipeline.search._WORKER.clear()


@pytest.fixture(scope="module")
def evaluated(two_stores):
    """Untrained student and baseline with hand-written logs beside the two teachers; `kd evaluate` with both
    teachers (weights 1 and 3) and with the first alone."""
    from test_report import write_history

    root = two_stores
    for name, seed in (("student", 1), ("baseline", 2)):
        save_checkpoint(build_model("tiny_cnn", 1, 10, seed=seed), "tiny_cnn", 1, 10, root / f"{name}.pt")
        write_history(root / f"live/{name}", {"loss": [2.0, 1.0], "train_acc": [0.3, 0.6], "val_acc": [0.4, 0.7]})
    params = write_params(root / "weighted.yaml", **{"distill.ensemble.weights": [1, 3]})

    def evaluate(out, *teachers, params=params):
        result = _kd("evaluate", "--params", params, *[a for t in teachers for a in ("--teacher", root / t)],
                     "--student", root / "student.pt", "--baseline", root / "baseline.pt", "--teacher-live",
                     root / "none", "--student-live", root / "live/student", "--baseline-live", root / "live/baseline",
                     "--search-csv", root / "none.csv", "--search-figure", root / "none.png",
                     "--metrics", root / out / "metrics.json", "--report", root / out / "report.md", "--html",
                     root / out / "report.html", "--confusion", root / out / "confusion.csv", "--figures",
                     root / out / "figures")
        return result

    return root, evaluate


def test_kd_evaluate_reports_each_teacher_the_ensemble_and_the_students_agreement(evaluated, dataset):
    import json

    from pipeline.data import input_transform
    from pipeline.metrics import accuracy, agreement, predict
    from pipeline.models import load_checkpoint

    root, evaluate = evaluated
    result = evaluate("two", "t0.pt", "t1.pt")
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "two/metrics.json").read_text())
    test, labels = dataset.test, dataset.test.labels.numpy()
    logits = {name: predict(load_checkpoint(root / f"{name}.pt")[0], test, input_transform(None, (0.0,), (1.0,)), CPU)
              for name in ("t0", "t1", "student")}
    mixed = combine([torch.from_numpy(logits["t0"]), torch.from_numpy(logits["t1"])], [0.25, 0.75], "probabilities",
                    2.0).numpy()
    assert metrics["teacher_acc"] == metrics["teacher_acc_0"] == accuracy(logits["t0"], labels)
    assert metrics["teacher_acc_1"] == accuracy(logits["t1"], labels)
    assert metrics["ensemble_acc"] == accuracy(mixed, labels)
    assert metrics["student_agreement_ensemble"] == agreement(logits["student"], mixed)
    assert metrics["student_agreement_teacher_0"] == metrics["student_teacher_agreement"]
    assert metrics["student_agreement_teacher_1"] == agreement(logits["student"], logits["t1"])
    assert 0 <= metrics["baseline_agreement_ensemble"] <= 1
    assert metrics["ensemble"] == {"teachers": [str(root / "t0.pt"), str(root / "t1.pt")], "archs": ["cnn", "tiny_cnn"],
                                   "weights": [0.25, 0.75], "rule": "probabilities", "temperature": 2.0}
    assert f"Ensemble of 2 teachers test accuracy: {100 * metrics['ensemble_acc']:.2f} %" in result.output
    assert "Teacher test accuracy" not in result.output  # the first teacher's accuracy is printed once, as teacher 0
    assert f"Teacher 0 ({root / 't0.pt'}) test accuracy: {100 * metrics['teacher_acc']:.2f} %" in result.output
    for text in ((root / "two/report.md").read_text(), (root / "two/report.html").read_text()):
        assert "Ensemble of teachers" in text and "t1.pt" in text and "Top-1 agreement with the ensemble" in text


def test_kd_evaluate_with_one_teacher_reports_no_ensemble_and_refuses_weights_that_do_not_pair(evaluated):
    import json

    root, evaluate = evaluated
    result = evaluate("one", "t0.pt", params=write_params(root / "plain.yaml"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "one/metrics.json").read_text())
    assert "ensemble" not in metrics and not any(key.startswith(("ensemble_", "teacher_acc_")) for key in metrics)
    assert "Ensemble" not in (root / "one/report.md").read_text() and "Ensemble" not in result.output
    three = write_params(root / "three.yaml", **{"distill.ensemble.weights": [1, 2, 3]})
    result = evaluate("bad", "t0.pt", "t1.pt", params=three)
    assert result.exit_code == 1 and "3 entries but 2 teachers" in result.output


def test_an_ensemble_may_mix_top_k_and_full_stores_of_float16_and_float32(teacher, second_teacher, tmp_path):
    """Each store of an ensemble is read as its own metadata says: params.yaml's cache.storage / top_k / dtype
    describe what `kd cache` writes and are held only against a lone store."""
    base = {"data.train_subset": 120, "distill.epochs": 1, "distill.optimizer.lr_milestones": [],
            "distill.optimizer.lr_factors": []}
    written = [write_params(tmp_path / "full.yaml", **base, **{"cache.dtype": "float32"}),
               write_params(tmp_path / "topk.yaml", **base, **{"cache.storage": "topk", "cache.top_k": 3,
                                                                "cache.dtype": "float16"})]
    pairs = []
    for k, (model, arch, params) in enumerate(((teacher, "cnn", written[0]), (second_teacher, "tiny_cnn", written[1]))):
        save_checkpoint(model, arch, 1, 10, tmp_path / f"t{k}.pt")
        result = _kd("cache", "--params", params, "--teacher", tmp_path / f"t{k}.pt", "--out", tmp_path / f"s{k}.zarr")
        assert result.exit_code == 0, result.output
        pairs += ["--cache", tmp_path / f"s{k}.zarr", "--teacher", tmp_path / f"t{k}.pt"]
    assert LogitStore(tmp_path / "s1.zarr").meta.storage == "topk"
    result = _kd("distill", "--params", written[0], *pairs, "--out", tmp_path / "student.pt")
    assert result.exit_code == 0, result.output
    result = _kd("distill", "--params", written[0], *pairs[4:], "--out", tmp_path / "alone.pt")
    assert result.exit_code == 1 and "storage: store topk, this run full" in result.output  # a lone store: held to params
