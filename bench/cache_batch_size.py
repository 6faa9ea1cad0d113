"""What `cache.batch_size` changes in a store, and in a student trained from it (it is no parameter of the DVC stage).

For each teacher, the same views are cached (`pipeline.cache.cache_teacher_logits`, on `--device`, in this process)
with each batch size of `--batch-sizes`, into float32 and float16 full stores; each store is compared with the one
of `--reference` batch size: largest absolute difference of the stored logits, the same relative to the largest
reference logit, and whether every value is bit-identical. Then the student of `distill` (its epochs shortened to
`--epochs`) is trained from each store, seeded alike, and its weights compared with the reference store's student.
Teachers: `digits`, params.yaml's teacher trained here for `--teacher-epochs` epochs on params.yaml's data, views
and augmentation; `resnet20`, a CIFAR-stem resnet20 at its seeded initialisation on `--random-images` random uint8
3x32x32 images (2 views of padded crops and flips, the path replayed a batch at a time; its student is tiny_cnn).
Keys: `cache_batch_size_max_rel_diff_<teacher>_<dtype>`, `cache_batch_size_identical_<teacher>_<dtype>` and
`cache_batch_size_student_identical_<teacher>_<dtype>` (1: every batch size equal to the reference, bit for bit).

Usage: python bench/cache_batch_size.py [--batch-sizes 16,64,256] [--reference 64] [--epochs 2] [--device cpu]
           [--append BENCHMARKS.md]
"""

import dataclasses
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
import zarr

from output import publish
from pipeline.augment import build_augment
from pipeline.cache import cache_teacher_logits
from pipeline.data import Split, input_transform, load_dataset
from pipeline.models import build_model
from pipeline.params import load_params
from pipeline.store import LogitStore
from pipeline.train import distill, store_targets, train_teacher

CIFAR_AUGMENT = [{"RandomCrop": {"size": 32, "padding": 4}}, {"RandomHorizontalFlip": {}}]


@dataclasses.dataclass
class Setup:
    """One teacher over one data set: what the cache and the student need."""
    teacher: torch.nn.Module
    arch: str
    train: Split
    val: Split
    num_classes: int
    augment: list
    mean: tuple
    std: tuple
    num_views: int
    student: str


def digits_setup(params, teacher_epochs: int, device: torch.device) -> Setup:
    data = load_dataset(params.data)
    t = params.teacher
    teacher = build_model(t.arch, data.image_shape[0], data.num_classes, t.arch_options, data.image_shape[-1],
                          seed=params.seed)
    augment = input_transform(build_augment(params.augment), data.mean, data.std)
    train_teacher(teacher, data.train, data.val, augment, input_transform(None, data.mean, data.std), teacher_epochs,
                  t.batch_size, t.optimizer, params.seed, device)
    return Setup(teacher, t.arch, data.train, data.val, data.num_classes, params.augment, data.mean, data.std,
                 params.cache.num_views, params.distill.student)


def random_images_setup(count: int) -> Setup:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count + count // 4, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (len(images),), generator=g)
    teacher = build_model("resnet20", 3, 10, {}, 32, seed=0)
    return Setup(teacher, "resnet20", Split(images[:count], labels[:count]), Split(images[count:], labels[count:]),
                 10, CIFAR_AUGMENT, (0.5,) * 3, (0.25,) * 3, 2, "tiny_cnn")


def stored_logits(path: Path) -> np.ndarray:
    """A full store's logits (N, V, C) as float32 (float16 values exactly)."""
    return zarr.open_group(str(path), mode="r")["logits"][...].astype(np.float32)


