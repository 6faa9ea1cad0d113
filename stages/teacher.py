"""`kd teacher`: train the teacher, or validate and copy the user's checkpoint (`teacher.checkpoint`)."""

import click

from stages.common import device_option, live_log, params_option, setup, stage


@click.command()
@params_option
@device_option
@click.option("--out", default="models/teacher.pt", show_default=True, help="Teacher checkpoint to write.")
@click.option("--live-dir", default=None, help="dvclive directory for per-epoch metrics.")
@stage
def teacher(params_path, device, out, live_dir):
    """Train the teacher on the training split (or take teacher.checkpoint) and save it to OUT."""
    from pipeline import KDError
    from pipeline.data import load_dataset
    from pipeline.models import build_model, load_checkpoint, save_checkpoint
    from pipeline.replay import build_augment
    from pipeline.train import accuracy, train_teacher

    params, device = setup(params_path, device)
    data = load_dataset(params.data)
    in_channels = data.image_shape[0]
    if params.teacher.checkpoint:
        model, ckpt = load_checkpoint(params.teacher.checkpoint)
        if (ckpt["in_channels"], ckpt["num_classes"]) != (in_channels, data.num_classes):
            raise KDError(f"{params.teacher.checkpoint}: teacher takes {ckpt['in_channels']} channels and "
                          f"predicts {ckpt['num_classes']} classes; the dataset has {in_channels} and "
                          f"{data.num_classes}")
        arch = ckpt["arch"]
    else:
        arch = params.teacher.arch
        model = build_model(arch, in_channels, data.num_classes, seed=params.seed)
        with live_log(live_dir) as log:
            train_teacher(model, data.train, data.val, build_augment(params.augment), params.teacher.epochs,
                          params.teacher.batch_size, params.teacher.lr, params.seed, device, log)
    model.to(device)
    click.echo(f"Teacher ({arch}) validation accuracy: {100 * accuracy(model, data.val, device):.2f} %")
    save_checkpoint(model, arch, in_channels, data.num_classes, out)
