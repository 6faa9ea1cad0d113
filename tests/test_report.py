"""The evaluate report: the measures on hand-computed examples, and `kd evaluate` building every section of
report.md and of a self-contained report.html from tiny models, logs and a real store."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import KDError
from pipeline.metrics import (agreement, calibration_bins, confusion_matrix, expected_calibration_error, gap_closed,
                              per_class_accuracy)
from pipeline.models import build_model, save_checkpoint
from pipeline.report import gap_text, json_text, read_history, read_search, search_section
from pipeline.store import LogitStore
from stages.cli import kd
from conftest import make_store, write_params

SEARCH_CSV = """trial,round,temperature,kd_weight,seed,epochs,val_acc,seconds,config
0,0,2.0,0.5,0,2,0.91,1.5,a.yaml
1,0,4.0,0.9,0,2,0.95,1.4,b.yaml
2,1,8.0,0.5,0,2,0.93,1.6,c.yaml
"""


PNG_1X1 = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"  # stands in for
                        "0000000d4944415478da63f8cfc0f01f0005000201a5e1b0a40000000049454e44ae426082")  # the search map


def logits_of(probabilities) -> np.ndarray:
    """Logits whose softmax is `probabilities` (rows summing to 1)."""
    return np.log(np.asarray(probabilities, dtype=np.float64))


def test_ece_on_a_hand_computed_example():
    # confidences 0.90 (right), 0.92 (wrong): both in bin 13 = (13/15, 14/15]: acc 0.5, conf 0.91, gap 0.41;
    # 0.75 (wrong), 0.55 (right), 0.70 (right): one per bin, gaps 0.75, 0.45, 0.30.
    probs = [[0.90, 0.10], [0.08, 0.92], [0.75, 0.25], [0.55, 0.45], [0.30, 0.70]]
    labels = np.array([0, 0, 1, 0, 1])
    expected = (2 * 0.41 + 0.75 + 0.45 + 0.30) / 5
    assert expected_calibration_error(logits_of(probs), labels) == pytest.approx(expected, abs=1e-12)
    count, acc, conf = calibration_bins(logits_of(probs), labels)
    assert count.tolist() == [0] * 8 + [1, 0, 1, 1, 0, 2, 0]
    assert acc[13] == 0.5 and conf[13] == pytest.approx(0.91) and np.isnan(acc[0])


def test_ece_is_zero_when_confidence_equals_accuracy():
    probs = [[0.5, 0.5]] * 4  # confidence 0.5 each, argmax 0, right on half of them
    assert expected_calibration_error(logits_of(probs), np.array([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_gap_closed_on_known_numbers():
    assert gap_closed(teacher=0.90, student=0.85, baseline=0.80) == pytest.approx(0.5)
    assert gap_closed(teacher=0.90, student=0.90, baseline=0.80) == pytest.approx(1.0)
    assert gap_closed(teacher=0.90, student=0.78, baseline=0.80) == pytest.approx(-0.2)
    assert gap_closed(teacher=0.80, student=0.85, baseline=0.80) is None  # the teacher is not better: no gap
    text = gap_text({"gap_closed": 0.5, "teacher_acc": 0.9, "student_acc": 0.85, "baseline_acc": 0.8,
                     "kd_gain": 0.05})
    assert "**50.0 %** of the teacher-student gap" in text and "+5.00 / 10.00 points" in text
    text = gap_text({"gap_closed": None, "teacher_acc": 0.7, "student_acc": 0.85, "baseline_acc": 0.8, "kd_gain": 0})
    assert "not defined" in text and "not better than the student alone" in text


def test_confusion_per_class_and_agreement():
    labels, predicted = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2])
    confusion = confusion_matrix(labels, predicted, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    per_class = per_class_accuracy(confusion)
    assert per_class[:3].tolist() == [0.5, 1.0, pytest.approx(2 / 3)] and np.isnan(per_class[3])
    a, b = np.eye(3)[[0, 1, 2, 2]], np.eye(3)[[0, 2, 2, 1]]
    assert agreement(a, b) == 0.5


def test_search_summary_and_its_absence(tmp_path):
    assert read_search(None) is None and read_search(tmp_path / "missing.csv") is None
    (tmp_path / "search.csv").write_text(SEARCH_CSV)
    assert read_search(tmp_path / "search.csv") == {"trials": 3, "rounds": 2, "best_temperature": 4.0,
                                                   "best_kd_weight": 0.9, "best_val_acc": 0.95, "best_trial": 1}
    (tmp_path / "bad.csv").write_text("trial,temperature\n0,2\n")
    with pytest.raises(KDError, match="lack the columns"):
        read_search(tmp_path / "bad.csv")


def test_teacher_history_may_lack_curves(tmp_path):
    (tmp_path / "plots/metrics").mkdir(parents=True)
    (tmp_path / "plots/metrics/val_acc.tsv").write_text("step\tval_acc\n0\t0.5\n")
    assert read_history(tmp_path, required=False) == {"val_acc": [0.5]}
    assert read_history(tmp_path / "absent", required=False) == {}
    with pytest.raises(KDError, match="loss.tsv: training log not found"):
        read_history(tmp_path)


def write_history(live_dir, curves: dict[str, list[float]]) -> None:
    (live_dir / "plots/metrics").mkdir(parents=True)
    for name, values in curves.items():
        rows = "".join(f"{step}\t{value}\n" for step, value in enumerate(values))
        (live_dir / "plots/metrics" / f"{name}.tsv").write_text(f"step\t{name}\n{rows}")


@pytest.fixture(scope="module")
def project(tmp_path_factory, teacher, train_subset):
    """Untrained tiny models, hand-written dvclive logs (the teacher's with validation accuracy only, as a
    user's checkpoint logs) and a real store: everything `kd evaluate` reads."""
    root = tmp_path_factory.mktemp("report")
    for name, seed in (("teacher", 0), ("student", 1), ("baseline", 2)):
        save_checkpoint(build_model("tiny_cnn", 1, 10, seed=seed), "tiny_cnn", 1, 10, root / f"models/{name}.pt")
    curves = {"loss": [2.3, 1.1, 0.6], "train_acc": [0.2, 0.6, 0.8], "val_acc": [0.3, 0.65, 0.82]}
    write_history(root / "live/student", curves)
    write_history(root / "live/baseline", {k: [v * 0.9 for v in values] for k, values in curves.items()})
    write_history(root / "live/teacher", {"val_acc": [0.97]})
    make_store(root / "store.zarr", "zarr", "float16", teacher, train_subset, num_views=2)
    write_params(root / "params.yaml")
    (root / "search").mkdir()
    (root / "search/search.csv").write_text(SEARCH_CSV)
    (root / "search/search.png").write_bytes(PNG_1X1)
    return root


def run_evaluate(root, out: str, *extra):
    args = ["evaluate", "--params", root / "params.yaml", "--teacher", root / "models/teacher.pt",
            "--student", root / "models/student.pt", "--baseline", root / "models/baseline.pt",
            "--student-live", root / "live/student", "--baseline-live", root / "live/baseline",
            "--metrics", root / out / "metrics.json", "--report", root / out / "report.md",
            "--html", root / out / "report.html", "--confusion", root / out / "confusion.csv",
            "--figures", root / out / "figures", *extra]
    result = CliRunner().invoke(kd, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def without_search(project):
    """A run with the teacher's one-step log, the store, and search options naming files that do not exist."""
    output = run_evaluate(project, "plain", "--teacher-live", project / "live/teacher", "--cache",
                          project / "store.zarr", "--search-figure", project / "none.png",
                          "--search-csv", project / "none.csv")
    return project / "plain", output


@pytest.fixture(scope="module")
def with_search(project):
    """A run with search results, without teacher logs or a store."""
    output = run_evaluate(project, "searched", "--teacher-live", project / "live/absent",
                          "--search-figure", project / "search/search.png", "--search-csv",
                          project / "search/search.csv")
    return project / "searched", output


def test_stdout_keeps_the_origin_lines(without_search):
    _, output = without_search
    assert re.search(r"^Student model test accuracy: \d+\.\d\d %$", output, re.M)
    assert re.search(r"^Is above threshold performance\? (True|False)$", output, re.M)


def test_report_holds_every_section(without_search):
    out, _ = without_search
    metrics = json.loads((out / "metrics.json").read_text())
    for text in ((out / "report.md").read_text(), (out / "report.html").read_text()):
        for heading in ("Summary", "Training curves", "Errors", "Calibration", "Hyperparameter search",
                        "Logit cache", "Settings"):
            assert heading in text
        for row in ("Teacher", "Student (distilled)", "Student alone (baseline, λ = 0)"):
            assert row in text
        for column in ("test accuracy", "parameters", "ms / image", "ECE", "top-1 agreement with teacher"):
            assert column in text
        assert f"{metrics['student_params']:,}" in text and "batch of 256 test images" in text
        assert "Gap closed: not defined" in text or "of the teacher-student gap" in text
        assert "Is above threshold performance?" in text
        assert "Not logged: training loss, training accuracy" in text  # the teacher's one-step log
        assert "Most frequent mistakes" in text and "Top-1 agreement with the teacher" in text
        assert "Per-class" in text or "within each class" in text
        assert "reliability" in text.lower() and "equal-width bins" in text
        assert "No search has run" in text
        meta = LogitStore(out.parent / "store.zarr", max_memory_bytes=0).meta
        for fact in (meta.teacher_fingerprint, meta.dataset_fingerprint, "float16", "views per sample",
                     "size on disk", "full logits"):
            assert fact in text
    md = (out / "report.md").read_text()
    for figure in ("training", "teacher", "confusion", "per_class", "reliability"):
        assert f"](figures/{figure}.png)" in md and (out / "figures" / f"{figure}.png").stat().st_size > 5_000


def test_metrics_hold_every_new_measure(without_search):
    out, _ = without_search
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("teacher_acc", "student_acc", "baseline_acc", "kd_gain", "threshold", "above_threshold",
                "test_samples", "teacher_errors", "student_errors", "baseline_errors"):  # the keys kept
        assert key in metrics
    for name in ("teacher", "student", "baseline"):
        assert metrics[f"{name}_params"] == sum(p.numel() for p in build_model("tiny_cnn", 1, 10).parameters())
        assert metrics[f"{name}_ms_per_image"] > 0 and 0 <= metrics[f"{name}_ece"] <= 1
        assert len(metrics[f"{name}_per_class_acc"]) == 10
    assert 0 <= metrics["student_teacher_agreement"] <= 1 and 0 <= metrics["baseline_teacher_agreement"] <= 1
    assert metrics["timing"]["batch_size"] == 256 and metrics["timing"]["device"].startswith("cpu")
    assert metrics["cache"]["views"] == 2 and metrics["cache"]["storage"] == "full" and metrics["cache"]["bytes"] > 0
    assert metrics["search"] is None and "gap_closed" in metrics
    rows = (out / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == metrics["test_samples"] + 1


def test_search_section_with_search_results(with_search):
    out, _ = with_search
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["search"]["trials"] == 3 and metrics["cache"] is None
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "3 trials in 2 rounds" in md and "T = **4**, λ = **0.9**" in md and "**95.00 %**" in md
    assert "search/search.png)" in md and "No search has run" not in md
    assert "Teacher: no training curves were logged." in md and "No logit store was given" in md
    assert page.count('src="data:image/png;base64,') == 5  # training, confusion, per-class, reliability, search


@pytest.mark.parametrize("run", ["without_search", "with_search"])
def test_html_is_self_contained(run, request):
    out, _ = request.getfixturevalue(run)
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert re.findall(r'src="(?!data:)', page) == [] and re.findall(r"url\(", page) == []
    assert re.findall(r'href="(?!#)', page) == []  # only links within the page
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page


DIVERGED_FIRST = SEARCH_CSV.replace("0,0,2.0,0.5,0,2,0.91,", "0,0,2.0,0.5,0,2,nan,")


def test_a_diverged_trial_is_never_the_best_and_all_diverged_is_said(tmp_path):
    (tmp_path / "search.csv").write_text(DIVERGED_FIRST)
    assert read_search(tmp_path / "search.csv") == {"trials": 3, "rounds": 2, "best_temperature": 4.0,
                                                   "best_kd_weight": 0.9, "best_val_acc": 0.95, "best_trial": 1}
    (tmp_path / "all.csv").write_text(SEARCH_CSV.replace(",0.91,", ",nan,").replace(",0.95,", ",nan,")
                                      .replace(",0.93,", ",nan,"))
    summary = read_search(tmp_path / "all.csv")
    assert summary["trials"] == 3 and summary["best_val_acc"] is None and summary["best_trial"] is None
    text = search_section(summary, None, "all.csv").blocks[0]
    assert "Every trial diverged" in text and "T = " not in text


def test_json_text_writes_null_for_non_finite_numbers():
    value = {"a": float("nan"), "b": [1.0, float("inf"), np.float64("-inf")], "c": {"d": 0.5, "e": None}}
    assert json.loads(json_text(value)) == {"a": None, "b": [1.0, None, None], "c": {"d": 0.5, "e": None}}


def strict_json(path):
    """The file's JSON, refusing NaN and Infinity (not JSON; Python's json.dumps writes them by default)."""
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluate_reads_a_store_at_a_url_and_skips_a_diverged_search_trial(project):
    (project / "diverged").mkdir()
    (project / "diverged/search.csv").write_text(DIVERGED_FIRST)
    run_evaluate(project, "at_url", "--teacher-live", project / "live/teacher", "--cache",
                 f"file://{project / 'store.zarr'}", "--search-csv", project / "diverged/search.csv")
    metrics = strict_json(project / "at_url/metrics.json")
    assert metrics["cache"]["path"] == f"file://{project / 'store.zarr'}" and metrics["cache"]["bytes"] > 0
    assert metrics["cache"]["bytes"] == sum(f.stat().st_size for f in (project / "store.zarr").rglob("*")
                                            if f.is_file())
    assert metrics["search"]["best_trial"] == 1 and metrics["search"]["best_val_acc"] == 0.95
    assert "T = **4**, λ = **0.9**" in (project / "at_url/report.md").read_text()


def test_the_summary_opens_by_saying_when_the_student_alone_is_already_as_good_as_the_teacher():
    from pipeline.report import reading_text

    close = {"teacher_errors": 2, "baseline_errors": 4, "teacher_acc": 358 / 360, "baseline_acc": 356 / 360,
             "test_samples": 360}
    text = reading_text(close)
    assert "within 2 test errors" in text and "+0.56 points" in text and "RESULTS.md" in text
    far = {**close, "baseline_errors": 30, "baseline_acc": 330 / 360}
    assert reading_text(far) is None


# ---- figures and words (issue 24, "Output") --------------------------------------------------------------------

@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions draw, drawn but not saved and kept open for their axes to be read."""
    import pipeline.figures

    figures = []

    def keep(fig, path):
        fig.canvas.draw()
        figures.append(fig)

    monkeypatch.setattr(pipeline.figures, "save_figure", keep)
    yield figures
    for fig in figures:
        pipeline.figures.pyplot().close(fig)


def shown_ticks(axis, minor: bool = True) -> list[tuple[float, str]]:
    """(location, label) of the ticks, major and (unless `minor` is False) minor, that a drawn `axis` shows
    within its view."""
    lo, hi = sorted(axis.get_view_interval())
    ticks = [*zip(axis.get_majorticklocs(), axis.get_majorticklabels())]
    if minor:
        ticks += [*zip(axis.get_minorticklocs(), axis.get_minorticklabels())]
    return [(loc, label.get_text()) for loc, label in ticks if lo * (1 - 1e-9) <= loc <= hi * (1 + 1e-9)]


SHORT_SEARCH = [{"trial": i, "round": 1 + i // 4, "temperature": t, "kd_weight": w, "seed": 0, "epochs": 1,
                 "val_acc": 0.9 + 0.01 * i, "seconds": 1.0, "config": "c.yaml"}
                for i, (t, w) in enumerate([(20, 0.3), (35, 0.5), (50, 0.4), (80, 0.9), (28, 0.6), (60, 0.7)])]


@pytest.mark.parametrize("temperatures, weights", [((20, 35, 50, 80), (0.3, 0.5, 0.4, 0.9)),  # within a decade
                                                   ((0.5, 3, 40, 600), (0.01, 0.1, 0.5, 1.0)),  # several decades
                                                   ((3.2, 3.5, 3.8), (0.61, 0.66, 0.7))])  # within a factor 1.2
def test_log_axes_are_labelled_in_plain_numbers_however_few_decades_the_data_span(temperatures, weights):
    from pipeline.figures import log_axes, pyplot

    fig, ax = pyplot().subplots()
    ax.scatter(temperatures, weights)
    log_axes(ax)
    fig.canvas.draw()
    for axis in (ax.xaxis, ax.yaxis):
        labels = [text for _, text in shown_ticks(axis) if text]
        assert len(labels) >= 2, labels
        assert all(re.fullmatch(r"\d+(\.\d+)?", text) for text in labels), labels  # 20, 0.5: no 2×10¹
        assert len(labels) <= 12, labels  # readable, not crowded
    assert ax.get_xscale() == ax.get_yscale() == "log"
    pyplot().close(fig)


def test_search_map_labels_temperatures_within_one_decade(drawn):
    from pipeline.search import plot_search

    plot_search(SHORT_SEARCH, "search.png")
    ax = drawn[0].axes[0]
    assert len([text for _, text in shown_ticks(ax.xaxis) if text]) >= 2
    assert "1 epochs" not in ax.get_title()


def test_epoch_axes_have_integer_ticks(drawn):
    from pipeline.figures import plot_training

    two = {"loss": [2.0, 1.0], "train_acc": [0.5, 0.7], "val_acc": [0.6, 0.8]}
    plot_training({"distilled": two, "baseline (λ = 0)": two}, "training.png")
    for ax in drawn[0].axes:
        ticks = [loc for loc, _ in shown_ticks(ax.xaxis, minor=False)]
        assert ticks and all(float(loc).is_integer() for loc in ticks), ticks


def test_counts_are_pluralised():
    from pipeline.report import counted

    assert (counted(1, "epoch"), counted(2, "epoch"), counted(0, "round")) == ("1 epoch", "2 epochs", "0 rounds")
    one = {"trials": 1, "rounds": 1, "best_val_acc": 0.9, "best_trial": 0, "best_temperature": 4.0,
           "best_kd_weight": 0.5}
    assert search_section(one, None, "s.csv").blocks[0].startswith("1 trial in 1 round (")
    assert search_section({**one, "trials": 3, "rounds": 2}, None, "s.csv").blocks[0].startswith("3 trials in 2 "
                                                                                                  "rounds (")


def test_inline_code_never_breaks_inside_a_word():
    from pipeline.render import CSS, Section, to_html, to_markdown

    rule = re.search(r"(?m)^code \{([^}]*)\}", CSS).group(1)
    assert "white-space: nowrap" in rule and "break-all" not in rule and "anywhere" not in rule
    text = "The store `" + "cache/" * 20 + "teacher_logits.zarr` and `kd distill --live-dir live/student` again."
    page = to_html([Section("S", [text])], "t")
    assert "<code>kd distill --live-dir live/student</code>" in page
    md = to_markdown([Section("S", [text])], "t", ".")
    assert all(line.count("`") % 2 == 0 for line in md.splitlines()), "a code span split across lines"