def cache_and_distill(s: Setup, params, dtype: str, batch_size: int, epochs: int, path: Path,
                      device: torch.device) -> tuple[float, dict]:
    """Cache `s` at `path` with this dtype and batch size; train the student from it: (cache seconds, weights)."""
    cfg = dataclasses.replace(params.cache, num_views=s.num_views, dtype=dtype, storage="full", format="zarr",
                              batch_size=batch_size, compile=False)
    started = time.perf_counter()
    cache_teacher_logits(path, cfg, s.teacher, s.arch, s.train, s.num_classes, s.augment, s.mean, s.std, device,
                         params.num_workers, mix=params.mix)
    seconds = time.perf_counter() - started
    d = dataclasses.replace(params.distill, student=s.student, epochs=epochs,
                            student_options=params.distill.student_options if s.student == params.distill.student
                            else {})
    student = build_model(d.student, s.train.images.shape[1], s.num_classes, d.student_options,
                          s.train.images.shape[-1], seed=params.seed)
    distill(student, s.train, s.val, store_targets(LogitStore(path), d.temperature, d.topk_tail),
            input_transform(build_augment(s.augment), s.mean, s.std), input_transform(None, s.mean, s.std), cfg.seed,
            s.num_views, d, kd_weight=d.kd_weight, seed=params.seed, device=device,
            chunk_samples=cfg.chunk_samples, progress=False, mix=params.mix, num_classes=s.num_classes)
    return seconds, {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--batch-sizes", default="16,64,256", show_default=True, help="cache.batch_size values.")
@click.option("--reference", default=64, show_default=True, help="The batch size the others are compared with.")
@click.option("--dtypes", default="float32,float16", show_default=True)
@click.option("--teacher-epochs", default=3, show_default=True, help="Training of the digits teacher.")
@click.option("--random-images", default=512, show_default=True, help="Images for resnet20; 0 leaves it out.")
@click.option("--epochs", default=2, show_default=True, help="Epochs of each student (distill.epochs overridden).")
@click.option("--device", default="cpu", show_default=True, help="Teacher, cache and students (cache.amp as given).")
@click.option("--append", "out", default=None)
@click.option("--json", "json_path", default="bench/results.json", show_default=True)
def main(params_path, batch_sizes, reference, dtypes, teacher_epochs, random_images, epochs, device, out, json_path):
    params, device = load_params(params_path), torch.device(device)
    sizes = sorted({int(b) for b in batch_sizes.split(",")} | {reference})
    setups = {"digits": digits_setup(params, teacher_epochs, device)}
    if random_images:
        setups["resnet20"] = random_images_setup(random_images)
    command = (f"python bench/cache_batch_size.py --batch-sizes {batch_sizes} --reference {reference} --dtypes "
               f"{dtypes} --teacher-epochs {teacher_epochs} --random-images {random_images} --epochs {epochs} "
               f"--device {device}")
    lines = ["", "## What `cache.batch_size` changes: the stored logits and the student", "",
             f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {torch.get_num_threads()} torch "
             f"threads, {params.num_workers} DataLoader workers, cache.amp {params.cache.amp}): the same teacher and "
             "views cached with each cache.batch_size (rounded to whole samples of all their views), compared with "
             f"batch size {reference}; max abs: the largest |difference| of a stored logit; relative: that over the "
             f"largest |logit|; then the student of {params_path}'s `distill` ({epochs} epochs, same seed) trained "
             "from each store, its weights compared with the reference store's student. Cache seconds: one run each, "
             "on a shared machine.", "",
             "| teacher | samples x views | dtype | cache.batch_size | cache s | max abs | relative | logits "
             "bit-identical | student weights bit-identical | student max abs weight difference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, s in setups.items():
            for dtype in dtypes.split(","):
                paths = {size: Path(tmp) / f"{name}_{dtype}_{size}.zarr" for size in sizes}
                runs = {size: cache_and_distill(s, params, dtype, size, epochs, path, device)
                        for size, path in paths.items()}
                ref, ref_student = stored_logits(paths[reference]), runs[reference][1]
                same_logits, same_students, worst = True, True, 0.0
                for size, (seconds, student) in runs.items():
                    logits = stored_logits(paths[size])
                    diff = float(np.abs(logits - ref).max())
                    rel = diff / float(np.abs(ref).max())
                    identical = bool(np.array_equal(logits.view(np.uint32), ref.view(np.uint32)))
                    student_same = all(torch.equal(student[k], ref_student[k]) for k in ref_student)
                    weight_diff = max(float((student[k].double() - ref_student[k].double()).abs().max())
                                      for k in ref_student if ref_student[k].is_floating_point())
                    same_logits &= identical
                    same_students &= student_same
                    worst = max(worst, rel)
                    lines.append(f"| {name} ({s.arch}) | {len(s.train)} x {s.num_views} | {dtype} | {size}"
                                 f"{' (reference)' if size == reference else ''} | {seconds:.1f} | {diff:.2e} | "
                                 f"{rel:.2e} | {'yes' if identical else 'no'} | {'yes' if student_same else 'no'} | "
                                 f"{weight_diff:.2e} |")
                    print(lines[-1], flush=True)
                results.update({f"cache_batch_size_max_rel_diff_{name}_{dtype}": worst,
                                f"cache_batch_size_identical_{name}_{dtype}": float(same_logits),
                                f"cache_batch_size_student_identical_{name}_{dtype}": float(same_students)})
    publish(lines, results, out, json_path)


if __name__ == "__main__":
    main()
