"""Properties that hold for every input, checked on random ones (hypothesis): the KD loss and the params validator.

The loss: L = α·CE(s, y) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T)), each term a batch mean. Its KD part (L − α·CE)
is a KL divergence scaled by λ·T²: never negative, zero exactly when the two softmaxes agree, and equal to an
independent float64 computation of the formula.

The validator: every key with a value it must refuse, alone or together with another, gives one ParamsError that
names the key.
"""

import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.loss import kd_loss
from pipeline.models import ARCHITECTURES
from pipeline.params import ParamsError, load_params
from pipeline.sources import SOURCES
from conftest import write_params

EXAMPLES = settings(max_examples=50, deadline=None)

# ---------------------------------------------------------------------------------------------------------- kd_loss

temperatures = st.floats(0.5, 50.0)
kd_weights = st.floats(0.0, 50.0)
ce_weights = st.floats(0.0, 5.0)


@st.composite
def batches(draw):
    """(student logits, teacher logits, labels): B in 1..8 samples, C in 2..20 classes, logits in [-20, 20]."""
    b, c = draw(st.integers(1, 8)), draw(st.integers(2, 20))
    logits = arrays(np.float32, (b, c), elements=st.floats(-20, 20, width=32))
    labels = draw(arrays(np.int64, (b,), elements=st.integers(0, c - 1)))
    return torch.from_numpy(draw(logits)), torch.from_numpy(draw(logits)), torch.from_numpy(labels)


def kd_part(s, t, y, temperature, kd_weight, ce_weight=1.0) -> float:
    """L − α·CE: the distillation term alone, in float64."""
    loss = kd_loss(s, t, y, temperature, kd_weight, ce_weight)
    return loss.double().item() - ce_weight * F.cross_entropy(s, y).double().item()


def reference_kl(s, t, temperature) -> float:
    """KL(softmax(t/T) ‖ softmax(s/T)) averaged over the batch, written out in float64 numpy."""
    def log_softmax(x):
        x = x.numpy().astype(np.float64) / temperature
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    log_p_teacher, log_p_student = log_softmax(t), log_softmax(s)
    return float((np.exp(log_p_teacher) * (log_p_teacher - log_p_student)).sum() / len(s))


def float32_slack(s, t, y, temperature, kd_weight) -> float:
    """How far float32 rounding can move the KD part: a few ulps of CE, and of λ·T² times the log-probabilities
    (magnitude up to max|logit|/T + log C) that the KL sums."""
    log_prob_scale = (s.abs().max() + t.abs().max()).item() / temperature + math.log(s.shape[1])
    return 1e-5 * F.cross_entropy(s, y).item() + 1e-6 * kd_weight * temperature ** 2 * (1 + log_prob_scale)


@EXAMPLES
@given(batches(), temperatures, kd_weights)
def test_kd_part_is_never_negative(batch, temperature, kd_weight):
    s, t, y = batch
    assert kd_part(s, t, y, temperature, kd_weight) >= -float32_slack(s, t, y, temperature, kd_weight)


@EXAMPLES
@given(batches(), temperatures, kd_weights)
def test_kd_part_is_zero_when_student_and_teacher_agree(batch, temperature, kd_weight):
    s, _, y = batch
    assert kd_part(s, s.clone(), y, temperature, kd_weight) == 0.0


@EXAMPLES
@given(batches(), temperatures, kd_weights, st.data())
def test_kd_part_is_zero_when_logits_differ_by_a_constant_per_row(batch, temperature, kd_weight, data):
    """softmax(x + c) = softmax(x): only the differences between a row's logits carry knowledge."""
    s, _, y = batch
    shifts = data.draw(arrays(np.float32, (len(s), 1), elements=st.floats(-20, 20, width=32)))
    t = s + torch.from_numpy(shifts)
    assert kd_part(s, t, y, temperature, kd_weight) == pytest.approx(
        0.0, abs=float32_slack(s, t, y, temperature, kd_weight))


@EXAMPLES
@given(batches(), temperatures, kd_weights)
def test_kd_part_is_kd_weight_times_t_squared_times_the_reference_kl(batch, temperature, kd_weight):
    s, t, y = batch
    expected = kd_weight * temperature ** 2 * reference_kl(s, t, temperature)
    assert kd_part(s, t, y, temperature, kd_weight) == pytest.approx(
        expected, rel=1e-4, abs=float32_slack(s, t, y, temperature, kd_weight))


@EXAMPLES
@given(batches(), temperatures, ce_weights)
def test_kd_weight_zero_is_exactly_cross_entropy_whatever_the_ce_weight(batch, temperature, ce_weight):
    s, t, y = batch
    assert torch.equal(kd_loss(s, t, y, temperature, 0.0, ce_weight), F.cross_entropy(s, y))


@EXAMPLES
@given(batches(), temperatures, st.floats(0.01, 50.0), ce_weights)
def test_ce_weight_scales_the_cross_entropy_term_only(batch, temperature, kd_weight, ce_weight):
    """L(α) = α·CE + L(α = 0): α multiplies CE and leaves the KD part alone."""
    s, t, y = batch
    kd_alone = kd_loss(s, t, y, temperature, kd_weight, ce_weight=0.0).double().item()
    ce = F.cross_entropy(s, y).double().item()
    assert kd_loss(s, t, y, temperature, kd_weight, ce_weight).item() == pytest.approx(
        ce_weight * ce + kd_alone, rel=1e-6, abs=1e-6 * (1 + ce_weight * ce))


