"""Read and validate `params.yaml`: the one place parameters enter the code.

Every key is required, an unknown key is an error (with the closest valid key as a hint),
and every value is type-checked, so a typo in `dvc exp run -S ...` fails loudly instead of
silently falling back to a default. Value rules are checked together and reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from pipeline import KDError
from pipeline.sources import SOURCES


class ParamsError(KDError):
    """params.yaml is missing, malformed, or holds an unknown key or a bad value."""


@dataclasses.dataclass(frozen=True)
class DataParams:
    name: str
    root: str
    image_size: Optional[int]
    normalize: Union[str, dict]
    split_seed: int
    val_fraction: float
    test_fraction: float
    train_subset: Optional[int]


@dataclasses.dataclass(frozen=True)
class OptimParams:
    name: str
    lr: float
    betas: list[float]
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    lr_milestones: list[Union[int, float]]  # epochs, or fractions of the epochs: `milestone_epochs`
    lr_factors: list[float]
    warmup_epochs: int = 0  # linear warm-up into the schedule (`pipeline.train.make_optimizer`)
    clip_grad_norm: Optional[float] = None  # clip the gradient's global norm to this (null: no clipping)


@dataclasses.dataclass(frozen=True)
class MixParams:
    mode: str
    mixup_alpha: float
    cutmix_alpha: float
    prob: float
    switch_prob: float


@dataclasses.dataclass(frozen=True)
class TeacherParams:
    checkpoint: Optional[str]
    arch: str
    arch_options: dict
    augment: Optional[list[dict]]
    epochs: int
    batch_size: int
    optimizer: OptimParams
    amp: str = "off"  # training precision (`pipeline.step`): auto | off | bfloat16 | float16
    ema: Optional[float] = None  # decay of an EMA of the weights, saved as the teacher; null: none


@dataclasses.dataclass(frozen=True)
class CacheParams:
    num_views: int
    seed: int
    format: str
    dtype: str
    storage: str
    top_k: int
    chunk_samples: int
    batch_size: int
    amp: str
    compile: bool = False  # torch.compile the teacher (never changes the logits beyond float32 rounding)


@dataclasses.dataclass(frozen=True)
class EnsembleParams:
    weights: Optional[list[float]]
    rule: str


@dataclasses.dataclass(frozen=True)
class DistillParams:
    student: str
    student_options: dict
    teacher_source: str
    temperature: float
    kd_weight: float
    ce_weight: float
    view_schedule: str
    shuffle_chunks: int
    topk_tail: str
    ensemble: EnsembleParams
    epochs: int
    batch_size: int
    optimizer: OptimParams
    amp: str = "off"  # the student's training precision (`pipeline.step`): auto | off | bfloat16 | float16
    channels_last: bool = False  # the student's weights and inputs in channels-last memory format
    compile: bool = False  # torch.compile the student's forward
    ema: Optional[float] = None  # decay of an EMA of the student's weights, validated and saved; null: none


@dataclasses.dataclass(frozen=True)
class SearchParams:
    trials: int
    refine_trials: int
    refine_span: float
    temperature: list[float]
    kd_weight: list[float]
    epochs: int
    seed: int
    processes: int


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    threshold: float


@dataclasses.dataclass(frozen=True)
class Params:
    seed: int
    device: str
    num_workers: int
    memory_mb: int
    data: DataParams
    augment: list[dict]
    mix: MixParams
    teacher: TeacherParams
    cache: CacheParams
    distill: DistillParams
    search: SearchParams
    evaluate: EvaluateParams


def _finite(v) -> bool:
    return math.isfinite(v)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _log_range(v) -> bool:
    """[lo, hi] drawn from log-uniformly: two finite numbers, 0 < lo < hi."""
    return len(v) == 2 and all(_finite(b) for b in v) and 0 < v[0] < v[1]


def milestone_epochs(milestones: list[int | float], epochs: int) -> list[int]:
    """The epochs at which a step schedule's learning rate changes, from `lr_milestones`: an integer is that epoch;
    a float f (a fraction of the run, 0 < f < 1) is epoch round(f x epochs), Python's round (to the nearest epoch, a
    tie to the even one: 0.25 of 10 epochs is epoch 2). So `[0.9]` is the origin's 180 of 200 epochs and follows
    `epochs` when a run is shortened. `load_params` refuses a mix, and fractions that round to equal epochs, to 0
    or to `epochs` or more."""
    return [round(m * epochs) if isinstance(m, float) else m for m in milestones]


def _milestones_form(v) -> bool:
    """Strictly increasing, and all epochs (integers >= 1) or all fractions (floats in (0, 1))."""
    return v == sorted(set(v)) and (all(isinstance(m, int) and m >= 1 for m in v)
                                    or all(isinstance(m, float) and 0 < m < 1 for m in v))


def _milestone_problems(section: str, milestones: list[int | float], epochs: int) -> list[str]:
    """What is wrong with a step schedule's well-formed `milestones` for a run of `epochs` (`milestone_epochs`)."""
    key, at = f"{section}.optimizer.lr_milestones", milestone_epochs(milestones, epochs)
    if not any(isinstance(m, float) for m in milestones):
        if any(m >= epochs for m in milestones):
            return [f"{key} {milestones} must be < {section}.epochs ({epochs}); a milestone at or past the last "
                    "epoch has no effect"]
        return []
    problems, of, rounded = [], f"of {section}.epochs ({epochs})", f"(round(fraction x {epochs}))"
    for i, (m, e) in enumerate(zip(milestones, at)):
        if i and e == at[i - 1]:
            problems.append(f"{key}: {milestones[i - 1]} and {m} {of} both fall on epoch {e} {rounded}; use "
                            "fractions further apart, or more epochs")
        elif e < 1:
            problems.append(f"{key}: {m} {of} falls on epoch 0 {rounded}; a milestone must fall on an epoch >= 1 "
                            "(at 0 the base lr is never used): use a larger fraction, or more epochs")
        elif e >= epochs:
            problems.append(f"{key}: {m} {of} falls on epoch {e} {rounded}, at or past the last epoch, where it has "
                            "no effect; use a smaller fraction, or more epochs")
    return problems


