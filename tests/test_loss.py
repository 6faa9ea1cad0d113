"""The loss: L = CE(s, y) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T)), batch mean."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.loss import kd_loss


def test_kl_term_is_zero_when_logits_match():
    s = torch.randn(16, 10)
    y = torch.randint(10, (16,))
    assert torch.allclose(kd_loss(s, s.clone(), y, temperature=4.0, kd_weight=3.0), F.cross_entropy(s, y))


def test_kd_weight_zero_is_plain_cross_entropy():
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    y = torch.randint(10, (16,))
    assert torch.equal(kd_loss(s, t, y, temperature=4.0, kd_weight=0.0), F.cross_entropy(s, y))


def test_hand_computed_case():
    # Two classes, one sample. s = [0, 0], t = [2, 0], y = 0, T = 2, λ = 0.5.
    s, t, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    ce = math.log(2)                                   # -log(1/2)
    p = 1 / (1 + math.exp(-1))                         # softmax([1, 0])[0]
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    expected = ce + 0.5 * 2 ** 2 * kl
    assert kd_loss(s, t, y, temperature=2.0, kd_weight=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_a_batch_mean_and_scaled_by_t_squared():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(5, (8,))
    T = 3.0
    per_sample = [F.kl_div(F.log_softmax(s[i] / T, 0), F.softmax(t[i] / T, 0), reduction="sum") for i in range(8)]
    expected = F.cross_entropy(s, y) + 2.0 * T ** 2 * torch.stack(per_sample).mean()
    assert torch.allclose(kd_loss(s, t, y, T, 2.0), expected, rtol=1e-6)


def test_float16_teacher_logits_are_accepted_and_carry_no_gradient():
    # The teacher's logits arrive wanting a gradient (a live teacher run without no_grad): the loss must not send one.
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10).half().requires_grad_()
    kd_loss(s, t, torch.randint(10, (4,)), 4.0, 1.0).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None
