"""Readers of the raw image data sets, one function per format; nothing is ever downloaded.

`load_source(name, root)` returns a `Source`: uint8 images (N, C, H, W) with C = 1 (grayscale) or
3 (RGB), never floats, and int64 labels. An image folder is never loaded whole: it comes back as
`ImageFiles`, decoded one file per `__getitem__`. `fingerprint_images` names image content and order.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import re
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import KDError

DIGIT_CLASSES = [str(c) for c in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_ACCEPTED = f"expected the four IDX files {', '.join(IDX_FILES)}, each raw or gzipped (.gz)"
CIFAR = {  # name: (folder, tar.gz, train members, test member, meta member, labels key, names key, classes)
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", "batches.meta", "labels", "label_names", 10),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], "test", "meta",
                 "fine_labels", "fine_label_names", 100),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")  # what torchvision.io.decode_image reads (no BMP)
LAYOUTS = {
    "mnist": "the four IDX files " + ", ".join(IDX_FILES) + " (each raw or gzipped, .gz)",
    "cifar10": "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or cifar-10-python.tar.gz",
    "cifar100": "cifar-100-python/ (train, test, meta) or cifar-100-python.tar.gz",
    "imagefolder": f"train/<class>/<images> and optionally test/<class>/<images> ({', '.join(IMAGE_SUFFIXES)})",
}
LAYOUTS["fashion_mnist"] = LAYOUTS["mnist"]
SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder")


@dataclass(frozen=True)
class Source:
    train_images: torch.Tensor | ImageFiles  # uint8 (N, C, H, W), or files decoded lazily to uint8 (3, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: torch.Tensor | ImageFiles | None  # None when the source has no test split
    test_labels: np.ndarray | None
    classes: list[str]  # class names, index = label


def load_source(name: str, root: str | Path, image_size: int | None = None) -> Source:
    """Read data set `name` (one of SOURCES) from `root` (unused for digits), read-only.

    With `image_size`, every image is resized (shorter side to `image_size`, antialiased) and
    center-cropped to image_size x image_size: tensor sources at once, image folders per file.
    """
    if name not in SOURCES:
        raise KDError(f"unknown data source {name!r}; expected one of {', '.join(SOURCES)}")
    root = Path(root)
    if name != "digits" and not root.exists():
        raise KDError(f"{root}: not found; the {name} source expects there {LAYOUTS[name]}")
    if name == "imagefolder":
        return load_imagefolder(root, image_size)  # resized lazily, per file
    if name == "digits":
        source = load_digits()
    elif name in ("mnist", "fashion_mnist"):
        source = load_idx(root, DIGIT_CLASSES if name == "mnist" else FASHION_CLASSES)
    else:
        source = load_cifar(root, name)
    if image_size is None:
        return source
    train, test = [_resize_crop(x, image_size) if x is not None else None
                   for x in (source.train_images, source.test_images)]
    return Source(train, source.train_labels, test, source.test_labels, source.classes)


def load_digits() -> Source:
    """scikit-learn's 8x8 digits (ships with it): (1797, 1, 8, 8), values 0..16 scaled to 0..255, no test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[:, None]
    return Source(torch.from_numpy(images), digits.target.astype(np.int64), None, None, DIGIT_CLASSES)


def load_idx(root: Path, classes: list[str]) -> Source:
    """MNIST-style IDX files in `root` (raw preferred over .gz): images (N, 1, H, W), labels < 10."""
    splits = []
    for images_name, labels_name in (IDX_FILES[:2], IDX_FILES[2:]):
        images, images_path = _read_idx(root, images_name, 0x803, "IDX images: unsigned byte, 3 dimensions")
        labels, labels_path = _read_idx(root, labels_name, 0x801, "IDX labels: unsigned byte, 1 dimension")
        if len(images) != len(labels):
            raise KDError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                          "expected one label per image")
        if len(labels) and labels.max() >= len(classes):
            raise KDError(f"{labels_path}: label {labels.max()} found, expected labels 0..{len(classes) - 1}")
        splits += [torch.from_numpy(images[:, None].copy()), labels.astype(np.int64)]
    return Source(*splits, classes=classes)


