"""A 100-class data set of real images from MNIST, in the CIFAR-100 python layout, for measuring top-K storage
where classes are many and their similarities are real (CIFAR-100 itself is not on this machine).

Each image is two MNIST digits side by side, each resized to 32 x 16 (antialiased), as a 3 x 32 x 32 image (the
grey value in all three channels); its class is 10 x left digit + right digit, so "37" resembles "38" and "87".
Training pairs draw both digits from MNIST's training images, test pairs from its test images (seeded).

Usage: python studies/scripts/mnist_pairs.py --mnist ../shared/data/mnist --out runs/pairs100 \
           [--train 50000 --test 10000]
then `data: {name: cifar100, root: runs/pairs100}` in params.yaml.
"""

import pickle
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.sources import load_source


def pairs(images: torch.Tensor, labels: np.ndarray, n: int, rng: np.random.Generator):
    left, right = rng.integers(len(images), size=n), rng.integers(len(images), size=n)
    halves = [F.interpolate(images[idx].float(), size=(32, 16), mode="bilinear", antialias=True, align_corners=False)
              for idx in (left, right)]
    grey = torch.cat(halves, dim=3).round().clamp(0, 255).to(torch.uint8)  # (n, 1, 32, 32)
    data = grey.expand(n, 3, 32, 32).reshape(n, 3072).numpy().copy()
    return data, (10 * labels[left] + labels[right]).astype(np.int64)


@click.command()
@click.option("--mnist", "mnist_root", required=True, help="Folder of the four MNIST IDX files.")
@click.option("--out", required=True, help="Folder to write cifar-100-python/ into.")
@click.option("--train", "n_train", default=50000, show_default=True)
@click.option("--test", "n_test", default=10000, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(mnist_root, out, n_train, n_test, seed):
    source = load_source("mnist", mnist_root)
    rng = np.random.default_rng(seed)
    folder = Path(out) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, images, labels, n in (("train", source.train_images, source.train_labels, n_train),
                                    ("test", source.test_images, source.test_labels, n_test)):
        data, fine = pairs(images, labels, n, rng)
        (folder / name).write_bytes(pickle.dumps({"data": data, "fine_labels": fine.tolist()}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"{a}{b}" for a in range(10) for b in range(10)]}))
    print(f"wrote {folder}: {n_train} training and {n_test} test images, 100 classes")


if __name__ == "__main__":
    main()
