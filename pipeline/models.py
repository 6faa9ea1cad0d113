"""Teacher and student architectures, and their checkpoints.

Every model maps images (N, C, H, W) to raw logits (N, num_classes). `ARCHITECTURES` maps each of our
names to a constructor `(in_channels, num_classes, **options)`; any torchvision classification model
name is accepted too, and any timm model as `timm:<name>` (timm is an optional extra). A checkpoint is a plain
dict `{"arch", "options", "image_size", "in_channels", "num_classes", "state_dict"}`, loadable with
`weights_only=True`, so a model can be rebuilt from the file alone (`pipeline.checkpoints` reads users' weights)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline import KDError
from pipeline.cifar_models import CIFAR_ARCHITECTURES


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class CNN(nn.Module):
    """Teacher-sized CNN: three 3x3 conv blocks (64-128-256), one max-pool, global average pool."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(_conv(in_channels, 64), _conv(64, 128), nn.MaxPool2d(2), _conv(128, 256),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyCNN(nn.Module):
    """Student CNN (~1.9k parameters): two small conv blocks (8-16 channels), max-pool, 2x2 average pool."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(_conv(in_channels, 8), nn.MaxPool2d(2), _conv(8, 16),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Fully connected net on the flattened image: dropout(input_dropout), then per hidden size
    Linear -> ReLU -> dropout(dropout), then Linear to the logits. Hinton et al. 2015's MNIST teacher is
    hidden_sizes=[1200, 1200], dropout=0.5, input_dropout=0.2; their student is hidden_sizes=[800, 800].
    Dropout layers are there even at p=0, so parameter names depend on hidden_sizes only."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, hidden_sizes: Sequence[int] = (64,),
                 dropout: float = 0.0, input_dropout: float = 0.0):
        super().__init__()
        layers, width = [nn.Flatten(), nn.Dropout(input_dropout)], in_channels * image_size * image_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


STEMS = ("auto", "small", "torchvision")


def torchvision_model(name: str, in_channels: int, num_classes: int, image_size: int | None = None,
                      stem: str = "auto", **options) -> nn.Module:
    """`torchvision.models.get_model(name, weights=None, num_classes=..., **options)`: freshly initialised,
    never downloaded, with its stem fitted to the input by `_adapt_stem`. `stem`: `auto` makes it the small-image
    stem when `image_size` is None or <= 64, `small` always, `torchvision` never (torchvision's own geometry, as
    in a model saved from torchvision; only the input channels are fitted)."""
    import torchvision

    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
    small = stem == "small" or (stem == "auto" and (image_size is None or image_size <= 64))
    return _adapt_stem(model, in_channels, small=small)


TIMM_PREFIX = "timm:"
# create_model arguments the pipeline sets, or that would fetch or read weights: never options.
_TIMM_RESERVED = ("in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                  "cache_dir")


def import_timm():
    """The timm module, or a KDError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise KDError("timm is not installed; timm models (`timm:<name>`) need it: pip install -e '.[timm]' in "
                      "this project (make install does), or pip install timm") from None
    return timm


def timm_model(name: str, in_channels: int, num_classes: int, **options) -> nn.Module:
    """`timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **options)`: freshly initialised,
    never downloaded. Options are timm's (e.g. `img_size` for a ViT, `drop_rate`)."""
    return import_timm().create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                      **options)


def is_torchvision(arch: str) -> bool:
    """True when `arch` is built by `torchvision_model` (resnet18 or any other torchvision name)."""
    constructor = _constructor(arch)
    return isinstance(constructor, functools.partial) and constructor.func is torchvision_model