def _read_idx(root: Path, name: str, magic: int, kind: str) -> tuple[np.ndarray, Path]:
    """One IDX file as a uint8 array shaped by its big-endian header, after checking magic and size."""
    path = next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)
    if path is None:
        raise KDError(f"{root / name}: not found (nor {name}.gz); {IDX_ACCEPTED}")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise KDError(f"{path}: cannot read or gunzip ({e}); {IDX_ACCEPTED}") from e
    header = 4 + 4 * (magic & 0xFF)  # the magic's last byte is the number of dimensions
    found = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and found != magic:
        raise KDError(f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} ({kind}); {IDX_ACCEPTED}")
    if len(data) < header:
        raise KDError(f"{path}: truncated: {len(data)} bytes, shorter than the {header}-byte header; {IDX_ACCEPTED}")
    dims = [int.from_bytes(data[i:i + 4], "big") for i in range(4, header, 4)]
    size, expected = len(data) - header, math.prod(dims)
    if size != expected:
        raise KDError(f"{path}: {'truncated' if size < expected else 'too long'}: header says "
                      f"{'x'.join(map(str, dims))} = {expected} bytes, file has {size} after the {header}-byte header; "
                      f"{IDX_ACCEPTED}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims), path


def load_cifar(root: Path, name: str) -> Source:
    """CIFAR-10/100 python pickles, from the extracted folder or straight from the .tar.gz (no checksums)."""
    folder, tar_name, train_names, test_name, meta_name, labels_key, names_key, num_classes = CIFAR[name]
    wanted = ([*train_names, test_name], meta_name)  # required members, optional meta (class names)
    if root.is_file():
        members = _read_tar(root, folder, *wanted)
    elif (root / folder).is_dir():
        members = _read_dir(root / folder, *wanted)
    elif (root / tar_name).is_file():
        members = _read_tar(root / tar_name, folder, *wanted)
    elif root.name == folder or (root / test_name).is_file():
        members = _read_dir(root, *wanted)
    else:
        raise KDError(f"{root}: no {name} data found; expected {LAYOUTS[name]} there, or root being that folder "
                      "or tar.gz")
    classes = [str(c) for c in range(num_classes)]
    if meta_name in members:
        where = members[meta_name][1]
        classes = _class_names(_field(_unpickle(*members[meta_name]), names_key, where), where, names_key,
                               num_classes)
    (train_images, train_labels), (test_images, test_labels) = [
        [np.concatenate(parts) for parts in zip(*[_batch(*members[m], labels_key, len(classes)) for m in split])]
        for split in (train_names, [test_name])]
    return Source(torch.from_numpy(train_images), train_labels, torch.from_numpy(test_images), test_labels, classes)


def _read_dir(directory: Path, required: list[str], optional: str) -> dict:
    """{name: (file bytes, path)} for the files `required` (all present) and `optional` in `directory`."""
    for name in required:
        if not (directory / name).is_file():
            raise KDError(f"{directory / name}: not found; expected {', '.join(required)} in {directory} "
                          f"(and optionally {optional})")
    present = [name for name in [*required, optional] if (directory / name).is_file()]
    return {name: ((directory / name).read_bytes(), directory / name) for name in present}


def _read_tar(path: Path, folder: str, required: list[str], optional: str) -> dict:
    """Like `_read_dir` for the members <folder>/<name> (or <name>) of a tar.gz, read in one pass, not extracted."""
    members, where = {}, f"{path}"
    try:
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                name = info.name.removeprefix("./").removeprefix(folder + "/")
                if info.isfile() and name in [*required, optional]:
                    where = f"{path}, member {info.name}"
                    members[name] = (tar.extractfile(info).read(), where)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise KDError(f"{where}: corrupt or truncated tar.gz ({e}); expected the original {folder} archive") from e
    for name in required:
        if name not in members:
            raise KDError(f"{path}: no member {folder}/{name}; expected members {', '.join(required)} "
                          f"(and optionally {optional}) under {folder}/")
    return members


def _batch(data: bytes, where, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch dict -> images uint8 (N, 3, 32, 32) and labels int64 (N,), shapes and ranges checked."""
    batch = _unpickle(data, where)
    images = _field(batch, "data", where)
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[1] == 3072):
        shape = getattr(images, "shape", type(images).__name__)
        raise KDError(f"{where}: 'data' is {shape} {getattr(images, 'dtype', '')}, expected (N, 3072) uint8")
    return images.reshape(-1, 3, 32, 32), _labels(_field(batch, labels_key, where), where, labels_key, len(images),
                                                  num_classes)


def _labels(values, where, key: str, count: int, num_classes: int) -> np.ndarray:
    """A batch's `key` entry as int64 (count,): refused, naming the file and key, unless it holds `count` integers
    in 0..num_classes - 1 (one per image)."""
    try:
        labels = np.asarray(values)
    except (TypeError, ValueError):  # a ragged list: numpy cannot make it an array
        labels = None
    if labels is None or labels.shape != (count,) or labels.dtype.kind not in "iu" or (count and (
            labels.min() < 0 or labels.max() >= num_classes)):
        found = "a ragged list" if labels is None else f"of shape {labels.shape} and dtype {labels.dtype}"
        raise KDError(f"{where}: '{key}' is {found}; expected a list of {count} integers (one per image) "
                      f"in 0..{num_classes - 1}")
    return labels.astype(np.int64)


def _class_names(names, where, key: str, num_classes: int) -> list[str]:
    """The meta file's class names as str: refused, naming the file and key, unless a list of `num_classes`
    strings (bytes in the Python 2 originals)."""
    if isinstance(names, (list, tuple)):
        odd = [n for n in names if not isinstance(n, (str, bytes))]
        if not odd and len(names) == num_classes:
            return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
        found = f"a list holding {odd[0]!r:.40} ({type(odd[0]).__name__})" if odd else f"a list of {len(names)} names"
    else:
        found = f"{type(names).__name__} {names!r:.60}"
    raise KDError(f"{where}: '{key}' is {found}; expected a list of {num_classes} class names (strings), or remove "
                  "the file to number the classes")


def _field(batch, key: str, where):
    """batch[key] whether the pickle's keys are bytes (the Python 2 originals) or str (re-packed)."""
    if not isinstance(batch, dict) or not (key in batch or key.encode() in batch):
        raise KDError(f"{where}: no '{key}' entry; expected a CIFAR python pickle (a dict with '{key}')")
    return batch[key] if key in batch else batch[key.encode()]


def _latin1(text: str, encoding: str) -> bytes:
    """What protocol-2 pickles from Python 3 call to rebuild bytes (_codecs.encode), latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _safe_globals() -> dict:
    try:  # pickles name numpy.core (numpy 1) or numpy._core (numpy 2), whichever numpy wrote them
        from numpy._core import multiarray, numeric
    except ImportError:
        from numpy.core import multiarray, numeric

    found = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype, "_codecs.encode": _latin1}
    for package in ("numpy.core", "numpy._core"):
        found |= {f"{package}.multiarray._reconstruct": multiarray._reconstruct,
                  f"{package}.multiarray.scalar": multiarray.scalar,
                  f"{package}.numeric._frombuffer": numeric._frombuffer}
    return found


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers only: any other global is refused, never imported."""

    allowed = _safe_globals()

    def find_class(self, module: str, name: str):
        if f"{module}.{name}" not in self.allowed:
            raise KDError(f"refused global '{module}.{name}'")
        return self.allowed[f"{module}.{name}"]


def _unpickle(data: bytes, where):
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # anything from truncated opcodes to bad numpy state; nothing unsafe can run
        reason = str(e) if isinstance(e, KDError) else f"{type(e).__name__}: {e}"
        raise KDError(f"{where}: cannot unpickle ({reason}); expected a CIFAR python pickle, which holds only "
                      "numpy arrays, lists and strings") from e


def load_imagefolder(root: Path, image_size: int | None = None) -> Source:
    """root/train/<class>/* and optional root/test/<class>/*: classes and files in sorted name order."""
    if not (root / "train").is_dir():
        raise KDError(f"{root}: no train/ folder; the imagefolder source expects {LAYOUTS['imagefolder']}")
    classes = _class_folders(root / "train")
    if not classes:
        raise KDError(f"{root / 'train'}: no class folders; expected {LAYOUTS['imagefolder']}")
    train = _list_images(root, "train", classes, image_size)
    if not (root / "test").is_dir():
        return Source(*train, None, None, classes)
    test_classes = _class_folders(root / "test")
    if test_classes != classes:
        missing, extra = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        raise KDError(f"{root / 'test'}: class folders differ from train/ (missing {missing}, extra {extra}); "
                      "expected the same class folders in test/ as in train/")
    return Source(*train, *_list_images(root, "test", classes, image_size), classes)


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _list_images(root: Path, split: str, classes: list[str], image_size) -> tuple[ImageFiles, np.ndarray]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(root / split / name)  # hidden files (macOS ._x.png) skipped
                       if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise KDError(f"{root / split / name}: no images; expected files ending in {', '.join(IMAGE_SUFFIXES)}")
        paths += [f"{split}/{name}/{f}" for f in files]
        labels += [label] * len(files)
    return ImageFiles(root, paths, image_size), np.array(labels, dtype=np.int64)


def _resize_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (..., C, H, W) -> (..., C, size, size): shorter side to `size` (antialiased), then center crop."""
    from torchvision.transforms.v2 import functional as F

    return F.center_crop(F.resize(images, [size], antialias=True), [size, size])


class ImageFiles:
    """Image files decoded lazily, one per __getitem__, e.g. in DataLoader workers (picklable).

    `paths` are relative to `root`; item i is uint8 (3, H, W) RGB, resized and center-cropped to
    image_size x image_size when `image_size` is set. With `first` (a relative path and its (H, W): see
    `same_size`), an image of another size is refused when decoded.
    """

    def __init__(self, root: Path, paths: list[str], image_size: int | None,
                 first: tuple[str, tuple[int, int]] | None = None):
        self.root, self.paths, self.image_size, self.first = Path(root), list(paths), image_size, first

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFiles({str(self.root)!r}, {len(self)} files, image_size={self.image_size})"

    def __getitem__(self, i: int) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image

        path = self.root / self.paths[i]
        try:
            image = decode_image(torch.from_numpy(np.fromfile(path, dtype=np.uint8)), mode=ImageReadMode.RGB)
        except (OSError, RuntimeError, ValueError) as e:
            reason = re.sub(r"^.*?\.cpp:\d+, ", "", str(e))  # drop torchvision's C++ source location
            raise KDError(f"{path}: cannot decode image ({reason}); expected a JPEG or PNG file "
                          "(GIF and WebP are read too)") from e
        image = image[0] if image.ndim == 4 else image  # an animated GIF: its first frame
        image = image if self.image_size is None else _resize_crop(image, self.image_size)
        if self.first is not None and tuple(image.shape[-2:]) != tuple(self.first[1]):
            (height, width), (first_height, first_width) = image.shape[-2:], self.first[1]
            raise KDError(f"{path}: {height}x{width} pixels (H x W), but {self.root / self.first[0]} has "
                          f"{first_height}x{first_width}: images of different sizes cannot be stacked into batches; "
                          "set data.image_size: N to resize every image (shorter side to N, centre crop N x N)")
        return image

    def same_size(self, first: tuple[str, tuple[int, int]] | None = None) -> ImageFiles:
        """These files, each refused when decoded (KDError naming it and `first`'s file, both sizes, and
        data.image_size as the fix) unless its size is that of `first`: (relative path, (H, W)), by default file
        0 and its size (decoded once here). What is stacked into batches must have one size."""
        if first is None and len(self):
            first = (self.paths[0], tuple(self[0].shape[-2:]))
        return ImageFiles(self.root, self.paths, self.image_size, first)

    def subset(self, rows) -> ImageFiles:
        """The files at `rows` (ints), in that order."""
        return ImageFiles(self.root, [self.paths[int(r)] for r in rows], self.image_size, self.first)

    def digest(self) -> str:
        """SHA-256 over (relative path, file bytes) of every file in order: per-file digests, combined in order.

        Files are hashed by a thread pool (file reads and hashlib release the GIL), 256 files per task so
        that small files (CIFAR's are ~1 KB) do not drown in scheduling overhead.
        """
        batches = [self.paths[i:i + 256] for i in range(0, len(self.paths), 256)]
        outer = hashlib.sha256()
        with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
            for batch, digests in zip(batches, pool.map(self._file_digests, batches)):
                for rel, file_digest in zip(batch, digests):
                    outer.update(rel.encode() + b"\0" + file_digest)
        return outer.hexdigest()

    def _file_digests(self, rels: list[str]) -> list[bytes]:
        digests = []
        for rel in rels:
            path = os.path.join(self.root, rel)
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    h = hashlib.sha256()
                    while block := os.read(fd, 1 << 20):
                        h.update(block)
                finally:
                    os.close(fd)
            except OSError as e:
                raise KDError(f"{path}: cannot read ({e.strerror}); expected a readable image file") from e
            digests.append(h.digest())
        return digests


def fingerprint_images(images: torch.Tensor | ImageFiles) -> str:
    """SHA-256 naming image content and order: a tensor's shape, dtype and bytes, or ImageFiles' digest()
    and image_size."""
    if isinstance(images, ImageFiles):  # the resize applied at decoding changes the pixels too
        return hashlib.sha256(f"image_size={images.image_size}:{images.digest()}".encode()).hexdigest()
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"fingerprint_images takes a tensor or ImageFiles, not {type(images).__name__}")
    h = hashlib.sha256(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(images.detach().cpu().contiguous().numpy())
    return h.hexdigest()
