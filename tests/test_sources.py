"""Raw data sources: each reader is fed tiny files written here in the real format, through load_source."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile

import numpy as np
import pytest
import torch
from torchvision.io import write_jpeg, write_png

from pipeline import KDError
from pipeline.sources import SOURCES, ImageFiles, fingerprint_images, load_source

RNG = np.random.default_rng(0)
# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work and are what we use.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


# --- writers of the real formats -------------------------------------------------------------------

def write_idx(path, array: np.ndarray, magic: int | None = None) -> None:
    """An IDX file: big-endian magic (0x08 = unsigned byte, then the number of dims), dims, raw bytes."""
    magic = 0x0800 | array.ndim if magic is None else magic
    data = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist(root, gz: bool, train=5, test=3):
    """The four MNIST files in `root`; returns train/test images (N, 28, 28) and labels."""
    root.mkdir(exist_ok=True)
    arrays = {"train": (RNG.integers(0, 256, (train, 28, 28)), RNG.integers(0, 10, train)),
              "t10k": (RNG.integers(0, 256, (test, 28, 28)), RNG.integers(0, 10, test))}
    suffix = ".gz" if gz else ""
    for split, (images, labels) in arrays.items():
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return arrays


def cifar_batch(n: int, labels_key: str, num_classes: int, str_keys=False) -> dict:
    """One batch as the originals hold it: bytes keys, data (N, 3072) uint8, labels a list of ints."""
    batch = {"batch_label": b"batch", "data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
             labels_key: [int(v) for v in RNG.integers(0, num_classes, n)],
             "filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return batch if str_keys else {k.encode(): v for k, v in batch.items()}


def cifar10_members(str_keys=False, protocol=2) -> tuple[dict[str, bytes], dict]:
    """Pickled members of cifar-10-batches-py (2 images per train batch, 3 test) and the batch dicts."""
    batches = {f"data_batch_{i}": cifar_batch(2, "labels", 10, str_keys) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(3, "labels", 10, str_keys)
    members = {name: pickle.dumps(b, protocol=protocol) for name, b in batches.items()}
    names = [f"class{c}".encode() for c in range(10)]
    members["batches.meta"] = pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=protocol)
    return members, batches


def cifar100_members() -> tuple[dict[str, bytes], dict]:
    batches = {"train": cifar_batch(4, "fine_labels", 100), "test": cifar_batch(3, "fine_labels", 100)}
    for b in batches.values():
        b[b"coarse_labels"] = [v // 5 for v in b[b"fine_labels"]]
    members = {name: pickle.dumps(b, protocol=2) for name, b in batches.items()}
    meta = {b"fine_label_names": [f"fine{c}".encode() for c in range(100)],
            b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]}
    members["meta"] = pickle.dumps(meta, protocol=2)
    return members, batches


def write_folder(directory, members: dict[str, bytes]) -> None:
    directory.mkdir(parents=True)
    for name, data in members.items():
        (directory / name).write_bytes(data)


def write_tar(path, folder: str, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cifar_images(batch: dict) -> torch.Tensor:
    return torch.from_numpy(batch[b"data"].reshape(-1, 3, 32, 32))


def gradient(height: int, width: int) -> torch.Tensor:
    """A smooth RGB image (3, H, W) uint8: JPEG keeps it close."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return (torch.stack([x, y, (x + y) / 2]) * 255).round().to(torch.uint8)


@pytest.fixture
def image_folder(tmp_path):
    """root/train/{cat,dog}, root/test/{cat,dog}: PNG (colour and grayscale) and JPEG; returns root, PNG pixels."""
    root = tmp_path / "images"
    pngs = {"train/cat/b.png": torch.randint(0, 256, (3, 10, 14), dtype=torch.uint8),
            "train/cat/a.png": torch.randint(0, 256, (3, 12, 9), dtype=torch.uint8),
            "train/dog/y.PNG": torch.randint(0, 256, (1, 7, 7), dtype=torch.uint8),  # grayscale
            "test/cat/c.png": torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8)}
    for split, name in [("train", "dog"), ("train", "cat"), ("test", "dog"), ("test", "cat")]:
        (root / split / name).mkdir(parents=True)
    for rel, image in pngs.items():
        write_png(image, str(root / rel))
    write_jpeg(gradient(16, 16), str(root / "train/dog/x.jpg"), quality=95)
    write_jpeg(gradient(8, 12), str(root / "test/dog/d.jpeg"), quality=95)
    (root / "train/dog/notes.txt").write_text("not an image: ignored")
    return root, pngs


