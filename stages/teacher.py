"""`kd teacher`: train the teacher, or validate and convert the user's weights (`teacher.checkpoint`)."""

import click

from stages.common import device_option, live_log, params_option, setup, stage


@click.command()
@params_option
@device_option
@click.option("--out", default="models/teacher.pt", show_default=True, help="Teacher checkpoint to write.")
@click.option("--live-dir", default=None, help="dvclive directory for per-epoch metrics.")
@click.option("--checkpoint-dir", default=None,
              help="Folder that teacher.checkpoint must lie in (the folder dvc.yaml tracks for this stage).")
@stage
def teacher(params_path, device, out, live_dir, checkpoint_dir):
    """Train the teacher on the training split (or take teacher.checkpoint) and save it to OUT.

    teacher.checkpoint is this project's checkpoint, or weights (.safetensors, or a .pth/.pt state dict, plain or
    nested in a training checkpoint) of teacher.arch: a torchvision name, one of ours, or timm:<name>.

    Training is resumable: after every epoch its state goes to OUT.resume; the same command after a kill continues
    from it (bit-identical weights on the CPU), and it is deleted once OUT is written."""
    import dataclasses

    from pipeline import KDError
    from pipeline.data import fingerprint, input_transform, load_dataset
    from pipeline.models import build_model, save_checkpoint
    from pipeline.augment import build_augment
    from pipeline.resume import resume_at
    from pipeline.step import resolve_train_amp
    from pipeline.train import accuracy, train_teacher

    params, device = setup(params_path, device)
    data = load_dataset(params.data)
    in_channels, image_size = data.image_shape[0], data.image_shape[-1]
    eval_transform = input_transform(None, data.mean, data.std)
    cfg = params.teacher
    if cfg.checkpoint and checkpoint_dir:
        from pathlib import Path

        if not Path(cfg.checkpoint).resolve().is_relative_to(Path(checkpoint_dir).resolve()):
            raise KDError(f"teacher.checkpoint {cfg.checkpoint!r} is outside {checkpoint_dir}/, the folder this "
                          f"stage tracks, so DVC would not notice when it changes; copy it into {checkpoint_dir}/ "
                          f"and set teacher.checkpoint: {checkpoint_dir}/<file>.pt")
    with live_log(live_dir) as log:
        if cfg.checkpoint:
            from pipeline.checkpoints import load_teacher
            from pipeline.augment import check_augment
            from pipeline.models import check_input_shape

            model, ckpt, notes = load_teacher(cfg.checkpoint, cfg.arch, cfg.arch_options, data)
            for note in notes:  # what was stripped or ignored, and warnings: once, here
                click.echo(note, err=note.startswith("Warning"))
            check_input_shape(model, ckpt, cfg.checkpoint, data.image_shape)
            # the cache replays `augment` next: refuse a misfit here, before that stage writes anything
            check_augment(input_transform(build_augment(params.augment), data.mean, data.std), data.train.images[0])
            arch, options, image_size = ckpt["arch"], ckpt.get("options") or {}, ckpt.get("image_size")
            model.to(device)
            # One logged step, so the stage's metrics exist whichever way the teacher came.
            log(0, {"val_acc": accuracy(model, data.val, eval_transform, device, params.num_workers)})
        else:
            arch, options = cfg.arch, cfg.arch_options
            model = build_model(arch, in_channels, data.num_classes, options, image_size, seed=params.seed)
            augment = params.augment if cfg.augment is None else cfg.augment
            transform = input_transform(build_augment(augment), data.mean, data.std)
            resume = resume_at(out, params.seed, dataclasses.asdict(params.data), augment, dataclasses.asdict(cfg),
                               fingerprint(data.train),
                               *([resolve_train_amp(cfg.amp, device)] if cfg.amp == "auto" else []))
            model = train_teacher(model, data.train, data.val, transform, eval_transform, cfg.epochs,
                                  cfg.batch_size, cfg.optimizer, params.seed, device, params.num_workers, log, resume,
                                  cfg.amp, cfg.ema)
    val_acc = accuracy(model, data.val, eval_transform, device, params.num_workers)
    click.echo(f"Teacher ({arch}) validation accuracy: {100 * val_acc:.2f} %")
    if at_chance(val_acc, data.num_classes, len(data.val)):
        why = ("its classes may be in another order than the data's (an image folder's are its sorted folder names), "
               "or it was trained on other data or another normalization" if cfg.checkpoint else
               "it has not learned: train longer, or check teacher.optimizer and the data")
        click.echo(f"Warning: the teacher is at chance level ({100 / data.num_classes:.2f} % for "
                   f"{data.num_classes} classes): {why}. Its logits would teach the student noise", err=True)
    save_checkpoint(model, arch, in_channels, data.num_classes, out, options, image_size,
                    None if cfg.checkpoint else cfg.ema, made_with={"live_dir": live_dir})
    if not cfg.checkpoint:
        resume.clear()


def at_chance(accuracy: float, num_classes: int, count: int) -> bool:
    """True when `accuracy` over `count` images is not above chance, 1/num_classes, by 3 binomial standard errors
    (for 10 classes: 0.167 over 180 images, 0.113 over 5000)."""
    import math

    chance = 1 / num_classes
    return count > 0 and accuracy <= chance + 3 * math.sqrt(chance * (1 - chance) / count)
