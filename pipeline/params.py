"""Read and validate `params.yaml`: the one place parameters enter the code.

Every key is required, an unknown key is an error (with the closest valid key as a hint),
and every value is type-checked, so a typo in `dvc exp run -S ...` fails loudly instead of
silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline import KDError
from pipeline.models import ARCHITECTURES

ARCHS = tuple(ARCHITECTURES)


class ParamsError(KDError):
    """params.yaml is missing, malformed, or holds an unknown key or a bad value."""


@dataclasses.dataclass(frozen=True)
class DataParams:
    name: str
    split_seed: int
    val_fraction: float
    test_fraction: float


@dataclasses.dataclass(frozen=True)
class TeacherParams:
    checkpoint: Optional[str]
    arch: str
    epochs: int
    batch_size: int
    lr: float


@dataclasses.dataclass(frozen=True)
class CacheParams:
    num_views: int
    seed: int
    format: str
    dtype: str
    chunk_samples: int
    batch_size: int


@dataclasses.dataclass(frozen=True)
class DistillParams:
    student: str
    teacher_source: str
    temperature: float
    kd_weight: float
    view_schedule: str
    epochs: int
    batch_size: int
    lr: float
    betas: list[float]
    weight_decay: float
    lr_milestones: list[int]
    lr_factors: list[float]
    num_workers: int


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    threshold: float


@dataclasses.dataclass(frozen=True)
class Params:
    seed: int
    device: str
    data: DataParams
    augment: list[dict]
    teacher: TeacherParams
    cache: CacheParams
    distill: DistillParams
    evaluate: EvaluateParams


# Value rules beyond types: (dotted key, predicate, what was expected).
_RULES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("data.name", lambda v: v == "digits", "'digits'"),
    ("data.val_fraction", lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    ("data.test_fraction", lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    ("teacher.arch", lambda v: v in ARCHS, f"one of {', '.join(ARCHS)}"),
    ("teacher.epochs", lambda v: v >= 0, "an integer >= 0"),
    ("teacher.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("teacher.lr", lambda v: v > 0, "a number > 0"),
    ("cache.num_views", lambda v: v >= 1, "an integer >= 1"),
    ("cache.format", lambda v: v in ("zarr", "hdf5"), "zarr or hdf5"),
    ("cache.dtype", lambda v: v in ("float16", "float32"), "float16 or float32"),
    ("cache.chunk_samples", lambda v: v >= 1, "an integer >= 1"),
    ("cache.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("distill.student", lambda v: v in ARCHS, f"one of {', '.join(ARCHS)}"),
    ("distill.teacher_source", lambda v: v in ("cache", "online"), "cache or online"),
    ("distill.temperature", lambda v: v > 0, "a number > 0"),
    ("distill.kd_weight", lambda v: v >= 0, "a number >= 0"),
    ("distill.view_schedule", lambda v: v in ("cycle", "random"), "cycle or random"),
    ("distill.epochs", lambda v: v >= 1, "an integer >= 1"),
    ("distill.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("distill.lr", lambda v: v > 0, "a number > 0"),
    ("distill.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("distill.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("distill.lr_milestones", lambda v: v == sorted(set(v)) and all(m >= 1 for m in v),
     "strictly increasing epochs >= 1"),
    ("distill.num_workers", lambda v: v >= 0, "an integer >= 0"),
    ("evaluate.threshold", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
]


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse and validate the params file; raise ParamsError naming the file, key and fix."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found; pass --params with the path to params.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    params = _build(Params, raw, str(path), "")
    for key, ok, expected in _RULES:
        value = params
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ParamsError(f"{path}: {key} is {value!r}; expected {expected}")
    if len(params.distill.lr_factors) != len(params.distill.lr_milestones):
        raise ParamsError(f"{path}: distill.lr_factors needs one factor per entry of "
                          f"distill.lr_milestones ({len(params.distill.lr_milestones)})")
    if params.data.val_fraction + params.data.test_fraction >= 1:
        raise ParamsError(f"{path}: data.val_fraction + data.test_fraction must be < 1")
    for i, step in enumerate(params.augment):
        if len(step) != 1 or not isinstance(next(iter(step.values())) or {}, dict):
            raise ParamsError(f"{path}: augment[{i}] is {step!r}; expected one "
                              "{ClassName: {keyword: value}}, e.g. {RandomAffine: {degrees: 10}}")
    return params


def _build(cls: type, raw: Any, path: str, prefix: str) -> Any:
    """Build dataclass `cls` from `raw`, checking keys and types; `prefix` is the dotted key so far."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: {where} must be a mapping of keys to values, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ParamsError(f"{path}: unknown key '{prefix}{key}'{hint}")
    values = {}
    for name in fields:
        if name not in raw:
            raise ParamsError(f"{path}: missing key '{prefix}{name}'; add it (see the project's params.yaml)")
        values[name] = _check(hints[name], raw[name], path, prefix + name)
    return cls(**values)


def _check(hint: Any, value: Any, path: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        return None if value is None else _check(args[0], value, path, key)
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{path}: {key} is {value!r}; expected a list")
        return [_check(args[0], v, path, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ParamsError(f"{path}: {key} is {value!r}; expected {hint.__name__}")
    return value
