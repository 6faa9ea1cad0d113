"""A user's teacher, as users have it (`teacher.checkpoint`), loaded into a model that fits the data.

Accepted: this project's checkpoint dict (`models.save_checkpoint`; its own architecture), or weights rebuilt as
`teacher.arch` / `teacher.arch_options`: a `.safetensors` file, or a `.pth` / `.pt` / `.bin` file holding a plain
state dict or a training framework's checkpoint that nests one under `state_dict` or `model` (optimiser state and
the rest ignored). Name prefixes that wrappers add to every key (`module.` from DataParallel/DDP, `model.` from
Lightning-style modules, `_orig_mod.` from torch.compile) are stripped. Nothing is executed: torch files are read
with weights_only=True, safetensors files hold tensors and strings only. Loading is strict: every weight must
fit. The preprocessing the model was trained with (timm's `pretrained_cfg`: input_size, mean, std), when the file
records it, is held against the data's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline import KDError
from pipeline.models import (build_model, check_fits, checkpoint_model, is_checkpoint, is_torchvision,
                             read_torch_file, what_file)

NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")  # where frameworks nest the weights, in this order
PREFIXES = ("module.", "model.", "_orig_mod.")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # Hugging Face hub layout: config.json beside them
SHOWN = 5  # keys named per kind of mismatch
TOLERANCE = 1e-3  # on normalization statistics (0.485 vs 0.4850000083...)


def load_teacher(path: str | Path, arch: str, options: dict | None, data) -> tuple[nn.Module, dict, list[str]]:
    """The teacher at `path` for `data` (a `data.Dataset`), in eval mode on CPU: (model, checkpoint dict in
    `models.save_checkpoint`'s form, messages to show the user once: what was stripped or ignored, warnings).

    This project's checkpoint dict rebuilds its own architecture (`arch`, `options` unused); anything else is a
    state dict rebuilt as `arch` with `options` for the data's channels and classes (a torchvision name keeps
    torchvision's own stem unless `options` sets `stem`). KDError, naming `path`, when the weights predict another
    number of classes than the data has, do not fit `arch` strictly, or were trained on inputs normalized otherwise
    than `data.normalize` says."""
    path = Path(path)
    raw, metadata = _read(path)
    in_channels, image_size = data.image_shape[0], data.image_shape[-1]
    if is_checkpoint(raw):
        check_values(raw["state_dict"], raw["state_dict"], path)
        model = checkpoint_model(raw, path)
        check_fits(raw, path, in_channels, data.num_classes)
        return model, raw, []
    state_dict, where = find_state_dict(raw, path)
    notes = []
    if where:
        others = sorted(k for k in raw if k != where)
        ignored = f"; ignored: {', '.join(others)}" if others else ""
        notes.append(f"{path}: weights taken from key {where!r}{ignored}")
    options = dict(options or {})
    if is_torchvision(arch):
        options.setdefault("stem", "torchvision")
    try:
        model = build_model(arch, in_channels, data.num_classes, options, image_size)
    except KDError as e:
        raise KDError(f"{path}: teacher.arch: {e}") from None
    state_dict, stripped = strip_prefixes(state_dict, list(model.state_dict()))
    if stripped:
        notes.append(f"{path}: stripped the prefix {stripped!r} from all {len(state_dict)} weight names")
    check_classes(model, state_dict, path, data.num_classes)
    load_strict(model, state_dict, path, arch, options)
    check_values(state_dict, model.state_dict(), path)
    cfg, source = pretrained_cfg(path, raw, metadata)
    notes += check_preprocessing(cfg, source, path, data)
    ckpt = {"arch": arch, "options": options, "image_size": image_size, "in_channels": in_channels,
            "num_classes": data.num_classes, "state_dict": model.state_dict()}
    return model.eval(), ckpt, notes


def _read(path: Path) -> tuple[object, dict]:
    """(what the file holds, its safetensors metadata or {}): a safetensors file by its suffix, else torch's."""
    if path.suffix != ".safetensors":
        return read_torch_file(path), {}
    if not path.is_file():
        raise KDError(f"{path}: {what_file(path)}" if path.exists() else f"{path}: checkpoint not found")
    kind = what_file(path)
    if kind:
        raise KDError(f"{path}: {kind}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise KDError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def find_state_dict(obj, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """(the state dict in `obj`, the key it was nested under or None): `obj` itself, or the first of NESTED_KEYS
    holding one."""
    if _is_state_dict(obj):
        return obj, None
    for key in NESTED_KEYS if isinstance(obj, dict) else ():
        if _is_state_dict(obj.get(key)):
            return obj[key], key
    found = f"a dict with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, dict) else type(obj).__name__
    raise KDError(f"{path}: no weights found, {found}: a checkpoint must be a dict with keys "
                  "['arch', 'in_channels', 'num_classes', 'state_dict'] (this project's), a state dict (weight name -> "
                  f"tensor), or a dict nesting one under {' or '.join(map(repr, NESTED_KEYS))}")


def strip_prefixes(state_dict: dict, model_keys: list[str]) -> tuple[dict, str]:
    """`state_dict` with each of PREFIXES that starts every name removed, repeatedly (`module._orig_mod.`), unless
    the model's own names all start with it too; and what was removed ('' if nothing)."""
    stripped = ""
    while True:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state_dict)
                       and not all(k.startswith(p) for k in model_keys)), None)
        if prefix is None:
            return state_dict, stripped
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
        stripped += prefix