def _optim_rules(section: str) -> list:
    return [
        (f"{section}.name", lambda v: v in ("adam", "adamw", "sgd"), "adam, adamw (decoupled weight decay) or sgd"),
        (f"{section}.lr", lambda v: _finite(v) and v > 0, "a finite number > 0"),
        (f"{section}.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
        (f"{section}.momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
        (f"{section}.weight_decay", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
        (f"{section}.schedule", lambda v: v in ("step", "cosine"), "step or cosine"),
        (f"{section}.lr_milestones", _milestones_form,
         f"strictly increasing epochs (integers >= 1, e.g. [120]) or strictly increasing fractions of the epochs "
         f"(numbers strictly between 0 and 1, e.g. [0.8]: epoch 0.8 x {section.split('.')[0]}.epochs), not a mix: "
         "write them all as epochs or all as fractions"),
        (f"{section}.lr_factors", lambda v: all(_finite(f) and f > 0 for f in v), "finite numbers > 0"),
        (f"{section}.warmup_epochs", lambda v: v >= 0, "an integer >= 0 (0: no warm-up)"),
        (f"{section}.clip_grad_norm", lambda v: v is None or (_finite(v) and v > 0),
         "null (no clipping) or a finite number > 0"),
    ]


def _recipe_rules(section: str) -> list:
    """amp and ema, shared by teacher and distill."""
    return [
        (f"{section}.amp", lambda v: v in ("auto", "off", "bfloat16", "float16"),
         "auto (bfloat16 on CUDA where supported, off on the CPU), off, bfloat16 or float16"),
        (f"{section}.ema", lambda v: v is None or 0 < v < 1, "null (no EMA) or a decay in (0, 1), e.g. 0.999"),
    ]


# Value rules beyond types: (dotted key, predicate, what was expected).
_RULES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("seed", lambda v: v >= 0, "an integer >= 0"),
    ("device", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None,
     "auto, cpu, cuda, cuda:N or mps"),
    ("num_workers", lambda v: v >= 0, "an integer >= 0"),
    ("memory_mb", lambda v: v >= 0, "an integer >= 0 (MiB)"),
    ("data.name", lambda v: v in SOURCES, f"one of {', '.join(SOURCES)}"),
    ("data.image_size", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("data.normalize", lambda v: v in ("auto", "none") if isinstance(v, str) else
     set(v) == {"mean", "std"} and all(isinstance(v[k], list) and v[k] for k in v)
     and len(v["mean"]) == len(v["std"]) and all(_number(s) and _finite(s) and s > 0 for s in v["std"])
     and all(_number(m) and _finite(m) for m in v["mean"]),
     "auto, none, or {mean: [one finite number per channel], std: [one per channel, each finite and > 0]}"),
    ("data.split_seed", lambda v: v >= 0, "an integer >= 0"),
    ("data.val_fraction", lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    ("data.test_fraction", lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    ("data.train_subset", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("teacher.epochs", lambda v: v >= 0, "an integer >= 0"),
    ("teacher.batch_size", lambda v: v >= 1, "an integer >= 1"),
    *_optim_rules("teacher.optimizer"),
    *_recipe_rules("teacher"),
    ("cache.num_views", lambda v: v >= 1, "an integer >= 1"),
    ("cache.seed", lambda v: v >= 0, "an integer >= 0"),
    ("cache.format", lambda v: v in ("zarr", "hdf5"), "zarr or hdf5"),
    ("cache.dtype", lambda v: v in ("float16", "float32"), "float16 or float32"),
    ("cache.storage", lambda v: v in ("full", "topk"), "full or topk"),
    ("cache.top_k", lambda v: v >= 1, "an integer >= 1 (used when cache.storage is topk)"),
    ("cache.chunk_samples", lambda v: v >= 1, "an integer >= 1"),
    ("cache.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("cache.amp", lambda v: v in ("auto", "off", "float16", "bfloat16"), "auto, off, float16 or bfloat16"),
    ("distill.teacher_source", lambda v: v in ("cache", "online"), "cache or online"),
    ("distill.temperature", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("distill.kd_weight", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("distill.ce_weight", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("distill.view_schedule", lambda v: v in ("cycle", "random", "fresh"), "cycle, random or fresh"),
    ("distill.ensemble.rule", lambda v: v in ("probabilities", "logits"), "probabilities or logits"),
    ("distill.ensemble.weights", lambda v: v is None or (all(_finite(w) and w >= 0 for w in v) and sum(v) > 0),
     "null (equal weights) or one finite weight >= 0 per teacher, not all 0"),
    ("mix.mode", lambda v: v in ("none", "mixup", "cutmix", "both"), "none, mixup, cutmix or both"),
    ("mix.mixup_alpha", lambda v: _finite(v) and v > 0, "a finite number > 0 (1: lambda uniform on [0, 1])"),
    ("mix.cutmix_alpha", lambda v: _finite(v) and v > 0, "a finite number > 0 (1: lambda uniform on [0, 1])"),
    ("mix.prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("mix.switch_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("distill.shuffle_chunks", lambda v: v >= 0, "an integer >= 0 (0: full shuffle)"),
    ("distill.topk_tail", lambda v: v in ("none", "summary"), "none or summary"),
    ("distill.epochs", lambda v: v >= 1, "an integer >= 1"),
    ("distill.batch_size", lambda v: v >= 1, "an integer >= 1"),
    *_optim_rules("distill.optimizer"),
    *_recipe_rules("distill"),
    ("search.trials", lambda v: v >= 0, "an integer >= 0"),
    ("search.refine_trials", lambda v: v >= 0, "an integer >= 0"),
    ("search.refine_span", lambda v: _finite(v) and v > 1, "a finite number > 1"),
    ("search.temperature", _log_range, "[lo, hi] with 0 < lo < hi, both finite"),
    ("search.kd_weight", _log_range, "[lo, hi] with 0 < lo < hi, both finite"),
    ("search.epochs", lambda v: v >= 1, "an integer >= 1"),
    ("search.seed", lambda v: v >= 0, "an integer >= 0"),
    ("search.processes", lambda v: v >= 1, "an integer >= 1"),
    ("evaluate.threshold", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
]


class _Invalid:
    """Stands for a value that failed its type check, so later rules skip it (already reported)."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID = _Invalid()


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse and validate the params file; raise one ParamsError naming the file and every bad key with its fix."""
    from pipeline.models import arch_error
    from pipeline.augment import build_augment

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found; pass --params with the path to params.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    problems: list[str] = []
    params = _build(Params, raw, "", problems)
    if params is INVALID:
        raise ParamsError(f"{path}: {problems[0]}")
    for key, ok, expected in _RULES:
        value = _get(params, key)
        if value is not INVALID and not ok(value):
            problems.append(f"{key} is {value!r}; expected {expected}")
    for section in ("teacher", "distill"):
        opt, epochs = _get(params, f"{section}.optimizer"), _get(params, f"{section}.epochs")
        if INVALID in (opt, epochs) or INVALID in (opt.lr_factors, opt.lr_milestones, opt.schedule):
            continue
        if len(opt.lr_factors) != len(opt.lr_milestones):
            problems.append(f"{section}.optimizer.lr_factors needs one factor per entry of "
                            f"{section}.optimizer.lr_milestones ({len(opt.lr_milestones)})")
        if opt.warmup_epochs is not INVALID and opt.warmup_epochs >= max(epochs, 1):
            problems.append(f"{section}.optimizer.warmup_epochs is {opt.warmup_epochs}; it must be < {section}.epochs "
                            f"({epochs}), or the run never reaches its learning rate")
        if opt.schedule == "step" and _milestones_form(opt.lr_milestones):
            problems += _milestone_problems(section, opt.lr_milestones, epochs)
    trials, refine = _get(params, "search.trials"), _get(params, "search.refine_trials")
    if INVALID not in (trials, refine) and trials == 0 and refine > 0:
        problems.append(f"search.refine_trials is {refine} but search.trials is 0; the refinement round draws around "
                        "the first round's best: set search.trials >= 1, or search.refine_trials: 0")
    schedule, source = _get(params, "distill.view_schedule"), _get(params, "distill.teacher_source")
    if schedule == "fresh" and source not in ("online", INVALID):
        problems.append(f"distill.view_schedule is fresh (a new view every epoch) but distill.teacher_source is "
                        f"{source}: a store holds only cache.num_views views; set distill.teacher_source: online, or "
                        "view_schedule: cycle")
    for key, options_key in (("teacher.arch", "teacher.arch_options"), ("distill.student", "distill.student_options")):
        arch, options = _get(params, key), _get(params, options_key)
        error = None if INVALID in (arch, options) else arch_error(arch, options)
        if error:
            problems.append(f"{key}: {error}")
    for key in ("augment", "teacher.augment"):
        spec = _get(params, key)
        for i, step in enumerate(spec if isinstance(spec, list) else []):
            if len(step) != 1 or not isinstance(next(iter(step.values())) or {}, dict):
                problems.append(f"{key}[{i}] is {step!r}; expected one "
                                "{ClassName: {keyword: value}}, e.g. {RandomAffine: {degrees: 10}}")
                continue
            try:  # names and arguments are checked before any work starts
                build_augment([step])
            except KDError as e:
                problems.append(str(e).replace("augment[0]", f"{key}[{i}]", 1))
    if problems:
        if len(problems) == 1:
            raise ParamsError(f"{path}: {problems[0]}")
        raise ParamsError(f"{path}: {len(problems)} problems:\n  " + "\n  ".join(problems))
    return params


def _get(params, key: str):
    """The value at dotted `key`, or INVALID when it or a section above it failed its type check."""
    value = params
    for part in key.split("."):
        if value is INVALID:
            return INVALID
        value = getattr(value, part)
    return value


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, checking keys and types; every problem is appended to `problems`
    (a bad field becomes INVALID). `prefix` is the dotted key so far."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        problems.append(f"{where} must be a mapping of keys to values, got {raw!r}")
        return INVALID
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            problems.append(f"unknown key '{prefix}{key}'{hint}")
    values = {}
    for name in fields:
        if name not in raw:
            problems.append(f"missing key '{prefix}{name}'; add it (see the project's params.yaml)")
            values[name] = INVALID
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], raw[name], prefix + name + ".", problems)
        else:
            try:
                values[name] = _check(hints[name], raw[name], prefix + name)
            except ParamsError as e:
                problems.append(str(e))
                values[name] = INVALID
    return cls(**values)


def _check(hint: Any, value: Any, key: str) -> Any:
    """`value` checked against type `hint` (int, float, str, bool, dict, list[X], Optional/Union); raises
    ParamsError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X], or a choice of types
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:
            try:
                return _check(option, value, key)
            except ParamsError:
                pass
        return _check(options[-1], value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key} is {value!r}; expected a list")
        return [_check(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if hint is str and value is False and key.endswith(".amp"):  # YAML 1.1 reads a bare `off` as false
        return "off"
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ParamsError(f"{key} is {value!r}; expected {hint.__name__}")
    return value
