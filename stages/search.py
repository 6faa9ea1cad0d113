"""`kd search`: choose T and λ on the validation split from one logit store, or one per teacher of an ensemble
(never re-running a teacher)."""

import click

from stages.common import default_store, device_option, open_run_store, params_option, setup, stage, store_checks


@click.command()
@params_option
@device_option
@click.option("--teacher", "teacher_paths", multiple=True, default=["models/teacher.pt"], show_default=True,
              help="Teacher checkpoint (its store must be made from it). Repeat with --cache for an ensemble: "
                   "--cache A --teacher TA --cache B --teacher TB.")
@click.option("--cache", "cache_paths", multiple=True,
              help="Logit store written by `kd cache`; one per --teacher, in the same order  "
                   "[default: cache/teacher_logits.<cache.format>, with one teacher]")
@click.option("--out", default="reports/search.csv", show_default=True,
              help="One row per trial; an interrupted search run again keeps its finished trials.")
@click.option("--figure", default="reports/search.png", show_default=True,
              help="Validation accuracy over T and λ.")
@click.option("--metrics", "metrics_path", default="reports/search.json", show_default=True,
              help="The best trial (JSON).")
@click.option("--write-params", is_flag=True,
              help="Write the best T and λ into the params file's distill.temperature / distill.kd_weight.")
@stage
def search(params_path, device, teacher_paths, cache_paths, out, figure, metrics_path, write_params):
    """Search distill.temperature and distill.kd_weight (params `search`), scored on the validation split.

    Several teachers (an ensemble): one --cache and one --teacher each; every trial mixes their stores by
    distill.ensemble, as `kd distill` does (docs/ensembles.md)."""
    from pipeline import KDError
    from pipeline.data import load_dataset
    from pipeline.ensemble import check_distinct, check_same_views
    from pipeline.models import load_for
    from pipeline.report import json_text, write_text
    from pipeline.search import best_summary, config_hash, plot_search, search as run_search, write_best_params

    params, device = setup(params_path, device)
    if params.distill.view_schedule == "fresh":
        raise KDError("distill.view_schedule is fresh (a new view every epoch, the teacher run live), but kd search "
                      "trains its trials from the store's cache.num_views views; search with view_schedule cycle or "
                      "random")
    cache_paths = cache_paths or ((default_store(params.cache.format),) if len(teacher_paths) == 1 else ())
    if len(cache_paths) != len(teacher_paths):
        raise KDError(f"{len(cache_paths)} --cache stores but {len(teacher_paths)} --teacher checkpoints: give each "
                      "teacher its store, in the same order (--cache A --teacher TA --cache B --teacher TB)")
    data = load_dataset(params.data)
    teachers = [load_for(path, data)[0] for path in teacher_paths]
    memory_bytes = params.memory_mb << 20
    cfg = params.search
    # With worker processes each worker reads the stores within memory_mb itself; here only their metadata is read,
    # so a store is held processes times at most, not once more in this process. Several stores share memory_mb.
    check_distinct(teacher_paths, teachers, cache_paths)
    checks = store_checks(len(teachers), storage=params.cache.storage, top_k=params.cache.top_k,
                          dtype=params.cache.dtype, amp=params.cache.amp)
    stores = [open_run_store(path, params.memory_mb // len(teachers) if cfg.processes == 1 else 0, teacher, data,
                             params.augment, params.cache.seed, params.cache.num_views, params.cache.chunk_samples,
                             mix=params.mix, **checks)
              for path, teacher in zip(cache_paths, teachers)]
    check_same_views(stores)
    store = stores[0] if len(stores) == 1 else stores
    config = config_hash([s.meta for s in stores], params.distill, cfg.epochs, params.seed, params.data)
    # Only the training and validation splits go in: the test split is never read to choose T and λ.
    rows = run_search(store, data.train, data.val, params.distill, cfg, seed=params.seed, config=config, out=out,
                      device=device, memory_bytes=memory_bytes, num_workers=params.num_workers, echo=click.echo)
    plot_search(rows, figure)
    best = best_summary(rows)
    write_text(metrics_path, json_text(best))
    if best["val_acc"] is None:
        click.echo("No trials run (search.trials is 0)" if not rows else "Every trial diverged")
        if write_params:
            raise KDError(f"--write-params: no trial scored, nothing to write into {params_path}")
        return
    click.echo(f"Best of {len(rows)} trials: T = {best['temperature']:g}, λ = {best['kd_weight']:g}, "
               f"validation accuracy {100 * best['val_acc']:.2f} % (round {best['round']}, trial {best['trial']})")
    if write_params:
        changes = write_best_params(params_path, best["temperature"], best["kd_weight"])
        click.echo(f"{params_path}: " + ("; ".join(changes) if changes else "already holds the best T and λ"))
