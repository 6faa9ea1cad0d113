"""The report: its inputs (dvclive histories, the search's CSV, the store's facts) and its sections, which
`pipeline.render` writes as markdown and as one self-contained HTML page.

The sections are built from `metrics.json`'s values (everything the report states is also a metric), the
settings, the class names, the distilled student's confusion matrix and the figures' paths.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from pipeline import KDError
from pipeline.figures import CURVES
from pipeline.render import Figure, Section, Table, Verbatim

MODELS = (("teacher", "Teacher"), ("student", "Student (distilled)"), ("baseline", "Student alone (baseline, λ = 0)"))
SEARCH_COLUMNS = ("trial", "round", "temperature", "kd_weight", "seed", "epochs", "val_acc", "seconds", "config")


# ---- inputs ------------------------------------------------------------------------------------------------------

def read_history(live_dir: str | Path, required: bool = True) -> dict[str, list[float]]:
    """Per-epoch values `{metric: [epoch 0, epoch 1, ...]}` from a dvclive directory's TSV plots.

    `required`: every curve of CURVES must exist (a student's log), else a KDError; otherwise missing curves are
    left out (a user's teacher logs only `val_acc`; a missing directory gives `{}`).
    """
    history = {}
    for name, _ in CURVES:
        path = Path(live_dir) / "plots" / "metrics" / f"{name}.tsv"
        if not path.is_file():
            if required:
                raise KDError(f"{path}: training log not found; run `kd distill --live-dir {live_dir}` first")
            continue
        with path.open() as f:
            history[name] = [float(row[name]) for row in csv.DictReader(f, delimiter="\t")]
    return history


def read_search(csv_path: str | Path | None) -> dict | None:
    """Summary of `kd search`'s trials, or None when there is no such file (no search has run).

    The CSV has the columns SEARCH_COLUMNS, one row per trial. Returns `{trials, rounds, best_temperature,
    best_kd_weight, best_val_acc, best_trial}`, the best trial being the one of highest finite `val_acc` (the
    first of equals); a diverged trial (NaN) never is, and when every trial diverged the `best_` values are None.
    A file without those columns or trials is a KDError.
    """
    if csv_path is None or not Path(csv_path).is_file():
        return None
    with Path(csv_path).open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SEARCH_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise KDError(f"{csv_path}: search results lack the columns {missing}; expected {list(SEARCH_COLUMNS)}")
        rows = list(reader)
    if not rows:
        raise KDError(f"{csv_path}: search results hold no trial; run `kd search` again or remove the file")
    try:
        scored = [r for r in rows if math.isfinite(float(r["val_acc"]))]
        best = max(scored, key=lambda r: float(r["val_acc"]), default=None)
        summary = {"trials": len(rows), "rounds": len({r["round"] for r in rows}), "best_temperature": None,
                   "best_kd_weight": None, "best_val_acc": None, "best_trial": None}
        if best is not None:
            summary.update(best_temperature=float(best["temperature"]), best_kd_weight=float(best["kd_weight"]),
                           best_val_acc=float(best["val_acc"]), best_trial=int(best["trial"]))
        return summary
    except ValueError as e:
        raise KDError(f"{csv_path}: a search result is not a number ({e})") from None


def cache_facts(store_path: str | Path) -> dict:
    """What the logit store at `store_path` (a local path or a URL, as `kd cache --out` takes) holds: views, dtype,
    storage (full or topk and K), samples, classes, size in bytes (`store_bytes`), format and the fingerprints."""
    from pipeline.store import LogitStore

    store = LogitStore(store_path, max_memory_bytes=0)  # reads only the metadata and labels
    meta = store.meta
    return {"path": str(store_path), "format": store.format, "samples": meta.num_samples, "views": meta.num_views,
            "classes": meta.num_classes, "dtype": meta.dtype, "storage": meta.storage,
            "top_k": meta.top_k if meta.storage == "topk" else None, "bytes": store_bytes(store_path),
            "teacher_arch": meta.teacher_arch, "teacher_fingerprint": meta.teacher_fingerprint,
            "dataset_fingerprint": meta.dataset_fingerprint}


def store_bytes(store_path: str | Path) -> int:
    """Bytes of every file of a zarr store (a local folder, or at a URL through fsspec), or of the HDF5 file."""
    from pipeline.store import is_url

    if is_url(store_path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(store_path))
        return int(fs.du(root))
    path = Path(store_path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def confusion_csv(labels, predicted, classes: list[str]) -> str:
    """Test predictions as CSV rows `actual,predicted` (class names), one per sample: DVC's `confusion` template
    counts them into a matrix."""
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted))
    return buffer.getvalue()


def json_text(value) -> str:
    """`value` as indented JSON text ending in a newline, each non-finite float (NaN, inf) written as null: strict
    JSON, as `dvc metrics show` and every JSON parser read it (Python's default would write NaN)."""
    return json.dumps(_finite_or_none(value), indent=2, allow_nan=False) + "\n"


def _finite_or_none(value):
    if isinstance(value, dict):
        return {key: _finite_or_none(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_text(path: str | Path, text: str) -> None:
    """Write a report or metrics file atomically: a temporary name, then a rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


# ---- sections ----------------------------------------------------------------------------------------------------

def percent(value: float | None, digits: int = 2) -> str:
    """`0.98889` -> `98.89 %`; None or NaN -> `n/a`."""
    return "n/a" if value is None or value != value else f"{100 * value:.{digits}f} %"


def counted(count: int, noun: str) -> str:
    """`count` and a `noun` made plural by an `s`, plural unless the count is one: `1 epoch`, `2 epochs`, `0 rounds`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def gap_text(metrics: dict) -> str:
    """The sentence on the share of the teacher-student gap that distillation closed."""
    gap, t, b = metrics["gap_closed"], metrics["teacher_acc"], metrics["baseline_acc"]
    if gap is None:
        return (f"Gap closed: not defined, the teacher ({percent(t)}) is not better than the student alone "
                f"({percent(b)}), so there is no gap for distillation to close.")
    reading = (" (negative: the distilled student is below the student alone)" if gap < 0
               else " (above 100 %: the distilled student beats the teacher)" if gap > 1 else "")
    return (f"Distillation closed **{percent(gap, 1)}** of the teacher-student gap{reading}: (student − baseline)"
            f" / (teacher − baseline) = {100 * metrics['kd_gain']:+.2f} / {100 * (t - b):.2f} points.")


CLOSE_ERRORS = 3  # a teacher this few test errors ahead of the student alone leaves distillation nothing to show


def reading_text(metrics: dict) -> str | None:
    """The report's first words when the student alone is already within `CLOSE_ERRORS` test errors of the teacher:
    what the gain line below can and cannot show, and where distillation is shown to pay."""
    ahead = metrics["baseline_errors"] - metrics["teacher_errors"]
    if ahead > CLOSE_ERRORS:
        return None
    gap = 100 * (metrics["teacher_acc"] - metrics["baseline_acc"])
    return (f"**What you are looking at:** the student alone is already within "
            f"{counted(max(ahead, 0), 'test error')} of the teacher ({gap:+.2f} points on {metrics['test_samples']} "
            "test images), so distillation has almost nothing to close here and a difference of one image "
            f"({100 / metrics['test_samples']:.2f} points) is noise, whichever way it goes. Distillation pays where "
            "the student alone falls well short of the teacher: RESULTS.md measures it on CIFAR-10 "
            "(recipes/cifar10-origin.yaml, shortened: +1.37 test points over the student alone, in every one of 3 "
            "seeds) and says why the embedded digits show no gain (\"The default run\").")


def summary_section(metrics: dict) -> Section:
    """Accuracy, size, speed, calibration and agreement of the three models; the gap closed; the verdict. When the
    student alone is as good as the teacher within a few test errors, the section opens by saying so."""
    rows = []
    for key, name in MODELS:
        rows.append([name, f"`{metrics[f'{key}_arch']}`", percent(metrics[f"{key}_acc"]),
                     f"{metrics[f'{key}_errors']} / {metrics['test_samples']}", f"{metrics[f'{key}_params']:,}",
                     f"{metrics[f'{key}_ms_per_image']:.3g}", percent(metrics[f"{key}_ece"]),
                     "—" if key == "teacher" else percent(metrics[f"{key}_teacher_agreement"])])
    timing = metrics["timing"]
    verdict = (f"Student model test accuracy: {100 * metrics['student_acc']:.2f} %\n"
               f"Is above threshold performance? {metrics['above_threshold']}")
    reading = reading_text(metrics)
    return Section("Summary", [*([reading] if reading else []),
        Table(["model", "architecture", "test accuracy", "errors", "parameters", "ms / image", "ECE",
               "top-1 agreement with teacher"], rows),
        f"Distillation gain over the baseline: {100 * metrics['kd_gain']:+.2f} points. " + gap_text(metrics),
        f"Threshold {percent(metrics['threshold'])}: student above it? **{metrics['above_threshold']}**",
        Verbatim(verdict),
        f"Inference time: median of {timing['repeats']} timed forward passes of a batch of {timing['batch_size']} "
        f"test images on `{timing['device']}`, after {timing['warmup']} warm-up passes (float32, eval mode, no "
        f"gradients), divided by the batch size. ECE: expected calibration error over {metrics['ece_bins']} "
        "equal-width confidence bins (see Calibration). Agreement: the share of test images on which the model "
        "predicts the teacher's class.",
    ])


def ensemble_section(metrics: dict) -> Section:
    """Each teacher of an ensemble, the ensemble (its teachers' test logits mixed as the student's targets were,
    argmax) and the distilled student's top-1 agreement with each (`metrics["ensemble"]` and the keys of
    `pipeline.metrics.ensemble_metrics`)."""
    ensemble = metrics["ensemble"]
    rows = [[f"teacher {k}", f"`{path}`", f"`{arch}`", f"{weight:.3g}", percent(metrics[f"teacher_acc_{k}"]),
             percent(metrics[f"student_agreement_teacher_{k}"])]
            for k, (path, arch, weight) in enumerate(zip(ensemble["teachers"], ensemble["archs"], ensemble["weights"]))]
    rows.append(["**ensemble**", "", f"rule `{ensemble['rule']}`, T = {ensemble['temperature']:g}", "1",
                 percent(metrics["ensemble_acc"]), percent(metrics["student_agreement_ensemble"])])
    return Section("Ensemble of teachers", [
        f"{len(ensemble['teachers'])} teachers. The ensemble predicts the argmax of their test logits mixed as "
        f"`kd distill` mixes their stores into the student's targets: rule `{ensemble['rule']}`, the weights below, "
        f"T = {ensemble['temperature']:g} (docs/ensembles.md). Elsewhere in this report, \"Teacher\" is "
        f"teacher 0 (`{ensemble['teachers'][0]}`).",
        Table(["model", "checkpoint", "architecture", "weight", "test accuracy", "distilled student's top-1 agreement"],
              rows),
        f"Top-1 agreement with the ensemble: distilled student **{percent(metrics['student_agreement_ensemble'])}**, "
        f"student alone **{percent(metrics['baseline_agreement_ensemble'])}**.",
    ])


def curves_section(figures: dict, teacher_curves: list[str]) -> Section:
    """The students' curves overlaid, and the teacher's when it logged any."""
    blocks = [Figure(figures["training"], "Distilled student and student alone (baseline), per epoch: training "
                                          "loss, training accuracy, validation accuracy.")]
    if figures.get("teacher") is None:
        blocks.append("Teacher: no training curves were logged.")
    else:
        missing = [title.lower() for name, title in CURVES if name not in teacher_curves]
        note = (f" Not logged: {', '.join(missing)} (a user-supplied checkpoint is not trained here; its stage "
                "logs only its validation accuracy).") if missing else ""
        blocks.append(Figure(figures["teacher"], "Teacher, per epoch." + note))
    return Section("Training curves", blocks)


def errors_section(metrics: dict, classes: list[str], confusion: np.ndarray, figures: dict) -> Section:
    """The distilled student's confusion matrix and its most frequent mistakes; per-class accuracy of all three."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:5]
    mistakes = [f"{classes[a]} → {classes[p]} ({off[a, p]})" for a, p in zip(*np.unravel_index(order, off.shape))
                if off[a, p] > 0]
    rows = [[c, str(int(confusion[i].sum()))] + [percent(metrics[f"{key}_per_class_acc"][i], 1) for key, _ in MODELS]
            for i, c in enumerate(classes)]
    return Section("Errors", [
        Figure(figures["confusion"], "Distilled student on the test split: rows actual class, columns predicted "
                                     "(colour on a log scale). DVC draws the same data: `dvc plots show`."),
        "Most frequent mistakes of the distilled student (actual → predicted): "
        + ("; ".join(mistakes) if mistakes else "none") + ".",
        f"Top-1 agreement with the teacher on the test split: distilled student "
        f"**{percent(metrics['student_teacher_agreement'])}**, student alone "
        f"**{percent(metrics['baseline_teacher_agreement'])}**.",
        Figure(figures["per_class"], "Test accuracy within each class."),
        Table(["class", "test samples"] + [name for _, name in MODELS], rows),
    ])


def calibration_section(metrics: dict, figures: dict) -> Section:
    """ECE of the three models, its definition, and the reliability diagram."""
    bins = metrics["ece_bins"]
    return Section("Calibration", [
        f"Expected calibration error, ECE = Σ_b (n_b / N) · |acc_b − conf_b| over {bins} equal-width bins of the "
        "confidence (the largest softmax probability), where bin b holds n_b of the N test images, acc_b is their "
        "accuracy and conf_b their mean confidence; 0 is perfectly calibrated.",
        Table(["model", "ECE"], [[name, percent(metrics[f"{key}_ece"])] for key, name in MODELS]),
        Figure(figures["reliability"], "Reliability diagrams: accuracy per confidence bin (bars) against perfect "
                                       "calibration (dashed); the hatched red part is the gap to the bin's mean "
                                       "confidence."),
    ])


def search_section(search: dict | None, figure: Path | None, csv_path: str | None) -> Section:
    """The search map and its best trial, or the statement that no search has run."""
    if search is None:
        return Section("Hyperparameter search", [
            "No search has run: there are no search results"
            + (f" at `{csv_path}`" if csv_path else "") + " (`kd search` writes them)."])
    if search["best_val_acc"] is None:
        best = "Every trial diverged (validation accuracy NaN), so there is no best T and λ."
    else:
        best = (f"Best on validation: trial {search['best_trial']}, T = **{search['best_temperature']:g}**, λ = "
                f"**{search['best_kd_weight']:g}**, validation accuracy **{percent(search['best_val_acc'])}** "
                "(diverged trials never count).")
    blocks = [f"{counted(search['trials'], 'trial')} in {counted(search['rounds'], 'round')} (`{csv_path}`). " + best]
    if figure is not None:
        blocks.append(Figure(figure, "Validation accuracy of the search's trials over temperature T and weight λ."))
    return Section("Hyperparameter search", blocks)


def cache_section(cache: dict | None) -> Section:
    """The logit store's facts."""
    if cache is None:
        return Section("Logit cache", ["No logit store was given (`kd evaluate --cache PATH`)."])
    storage = f"top-{cache['top_k']} logits + tail" if cache["storage"] == "topk" else "full logits"
    rows = [["path", f"`{cache['path']}` ({cache['format']})"], ["training samples", f"{cache['samples']:,}"],
            ["views per sample", str(cache["views"])], ["classes", str(cache["classes"])], ["dtype", cache["dtype"]],
            ["storage", f"{cache['storage']} ({storage})"], ["size on disk", f"{cache['bytes'] / 2**20:.2f} MiB"],
            ["teacher", f"`{cache['teacher_arch']}`"], ["teacher fingerprint", f"`{cache['teacher_fingerprint']}`"],
            ["dataset fingerprint", f"`{cache['dataset_fingerprint']}`"]]
    return Section("Logit cache", [Table(["fact", "value"], rows, numeric=False)])


def settings_section(settings: dict) -> Section:
    return Section("Settings", ["\n".join(f"- {key}: `{value}`" for key, value in settings.items())])


def report_sections(metrics: dict, settings: dict, classes: list[str], confusion: np.ndarray, figures: dict,
                    teacher_curves: list[str], search_csv: str | None = None) -> list[Section]:
    """Every section of the report, in reading order. `figures` maps training, teacher, confusion, per_class,
    reliability and search to PNG paths (teacher and search None when absent). With several teachers
    (`metrics["ensemble"]`), the ensemble's section follows the summary."""
    ensemble = [ensemble_section(metrics)] if metrics.get("ensemble") else []
    return [summary_section(metrics), *ensemble, curves_section(figures, teacher_curves),
            errors_section(metrics, classes, confusion, figures), calibration_section(metrics, figures),
            search_section(metrics["search"], figures.get("search"), search_csv), cache_section(metrics["cache"]),
            settings_section(settings)]