# ------------------------------------------------------------------------------------------------ params validator

def not_a_number(text: str) -> bool:
    """True for text that YAML-1.1 compatibility (`1e-3` read as a string) does not turn into a float."""
    try:
        float(text)
    except ValueError:
        return True
    return False


not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
negative = st.floats(max_value=-math.ulp(0.0))  # not -0.0, which is >= 0
non_numeric_text = st.text(max_size=12).filter(not_a_number)
KNOWN_ARCHITECTURES = set(ARCHITECTURES) | set(torchvision.models.list_models())


def lists_with_one_bad_factor(bad):
    """Lists of 1 to 3 learning-rate factors, all fine but one drawn from `bad`."""
    return st.tuples(st.lists(st.floats(1e-3, 1.0), max_size=2), bad, st.integers(0, 2)).map(
        lambda d: d[0][:d[2]] + [d[1]] + d[0][d[2]:])


def milestones_for(factors: list) -> dict:
    """lr_milestones with one entry per factor, all before the last epoch: the factors' values are the only fault."""
    return {"distill.optimizer.lr_milestones": list(range(1, len(factors) + 1)), "distill.epochs": len(factors) + 1}


class Bad(NamedTuple):
    """Values `load_params` must refuse for `key`, and the key its message names for them."""
    key: str
    out_of_range: st.SearchStrategy  # the right type, refused by a value rule
    wrong_type: Optional[st.SearchStrategy] = None
    companions: Callable[[Any], dict] = lambda value: {}  # overrides that keep every other key valid
    named_as: Optional[str] = None  # when the message names another key than `key`


BAD = {bad.key: bad for bad in [
    Bad("distill.temperature", st.one_of(st.floats(max_value=0.0), not_finite), wrong_type=non_numeric_text),
    Bad("distill.kd_weight", st.one_of(negative, not_finite)),
    Bad("distill.optimizer.lr", st.one_of(st.floats(max_value=0.0), not_finite)),
    Bad("distill.optimizer.lr_factors", lists_with_one_bad_factor(st.one_of(st.floats(max_value=0.0), not_finite)),
        companions=milestones_for),
    Bad("cache.num_views", st.integers(max_value=0), wrong_type=st.floats(allow_nan=False, allow_infinity=False)),
    Bad("cache.format", st.text(max_size=12).filter(lambda s: s not in ("zarr", "hdf5"))),
    Bad("seed", st.integers(max_value=-1)),
    Bad("data.val_fraction", st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(math.nan))),
    Bad("evaluate.threshold", st.one_of(negative, st.floats(min_value=1.0, exclude_min=True), st.just(math.nan))),
    Bad("data.name", st.text(max_size=12).filter(lambda s: s not in SOURCES)),
    Bad("distill.student", st.text(max_size=12).filter(lambda s: s not in KNOWN_ARCHITECTURES)),
    # the tiny params' teacher (tiny_cnn) takes no options, so every option name is unknown
    Bad("teacher.arch_options", st.dictionaries(st.text(min_size=1, max_size=12), st.just(1), min_size=1, max_size=1),
        named_as="teacher.arch"),
    Bad("num_workers", st.integers(max_value=-1)),
]}
BAD_KEYS = list(BAD)
WRONG_TYPE_KEYS = [key for key, bad in BAD.items() if bad.wrong_type is not None]


def any_bad_value(key: str) -> st.SearchStrategy:
    bad = BAD[key]
    return bad.out_of_range if bad.wrong_type is None else st.one_of(bad.out_of_range, bad.wrong_type)


def refusal(**overrides) -> str:
    """The ParamsError message for the project's (tiny) params with `overrides`, without the file's path."""
    with tempfile.TemporaryDirectory() as folder:
        path = write_params(Path(folder) / "params.yaml", **overrides)
        with pytest.raises(ParamsError) as refused:
            load_params(path)
    return str(refused.value).replace(str(path), "<params>")


def with_companions(key, value) -> dict:
    return {key: value, **BAD[key].companions(value)}


def names(message: str, key: str) -> bool:
    """`key` appears in `message` as a whole dotted key (`seed` is not named by `cache.seed` or `split_seed`)."""
    return re.search(rf"(?<![\w.]){re.escape(BAD[key].named_as or key)}(?![\w])", message) is not None


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_a_bad_value_is_refused_naming_its_key(data):
    key = data.draw(st.sampled_from(BAD_KEYS), label="key")
    value = data.draw(any_bad_value(key), label="value")
    message = refusal(**with_companions(key, value))
    assert names(message, key), message


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_two_values_out_of_range_are_both_named_in_one_message(data):
    first, second = data.draw(st.lists(st.sampled_from(BAD_KEYS), min_size=2, max_size=2, unique=True), label="keys")
    overrides = {**with_companions(first, data.draw(BAD[first].out_of_range, label=first)),
                 **with_companions(second, data.draw(BAD[second].out_of_range, label=second))}
    message = refusal(**overrides)
    assert names(message, first) and names(message, second), message


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_a_wrong_type_and_another_bad_value_are_both_named_in_one_message(data):
    first = data.draw(st.sampled_from(WRONG_TYPE_KEYS), label="wrong-type key")
    second = data.draw(st.sampled_from([k for k in BAD_KEYS if k != first]), label="other key")
    overrides = {**with_companions(first, data.draw(BAD[first].wrong_type, label=first)),
                 **with_companions(second, data.draw(any_bad_value(second), label=second))}
    message = refusal(**overrides)
    assert names(message, first) and names(message, second), message
