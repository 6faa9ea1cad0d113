"""Batched replay on a device against `replay_view` on the CPU, bit for bit (the GPU check of BatchReplay; the
CPU one is tests/test_replay.py). Prints one line per augmentation and exits 1 on any difference, except for
RandomResizedCrop off the CPU: its interpolation's rounding on a GPU may differ from the CPU's, so there the
line states the measured difference (max and mean absolute, share of values that differ) without failing; the
store records where its views were replayed (`replay`) and `kd distill` warns when a run would replay elsewhere.

Usage: python bench/replay_check.py [--device cuda]
"""

import sys

import click
import numpy as np
import torch

from pipeline.data import input_transform
from pipeline.replay import BatchReplay, replay_view
from pipeline.augment import build_augment

SPECS = {
    "cifar crop + flip": [{"RandomCrop": {"size": 32, "padding": 4}}, {"RandomHorizontalFlip": {"p": 0.5}}],
    "flip, uneven crop, vflip": [{"RandomHorizontalFlip": {}},
                                 {"RandomCrop": {"size": [28, 30], "padding": [1, 2, 3, 4]}},
                                 {"RandomVerticalFlip": {"p": 0.3}}],
    "no augmentation": [],
    "RandomResizedCrop 56 + flip (64x64 images)": [{"RandomResizedCrop": {"size": 56}}, {"RandomHorizontalFlip": {}}],
}


@click.command()
@click.option("--device", default="cuda", show_default=True)
@click.option("--views", default=4096, show_default=True)
def main(device, views):
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (views // 4, 3, 32, 32), dtype=torch.uint8, generator=g)
    large = torch.randint(0, 256, (views // 4, 3, 64, 64), dtype=torch.uint8, generator=g)
    samples, view = np.repeat(np.arange(len(small)), 4), np.tile(np.arange(4), len(small))
    failed = False
    for name, spec in SPECS.items():
        resized = "RandomResizedCrop" in name
        images = large if resized else small
        transform = input_transform(build_augment(spec), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
        plan = BatchReplay.of(transform)
        got = plan.apply(images[samples].to(device), plan.draw(5, samples, view, images.shape[1:])).cpu()
        want = torch.stack([replay_view(images[i], transform, 5, int(i), int(v)) for i, v in zip(samples, view)])
        same = torch.equal(got, want)
        failed |= not same and not (resized and torch.device(device).type != "cpu")
        diff = (got - want).abs()
        print(f"{name}: {views} views on {device}: {'bit for bit equal' if same else 'DIFFER'} "
              f"(max abs difference {diff.max().item():.3g}, mean {diff.mean().item():.3g}, "
              f"{100 * (diff > 0).float().mean().item():.3g} % of values differ; normalized units)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
