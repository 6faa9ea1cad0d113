"""`kd search`: seeded draws, the refinement span, resuming, the test split never read, processes that never change
a result, --write-params, and refused params. Tiny data (96 training samples), 1-epoch trials."""

import dataclasses
import json
import re

import pytest
import torch
from click.testing import CliRunner

import pipeline.data
from pipeline.params import ParamsError, load_params
from pipeline.search import COLUMNS, draw_trials, read_rows, refine_range, search, set_distill_values
from stages.cli import kd
from conftest import make_store, write_params

SEARCH = {"data.train_subset": 96, "search.trials": 3, "search.refine_trials": 2, "search.epochs": 1,
          "search.processes": 1, "distill.optimizer.lr": 0.01}  # an lr that makes one epoch tell the trials apart


def invoke(*args):
    return CliRunner().invoke(kd, [str(a) for a in args])


def test_seeded_draws_are_the_same_twice_and_log_uniform_within_the_ranges():
    first = draw_trials(20, 1, [1.0, 100.0], [0.01, 100.0], seed=3)
    assert first == draw_trials(20, 1, [1.0, 100.0], [0.01, 100.0], seed=3)
    assert first != draw_trials(20, 1, [1.0, 100.0], [0.01, 100.0], seed=4)
    assert draw_trials(25, 1, [1.0, 100.0], [0.01, 100.0], seed=3)[:20] == first  # more trials keep the first
    assert all(1 <= t.temperature <= 100 and 0.01 <= t.kd_weight <= 100 for t in first)
    below_one = sum(t.kd_weight < 1 for t in draw_trials(400, 1, [1.0, 100.0], [0.01, 100.0], seed=0))
    assert 150 < below_one < 250  # log-uniform: half the draws in [0.01, 1], half in [1, 100]


def test_refinement_range_is_the_span_around_the_best_clipped_to_the_first_round():
    assert refine_range(10.0, 2.0, [1.0, 100.0]) == [5.0, 20.0]
    assert refine_range(80.0, 2.0, [1.0, 100.0]) == [40.0, 100.0]
    assert refine_range(0.015, 3.0, [0.01, 100.0]) == [0.01, 0.045]
    for t in draw_trials(50, 2, refine_range(80.0, 2.0, [1.0, 100.0]), refine_range(0.015, 3.0, [0.01, 100.0]), 0):
        assert 40 <= t.temperature <= 100 and 0.01 <= t.kd_weight <= 0.045


@pytest.fixture(scope="module")
def tiny(dataset, teacher, train_subset, tmp_path_factory):
    """A store over 96 training samples, 60 validation samples, and the distill / search params of a tiny search."""
    root = tmp_path_factory.mktemp("search")
    store_path = make_store(root / "logits.zarr", "zarr", "float32", teacher, train_subset, num_views=2)
    from pipeline.store import LogitStore

    params = load_params(write_params(root / "params.yaml", **SEARCH))
    return LogitStore(store_path), train_subset, dataset.val.subset(range(60)), params


def tiny_search(tiny, out, **kwargs):
    store, train, val, params = tiny
    cfg = dataclasses.replace(params.search, **kwargs.pop("search", {}))
    return search(store, train, val, params.distill, cfg, seed=0, config=kwargs.pop("config", "abc"), out=out,
                  device=torch.device("cpu"), **kwargs)


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_search_rows_and_the_refinement_round_within_the_clipped_span(tiny, tmp_path):
    rows = tiny_search(tiny, tmp_path / "search.csv")
    assert [(r["round"], r["trial"]) for r in rows] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert rows == read_rows(tmp_path / "search.csv")
    assert (tmp_path / "search.csv").read_text().split("\n")[0] == ",".join(COLUMNS)
    first = [r for r in rows if r["round"] == 1]
    best = max(first, key=lambda r: r["val_acc"])
    span = tiny[3].search.refine_span
    t_lo, t_hi = refine_range(best["temperature"], span, [1.0, 100.0])
    l_lo, l_hi = refine_range(best["kd_weight"], span, [0.01, 100.0])
    for r in rows[3:]:
        assert t_lo <= r["temperature"] <= t_hi and l_lo <= r["kd_weight"] <= l_hi
    assert all(0 <= r["val_acc"] <= 1 and r["epochs"] == 1 and r["config"] == "abc" for r in rows)


