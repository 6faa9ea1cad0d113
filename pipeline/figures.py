"""The report's figures, as PNG files: training curves, confusion matrix, per-class accuracy, reliability diagram;
and the axes every figure shares (epochs in whole numbers, log axes labelled in plain numbers).

Each function draws one figure from plain numbers (no model, no file reading) and writes it atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CURVES = (("loss", "Training loss"), ("train_acc", "Training accuracy"), ("val_acc", "Validation accuracy"))
COLORS = {"teacher": "tab:green", "distilled": "tab:blue", "baseline": "tab:orange"}  # by the label's first word


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(label: str) -> str | None:
    return COLORS.get(label.split()[0])


def save_figure(fig, path: str | Path) -> None:
    """Write `fig` as a PNG (100 dpi) under a temporary name, then rename it into place; close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
    tmp.replace(path)


def epoch_axis(axis) -> None:
    """Ticks of a matplotlib `axis` counting epochs on whole numbers only (a 2-epoch run: 1, 2; never 1.5)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def log_axes(ax) -> None:
    """Both axes of `ax` on a log scale, labelled in plain numbers (0.2, 0.5, 20, 50, never 2×10¹) however few
    decades the data span: ticks at the powers of ten, else also at 2 and 5 times them, else at every multiple,
    else (a span under a factor of about 2) evenly spaced; the finer multiples unlabelled, for the grid.
    Set the data first: the ticks follow the axes' final limits."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(_readable_log_locator())
        axis.set_major_formatter(StrMethodFormatter("{x:g}"))
        axis.set_minor_locator(LogLocator(subs=np.arange(2.0, 10.0)))
        axis.set_minor_formatter(NullFormatter())


def _readable_log_locator():
    """A matplotlib Locator for a log axis: the coarsest of `log_axes`'s tick sets that puts 3 ticks in view."""
    from matplotlib.ticker import Locator, LogLocator, MaxNLocator

    class ReadableLogLocator(Locator):
        def __call__(self):
            return self.tick_values(*self.axis.get_view_interval())

        def tick_values(self, vmin, vmax):
            vmin, vmax = sorted((vmin, vmax))
            for subs in ((1.0,), (1.0, 2.0, 5.0), np.arange(1.0, 10.0)):
                ticks = LogLocator(subs=subs, numticks=100).tick_values(vmin, vmax)
                ticks = ticks[(ticks >= vmin) & (ticks <= vmax)]
                if len(ticks) >= 3:
                    return ticks
            return MaxNLocator(nbins=4).tick_values(vmin, vmax)

    return ReadableLogLocator()


def plot_training(histories: dict[str, dict[str, list[float]]], path: str | Path) -> None:
    """One PNG, three panels (loss, training accuracy, validation accuracy per epoch), a line per run.

    A run may lack a curve (a user's teacher logs only validation accuracy): its panel shows the other runs,
    or says "not logged". Epochs are counted from 1; a run of one epoch shows as a point.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, title) in zip(axes, CURVES):
        drawn = False
        for label, history in histories.items():
            values = history.get(name) or []
            if values:
                ax.plot(range(1, len(values) + 1), values, label=label, color=_color(label),
                        marker="o" if len(values) == 1 else None)
                drawn = True
        ax.set(title=title, xlabel="epoch")
        epoch_axis(ax.xaxis)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(confusion: np.ndarray, classes: list[str], path: str | Path, title: str) -> None:
    """Heat map of a confusion matrix (rows actual, columns predicted), counts written in the cells when C <= 20."""
    plt = pyplot()
    n = len(classes)
    side = min(12.0, max(5.0, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    shown = np.log1p(confusion)  # the diagonal dominates: a log scale keeps the few mistakes visible
    image = ax.imshow(shown, cmap="Blues")
    if n <= 20:
        ticks = np.arange(n)
        ax.set_xticks(ticks, classes, rotation=90 if max(map(len, classes)) > 3 else 0)
        ax.set_yticks(ticks, classes)
        for a in range(n):
            for p in range(n):
                if confusion[a, p]:
                    ax.text(p, a, str(confusion[a, p]), ha="center", va="center", fontsize=8,
                            color="white" if shown[a, p] > 0.6 * shown.max() else "black")
    ax.set(xlabel="predicted class", ylabel="actual class", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="log(1 + count)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_per_class(per_class: dict[str, np.ndarray], classes: list[str], path: str | Path) -> None:
    """Grouped bars: test accuracy within each class, one bar per model (label -> accuracy per class)."""
    plt = pyplot()
    n, k = len(classes), len(per_class)
    fig, ax = plt.subplots(figsize=(min(15.0, max(8.0, 0.35 * n * k)), 4))
    width = 0.8 / k
    x = np.arange(n)
    for j, (label, values) in enumerate(per_class.items()):
        ax.bar(x + (j - (k - 1) / 2) * width, 100 * np.asarray(values), width, label=label, color=_color(label))
    lowest = np.nanmin([np.nanmin(v) for v in per_class.values()]) if n else 0.0
    ax.set_ylim(max(0.0, 100 * lowest - 5), 100.5)
    if n <= 40:
        ax.set_xticks(x, classes, rotation=90 if max(map(len, classes)) > 3 else 0)
    ax.set(xlabel="class", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=k, frameon=False)  # above: never over a bar
    fig.tight_layout()
    save_figure(fig, path)


def plot_reliability(bins: dict[str, tuple], eces: dict[str, float], path: str | Path) -> None:
    """Reliability diagrams side by side (Guo et al. 2017): per confidence bin, the accuracy (bars) against the
    diagonal of perfect calibration, the gap to the bin's mean confidence hatched in red. `bins[label] = (count,
    accuracy, confidence)` as `pipeline.metrics.calibration_bins` returns them; empty bins are left blank."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(bins), figsize=(5 * len(bins), 4.6), squeeze=False)
    for ax, (label, (count, acc, conf)) in zip(axes[0], bins.items()):
        width = 1 / len(count)
        left = np.arange(len(count))[count > 0] * width
        acc, conf = acc[count > 0], conf[count > 0]
        ax.bar(left, acc, width=width, align="edge", color=_color(label), edgecolor="black", linewidth=0.5,
               label="accuracy")
        ax.bar(left, conf - acc, bottom=acc, width=width, align="edge", fill=False, edgecolor="tab:red",
               hatch="//", linewidth=0.5, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max softmax probability)", ylabel="accuracy",
               title=f"{label}: ECE {100 * eces[label]:.2f} %")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the shared legend below the panels
    save_figure(fig, path)