# --- digits, MNIST, Fashion-MNIST --------------------------------------------------------------------

def test_digits_are_uint8_images_scaled_from_0_to_16_with_no_test_split():
    from sklearn.datasets import load_digits

    source = load_source("digits", "unused")
    assert source.train_images.shape == (1797, 1, 8, 8) and source.train_images.dtype == torch.uint8
    expected = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    assert np.array_equal(source.train_images[:, 0].numpy(), expected)
    assert source.train_labels.dtype == np.int64 and source.train_labels.shape == (1797,)
    assert source.test_images is None and source.test_labels is None
    assert source.classes == [str(c) for c in range(10)]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzipped"])
def test_mnist_idx_files_read_exactly(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz)
    source = load_source("mnist", tmp_path / "mnist")
    for images, labels, (expected_images, expected_labels) in [
            (source.train_images, source.train_labels, arrays["train"]),
            (source.test_images, source.test_labels, arrays["t10k"])]:
        assert images.dtype == torch.uint8 and images.shape == (len(expected_images), 1, 28, 28)
        assert np.array_equal(images[:, 0].numpy(), expected_images)
        assert labels.dtype == np.int64 and np.array_equal(labels, expected_labels)
    assert source.classes == [str(c) for c in range(10)]


def test_uncompressed_idx_file_is_preferred_over_gz(tmp_path):
    write_mnist(tmp_path, gz=True)
    raw = write_mnist(tmp_path, gz=False)
    assert np.array_equal(load_source("mnist", tmp_path).train_images[:, 0].numpy(), raw["train"][0])


def test_fashion_mnist_has_the_fashion_class_names(tmp_path):
    write_mnist(tmp_path, gz=True)
    classes = load_source("fashion_mnist", tmp_path).classes
    assert classes[0] == "T-shirt/top" and classes[9] == "Ankle boot" and len(classes) == 10


def test_image_size_resizes_and_crops_tensor_sources(tmp_path):
    write_mnist(tmp_path, gz=False)
    source = load_source("mnist", tmp_path, image_size=16)
    assert source.train_images.shape == (5, 1, 16, 16) and source.test_images.shape == (3, 1, 16, 16)
    assert source.train_images.dtype == torch.uint8


def test_wrong_idx_magic_names_file_and_expected_magic(tmp_path):
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", RNG.integers(0, 10, 5))  # a labels file in its place
    with pytest.raises(KDError, match=r"train-images-idx3-ubyte: magic number 0x00000801, expected 0x00000803 "
                                      r"\(IDX images: unsigned byte, 3 dimensions\).*gzipped"):
        load_source("mnist", tmp_path)


def test_short_idx_file_is_reported_as_truncated(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:1016]))
    with pytest.raises(KDError, match=r"t10k-images-idx3-ubyte.gz: truncated: header says 3x28x28 = 2352 bytes, "
                                      r"file has 1000"):
        load_source("mnist", tmp_path)


def test_idx_image_and_label_counts_must_agree(tmp_path):
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", RNG.integers(0, 10, 4))
    with pytest.raises(KDError, match="has 5 images but .*train-labels-idx1-ubyte has 4 labels"):
        load_source("mnist", tmp_path)


def test_idx_labels_must_be_below_10(tmp_path):
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 10, 2]))
    with pytest.raises(KDError, match="t10k-labels-idx1-ubyte: label 10 found, expected labels 0..9"):
        load_source("mnist", tmp_path)


