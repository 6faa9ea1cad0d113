"""Teacher and student architectures, and their checkpoints.

Every model maps images (N, C, H, W) to raw logits (N, num_classes). A checkpoint is a plain dict
`{"arch", "num_classes", "in_channels", "state_dict"}`, loadable with `weights_only=True`, so a
model can be rebuilt from the file alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from pipeline import KDError


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
    """Student MLP: pooled to 8x8, one hidden layer of 64 units."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(in_channels * 64, 64), nn.ReLU(),
                                 nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with a CIFAR-style stem (3x3 conv, no max-pool) for small images."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


ARCHITECTURES = {"cnn": CNN, "tiny_cnn": TinyCNN, "mlp": MLP, "resnet18": _resnet18}


def build_model(arch: str, in_channels: int, num_classes: int, seed: int | None = None) -> nn.Module:
    """A fresh model; with `seed`, its initial weights are a function of the seed (global RNG untouched)."""
    if arch not in ARCHITECTURES:
        raise KDError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if seed is None:
        return ARCHITECTURES[arch](in_channels, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHITECTURES[arch](in_channels, num_classes)


def save_checkpoint(model: nn.Module, arch: str, in_channels: int, num_classes: int, path: str | Path) -> None:
    """Write the checkpoint atomically (temp file, then rename), so a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    torch.save({"arch": arch, "in_channels": in_channels, "num_classes": num_classes, "state_dict": state}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model saved at `path`, in eval mode on CPU; return (model, checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise KDError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise KDError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    expected = {"arch", "in_channels", "num_classes", "state_dict"}
    if not isinstance(ckpt, dict) or not expected <= set(ckpt):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise KDError(f"{path}: checkpoint must be a dict with keys {sorted(expected)}, found {found}; "
                      "save it as {'arch': ..., 'in_channels': ..., 'num_classes': ..., 'state_dict': model.state_dict()}")
    model = build_model(ckpt["arch"], ckpt["in_channels"], ckpt["num_classes"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise KDError(f"{path}: state_dict does not fit architecture {ckpt['arch']!r}: {e}") from None
    return model.eval(), ckpt


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
