"""Measures of trained models on the test split: predictions, confusion, agreement, calibration, size, speed.

`predict` runs a model once over a split; everything else is a pure numpy function of those logits and the
labels, so one pass per model gives accuracy, confusion matrix, per-class accuracy, agreement and calibration.
`inference_ms` times a model on the device; `count_parameters` counts its weights.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline import KDError
from pipeline.data import Split, ViewDataset

NUM_BINS = 15  # confidence bins of the expected calibration error (Guo et al. 2017)


@torch.no_grad()
def predict(model: nn.Module, split: Split, transform, device: torch.device, num_workers: int = 0,
            batch_size: int = 512) -> np.ndarray:
    """Logits `(N, C)` float32 of `model` (eval mode) on every sample of `split`, in order, inputs through the
    deterministic `transform`."""
    model.eval()
    loader = DataLoader(ViewDataset(split, transform), batch_size=batch_size, num_workers=num_workers)
    return np.concatenate([model(x.to(device)).float().cpu().numpy() for x, _ in loader])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy: the fraction of rows whose largest logit is at the label."""
    return float(np.mean(logits.argmax(1) == labels))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """`M[a, p]` = number of samples of actual class `a` predicted as `p`; `(C, C)` int64, rows sum to class sizes."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Accuracy within each actual class, `M[c, c] / sum_p M[c, p]`; NaN for a class without test samples."""
    sizes = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, np.diag(confusion) / sizes, np.nan)


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Top-1 agreement: the fraction of samples on which the two models predict the same class (right or wrong)."""
    return float(np.mean(logits_a.argmax(1) == logits_b.argmax(1)))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable (the row maximum subtracted first)."""
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def calibration_bins(logits: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS):
    """Reliability-diagram data: per equal-width confidence bin, `(count, accuracy, mean confidence)`.

    A sample's confidence is its largest softmax probability `max_c p_c`; bin b holds confidences in
    `((b) / B, (b + 1) / B]` (a confidence of exactly 0 cannot occur: it is at least 1 / C). Accuracy and
    confidence are NaN in an empty bin. Three arrays of length `num_bins`.
    """
    probs = softmax(logits)
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(bins, weights=correct, minlength=num_bins) / count
        conf = np.bincount(bins, weights=confidence, minlength=num_bins) / count
    return count, acc, conf


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> float:
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017), a fraction in [0, 1]:

        ECE = sum_b (n_b / N) * |acc_b - conf_b|

    over `num_bins` (15) equal-width bins of confidence `max_c softmax(logits)_c`, bin b = (b/B, (b+1)/B]; n_b
    samples fall in bin b, acc_b is the fraction of them classified correctly, conf_b their mean confidence.
    0 is perfectly calibrated; empty bins contribute nothing.
    """
    count, acc, conf = calibration_bins(logits, labels, num_bins)
    filled = count > 0
    return float(np.sum(count[filled] / count.sum() * np.abs(acc[filled] - conf[filled])))


def gap_closed(teacher: float, student: float, baseline: float) -> float | None:
    """Share of the teacher-student gap that distillation closed: `(student - baseline) / (teacher - baseline)`.

    1 means the distilled student matches the teacher, 0 that it is no better than the student alone, < 0 worse;
    > 1 that it beats the teacher. None when the teacher is not better than the baseline (no gap to close).
    """
    if teacher <= baseline:
        return None
    return (student - baseline) / (teacher - baseline)


def test_metrics(logits: dict[str, np.ndarray], labels: np.ndarray, num_classes: int, threshold: float) -> dict:
    """metrics.json's measures of the test split from each model's logits (`teacher`, `student`, `baseline` ->
    (N, C)): accuracies, errors, `kd_gain` (student - baseline), the verdict (student >= threshold), `gap_closed`,
    ECE per model, the students' top-1 agreement with the teacher, per-class accuracies (lists in class order,
    None for a class without test samples)."""
    acc = {name: accuracy(values, labels) for name, values in logits.items()}
    metrics = {"teacher_acc": acc["teacher"], "student_acc": acc["student"], "baseline_acc": acc["baseline"],
               "kd_gain": acc["student"] - acc["baseline"], "threshold": threshold,
               "above_threshold": acc["student"] >= threshold, "test_samples": len(labels)}
    metrics.update({f"{name}_errors": int(np.sum(values.argmax(1) != labels)) for name, values in logits.items()})
    metrics["gap_closed"] = gap_closed(acc["teacher"], acc["student"], acc["baseline"])
    metrics.update({f"{name}_ece": expected_calibration_error(values, labels) for name, values in logits.items()})
    metrics["ece_bins"] = NUM_BINS
    metrics.update({f"{name}_teacher_agreement": agreement(logits[name], logits["teacher"])
                    for name in ("student", "baseline")})
    for name, values in logits.items():
        per_class = per_class_accuracy(confusion_matrix(labels, values.argmax(1), num_classes))
        metrics[f"{name}_per_class_acc"] = [None if np.isnan(a) else float(a) for a in per_class]
    return metrics


def ensemble_metrics(teacher_logits: list[np.ndarray], student: np.ndarray, baseline: np.ndarray, labels: np.ndarray,
                     weights: list[float], rule: str, temperature: float) -> dict:
    """metrics.json's measures of an ensemble of K teachers from their logits (N, C) each (in --teacher order): each
    teacher's accuracy (`teacher_acc_<k>`, k from 0), the ensemble's (`ensemble_acc`, `ensemble_errors`: the argmax
    of `pipeline.ensemble.combine`'s target, the logits mixed as the distilled student's targets were, by `rule`
    with `weights` (normalised) at `temperature`), and the top-1 agreement of the distilled student with the
    ensemble and with each teacher, and of the baseline with the ensemble."""
    from pipeline.ensemble import combine

    ensemble = combine([torch.from_numpy(t) for t in teacher_logits], weights, rule, temperature).numpy()
    metrics = {f"teacher_acc_{k}": accuracy(t, labels) for k, t in enumerate(teacher_logits)}
    metrics.update(ensemble_acc=accuracy(ensemble, labels), ensemble_errors=int(np.sum(ensemble.argmax(1) != labels)),
                   student_agreement_ensemble=agreement(student, ensemble),
                   baseline_agreement_ensemble=agreement(baseline, ensemble))
    metrics.update({f"student_agreement_teacher_{k}": agreement(student, t) for k, t in enumerate(teacher_logits)})
    return metrics


def count_parameters(model: nn.Module) -> int:
    """Number of weights (every parameter tensor's elements; buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def inference_ms(model: nn.Module, inputs: torch.Tensor, device: torch.device, warmup: int = 3,
                 repeats: int = 10) -> float:
    """Inference time in milliseconds per image: the median over `repeats` timed forward passes of the batch
    `inputs` (B, C, H, W) on `device`, divided by B, after `warmup` untimed passes (allocations, cuDNN autotuning).
    Eval mode, no gradients, float32; CUDA is synchronized around each timed pass."""
    if len(inputs) == 0:
        raise KDError("inference timing needs at least one input image; the test split is empty")
    model.eval().to(device)
    x = inputs.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        sync()
        seconds.append(time.perf_counter() - start)
    return 1000 * float(np.median(seconds)) / len(x)