def test_missing_idx_file_lists_the_four_names_and_gz(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(KDError, match=r"train-labels-idx1-ubyte: not found .*train-images-idx3-ubyte, "
                                      r"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte.*\.gz"):
        load_source("mnist", tmp_path)


def test_corrupt_gzip_names_the_file(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KDError, match="train-images-idx3-ubyte.gz: cannot read or gunzip"):
        load_source("mnist", tmp_path)


# --- CIFAR-10 and CIFAR-100 python pickles -----------------------------------------------------------

@pytest.mark.parametrize("layout", ["folder in root", "root is the folder", "tar.gz in root", "root is the tar.gz"])
def test_cifar10_reads_extracted_folder_and_tar_gz_exactly(tmp_path, layout):
    members, batches = cifar10_members()
    if "tar" in layout:
        write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
        root = tmp_path / "cifar-10-python.tar.gz" if layout == "root is the tar.gz" else tmp_path
    else:
        write_folder(tmp_path / "cifar-10-batches-py", members)
        root = tmp_path / "cifar-10-batches-py" if layout == "root is the folder" else tmp_path
    source = load_source("cifar10", root)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    assert source.train_images.dtype == torch.uint8 and source.train_images.shape == (10, 3, 32, 32)
    assert torch.equal(source.train_images, torch.cat([cifar_images(b) for b in train]))
    assert np.array_equal(source.train_labels, sum((b[b"labels"] for b in train), []))
    assert source.train_labels.dtype == np.int64
    assert torch.equal(source.test_images, cifar_images(batches["test_batch"]))
    assert np.array_equal(source.test_labels, batches["test_batch"][b"labels"])
    assert source.classes == [f"class{c}" for c in range(10)]


@pytest.mark.parametrize("packed", ["folder", "tar.gz"])
def test_cifar100_reads_fine_labels_and_names(tmp_path, packed):
    members, batches = cifar100_members()
    if packed == "tar.gz":
        write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", members)
    else:
        write_folder(tmp_path / "cifar-100-python", members)
    source = load_source("cifar100", tmp_path)
    assert torch.equal(source.train_images, cifar_images(batches["train"]))
    assert np.array_equal(source.train_labels, batches["train"][b"fine_labels"])
    assert torch.equal(source.test_images, cifar_images(batches["test"]))
    assert np.array_equal(source.test_labels, batches["test"][b"fine_labels"])
    assert source.classes[:2] == ["fine0", "fine1"] and len(source.classes) == 100


@pytest.mark.parametrize("protocol", [4, 5])
def test_repacked_cifar_with_str_keys_and_no_meta_gets_numbered_classes(tmp_path, protocol):
    members, batches = cifar10_members(str_keys=True, protocol=protocol)
    del members["batches.meta"]
    write_folder(tmp_path / "cifar-10-batches-py", members)
    source = load_source("cifar10", tmp_path)
    assert torch.equal(source.test_images, torch.from_numpy(batches["test_batch"]["data"].reshape(-1, 3, 32, 32)))
    assert source.classes == [str(c) for c in range(10)]


class RunsShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("refused", ["os.system", "posix.system", "builtins.eval"])
def test_restricted_unpickler_refuses_other_globals_and_runs_nothing(tmp_path, refused):
    marker = tmp_path / "pwned"
    if refused == "os.system":  # written by hand, as an attacker would: GLOBAL 'os system', then call it
        evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    elif refused == "posix.system":  # what pickle writes for os.system on Linux
        evil = pickle.dumps({b"data": RunsShellCommand(f"touch {marker}"), b"labels": [0]}, protocol=2)
    else:
        evil = pickle.dumps({b"data": eval, b"labels": [0]}, protocol=4)
    members, _ = cifar10_members()
    members["test_batch"] = evil
    write_folder(tmp_path / "cifar-10-batches-py", members)
    with pytest.raises(KDError, match=rf"test_batch: cannot unpickle \(refused global '{refused}'\)"):
        load_source("cifar10", tmp_path)
    assert not marker.exists()


def test_missing_cifar_batch_names_the_file(tmp_path):
    members, _ = cifar10_members()
    del members["data_batch_3"]
    write_folder(tmp_path / "cifar-10-batches-py", members)
    with pytest.raises(KDError, match=r"cifar-10-batches-py/data_batch_3: not found; expected data_batch_1"):
        load_source("cifar10", tmp_path)


def test_missing_cifar_batch_in_tar_names_the_member(tmp_path):
    members, _ = cifar10_members()
    del members["test_batch"]
    write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    with pytest.raises(KDError, match=r"cifar-10-python.tar.gz: no member cifar-10-batches-py/test_batch"):
        load_source("cifar10", tmp_path)


def test_corrupt_and_truncated_tar_gz_name_the_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(KDError, match="cifar-10-python.tar.gz: corrupt or truncated tar.gz"):
        load_source("cifar10", tmp_path)
    write_tar(path, "cifar-10-batches-py", cifar10_members()[0])
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(KDError, match="cifar-10-python.tar.gz.*: corrupt or truncated tar.gz"):
        load_source("cifar10", tmp_path)


def test_truncated_cifar_pickle_names_the_file(tmp_path):
    members, _ = cifar10_members()
    members["data_batch_2"] = members["data_batch_2"][:500]
    write_folder(tmp_path / "cifar-10-batches-py", members)
    with pytest.raises(KDError, match="data_batch_2: cannot unpickle"):
        load_source("cifar10", tmp_path)


def test_cifar_data_of_the_wrong_shape_is_refused(tmp_path):
    members, batches = cifar10_members()
    batches["data_batch_1"][b"data"] = batches["data_batch_1"][b"data"][:, :3000]
    members["data_batch_1"] = pickle.dumps(batches["data_batch_1"], protocol=2)
    write_folder(tmp_path / "cifar-10-batches-py", members)
    with pytest.raises(KDError, match=r"data_batch_1: 'data' is \(2, 3000\) uint8, expected \(N, 3072\) uint8"):
        load_source("cifar10", tmp_path)


@pytest.mark.parametrize("labels, found", [([[1, 2], [3]], "is a ragged list"),
                                           ([[1], [2]], r"is of shape \(2, 1\)"),
                                           (["a", "b"], r"is of shape \(2,\) and dtype <U1"),
                                           ([1, 2, 3], r"is of shape \(3,\)")])
def test_cifar_labels_that_are_not_one_integer_per_image_name_file_and_key(tmp_path, labels, found):
    members, batches = cifar10_members()
    batches["data_batch_4"][b"labels"] = labels
    members["data_batch_4"] = pickle.dumps(batches["data_batch_4"], protocol=2)
    write_folder(tmp_path / "cifar-10-batches-py", members)
    with pytest.raises(KDError, match=rf"data_batch_4: 'labels' {found}.*expected a list of 2 integers"):
        load_source("cifar10", tmp_path)


@pytest.mark.parametrize("names, found", [(5, "is int 5"),
                                          ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], r"is a list holding 0 \(int\)"),
                                          ([b"cat", b"dog"], "is a list of 2 names")])
