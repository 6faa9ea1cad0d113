"""`kd cache`: run the teacher once over every (training sample, view) and store its raw logits;
`kd cache verify STORE`: check a store's every chunk and recompute a sample of its logits."""

import click

from stages.common import default_store, device_option, params_option, setup, stage

teacher_option = click.option("--teacher", "teacher_path", default="models/teacher.pt", show_default=True,
                              help="Teacher checkpoint.")


@click.group(invoke_without_command=True)
@params_option
@device_option
@teacher_option
@click.option("--out", default=None, help="Store to write: a zarr directory or an HDF5 file (cache.format)  "
                                         "[default: cache/teacher_logits.<cache.format>, as in dvc.yaml]")
@click.pass_context
@stage
def cache(ctx, params_path, device, teacher_path, out):
    """Write the teacher's logits for cache.num_views replayed views of each training sample to OUT.

    A run that was killed left OUT.partial: the same command finishes it without recomputing finished chunks.
    """
    if ctx.invoked_subcommand:
        return
    import contextlib

    from pipeline import distributed
    from pipeline.data import input_transform, load_dataset
    from pipeline.augment import check_augment
    from pipeline.models import load_for
    from pipeline.augment import build_augment
    from pipeline.cache import cache_teacher_logits
    from pipeline.writer import store_lock

    params, device = setup(params_path, device)
    out = out or default_store(params.cache.format)
    # one run writes a store at a time: a second is refused here, before any work (the ranks of one torchrun run
    # share the store, so only rank 0 takes the lock; if it is refused, torchrun stops the other ranks)
    with store_lock(out) if distributed.rank() == 0 else contextlib.nullcontext():
        device = distributed.init(device)  # under torchrun: one rank per process, each on its own GPU
        data = load_dataset(params.data)
        if len(data.train):  # refuse an augmentation the images do not fit before the store is begun
            check_augment(input_transform(build_augment(params.augment), data.mean, data.std), data.train.images[0])
        teacher, ckpt = load_for(teacher_path, data)  # refused before the store is begun
        cfg = params.cache
        try:
            meta, resumed = cache_teacher_logits(out, cfg, teacher, ckpt["arch"], data.train, data.num_classes,
                                                 params.augment, data.mean, data.std, device, params.num_workers,
                                                 mix=params.mix)
        finally:
            distributed.close()
    if distributed.rank() != 0:
        return
    if resumed:
        click.echo(f"Resumed an interrupted run: {resumed} of {meta.num_chunks} chunks were already done")
    click.echo(f"Wrote {out} ({cfg.format}): {meta.num_samples} samples x {meta.num_views} views x "
               f"{meta.num_classes} classes, {meta.dtype}")


@cache.command()
@click.argument("store_path", metavar="STORE")
@params_option
@device_option
@teacher_option
@click.option("--samples", default=64, show_default=True,
              help="Random (sample, view) entries to recompute; 0 recomputes none (chunks and fingerprints are still "
                   "checked); negative is refused.")
@stage
def verify(store_path, params_path, device, teacher_path, samples):
    """Check every chunk of STORE (present, checksum, finite), that it belongs to this teacher and data, and
    recompute SAMPLES random (sample, view) logits with the teacher (none for 0); exit 1 on any difference."""
    import numpy as np
    import torch

    from pipeline import KDError, topk
    from pipeline.data import fingerprint, input_transform, load_dataset
    from pipeline.models import load_for, weights_fingerprint
    from pipeline.replay import ReplayDataset
    from pipeline.augment import build_augment
    from pipeline.store import LogitStore
    from pipeline.cache import prepare_teacher, teacher_forward

    if samples < 0:
        raise KDError(f"--samples is {samples}; expected the number of entries to recompute, >= 0 (0: none)")
    params, device = setup(params_path, device)
    store = LogitStore(store_path, max_memory_bytes=0)
    meta = store.meta
    chunks = store.verify_chunks()
    click.echo(f"{store_path}: {chunks} chunks present, checksums and values valid "
               f"({meta.num_samples} samples x {meta.num_views} views x {meta.num_classes} classes, {meta.dtype})")
    data = load_dataset(params.data)
    teacher, _ = load_for(teacher_path, data)
    store.check_run(teacher_fingerprint=weights_fingerprint(teacher), dataset_fingerprint=fingerprint(data.train))
    click.echo("teacher and dataset fingerprints match")
    if samples == 0:
        click.echo("no (sample, view) entries recomputed (--samples 0)")
        return
    rng = np.random.default_rng(0)
    rows = rng.integers(meta.num_samples, size=samples)
    views = rng.integers(meta.num_views, size=samples)
    transform = input_transform(build_augment(meta.augment), meta.mean, meta.std)
    views_of = ReplayDataset(data.train.images, data.train.labels, transform, meta.seed, batched=False, mix=meta.mix,
                             num_classes=meta.num_classes)  # view by view, mixed as the store's views were
    x = torch.stack([views_of[(int(i), int(v))][0] for i, v in zip(rows, views)])
    fresh = teacher_forward(prepare_teacher(teacher, device), x, device, meta.amp).numpy()
    if meta.storage == "topk":  # compare what the store keeps of them: the same top-K classes and tail summary
        fresh = topk.decode("topk", topk.encode("topk", fresh, meta.top_k), 1.0, meta.num_classes)
    stored = store.read(rows, views).astype(np.float32)
    # float16 storage rounds to 11 significant bits; float32 only differs by the teacher's batch arithmetic
    tolerance = 2e-3 if meta.dtype == "float16" else 1e-4
    error = np.abs(stored - fresh) / np.maximum(np.abs(fresh), 1.0)
    worst = int(error.max(axis=1).argmax())
    if error.max() > tolerance:
        raise KDError(f"{store_path}: {(error.max(axis=1) > tolerance).sum()} of {samples} recomputed entries "
                      f"differ beyond {tolerance:g} (worst: sample {rows[worst]}, view {views[worst]}, relative "
                      f"error {error.max():.3g}); the store does not hold this teacher's logits: rebuild it")
    click.echo(f"{samples} recomputed (sample, view) entries agree (largest relative error {error.max():.2g}, "
               f"tolerance {tolerance:g} for {meta.dtype})")
