"""MixUp and CutMix as part of a view: view v of sample i may be its own replayed view mixed with a partner's.

Everything about the mix is drawn from the view's own seed, so a mixed view is a pure function of
(seed, i, v) and of the data, whatever the batch size, order, sampler, number of workers or ranks:

    rng = np.random.default_rng(np.random.SeedSequence([seed, i, v, MIX_STREAM]))
    mixed  = rng.random() < prob                          # mix this view at all
    cutmix = mode == "cutmix" or (mode == "both" and rng.random() < switch_prob)
    lam    = rng.beta(alpha, alpha)                        # alpha = cutmix_alpha or mixup_alpha
    j      = rng.integers(N - 1); j += j >= i              # the partner: any other training sample
    cx, cy = rng.integers(W), rng.integers(H)              # CutMix's box centre

(every number is drawn for every view, in this order, so one mode's draws never shift another's). The
partner's pixels are its own replayed view v, `replay_view(image_j, transform, seed, j, v)`. The arithmetic
is torchvision.transforms.v2's MixUp and CutMix (Zhang et al. 2018; Yun et al. 2019), applied to one pair
instead of a batch rolled by one:
    MixUp:  x = lam * x_i + (1 - lam) * x_j
    CutMix: the box [y1:y2, x1:x2] of x_i replaced by x_j's, with r = sqrt(1 - lam) / 2,
            x1 = max(cx - int(r W), 0), x2 = min(cx + int(r W), W) (rows alike), and lam := 1 - box area / (H W)
    labels: lam * onehot(y_i) + (1 - lam) * onehot(y_j)
The teacher's logits are stored for the mixed input and the student trains on the same mixed input; the
hard-label term takes the mixed labels. Mixing runs after the view's whole transform (Normalize included), as
torchvision's MixUp/CutMix run on normalised batches.

`mixup_alpha: 1` draws lam uniformly on [0, 1]: the MixUp of Beyer et al. 2022 ("Knowledge distillation: a
good teacher is patient and consistent"), whose function matching also sets `distill.ce_weight: 0`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

MIX_STREAM = 0x6D6978  # "mix": the mix's draws are a stream of their own beside the view's replay seed
NONE = {"mode": "none"}  # a store from before mixing (format < 7) holds unmixed views


@dataclass(frozen=True)
class MixDraw:
    """What view (i, v) mixes: with partner sample `partner` (its view v), by `kind`, ratio `lam` (the share
    of view i), and for CutMix the box (y1, y2, x1, x2) taken from the partner."""
    kind: str  # none | mixup | cutmix
    partner: int
    lam: float
    box: tuple[int, int, int, int] = (0, 0, 0, 0)


def as_spec(mix) -> dict:
    """A mix setting (`MixParams`, a dict from a store or params.yaml, or None) as the plain dict a store records:
    `{"mode": "none"}` when nothing is mixed, else every key."""
    if mix is None:
        return dict(NONE)
    spec = asdict(mix) if not isinstance(mix, dict) else dict(mix)
    return dict(NONE) if spec.get("mode", "none") == "none" else spec


def enabled(mix) -> bool:
    return as_spec(mix)["mode"] != "none"


def draw(mix, seed: int, index: int, view: int, num_samples: int, height: int, width: int) -> MixDraw:
    """The mix of view `view` of sample `index` (of `num_samples` training samples, views height x width)."""
    spec = as_spec(mix)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, view, MIX_STREAM]))
    mixed = rng.random() < spec.get("prob", 0.0)
    switch = rng.random()
    cutmix = spec["mode"] == "cutmix" or (spec["mode"] == "both" and switch < spec["switch_prob"])
    alpha = spec.get("cutmix_alpha" if cutmix else "mixup_alpha", 1.0)
    lam = float(rng.beta(alpha, alpha))
    partner = int(rng.integers(max(1, num_samples - 1)))
    partner += partner >= index and num_samples > 1
    cx, cy = int(rng.integers(width)), int(rng.integers(height))
    if spec["mode"] == "none" or not mixed or num_samples < 2:
        return MixDraw("none", index, 1.0)
    if not cutmix:
        return MixDraw("mixup", partner, lam)
    r = 0.5 * np.sqrt(1.0 - lam)  # torchvision's CutMix box
    half_w, half_h = int(r * width), int(r * height)
    x1, x2 = max(cx - half_w, 0), min(cx + half_w, width)
    y1, y2 = max(cy - half_h, 0), min(cy + half_h, height)
    return MixDraw("cutmix", partner, 1.0 - (x2 - x1) * (y2 - y1) / (width * height), (y1, y2, x1, x2))


def draws(mix, seed: int, samples, views, num_samples: int, height: int, width: int) -> list[MixDraw]:
    """`draw` for each (sample, view) pair."""
    return [draw(mix, seed, int(i), int(v), num_samples, height, width) for i, v in zip(samples, views)]


def mix_pixels(x: torch.Tensor, partner: torch.Tensor, d: MixDraw) -> torch.Tensor:
    """View `x` (C, H, W) float mixed with the partner's view by `d` (a new tensor; `x` is left as it was).
    Separate multiply and add (never a fused multiply-add), so the CPU and a GPU round alike."""
    if d.kind == "mixup":
        return x.mul(d.lam).add(partner.mul(1.0 - d.lam))
    if d.kind == "cutmix":
        y1, y2, x1, x2 = d.box
        out = x.clone()
        out[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
        return out
    return x


def mix_batch(x: torch.Tensor, partners: torch.Tensor, mixes: list[MixDraw]) -> torch.Tensor:
    """A batch of views (B, C, H, W) mixed by `mixes` (B); `partners` holds, in order, the partner view of each
    mixed one (kind != none). Row by row, `mix_pixels`: the same bits as one view at a time."""
    rows = [k for k, d in enumerate(mixes) if d.kind != "none"]
    if not rows:
        return x
    x = x.clone()
    for partner, k in zip(partners, rows):
        x[k] = mix_pixels(x[k], partner, mixes[k])
    return x


def soft_labels(labels, mixes: list[MixDraw], partner_labels, num_classes: int) -> np.ndarray:
    """(B, num_classes) float32: lam * onehot(y_i) + (1 - lam) * onehot(y_j) (torchvision's label mix); an
    unmixed view's row is its one-hot label. `partner_labels` holds the partner's label of each mixed view, in
    order."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.zeros((len(labels), num_classes), np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    partner_labels = iter(np.asarray(partner_labels, dtype=np.int64).tolist())
    for k, d in enumerate(mixes):
        if d.kind != "none":
            own = np.zeros(num_classes, np.float32)
            own[labels[k]] = 1.0
            other = np.zeros(num_classes, np.float32)
            other[next(partner_labels)] = 1.0
            out[k] = other * np.float32(1.0 - d.lam) + own * np.float32(d.lam)
    return out