def test_an_interrupted_search_resumes_and_runs_only_the_unfinished_trials(tiny, tmp_path):
    out = tmp_path / "search.csv"
    reference = tiny_search(tiny, tmp_path / "reference.csv")

    class Interrupted(Exception):
        pass

    done = []

    def interrupt_after_two(row):
        done.append(row)
        if len(done) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        tiny_search(tiny, out, on_trial=interrupt_after_two)
    assert len(read_rows(out)) == 2
    ran, lines = [], []
    rows = tiny_search(tiny, out, on_trial=ran.append, echo=lines.append)
    assert [(r["round"], r["trial"]) for r in ran] == [(1, 2), (2, 0), (2, 1)]  # the two finished ones were kept
    assert without_seconds(rows) == without_seconds(reference)
    assert lines == [f"{out}: 2 of 5 trials kept from an earlier run, 3 run now"]
    ran.clear()
    lines.clear()
    tiny_search(tiny, out, on_trial=ran.append, echo=lines.append)
    assert ran == [] and lines == [f"{out}: 5 of 5 trials kept from an earlier run, 0 run now"]
    lines.clear()
    tiny_search(tiny, out, on_trial=ran.append, echo=lines.append, config="other")
    assert len(ran) == 5 and lines == [f"{out}: its 5 trials were run with another configuration (config abc, now "
                                       "other): starting a fresh search"]