def _adapt_stem(model: nn.Module, in_channels: int, small: bool) -> nn.Module:
    """Fit a torchvision model's stem (its first Conv2d) to `in_channels`. For small images (the CIFAR
    recipe) the stem also becomes a 3x3 stride-1 conv and a MaxPool2d right after it (ResNet's `maxpool`,
    before any other conv) becomes Identity: the stem no longer downsamples. The stem is re-initialised only
    if it changes, so at in_channels 3 and image_size > 64 the model is torchvision's own."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    first = next(i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Conv2d))
    name, conv = layers[first]
    geometry = ((3, 3), (1, 1), (1, 1)) if small else (conv.kernel_size, conv.stride, conv.padding)
    if conv.in_channels != in_channels or geometry != (conv.kernel_size, conv.stride, conv.padding):
        model.set_submodule(name, nn.Conv2d(in_channels, conv.out_channels, *geometry, bias=conv.bias is not None))
    if small and first + 1 < len(layers) and isinstance(layers[first + 1][1], nn.MaxPool2d):
        model.set_submodule(layers[first + 1][0], nn.Identity())
    return model


ARCHITECTURES = {
    "cnn": CNN,
    "tiny_cnn": TinyCNN,
    "mlp": MLP,
    "resnet18": functools.partial(torchvision_model, "resnet18"),  # as any torchvision name; listed as a default
    **CIFAR_ARCHITECTURES,
}

# build_model's own arguments: never options.
_RESERVED = ("in_channels", "num_classes", "image_size", "weights")


@functools.cache
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _constructor(arch: str):
    """ARCHITECTURES[arch], or the timm path for `timm:<name>` (KDError when timm is not installed), or the
    torchvision path for a torchvision classification name, or None."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):]
        return functools.partial(timm_model, name) if import_timm().is_model(name) else None
    return functools.partial(torchvision_model, arch) if arch in _torchvision_names() else None


def _option_names(constructor) -> list[str] | None:
    """The options a constructor takes beyond in_channels, num_classes, image_size; None if it takes any."""
    params = inspect.signature(constructor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [name for name in params if name not in _RESERVED]


def arch_error(arch: str, options: dict | None) -> str | None:
    """None when `arch` names an architecture that takes these option keys, else why not. Builds nothing:
    for torchvision and timm names only the name is checked (torchvision and timm judge their options)."""
    options = {} if options is None else options
    if not isinstance(options, dict):
        return f"options for architecture {arch!r} must be a mapping of option name to value, got {options!r}"
    try:
        constructor = _constructor(arch)
    except KDError as e:  # timm:<name> without timm installed
        return f"architecture {arch!r}: {e}"
    if constructor is None and arch.startswith(TIMM_PREFIX):
        return (f"unknown timm model {arch[len(TIMM_PREFIX):]!r} (architecture {arch!r}); "
                "timm.list_models() lists the names")
    if constructor is None:
        return (f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}, "
                "any torchvision classification model name (torchvision.models.list_models()), "
                "or timm:<name> for a timm model")
    allowed = _option_names(constructor)
    reserved = _RESERVED + (_TIMM_RESERVED if arch.startswith(TIMM_PREFIX) else ())
    unknown = sorted(key for key in options if key in reserved or (allowed is not None and key not in allowed))
    if not unknown:
        return None
    library = "timm" if arch.startswith(TIMM_PREFIX) else "torchvision"
    described = (f"those {library} accepts, but {', '.join(reserved)}" if allowed is None
                 else ", ".join(allowed) or "none")
    return f"architecture {arch!r} has no option {', '.join(map(repr, unknown))}; its options are: {described}"


def build_model(arch: str, in_channels: int, num_classes: int, options: dict | None = None,
                image_size: int | None = None, seed: int | None = None) -> nn.Module:
    """A fresh `arch` model for (N, in_channels, image_size, image_size) inputs and `num_classes` logits.

    `options` are the architecture's keyword options (see `arch_error`). `mlp` needs `image_size`; a
    torchvision model keeps its own stem only when `image_size` is given and > 64 (None keeps the small-image
    stem every `resnet18` had before image sizes were recorded). With `seed`, the initial weights are a
    function of the seed alone (the global RNG is untouched)."""
    error = arch_error(arch, options)
    if error:
        raise KDError(error)
    constructor, kwargs = _constructor(arch), dict(options or {})
    params = inspect.signature(constructor).parameters
    if "image_size" in params:
        if image_size is None and params["image_size"].default is inspect.Parameter.empty:
            raise KDError(f"architecture {arch!r} needs image_size (the input's side length)")
        kwargs["image_size"] = image_size
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return constructor(in_channels, num_classes, **kwargs)
        except (TypeError, ValueError, AssertionError) as e:  # a bad option value, or one torchvision/timm rejects
            raise KDError(f"architecture {arch!r} cannot be built with options {options or {}}: {e}") from None


