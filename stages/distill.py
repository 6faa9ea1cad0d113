"""`kd distill`: train the student on CE + λT²KL against the cached (or live) teacher logits."""

import click

from stages.common import (default_store, device_option, live_log, open_run_store, params_option, setup, stage,
                           store_checks)


@click.command()
@params_option
@device_option
@click.option("--teacher", "teacher_paths", multiple=True, default=["models/teacher.pt"], show_default=True,
              help="Teacher checkpoint (checked against its store; run live when teacher_source is online). Repeat "
                   "with --cache for an ensemble: --cache A --teacher TA --cache B --teacher TB.")
@click.option("--cache", "cache_paths", multiple=True,
              help="Logit store written by `kd cache` (read when distill.teacher_source is cache); one per "
                   "--teacher, in the same order  [default: cache/teacher_logits.<cache.format>, with one teacher]")
@click.option("--out", default="models/student.pt", show_default=True, help="Student checkpoint to write.")
@click.option("--live-dir", default=None, help="dvclive directory for per-epoch metrics.")
@click.option("--baseline", is_flag=True, help="Train the student alone (kd_weight 0) on the same views.")
@stage
def distill(params_path, device, teacher_paths, cache_paths, out, live_dir, baseline):
    """Train distill.student and save it to OUT (under torchrun: one DDP rank per process, rank 0 writes).

    Several teachers (an ensemble): one --cache and one --teacher each, mixed by distill.ensemble
    (docs/ensembles.md). Resumable: after every epoch the run's state goes to OUT.resume; the same command after a kill
    continues from it (weights bit-identical to an uninterrupted run on the CPU), and it is deleted once OUT is
    written.
    """
    import dataclasses

    from pipeline import KDError, distributed
    from pipeline.data import fingerprint, input_transform, load_dataset
    from pipeline.ensemble import Ensemble, check_distinct, check_same_views, normalized
    from pipeline.models import build_model, load_for, save_checkpoint, weights_fingerprint
    from pipeline.replay import replay_device
    from pipeline.augment import build_augment
    from pipeline.resume import resume_at
    from pipeline.step import resolve_train_amp
    from pipeline.train import accuracy, distill as run_distill, online_targets, store_targets
    from pipeline.loaders import PREFETCH
    from pipeline.mix import as_spec, enabled

    params, device = setup(params_path, device)
    device = distributed.init(device)  # under torchrun: DDP, one rank per process (each on its own GPU)
    try:
        cfg = params.distill
        data = load_dataset(params.data)
        teachers = [load_for(path, data)[0] for path in teacher_paths]
        weights = normalized(cfg.ensemble.weights, len(teachers))
        augment, mean, std = params.augment, data.mean, data.std
        replay_seed, num_views = params.cache.seed, params.cache.num_views
        stores = []
        if cfg.teacher_source == "cache":
            if not cache_paths and len(teachers) > 1:
                raise KDError(f"distill.teacher_source is cache and {len(teachers)} --teacher were given, but no "
                              "--cache: give each teacher its store, in the same order (--cache A --teacher TA "
                              "--cache B --teacher TB)")
            cache_paths = cache_paths or (default_store(params.cache.format),)
            if len(cache_paths) != len(teachers):
                raise KDError(f"{len(cache_paths)} --cache stores but {len(teachers)} --teacher checkpoints: give "
                              "each teacher its store, in the same order (--cache A --teacher TA --cache B "
                              "--teacher TB)")
            check_distinct(teacher_paths, teachers, cache_paths)
            checks = store_checks(len(teachers), storage=params.cache.storage, top_k=params.cache.top_k,
                                  dtype=params.cache.dtype, amp=params.cache.amp)
            stores = [open_run_store(path, params.memory_mb // len(teachers), teacher, data, augment, replay_seed,
                                     num_views, params.cache.chunk_samples, mix=params.mix, **checks)
                      for path, teacher in zip(cache_paths, teachers)]
            check_same_views(stores)
            members = [store_targets(store, cfg.temperature, cfg.topk_tail) for store in stores]
            teacher_facts = [(store.meta.teacher_fingerprint, store.meta.dataset_fingerprint) for store in stores]
            prefetch = 0 if all(store.in_memory for store in stores) else PREFETCH
            for store in stores:
                if not store.in_memory and distributed.rank() == 0:
                    _out_of_core_advice(store, cfg.shuffle_chunks, params.memory_mb)
        else:
            if cache_paths:
                raise KDError(f"--cache {cache_paths[0]} is given, but distill.teacher_source is online: the teacher "
                              "runs live on every batch and no store is read; drop --cache, or set "
                              "distill.teacher_source: cache to train from the store")
            check_distinct(teacher_paths, teachers)
            members = [online_targets(teacher, device, params.cache.amp) for teacher in teachers]
            prefetch = 0
            teacher_facts = [(weights_fingerprint(teacher), fingerprint(data.train)) for teacher in teachers]
        targets = members[0] if len(members) == 1 else Ensemble(members, weights, cfg.ensemble.rule, cfg.temperature)
        in_channels, image_size = data.image_shape[0], data.image_shape[-1]
        student = build_model(cfg.student, in_channels, data.num_classes, cfg.student_options, image_size,
                              seed=params.seed)
        transform = input_transform(build_augment(augment), mean, std)
        eval_transform = input_transform(None, mean, std)
        me = distributed.rank()
        if stores and me == 0 and not baseline:
            for store in stores:
                _replay_advice(store, replay_device(data.train.images, transform, device))
        facts = teacher_facts[0] if len(teacher_facts) == 1 else teacher_facts
        resume = resume_at(out, params.seed, dataclasses.asdict(params.data), augment, replay_seed, num_views,
                           params.cache.chunk_samples, params.cache.amp, _run_fields(cfg, len(teachers)), baseline,
                           facts, *([as_spec(params.mix)] if enabled(params.mix) else []),
                           *([resolve_train_amp(cfg.amp, device)] if cfg.amp == "auto" else []),
                           # everything that makes the targets: each store's whole metadata (dtype, storage, top-K,
                           # the teacher's precision, the replay device, ...), so a store written anew is another run
                           *([[store.meta.to_attrs() for store in stores]] if stores else []))
        with live_log(live_dir if me == 0 else None) as log:
            student = run_distill(student, data.train, data.val, targets, transform, eval_transform, replay_seed,
                                  num_views, cfg, kd_weight=0.0 if baseline else cfg.kd_weight, seed=params.seed,
                                  device=device, num_workers=params.num_workers,
                                  chunk_samples=params.cache.chunk_samples, prefetch=prefetch, log=log,
                                  resume=resume, mix=params.mix, num_classes=data.num_classes)
    finally:
        distributed.close()
    if me != 0:  # rank 0 reports and writes
        return
    name = "Baseline" if baseline else "Student"
    val_acc = accuracy(student, data.val, eval_transform, device, params.num_workers)
    click.echo(f"{name} ({cfg.student}) validation accuracy: {100 * val_acc:.2f} %")
    save_checkpoint(student, cfg.student, in_channels, data.num_classes, out, cfg.student_options, image_size, cfg.ema,
                    made_with={"live_dir": live_dir, "stores": list(cache_paths) if stores else None,
                               "teachers": list(teacher_paths)})
    resume.clear()


