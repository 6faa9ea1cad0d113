"""`kd cache`: run the teacher once over every (training sample, view) and store its raw logits."""

import click

from stages.common import device_option, params_option, setup, stage


@click.command()
@params_option
@device_option
@click.option("--teacher", "teacher_path", default="models/teacher.pt", show_default=True,
              help="Teacher checkpoint.")
@click.option("--out", required=True, help="Store to write: a zarr directory or an HDF5 file (cache.format).")
@stage
def cache(params_path, device, teacher_path, out):
    """Write the teacher's logits for cache.num_views replayed views of each training sample to OUT."""
    from pipeline.data import fingerprint, load_dataset
    from pipeline.models import load_checkpoint, weights_fingerprint
    from pipeline.replay import build_augment
    from pipeline.store import LogitStore, StoreMeta, write_store
    from pipeline.train import teacher_logit_blocks

    params, device = setup(params_path, device)
    data = load_dataset(params.data)
    teacher, ckpt = load_checkpoint(teacher_path)
    cfg = params.cache
    meta = StoreMeta(num_samples=len(data.train), num_views=cfg.num_views, num_classes=data.num_classes,
                     augment=params.augment, seed=cfg.seed, dtype=cfg.dtype, teacher_arch=ckpt["arch"],
                     teacher_fingerprint=weights_fingerprint(teacher), dataset_fingerprint=fingerprint(data.train))
    blocks = teacher_logit_blocks(teacher.to(device), data.train.images, build_augment(params.augment), cfg.seed,
                                  cfg.num_views, cfg.batch_size, cfg.chunk_samples, device)
    write_store(out, cfg.format, meta, data.train.labels.numpy(), blocks, cfg.chunk_samples)
    store = LogitStore(out)
    click.echo(f"Wrote {out} ({store.format}): {meta.num_samples} samples x {meta.num_views} views x "
               f"{meta.num_classes} classes, {meta.dtype}")
