"""`kd distill`: train the student on CE + λT²KL against the cached (or live) teacher logits."""

import click

from stages.common import device_option, live_log, params_option, setup, stage


@click.command()
@params_option
@device_option
@click.option("--teacher", "teacher_path", default="models/teacher.pt", show_default=True,
              help="Teacher checkpoint (checked against the store; run live when teacher_source is online).")
@click.option("--cache", "cache_path", default=None,
              help="Logit store written by `kd cache` (required when distill.teacher_source is cache).")
@click.option("--out", default="models/student.pt", show_default=True, help="Student checkpoint to write.")
@click.option("--live-dir", default=None, help="dvclive directory for per-epoch metrics.")
@click.option("--baseline", is_flag=True, help="Train the student alone (kd_weight 0) on the same views.")
@stage
def distill(params_path, device, teacher_path, cache_path, out, live_dir, baseline):
    """Train distill.student and save it to OUT."""
    from pipeline import KDError
    from pipeline.data import fingerprint, load_dataset
    from pipeline.models import build_model, load_checkpoint, save_checkpoint, weights_fingerprint
    from pipeline.replay import build_augment
    from pipeline.store import LogitStore
    from pipeline.train import accuracy, distill as run_distill, online_targets, store_targets

    params, device = setup(params_path, device)
    cfg = params.distill
    data = load_dataset(params.data)
    teacher, _ = load_checkpoint(teacher_path)
    if cfg.teacher_source == "cache":
        if cache_path is None:
            raise KDError("distill.teacher_source is cache but no --cache store was given")
        store = LogitStore(cache_path)
        store.check_matches(weights_fingerprint(teacher), fingerprint(data.train))
        # The store, not params.yaml, says which views its logits belong to.
        augment, replay_seed, num_views = store.meta.augment, store.meta.seed, store.meta.num_views
        targets = store_targets(store)
    else:
        augment, replay_seed, num_views = params.augment, params.cache.seed, params.cache.num_views
        targets = online_targets(teacher.to(device), device)
    student = build_model(cfg.student, data.image_shape[0], data.num_classes, seed=params.seed)
    with live_log(live_dir) as log:
        run_distill(student, data.train, data.val, targets, build_augment(augment), replay_seed, num_views,
                    temperature=cfg.temperature, kd_weight=0.0 if baseline else cfg.kd_weight,
                    view_schedule=cfg.view_schedule, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                    betas=cfg.betas, weight_decay=cfg.weight_decay, lr_milestones=cfg.lr_milestones,
                    lr_factors=cfg.lr_factors, seed=params.seed, device=device, num_workers=cfg.num_workers,
                    log=log)
    name = "Baseline" if baseline else "Student"
    click.echo(f"{name} ({cfg.student}) validation accuracy: {100 * accuracy(student, data.val, device):.2f} %")
    save_checkpoint(student, cfg.student, data.image_shape[0], data.num_classes, out)