def test_cifar_label_names_that_are_not_a_list_of_strings_name_file_and_key(tmp_path, names, found):
    members, _ = cifar10_members()
    members["batches.meta"] = pickle.dumps({b"label_names": names}, protocol=2)
    write_folder(tmp_path / "cifar-10-batches-py", members)
    with pytest.raises(KDError, match=rf"batches.meta: 'label_names' {found}; expected a list of 10 class names"):
        load_source("cifar10", tmp_path)


# --- image folders -----------------------------------------------------------------------------------

def test_image_folder_lists_sorted_classes_and_files_and_decodes_png_exactly(image_folder):
    root, pngs = image_folder
    source = load_source("imagefolder", root)
    assert source.classes == ["cat", "dog"]
    train = source.train_images
    assert isinstance(train, ImageFiles) and len(train) == 4
    assert train.paths == ["train/cat/a.png", "train/cat/b.png", "train/dog/x.jpg", "train/dog/y.PNG"]
    assert source.train_labels.dtype == np.int64 and source.train_labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(train[0], pngs["train/cat/a.png"]) and torch.equal(train[1], pngs["train/cat/b.png"])
    assert torch.equal(train[3], pngs["train/dog/y.PNG"].expand(3, 7, 7))  # grayscale decoded as RGB
    jpeg = train[2]
    assert jpeg.dtype == torch.uint8 and jpeg.shape == (3, 16, 16)
    assert (jpeg.int() - gradient(16, 16).int()).abs().float().mean() < 4
    assert source.test_images.paths == ["test/cat/c.png", "test/dog/d.jpeg"] and source.test_labels.tolist() == [0, 1]
    assert torch.equal(source.test_images[0], pngs["test/cat/c.png"])


