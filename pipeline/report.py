"""Figures and the markdown report from dvclive histories and test accuracies."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline import KDError

CURVES = (("loss", "Training loss"), ("train_acc", "Training accuracy"), ("val_acc", "Validation accuracy"))


def read_history(live_dir: str | Path) -> dict[str, list[float]]:
    """Per-epoch values `{metric: [epoch 0, epoch 1, ...]}` from a dvclive directory's TSV plots."""
    history = {}
    for name, _ in CURVES:
        path = Path(live_dir) / "plots" / "metrics" / f"{name}.tsv"
        if not path.is_file():
            raise KDError(f"{path}: training log not found; run `kd distill --live-dir {live_dir}` first")
        with path.open() as f:
            history[name] = [float(row[name]) for row in csv.DictReader(f, delimiter="\t")]
    return history


def plot_training(histories: dict[str, dict[str, list[float]]], path: str | Path) -> None:
    """One PNG, three panels (loss, training accuracy, validation accuracy per epoch), a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, title) in zip(axes, CURVES):
        for label, history in histories.items():
            ax.plot(range(1, len(history[name]) + 1), history[name], label=label)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    tmp.replace(path)


def write_text(path: str | Path, text: str) -> None:
    """Write a report or metrics file atomically: a temporary name, then a rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


def markdown_report(metrics: dict, settings: dict, figure: str) -> str:
    """The report: test accuracies, the threshold verdict, the settings that produced them, the figure."""
    rows = [("Teacher", metrics["teacher_acc"]), ("Student (distilled)", metrics["student_acc"]),
            ("Student alone (baseline, λ = 0)", metrics["baseline_acc"])]
    lines = ["# Distillation report", "", "| model | test accuracy |", "|---|---|"]
    lines += [f"| {name} | {100 * acc:.2f} % |" for name, acc in rows]
    lines += ["", f"Distillation gain over the baseline: {100 * metrics['kd_gain']:+.2f} points.",
              f"Threshold {100 * metrics['threshold']:.2f} %: student above it? **{metrics['above_threshold']}**",
              "", "## Settings", ""]
    lines += [f"- {key}: `{value}`" for key, value in settings.items()]
    lines += ["", "## Training curves", "", f"![training curves]({figure})", ""]
    return "\n".join(lines)