def _run_fields(cfg, teachers: int) -> dict:
    """The distill section as it decides this run: `ensemble` only matters with several teachers (so a
    one-teacher run's checkpoint key stays what it was)."""
    import dataclasses

    fields = dataclasses.asdict(cfg)
    if teachers == 1:
        fields.pop("ensemble")
    return fields


def _replay_advice(store, replay: str) -> None:
    """Say on stderr when this run makes its views on another device than the cache did (`replay` in the store):
    a RandomResizedCrop's interpolation rounds differently there, so the student's views are not, bit for bit,
    those whose logits the store holds."""
    if store.meta.replay != replay:
        click.echo(f"warning: {store.path} holds the teacher's logits for views made on {store.meta.replay} "
                   f"(replay: {store.meta.replay}), while this run makes them on {replay}: a RandomResizedCrop's "
                   "interpolation rounds differently there, so the student's views differ from the teacher's in the "
                   "last bits; distill on the device that cached (--device), or re-cache on this one", err=True)


def _out_of_core_advice(store, shuffle_chunks: int, memory_mb: int) -> None:
    """Say on stderr when a store larger than `memory_mb` will be read slowly, and what to change."""
    if shuffle_chunks == 0:
        click.echo(f"note: {store.path} is larger than memory_mb ({memory_mb}) and distill.shuffle_chunks is 0 "
                   "(a full shuffle): every batch reads from most chunks, which is slow; set distill.shuffle_chunks "
                   "(e.g. 4) to shuffle within windows of chunks (docs/large-stores.md)", err=True)
    elif store.chunk_capacity < shuffle_chunks + 1:
        click.echo(f"note: memory_mb ({memory_mb}) holds {store.chunk_capacity} decoded chunks of {store.path}, fewer "
                   f"than a window of distill.shuffle_chunks ({shuffle_chunks}) + 1: chunks will be decoded more than "
                   "once per epoch; raise memory_mb or lower distill.shuffle_chunks", err=True)