def test_image_folder_without_test_has_no_test_split(image_folder):
    root, _ = image_folder
    shutil.rmtree(root / "test")
    source = load_source("imagefolder", root)
    assert source.test_images is None and source.test_labels is None and len(source.train_images) == 4


def test_hidden_files_such_as_macos_appledouble_are_skipped(image_folder):
    root, _ = image_folder
    (root / "train/cat/._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata, not a PNG")
    write_png(torch.zeros(3, 12, 9, dtype=torch.uint8), str(root / "train/cat/.hidden.png"))
    source = load_source("imagefolder", root)
    assert source.train_images.paths == ["train/cat/a.png", "train/cat/b.png", "train/dog/x.jpg", "train/dog/y.PNG"]
    assert all(image.dtype == torch.uint8 for image in source.train_images)  # every listed file decodes


def test_images_of_different_sizes_without_image_size_name_two_files_and_the_fix(tmp_path):
    from pipeline.data import load_dataset
    from pipeline.params import DataParams

    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(5):
            write_png(torch.full((3, 6, 6), 40 * i, dtype=torch.uint8), str(tmp_path / f"train/{name}/{i}.png"))
    write_png(torch.zeros(3, 9, 7, dtype=torch.uint8), str(tmp_path / "train/dog/4.png"))  # one of another size
    params = DataParams(name="imagefolder", root=str(tmp_path), image_size=None, normalize="none", split_seed=0,
                        val_fraction=0.25, test_fraction=0.2, train_subset=None)
    data = load_dataset(params)
    splits = [data.train, data.val, data.test]
    loaders = [torch.utils.data.DataLoader(split.images, batch_size=len(split)) for split in splits]
    with pytest.raises(KDError) as error:  # whichever split holds the odd file: before, torch.stack failed
        [next(iter(loader)) for loader in loaders]
    first = str(tmp_path / data.train.images.first[0])
    assert str(error.value).startswith(f"{tmp_path / 'train/dog/4.png'}: 9x7 pixels (H x W), but {first} has 6x6")
    assert "set data.image_size: N" in str(error.value)
    resized = load_dataset(dataclasses.replace(params, image_size=6))
    assert torch.utils.data.default_collate([resized.train.images[i] for i in range(len(resized.train))]).shape[1:] \
        == (3, 6, 6)


def test_image_size_resizes_shorter_side_then_crops_the_center(tmp_path):
    image = torch.zeros(3, 8, 32, dtype=torch.uint8)
    image[0] = 255  # red margins ...
    image[:, :, 8:24] = torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None]  # ... around a blue middle
    (tmp_path / "train/a").mkdir(parents=True)
    write_png(image, str(tmp_path / "train/a/wide.png"))
    files = load_source("imagefolder", tmp_path, image_size=4).train_images
    resized = files[0]
    assert resized.shape == (3, 4, 4) and resized.dtype == torch.uint8
    assert torch.equal(resized, torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None].expand(3, 4, 4))
    assert torch.equal(files[0], resized)  # deterministic


def test_test_classes_must_match_train_classes(image_folder):
    root, _ = image_folder
    shutil.rmtree(root / "test/dog")
    (root / "test/bird").mkdir()
    with pytest.raises(KDError, match=r"test: class folders differ from train/ "
                                      r"\(missing \['dog'\], extra \['bird'\]\)"):
        load_source("imagefolder", root)


def test_class_folder_without_images_and_empty_train_are_refused(tmp_path):
    (tmp_path / "train/empty").mkdir(parents=True)
    (tmp_path / "train/empty/readme.txt").write_text("no images here")
    with pytest.raises(KDError, match=r"train/empty: no images; expected files ending in .jpg, .jpeg, .png"):
        load_source("imagefolder", tmp_path)
    shutil.rmtree(tmp_path / "train/empty")
    with pytest.raises(KDError, match=r"train: no class folders"):
        load_source("imagefolder", tmp_path)


