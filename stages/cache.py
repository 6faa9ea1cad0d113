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
    from pipeline.data import load_dataset
    from pipeline.models import load_checkpoint
    from pipeline.train import cache_teacher_logits

    params, device = setup(params_path, device)
    data = load_dataset(params.data)
    teacher, ckpt = load_checkpoint(teacher_path)
    cfg = params.cache
    meta = cache_teacher_logits(out, cfg, teacher, ckpt["arch"], data.train, data.num_classes, params.augment,
                                data.mean, data.std, device, params.num_workers)
    click.echo(f"Wrote {out} ({cfg.format}): {meta.num_samples} samples x {meta.num_views} views x "
               f"{meta.num_classes} classes, {meta.dtype}")