def _first_layer(model: nn.Module, kinds) -> str | None:
    """Name of the first module of one of `kinds`, or None."""
    return next((name for name, m in model.named_modules() if isinstance(m, kinds)), None)


def classifier_key(model: nn.Module) -> str | None:
    """The state-dict name of the classifier's weight (its first dimension is the number of classes): timm's
    `get_classifier()`, else the last Linear layer, else the last Conv2d (SqueezeNet); None if there is none."""
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)] or \
                 [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        head = layers[-1] if layers else None
    return next((f"{name}.weight" for name, m in model.named_modules() if m is head and head is not None), None)


def check_classes(model: nn.Module, state_dict: dict, path: Path, num_classes: int) -> None:
    """Refuse weights whose classifier predicts another number of classes than the data has."""
    key = classifier_key(model)
    weight = state_dict.get(key) if key else None
    if weight is not None and weight.ndim >= 1 and weight.shape[0] != num_classes:
        raise KDError(f"{path}: the teacher predicts {weight.shape[0]} classes (its classifier {key} has shape "
                      f"{tuple(weight.shape)}); the dataset has {num_classes} classes. Bring a teacher trained on the "
                      "data's classes, in the data's order (an image folder's are its sorted folder names)")


def check_values(state_dict: dict, own: dict, path: Path) -> None:
    """Refuse weights that are integers where the model holds floating point (`own`: the model's state dict; a
    cast would use them silently: quantised or wrongly exported weights), or that hold NaN or infinite values (a
    teacher that diverged: every logit it gives would be NaN)."""
    integral = [k for k, v in state_dict.items() if k in own and own[k].is_floating_point()
                and not v.is_floating_point()]
    if integral:
        dtypes = sorted({str(state_dict[k].dtype).removeprefix("torch.") for k in integral})
        raise KDError(f"{path}: {len(integral)} weights are {'/'.join(dtypes)}, not floating point ({_names(integral)}); "
                      "expected the model's float weights: export them unquantised, as float32 (or float16/bfloat16)")
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise KDError(f"{path}: {len(broken)} weights hold NaN or infinite values ({_names(broken)}); the teacher is "
                      "broken (its training diverged?) and every logit it gave would be NaN: bring a teacher whose "
                      "weights are finite")


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")


def load_strict(model: nn.Module, state_dict: dict, path: Path, arch: str, options: dict) -> None:
    """`model.load_state_dict(state_dict, strict=True)`, or a KDError naming the first missing and unexpected
    weights and those of another shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        model.load_state_dict(state_dict, strict=True)
        return
    problems = [f"{len(missing)} missing ({_names(missing)})" if missing else "",
                f"{len(unexpected)} unexpected ({_names(unexpected)})" if unexpected else "",
                f"{len(shapes)} of another shape (" + "; ".join(
                    f"{k}: file {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}" for k in shapes[:SHOWN])
                + ("; ..." if len(shapes) > SHOWN else "") + ")" if shapes else ""]
    hints = ["set teacher.arch (and teacher.arch_options) to the architecture the weights were saved from"]
    stem = _first_layer(model, nn.Conv2d)
    if stem and f"{stem}.weight" in shapes:
        file_shape, model_shape = state_dict[f"{stem}.weight"].shape, own[f"{stem}.weight"].shape
        if file_shape[1] != model_shape[1]:
            hints.append(f"the weights' first conv takes {file_shape[1]} input channels, the data's images have "
                         f"{model_shape[1]}")
        elif is_torchvision(arch):
            hints.append("the first conv differs: teacher.arch_options `stem` chooses a torchvision model's stem, "
                         "torchvision (its own; the default for weights) or small (3x3 stride 1, no max-pool: the "
                         "usual change for small images)")
    raise KDError(f"{path}: the weights do not fit {arch!r} with options {options}: "
                  + ", ".join(filter(None, problems)) + "; " + "; ".join(hints))


def pretrained_cfg(path: Path, raw, metadata: dict) -> tuple[dict | None, str]:
    """(timm's `pretrained_cfg` recorded with the weights, where it was found), or (None, ''). Looked for in the
    safetensors metadata (key `pretrained_cfg`, a JSON string), in a torch checkpoint dict (key `pretrained_cfg`),
    and in `config.json` beside a Hugging Face hub file (`model.safetensors`, `pytorch_model.bin`)."""
    if "pretrained_cfg" in metadata:
        try:
            return json.loads(metadata["pretrained_cfg"]), "its safetensors metadata"
        except json.JSONDecodeError as e:
            raise KDError(f"{path}: safetensors metadata 'pretrained_cfg' is not JSON ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("pretrained_cfg"), dict):
        return raw["pretrained_cfg"], "its key 'pretrained_cfg'"
    config = path.parent / "config.json"
    if path.name in HF_WEIGHTS and config.is_file():
        try:
            cfg = json.loads(config.read_text()).get("pretrained_cfg")
        except (json.JSONDecodeError, AttributeError) as e:
            raise KDError(f"{config}: not a JSON object ({e})") from None
        return (cfg, f"{config}") if isinstance(cfg, dict) else (None, "")
    return None, ""


def check_preprocessing(cfg: dict | None, source: str, path: Path, data) -> list[str]:
    """Hold the `pretrained_cfg` the teacher was trained with against the data (a `data.Dataset`). Another
    normalization is a KDError: the logits would be wrong and the cache would keep them for every later run. Another
    image size is a warning (returned): convolutional nets run at other sizes, usually a little less accurate
    (timm itself evaluates many at a `test_input_size`), and a net that cannot is refused by its forward pass."""
    if not cfg:
        return []
    channels, height, width = data.image_shape
    warnings = []
    sizes = [tuple(cfg[k][-2:]) for k in ("input_size", "test_input_size")
             if isinstance(cfg.get(k), (list, tuple)) and len(cfg[k]) == 3]
    if sizes and (height, width) not in sizes:
        trained = " or ".join(f"{h}x{w}" for h, w in sizes)
        warnings.append(f"Warning: {path}: the teacher was trained on {trained} images ({source}: input_size); the "
                        f"data's are {height}x{width}. It runs, but its accuracy usually drops away from the training "
                        f"size (for an image folder, data.image_size: {sizes[0][0]} resizes them)")
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is not None and std is not None:
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        if len(mean) != channels or any(abs(a - b) > TOLERANCE for a, b in zip(mean + std, data.mean + data.std)):
            raise KDError(f"{path}: the teacher was trained on inputs normalized with mean {_round(mean)}, std "
                          f"{_round(std)} ({source}); data.normalize gives mean {_round(data.mean)}, std "
                          f"{_round(data.std)}. Its logits on inputs normalized otherwise are off, and the cache would "
                          f"keep them: set data.normalize: {{mean: {_round(mean)}, std: {_round(std)}}}")
    return warnings


def _round(values) -> list[float]:
    return [round(float(v), 4) for v in values]
