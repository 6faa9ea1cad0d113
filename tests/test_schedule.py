"""The optimiser and its learning-rate schedule (`make_optimizer`), stepped once per epoch.

step: from epoch lr_milestones[k] on, lr = base lr · lr_factors[k]. cosine: lr = base lr · (1 + cos(π·e/E)) / 2.
"""

import math

import pytest
import torch
from torch import nn

from pipeline.params import OptimParams
from pipeline.train import make_optimizer

BASE_LR = 0.2


def optim(**changes) -> OptimParams:
    fields = dict(name="sgd", lr=BASE_LR, betas=[0.9, 0.999], momentum=0.9, nesterov=False, weight_decay=0.0,
                  schedule="step", lr_milestones=[], lr_factors=[])
    return OptimParams(**{**fields, **changes})


def lr_per_epoch(cfg: OptimParams, epochs: int) -> list[float]:
    """The learning rate each epoch 0..epochs trains with, stepping as the training loops do."""
    optimizer, scheduler = make_optimizer(nn.Linear(2, 2), cfg, epochs)
    rates = []
    for _ in range(epochs + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: changes nothing, but comes first, as in training
        scheduler.step()
    return rates


def test_step_schedule_multiplies_the_base_lr_from_each_milestone_on():
    rates = lr_per_epoch(optim(lr_milestones=[2, 4], lr_factors=[0.1, 0.01]), epochs=5)
    assert rates[:5] == pytest.approx([BASE_LR, BASE_LR, 0.1 * BASE_LR, 0.1 * BASE_LR, 0.01 * BASE_LR])


def test_step_schedule_without_milestones_keeps_the_base_lr():
    assert lr_per_epoch(optim(), epochs=4) == pytest.approx([BASE_LR] * 5)


def test_cosine_schedule_falls_from_the_base_lr_to_zero_over_the_epochs():
    epochs = 10
    rates = lr_per_epoch(optim(schedule="cosine", lr_milestones=[3], lr_factors=[0.5]), epochs)
    expected = [BASE_LR * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs + 1)]
    assert rates == pytest.approx(expected, abs=1e-12)  # milestones and factors are unused
    assert rates[0] == BASE_LR and rates[epochs] == pytest.approx(0.0, abs=1e-12)


def test_adam_gets_its_betas_and_weight_decay():
    optimizer, _ = make_optimizer(nn.Linear(2, 2), optim(name="adam", betas=[0.8, 0.95], weight_decay=1e-4), 3)
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.Adam
    assert group["lr"] == BASE_LR and group["betas"] == (0.8, 0.95) and group["weight_decay"] == 1e-4


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_gets_its_momentum_nesterov_and_weight_decay(nesterov):
    cfg = optim(name="sgd", momentum=0.7, nesterov=nesterov, weight_decay=5e-4)
    optimizer, _ = make_optimizer(nn.Linear(2, 2), cfg, 3)
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.SGD
    assert group["lr"] == BASE_LR and group["momentum"] == 0.7 and group["nesterov"] is nesterov
    assert group["weight_decay"] == 5e-4


@pytest.mark.parametrize("fractions, epochs_at, epochs", [([0.8], [120], 150), ([0.9], [180], 200),
                                                          ([0.4, 0.8], [4, 8], 10), ([0.5, 0.75], [2, 4], 5)])
def test_fractional_milestones_give_the_lr_of_their_epochs(fractions, epochs_at, epochs):
    """A fraction f of the epochs is the milestone at epoch round(f · epochs): the same learning rate every epoch."""
    factors = [0.1, 0.01][:len(fractions)]
    assert lr_per_epoch(optim(lr_milestones=fractions, lr_factors=factors), epochs) == \
        lr_per_epoch(optim(lr_milestones=epochs_at, lr_factors=factors), epochs)


def test_milestone_epochs_keeps_epochs_and_rounds_fractions_to_the_nearest_epoch():
    from pipeline.params import milestone_epochs

    assert milestone_epochs([120], 150) == [120] and milestone_epochs([], 150) == []
    assert milestone_epochs([0.8], 150) == [120] and milestone_epochs([0.8], 5) == [4]
    assert milestone_epochs([0.33], 10) == [3] and milestone_epochs([0.37], 10) == [4]
    assert milestone_epochs([0.25, 0.5], 10) == [2, 5]  # Python's round: a tie goes to the even epoch
