"""Several teachers, one student: the teachers' logits (one store per teacher, or each teacher run live) mixed at
read time into one target.

With K teachers of logits z_k, weights w_k (normalised to sum 1) and the run's temperature T, the target is
  rule probabilities:  p̄ = Σ_k w_k softmax(z_k / T), given to the loss as the logits T · log p̄
  rule logits:         z̄ = Σ_k w_k z_k
so `kd_loss`'s softmax(target / T) is p̄ (the mean of the teachers' soft targets, Hinton et al. 2015) or the
softmax of the mean logit. A top-K store's logits are first rebuilt as full logits at T (`pipeline.topk.decode`,
with `distill.topk_tail`), then mixed like a full store's. One teacher is passed through untouched (bit for bit).
Adding or dropping a teacher re-runs no teacher: each store stays as it is.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline import KDError

RULES = ("probabilities", "logits")


def normalized(weights, count: int) -> list[float]:
    """`weights` (None: equal) as `count` non-negative floats summing to 1."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise KDError(f"distill.ensemble.weights has {len(weights)} entries but {count} teachers were given; give "
                      "one weight per --teacher, in the same order, or null for equal weights")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def combine(logits: list[torch.Tensor], weights: list[float], rule: str, temperature: float) -> torch.Tensor:
    """The ensemble's target (B, C) float32 from each teacher's logits (B, C) (see the module's docstring)."""
    if len(logits) == 1:
        return logits[0]
    z = torch.stack([t.float() for t in logits])  # (K, B, C)
    w = torch.tensor(weights, dtype=torch.float32, device=z.device)[:, None, None]
    if rule == "logits":
        return (w * z).sum(0)
    log_p = torch.log_softmax(z / temperature, dim=2) + torch.log(w)  # log(w_k softmax(z_k / T)), -inf where w_k 0
    return temperature * torch.logsumexp(log_p, dim=0)


class Ensemble:
    """Targets of several teachers, mixed by `combine`: `ensemble(x, samples, views)` for the live teachers or
    stores, `read(samples, views)` for stores (the read-ahead thread and DataLoader workers read through it)."""

    def __init__(self, members: list, weights: list[float], rule: str, temperature: float):
        if rule not in RULES:
            raise KDError(f"distill.ensemble.rule is {rule!r}; expected one of {', '.join(RULES)}")
        self.members, self.weights, self.rule, self.temperature = members, weights, rule, temperature

    @property
    def in_memory(self) -> bool:
        return all(getattr(m, "in_memory", True) for m in self.members)

    def in_workers(self, num_workers: int) -> "Ensemble":
        return Ensemble([m.in_workers(num_workers) for m in self.members], self.weights, self.rule, self.temperature)

    def read(self, samples: np.ndarray, views: np.ndarray) -> np.ndarray:
        return combine([torch.from_numpy(m.read(samples, views)) for m in self.members], self.weights, self.rule,
                       self.temperature).numpy()

    def __call__(self, x, samples: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return combine([m(x, samples, views) for m in self.members], self.weights, self.rule, self.temperature)


# What makes two stores hold the logits of the same views (a teacher's own fields may differ).
SAME_VIEWS = ("num_samples", "num_views", "num_classes", "augment", "mix", "mean", "std", "seed",
              "dataset_fingerprint", "replay")


def check_same_views(stores: list) -> None:
    """Refuse stores that do not hold logits for the same views, naming the stores and every differing field."""
    from dataclasses import asdict

    first = asdict(stores[0].meta)
    problems = []
    for store in stores[1:]:
        other = asdict(store.meta)
        fields = [f"{k}: {first[k]!r} vs {other[k]!r}" for k in SAME_VIEWS if first[k] != other[k]]
        if fields:
            problems.append(f"{stores[0].path} vs {store.path}: " + "; ".join(fields))
    if problems:
        raise KDError("the stores of an ensemble must hold logits for the same views (same data, augmentation, "
                      "mixing, replay seed and number of views), but:\n  " + "\n  ".join(problems) +
                      "\nre-cache the odd ones out with this run's params")


def check_distinct(teacher_paths: list, teachers: list, cache_paths: list = ()) -> None:
    """Refuse a store or a teacher given twice (by path, or the same weights under two paths): an ensemble of one
    teacher twice is that teacher weighted double, which `distill.ensemble.weights` says openly."""
    from pipeline.models import weights_fingerprint

    def same(paths, key):
        seen = {}
        for path in paths:
            if key(path) in seen:
                return seen[key(path)], path
            seen[key(path)] = path
        return None

    where = lambda p: str(p) if "://" in str(p) else str(Path(p).resolve())  # noqa: E731 (URLs as written)
    twice = same(cache_paths, where)
    if twice:
        raise KDError(f"--cache {twice[1]} is given twice{'' if twice[0] == twice[1] else f' (as {twice[0]})'}: "
                      "give each teacher's store once; to weigh a teacher more, set distill.ensemble.weights")
    fingerprints = {str(p): weights_fingerprint(t) for p, t in zip(teacher_paths, teachers)}
    twice = same([str(p) for p in teacher_paths], fingerprints.get)
    if twice:
        what = "is given twice" if where(twice[0]) == where(twice[1]) else f"holds the same weights as {twice[0]}"
        raise KDError(f"--teacher {twice[1]} {what}: an ensemble of one teacher twice is that teacher weighted "
                      "double; give each teacher once, and set distill.ensemble.weights to weigh one more")


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows where two models' logits (N, C) pick the same class."""
    return float((a.argmax(1) == b.argmax(1)).float().mean()) if len(a) else math.nan
