"""The training augmentation: `params.yaml`'s `augment` list built as torchvision.transforms.v2 steps
(`build_augment`), and the check that a transform fits the data's images (`check_augment`). Its own module, below
params, data and replay, which all use it (params validates `augment` with it, without importing the replay engine).
"""

from __future__ import annotations

import torch

from pipeline import KDError

# Deterministic preprocessing: evaluation never applies `augment`, so these would make training and test
# inputs differ. They belong in data.image_size / data.normalize.
DETERMINISTIC = {"Resize", "CenterCrop", "Normalize", "ToDtype", "ConvertImageDtype", "Grayscale", "RGB", "Pad",
                 "FiveCrop", "TenCrop", "ToImage", "ToPureTensor", "PILToTensor", "ToPILImage", "Lambda", "Identity",
                 "LinearTransformation"}


def build_augment(spec: list[dict]):
    """`[{ClassName: {kw: value}}, ...]` -> `v2.Compose` of those torchvision.transforms.v2 classes.

    Only random transforms: deterministic preprocessing (Resize, Normalize, ...) is refused, since evaluation
    never applies `augment`.
    """
    from torchvision.transforms import v2

    steps = []
    for i, step in enumerate(spec):
        (name, kwargs), = step.items()
        cls = getattr(v2, name, None)
        if not (isinstance(cls, type) and issubclass(cls, v2.Transform)):
            raise KDError(f"augment[{i}]: {name!r} is not a torchvision.transforms.v2 transform "
                          "(names are case-sensitive, e.g. RandomAffine, RandomCrop, ColorJitter)")
        if name in DETERMINISTIC:
            raise KDError(f"augment[{i}]: {name} is deterministic preprocessing, which evaluation never applies "
                          "(test inputs would differ from training ones); use data.image_size and data.normalize "
                          "for preprocessing and keep augment to random transforms")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (kwargs or {}).items()}
        try:
            steps.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise KDError(f"augment[{i}]: {name}({kwargs}) failed: {e}") from None
    return v2.Compose(steps) if steps else v2.Identity()


def check_augment(transform, image: torch.Tensor) -> None:
    """Refuse, before any view is replayed, a training `transform` (an `input_transform`) that cannot augment
    `image` (uint8 (C, H, W), one of the data's), e.g. a RandomCrop larger than the images: the image goes through
    the transform once, step by step, and a failing step is a KDError naming `augment[i]`, the transform and the
    image size. torch's global generator is left as it was."""
    from torchvision.transforms import v2

    parts = list(getattr(transform, "transforms", ()))
    named = [("augment", transform)]  # anything else than an input_transform: one step
    if len(parts) == 3 and isinstance(parts[1], v2.Compose):
        named = [("the conversion to float", parts[0]), *((f"augment[{i}]", step) for i, step in
                                                          enumerate(parts[1].transforms)), ("data.normalize", parts[2])]
    size = "x".join(map(str, image.shape))
    x = image
    with torch.random.fork_rng(devices=[]):
        for where, step in named:
            try:
                x = step(x)
            except Exception as e:  # torchvision raises ValueError, TypeError, RuntimeError for misfits
                reason = f"{type(e).__name__}: {str(e).rstrip('.')}"
                raise KDError(f"{where}: {step} cannot be applied to the training images, of size {size} (C x H x W): "
                              f"{reason}; fit the step to that size (in augment, or teacher.augment for the teacher's "
                              "own training), or resize the images with data.image_size") from None