def save_checkpoint(model: nn.Module, arch: str, in_channels: int, num_classes: int, path: str | Path,
                    options: dict | None = None, image_size: int | None = None, ema: float | None = None,
                    made_with: dict | None = None) -> None:
    """Write the checkpoint atomically (temp file, then rename), so a crash never leaves a partial file.
    `arch`, `options` and `image_size` are those the model was built with, so `load_checkpoint` can rebuild it.
    `ema`: the weights are an exponential moving average with this decay (`pipeline.step`), recorded as
    `weights: {"ema": decay}`. `made_with`: the inputs that made the model, as paths (`live_dir`: its training
    curves; `stores`, `teachers`: what it was distilled from), so `kd evaluate` finds them (`made_with`).
    Tensors are saved contiguous (a channels-last run's weights load anywhere)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    extra = {} if ema is None else {"weights": {"ema": ema}}
    if made_with:
        extra["made_with"] = {k: v for k, v in made_with.items() if v}
    torch.save({"arch": arch, "options": dict(options or {}), "image_size": image_size, "in_channels": in_channels,
                "num_classes": num_classes, "state_dict": state, **extra}, tmp)
    tmp.replace(path)


def made_with(ckpt: dict, key: str):
    """What checkpoint `ckpt` records of the inputs that made it (`save_checkpoint`'s `made_with`): the value
    of `key` (`live_dir`, `stores`, `teachers`), or None when it records none (older checkpoints, users' own)."""
    recorded = ckpt.get("made_with")
    return recorded.get(key) if isinstance(recorded, dict) else None


CHECKPOINT_KEYS = ("arch", "in_channels", "num_classes", "state_dict")


def read_torch_file(path: str | Path):
    """`torch.load(path, weights_only=True)` on CPU: tensors and plain containers only, never running code. A file
    that is missing, unreadable, or needs pickled Python objects (a saved nn.Module, argparse.Namespace, os.system,
    ...) is a KDError naming it and saying what the file is (`what_file`); it never advises unsafe loading."""
    path = Path(path)
    if not path.is_file():
        raise KDError(f"{path}: {what_file(path)}" if path.exists() else f"{path}: checkpoint not found")
    kind = what_file(path)
    if kind:
        raise KDError(f"{path}: {kind}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        needs = re.search(r"GLOBAL ([\w.]+)", str(e))
        if needs:
            raise KDError(f"{path}: refused: loading it would run Python code (it pickles {needs[1]}); only tensors "
                          "and plain containers are read (torch.load weights_only=True). Re-save just the weights, "
                          "where you trust the file: torch.save(model.state_dict(), 'teacher.pt'), or "
                          "safetensors.torch.save_file(model.state_dict(), 'teacher.safetensors')") from None
        raise KDError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_torch_reason(e)}); expected "
                      "a file written by torch.save, or a .safetensors file") from None