def test_a_deleted_row_or_changed_draw_is_run_again(tiny, tmp_path):
    out = tmp_path / "search.csv"
    tiny_search(tiny, out)
    rows = read_rows(out)
    text = out.read_text().split("\n")
    out.write_text("\n".join(text[:2] + text[3:]))  # drop trial 1 of round 1
    ran = []
    tiny_search(tiny, out, on_trial=ran.append)
    assert [(r["round"], r["trial"]) for r in ran] == [(1, 1)]
    assert without_seconds(read_rows(out)) == without_seconds(rows)
    ran.clear()
    tiny_search(tiny, out, on_trial=ran.append, search={"seed": 1})  # other draws: nothing matches
    assert len(ran) == 5


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A teacher and a store made by `kd teacher` and `kd cache` for the tiny search params."""
    root = tmp_path_factory.mktemp("project")
    params = write_params(root / "params.yaml", **SEARCH)
    assert invoke("teacher", "--params", params, "--out", root / "teacher.pt").exit_code == 0
    result = invoke("cache", "--params", params, "--teacher", root / "teacher.pt", "--out", root / "logits.zarr")
    assert result.exit_code == 0, result.output
    return root


class Tripwire:
    """Stands for the test split: any use of it (attributes, len, indexing, iteration, pickling) is recorded."""

    def __init__(self, reads: list):
        object.__setattr__(self, "_reads", reads)

    def __getattribute__(self, name):
        object.__getattribute__(self, "_reads").append(name)
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        return self.__getattribute__("__len__")

    def __getitem__(self, i):
        return self.__getattribute__("__getitem__")

    def __iter__(self):
        return self.__getattribute__("__iter__")


@pytest.fixture
def test_reads(monkeypatch):
    """Every dataset the stages load has its test split replaced by a Tripwire; yields the reads it recorded."""
    reads, load = [], pipeline.data.load_dataset
    monkeypatch.setattr(pipeline.data, "load_dataset",
                        lambda params: dataclasses.replace(load(params), test=Tripwire(reads)))
    return reads


def test_the_tripwire_records_a_read_of_the_test_split(test_reads, project):
    from pipeline.data import load_dataset
    from pipeline.train import accuracy

    data = load_dataset(load_params(project / "params.yaml").data)
    with pytest.raises(AssertionError, match="the test split was read"):
        accuracy(torch.nn.Flatten(), data.test, None, torch.device("cpu"))
    assert test_reads  # so the check below can fail


def kd_search(project, params, out, *extra):
    result = invoke("search", "--params", params, "--teacher", project / "teacher.pt", "--cache",
                    project / "logits.zarr", "--out", out / "search.csv", "--figure", out / "search.png",
                    "--metrics", out / "search.json", *extra)
    assert result.exit_code == 0, result.output
    return result.output


def test_kd_search_never_reads_the_test_split_and_processes_never_change_a_result(test_reads, project, tmp_path):
    rows = {}
    for processes in (1, 2):
        params = write_params(tmp_path / f"params{processes}.yaml", **{**SEARCH, "search.processes": processes})
        before = params.read_bytes()
        output = kd_search(project, params, tmp_path / str(processes))
        assert params.read_bytes() == before  # no --write-params: params.yaml untouched
        rows[processes] = without_seconds(read_rows(tmp_path / str(processes) / "search.csv"))
    assert test_reads == []
    assert rows[1] == rows[2] and len(rows[1]) == 5
    assert len({r["val_acc"] for r in rows[1]}) > 1  # the trials differ, so equal rows mean something
    best = json.loads((tmp_path / "2/search.json").read_text())
    assert best["trials"] == 5 and best["val_acc"] == max(r["val_acc"] for r in rows[2])
    assert f"T = {best['temperature']:g}, λ = {best['kd_weight']:g}" in output
    assert (tmp_path / "2/search.png").stat().st_size > 10_000


def test_write_params_changes_exactly_temperature_and_kd_weight(project, tmp_path):
    from conftest import ROOT

    params = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    # The project's own file (comments and all), made to fit the store and tiny by line edits.
    tiny = {"cache.num_views": 2, "cache.chunk_samples": 100, "data.train_subset": 96, "search.trials": 3,
            "search.refine_trials": 2, "search.epochs": 1, "search.processes": 1}
    for key, value in tiny.items():
        section, name = key.split(".")
        head, tail = text.split(f"\n{section}:", 1)
        text = head + f"\n{section}:" + re.sub(rf"(?m)^(  {name}: )\S+ ( *)", rf"\g<1>{value}\g<2>", tail, count=1)
    params.write_text(text)
    assert load_params(params).search.trials == 3 and load_params(params).data.train_subset == 96
    output = kd_search(project, params, tmp_path, "--write-params")
    best = json.loads((tmp_path / "search.json").read_text())
    changed = [(a, b) for a, b in zip(text.split("\n"), params.read_text().split("\n")) if a != b]
    assert len(changed) == 2 and len(text.split("\n")) == len(params.read_text().split("\n"))
    for (old, new), key in zip(changed, ("temperature", "kd_weight")):
        assert new.split("#")[1] == old.split("#")[1] and new.index("#") == old.index("#")  # comment kept, aligned
        assert new.split("#")[0].split() == [f"{key}:", repr(best[key])]
    distill = load_params(params).distill
    assert (distill.temperature, distill.kd_weight) == (best["temperature"], best["kd_weight"])
    assert f"distill.temperature: 2.0 -> {best['temperature']!r}" in output


def test_line_edit_refuses_what_it_cannot_find():
    from pipeline import KDError

    with pytest.raises(KDError, match="no top-level `distill:` section"):
        set_distill_values("distill: {temperature: 2}\n", {"temperature": 3.0})
    with pytest.raises(KDError, match="found 0 lines `distill.kd_weight"):
        set_distill_values("distill:\n  temperature: 2.0\nsearch:\n  kd_weight: [1, 2]\n", {"kd_weight": 3.0})
    assert set_distill_values("distill:\n  temperature: 2.0   # T\n", {"temperature": 43.25}) == \
        "distill:\n  temperature: 43.25 # T\n"


@pytest.mark.parametrize("key, value, message", [
    ("search.temperature", [10.0, 1.0], r"search.temperature is \[10.0, 1.0\]; expected \[lo, hi\] with 0 < lo < hi"),
    ("search.kd_weight", [0.0, 1.0], r"search.kd_weight is \[0.0, 1.0\]; expected \[lo, hi\] with 0 < lo < hi"),
    ("search.kd_weight", [1.0], r"search.kd_weight is \[1.0\]"),
    ("search.refine_span", 1.0, r"search.refine_span is 1.0; expected a finite number > 1"),
    ("search.trials", -1, r"search.trials is -1; expected an integer >= 0"),
    ("search.epochs", 0, r"search.epochs is 0; expected an integer >= 1"),
    ("search.processes", 0, r"search.processes is 0; expected an integer >= 1"),
    ("search.processes", 1.5, r"search.processes is 1.5; expected int"),
    ("search.trials", 0, r"search.refine_trials is 2 but search.trials is 0"),
])
def test_bad_search_params_name_the_key(tmp_path, key, value, message):
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path / "params.yaml", **{**SEARCH, key: value}))


def test_a_missing_search_key_is_named(tmp_path):
    path = write_params(tmp_path / "params.yaml")
    path.write_text(path.read_text().replace("  refine_span:", "  # refine_span:"))
    with pytest.raises(ParamsError, match="missing key 'search.refine_span'"):
        load_params(path)


def test_no_trials_still_writes_a_figure_and_metrics(tmp_path):
    from pipeline.search import best_summary, plot_search

    plot_search([], tmp_path / "search.png")
    assert (tmp_path / "search.png").stat().st_size > 1000
    assert best_summary([]) == {"temperature": None, "kd_weight": None, "val_acc": None, "round": None,
                                "trial": None, "trials": 0}
    diverged = {"trial": 0, "round": 1, "temperature": 50.0, "kd_weight": 80.0, "seed": 0, "epochs": 1,
                "val_acc": float("nan"), "seconds": 0.1, "config": "abc"}
    plot_search([diverged], tmp_path / "diverged.png")
    assert best_summary([diverged])["val_acc"] is None


def test_one_process_keeps_the_users_thread_setting(tiny, monkeypatch):
    import pipeline.search
    from pipeline.search import trial_runner, trial_threads

    store, train, val, params = tiny
    before = torch.get_num_threads()
    monkeypatch.setattr(pipeline.search, "cores", lambda: 8)
    try:
        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 sets it: another job shares the cores
        with trial_runner(store, train, val, params.distill, seed=0, device=torch.device("cpu"), processes=1,
                          memory_bytes=0):
            assert torch.get_num_threads() == 1  # not one per core
        assert (trial_threads(1), trial_threads(2)) == (1, 1)
        torch.set_num_threads(4)
        assert (trial_threads(1), trial_threads(2), trial_threads(3), trial_threads(8)) == (4, 2, 1, 1)
        monkeypatch.setattr(pipeline.search, "cores", lambda: 2)
        assert trial_threads(1) == 2  # never more threads than cores
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("processes, in_memory", [(1, True), (2, False)])
def test_with_worker_processes_the_kd_process_does_not_hold_the_store(project, tmp_path, monkeypatch, processes,
                                                                      in_memory):
    import pipeline.search

    seen = []

    def no_trials(store, *args, **kwargs):
        seen.append(store.in_memory)
        return []

    monkeypatch.setattr(pipeline.search, "search", no_trials)
    params = write_params(tmp_path / "params.yaml", **{**SEARCH, "search.processes": processes})
    assert "No trials run" in kd_search(project, params, tmp_path)
    assert seen == [in_memory]  # with workers, each worker holds it (within memory_mb), not also this process
