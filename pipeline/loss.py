"""The distillation loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, kd_weight: float, ce_weight: float = 1.0) -> torch.Tensor:
    """L = α · CE(softmax(s), y) + λ · T² · KL(softmax(t / T) ‖ softmax(s / T)), each term a batch mean.

    student_logits, teacher_logits: (B, C) raw logits (before temperature); teacher_logits may be
    float16 and carry no gradient. labels: (B,) int64, or (B, C) float class probabilities (mixed views:
    `pipeline.mix`; CE is then -Σ_c y_c log p_c). T = `temperature` > 0, λ = `kd_weight` >= 0.
    The T² keeps the soft-target gradients on the scale of the hard ones. α = `ce_weight` is 1 in
    Hinton's formula (RepDistiller's recipes use α = 0.1, λ = 0.9). λ = 0 gives plain CE (α ignored).
    """
    ce = F.cross_entropy(student_logits, labels)
    if kd_weight == 0:
        return ce
    if ce_weight != 1:
        ce = ce_weight * ce
    log_q_student = F.log_softmax(student_logits / temperature, dim=1)
    log_q_teacher = F.log_softmax(teacher_logits.float().detach() / temperature, dim=1)
    kl = F.kl_div(log_q_student, log_q_teacher, reduction="batchmean", log_target=True)
    return ce + kd_weight * temperature ** 2 * kl
