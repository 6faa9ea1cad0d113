"""Compact storage for many classes: the top-K raw logits of each view plus a summary of the tail.

`cache.storage: topk` keeps, per (sample, view), the K largest raw logits (before temperature) and their
class indices, and the tail's *effective logit* at a few temperatures:

    tail(T) = T * (logsumexp(z_c / T for c in tail) - log n),      n = C - K tail classes,

stored at T = 1, 2, 4, 8, 16 and its limit T -> inf, the tail's mean logit (six numbers). At training time,
for the run's temperature T, `decode` rebuilds a full logit vector: the K stored logits at their classes and
tail(T) at every tail class, tail(T) interpolated linearly in 1/T between the stored temperatures (exact at
them; below T = 1 the T = 1 value). Then softmax(decoded / T) gives the top-K classes their exact teacher
probabilities and the tail its exact total mass at every stored T, spread evenly over the tail classes --
the best any scheme can do for classes it keeps no logit of. T stays free after caching, and the student is
never pushed to put all its mass on K classes (what renormalising the top K does: Anshumann et al. 2025).

Baselines measured against it (bench/topk.py): `renorm` (top-K only, no tail) and `uniform` (FKD / TinyViT:
the tail's mass at the stored temperature T = 1 spread evenly, i.e. tail(T) = tail(1) at every T).

What a student learns from is chosen at training time (`distill.topk_tail`), from the same store: `summary`
rebuilds the tail as above (the most faithful loss and gradient of the three: BENCHMARKS.md); `none` gives the
tail no mass (the renormalised top K). Students trained from each differ by more than the loss errors suggest:
on 100 classes of real images at T = 4 the renormalised top K trained the best students of the three, while at
T = 1 with K = 5 the summary did (RESULTS.md, "Students from top-K stores, 100 classes"); `none` is the
default.
"""

from __future__ import annotations

import numpy as np

TAIL_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0)  # and T -> inf (the mean), stored last
TAIL_WIDTH = len(TAIL_TEMPERATURES) + 1
TAILS = ("none", "summary")  # distill.topk_tail: how the tail is rebuilt for training


def fields(storage: str, num_classes: int, top_k: int) -> dict[str, tuple[int, str | None]]:
    """Arrays a store holds per (sample, view): name -> (width, dtype; None = the store's float dtype)."""
    if storage == "full":
        return {"logits": (num_classes, None)}
    index_dtype = "int16" if num_classes <= np.iinfo(np.int16).max else "int32"
    return {"topk_logits": (top_k, None), "topk_indices": (top_k, index_dtype), "tail": (TAIL_WIDTH, None)}


def encode(storage: str, logits: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """Raw logits (..., C) float32 -> the stored arrays (see `fields`)."""
    if storage == "full":
        return {"logits": logits}
    num_classes = logits.shape[-1]
    order = np.argsort(-logits, axis=-1, kind="stable")
    top, rest = order[..., :top_k], order[..., top_k:]
    tail_logits = np.take_along_axis(logits, rest, axis=-1).astype(np.float64)
    n = num_classes - top_k
    summary = [T * (_logsumexp(tail_logits / T) - np.log(n)) for T in TAIL_TEMPERATURES]
    summary.append(tail_logits.mean(axis=-1))
    return {"topk_logits": np.take_along_axis(logits, top, axis=-1),
            "topk_indices": top.astype(fields(storage, num_classes, top_k)["topk_indices"][1]),
            "tail": np.stack(summary, axis=-1).astype(np.float32)}


def tail_logit(tail: np.ndarray, temperature: float) -> np.ndarray:
    """tail(T) from the stored summary (..., 6): linear in u = 1/T between the stored temperatures."""
    u = np.array([1 / T for T in TAIL_TEMPERATURES] + [0.0])  # decreasing: 1, 1/2, ..., 1/16, 0
    x = min(1.0, 1 / temperature)
    j = int(np.searchsorted(-u, -x))  # first anchor with u <= x
    if j == 0:
        return tail[..., 0].astype(np.float32)
    w = (u[j - 1] - x) / (u[j - 1] - u[j])
    return ((1 - w) * tail[..., j - 1].astype(np.float32) + w * tail[..., j].astype(np.float32)).astype(np.float32)


def decode(storage: str, stored: dict[str, np.ndarray], temperature: float, num_classes: int,
           tail: str = "summary") -> np.ndarray:
    """The stored arrays of a batch (B, ...) -> logits (B, C) for the loss at `temperature`.

    tail (top-K stores): `summary` puts tail(T) at every tail class; `none` puts every tail class 200 T below the
    K-th logit, so softmax(logits / T) gives it probability 0 in float32 (exp(-200) underflows) while the loss
    stays finite (a -inf logit would make KL's 0 x log 0 a NaN)."""
    if storage == "full":
        return stored["logits"]
    values, indices = stored["topk_logits"].astype(np.float32), stored["topk_indices"].astype(np.int64)
    if tail == "none":
        level = values.min(axis=-1) - np.float32(200 * max(1.0, temperature))
    elif tail == "summary":
        level = tail_logit(stored["tail"], temperature)
    else:
        raise ValueError(f"tail is {tail!r}, expected one of {TAILS}")
    out = np.repeat(level[..., None], num_classes, axis=-1).astype(np.float32)
    np.put_along_axis(out, indices, values, axis=-1)
    return out


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]