def test_corrupt_and_truncated_images_name_the_file(image_folder):
    root, _ = image_folder
    (root / "train/cat/c.jpg").write_bytes(RNG.integers(0, 256, 300, dtype=np.uint8).tobytes())
    png = (root / "train/cat/b.png").read_bytes()
    (root / "train/cat/b.png").write_bytes(png[:len(png) // 2])
    files = load_source("imagefolder", root).train_images
    for i, name in [(1, "b.png"), (2, "c.jpg")]:
        with pytest.raises(KDError) as error:
            files[i]
        message = str(error.value)
        assert message.startswith(str(root / "train/cat" / name) + ": cannot decode image (")
        assert "expected a JPEG or PNG file" in message and ".cpp" not in message


def test_image_files_are_picklable_and_load_in_a_dataloader_worker(image_folder):
    root, _ = image_folder
    files = load_source("imagefolder", root, image_size=5).train_images
    copy = pickle.loads(pickle.dumps(files))
    assert copy.paths == files.paths and torch.equal(copy[2], files[2])
    loader = torch.utils.data.DataLoader(files, batch_size=2, num_workers=1)
    batches = list(loader)
    assert torch.equal(torch.cat(batches), torch.stack([files[i] for i in range(len(files))]))


def test_subset_keeps_the_given_order(image_folder):
    files = load_source("imagefolder", image_folder[0]).train_images
    subset = files.subset(np.array([3, 0]))
    assert subset.paths == [files.paths[3], files.paths[0]] and torch.equal(subset[1], files[0])


# --- fingerprints ------------------------------------------------------------------------------------

def test_tensor_fingerprint_follows_every_pixel_and_the_order():
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    assert fingerprint_images(images) == fingerprint_images(images.clone())
    changed = images.clone()
    changed[2, 0, 3, 3] ^= 1
    assert fingerprint_images(changed) != fingerprint_images(images)
    assert fingerprint_images(images[[1, 0, 2]]) != fingerprint_images(images)
    assert fingerprint_images(images.reshape(3, 1, 2, 8)) != fingerprint_images(images)


def test_image_folder_fingerprint_follows_every_pixel_and_the_order(image_folder, tmp_path):
    root, pngs = image_folder
    files = load_source("imagefolder", root).train_images
    before = fingerprint_images(files)
    shutil.copytree(root, tmp_path / "copy")
    assert fingerprint_images(load_source("imagefolder", tmp_path / "copy").train_images) == before
    assert fingerprint_images(files.subset([1, 0, 2, 3])) != before
    changed = pngs["train/cat/b.png"].clone()
    changed[0, 0, 0] ^= 1
    write_png(changed, str(root / "train/cat/b.png"))
    assert fingerprint_images(files) != before


def test_digest_of_a_vanished_file_names_it(image_folder):
    root, _ = image_folder
    files = load_source("imagefolder", root).train_images
    (root / "train/cat/b.png").unlink()
    with pytest.raises(KDError, match=r"train/cat/b.png: cannot read \(No such file or directory\)"):
        files.digest()


# --- names and roots ---------------------------------------------------------------------------------

def test_unknown_source_lists_the_sources():
    with pytest.raises(KDError, match="unknown data source 'svhn'; expected one of digits, mnist, fashion_mnist, "
                                      "cifar10, cifar100, imagefolder"):
        load_source("svhn", "anywhere")
    assert SOURCES == ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder")


@pytest.mark.parametrize("name, expected", [("mnist", "train-images-idx3-ubyte"),
                                            ("fashion_mnist", "t10k-labels-idx1-ubyte"),
                                            ("cifar10", "cifar-10-python.tar.gz"),
                                            ("cifar100", "cifar-100-python/"),
                                            ("imagefolder", "train/<class>/")])
def test_missing_root_says_what_belongs_there(tmp_path, name, expected):
    with pytest.raises(KDError, match=f"{tmp_path / 'nowhere'}: not found; the {name} source expects there .*"
                                      f"{expected}"):
        load_source(name, tmp_path / "nowhere")