def _torch_reason(e: Exception) -> str:
    """torch.load's error without its advice (re-running with weights_only=False would run the file's code)."""
    advice = ("weights_only", "Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not any(a in line for a in advice)]
    return " ".join(lines).removeprefix("WeightsUnpickler error: ") or "no detail"


def what_file(path: Path) -> str | None:
    """Why `path` cannot be read as its suffix says (.safetensors: safetensors; any other: torch.save's), from what
    it is, or None when it may be: a folder (naming the weight file inside a Hugging Face folder), an empty file, a
    safetensors file under another suffix or a torch file under .safetensors, a Git LFS pointer, a text file."""
    if path.is_dir():
        inside = [name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        hint = f"point at {path / inside[0]}" if inside else "point at the weights file inside it"
        return f"is a folder, not a checkpoint file; {hint}"
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "is empty (0 bytes); expected a checkpoint written by torch.save or safetensors (was a copy cut short?)"
    header = int.from_bytes(head[:8], "little")  # safetensors: the JSON header's length, then the header
    if len(head) > 8 and head[8:9] == b"{" and 8 + header <= path.stat().st_size:
        return None if path.suffix == ".safetensors" else (
            f"is a safetensors file named {path.suffix or 'without a suffix'}; rename it to "
            f"{path.with_suffix('.safetensors').name} (the suffix says how it is read)")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or head[:1] == b"\x80":  # torch's zip format, or a legacy pickle
        return None if path.suffix != ".safetensors" else (
            f"is a PyTorch checkpoint (torch.save) named .safetensors; rename it to {path.with_suffix('.pt').name}")
    if head.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer, not the weights; fetch them with `git lfs pull`"
    if b"\0" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return (f"is a text file (it starts {text.strip()[:40]!r}), not a checkpoint; expected a file written by "
                "torch.save or safetensors")
    return None


def is_checkpoint(obj) -> bool:
    """True when `obj` is this project's checkpoint dict (holds every key of CHECKPOINT_KEYS)."""
    return isinstance(obj, dict) and set(CHECKPOINT_KEYS) <= set(obj)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model saved at `path`, in eval mode on CPU; return (model, checkpoint dict).
    Checkpoints from before options and image sizes were recorded load as options {} and image_size None."""
    ckpt = read_torch_file(path)
    if not is_checkpoint(ckpt):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise KDError(f"{path}: checkpoint must be a dict with keys {sorted(CHECKPOINT_KEYS)}, found {found}; "
                      "save it as {'arch': ..., 'in_channels': ..., 'num_classes': ..., 'state_dict': model.state_dict()}")
    return checkpoint_model(ckpt, path), ckpt


def checkpoint_model(ckpt: dict, path: str | Path) -> nn.Module:
    """The model a checkpoint dict (`is_checkpoint`) describes, with its weights, in eval mode on CPU; errors name
    `path`."""
    try:
        model = build_model(ckpt["arch"], ckpt["in_channels"], ckpt["num_classes"], ckpt.get("options") or {},
                            ckpt.get("image_size"))
    except KDError as e:
        raise KDError(f"{path}: {e}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise KDError(f"{path}: state_dict does not fit architecture {ckpt['arch']!r}: {e}") from None
    return model.eval()


def check_fits(ckpt: dict, path: str | Path, in_channels: int, num_classes: int, role: str = "teacher") -> None:
    """Refuse a checkpoint whose model takes another number of channels or predicts another number of classes than
    the data has, naming both numbers: its logits could not be the data's classes (a cache of them would fail
    mid-run, an accuracy over them would be silently meaningless)."""
    if (ckpt["in_channels"], ckpt["num_classes"]) != (in_channels, num_classes):
        raise KDError(f"{path}: the {role} ({ckpt['arch']!r}) takes {ckpt['in_channels']} channels and predicts "
                      f"{ckpt['num_classes']} classes; the data has {in_channels} and {num_classes}: use a {role} "
                      "made for this data (the same classes, in the same order), or set data.name / data.root to "
                      f"the data it was made for")


def load_for(path: str | Path, data, role: str = "teacher") -> tuple[nn.Module, dict]:
    """`load_checkpoint(path)`, refused (`check_fits`) unless the model fits `data` (a `data.Dataset`)."""
    model, ckpt = load_checkpoint(path)
    check_fits(ckpt, path, data.image_shape[0], data.num_classes, role)
    return model, ckpt


def check_input_shape(model: nn.Module, ckpt: dict, path: str | Path, image_shape: tuple[int, int, int]) -> None:
    """Refuse a checkpoint's `model` that cannot take the data's images, (C, H, W) = `image_shape`: one forward of
    a zero batch of one image (eval mode, no gradients), its error turned into a KDError naming the checkpoint,
    the image size it records (if any) and the data's. A model built for another size (an MLP, a flattening head)
    would otherwise fail with a matrix-shape error at its first real batch."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *image_shape))
    except (RuntimeError, ValueError) as e:
        size = ckpt.get("image_size")
        made = f"was made for {size}x{size} images" if size else "records no image size (key 'image_size')"
        data = "x".join(map(str, image_shape))
        fix = f"set data.image_size: {size}, or " if size else ""
        reason = f"{type(e).__name__}: {str(e).rstrip('.')}"
        raise KDError(f"{path}: teacher {ckpt['arch']!r} {made} and cannot take the data's images, {data} "
                      f"(C x H x W): {reason}; {fix}use a checkpoint trained on images of this size") from None


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state dict (sorted names, shapes, dtypes, values): names the teacher behind a store."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KDError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    return torch.device(name)
