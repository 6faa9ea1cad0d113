"""`kd evaluate`: teacher (or teachers), student and baseline on the test split; verdict, metrics, figures, report
(md + html)."""

import click

from stages.common import device_option, params_option, setup, stage

TIMING = {"batch_size": 256, "warmup": 3, "repeats": 10}  # inference timing: test images per batch, passes
SEARCH = {"csv": "reports/search.csv", "figure": "reports/search.png"}  # kd search's default --out and --figure


@click.command()
@params_option
@device_option
@click.option("--teacher", "teacher_paths", multiple=True, default=["models/teacher.pt"], show_default=True,
              help="Teacher checkpoint; repeat for an ensemble (in kd distill's --teacher order): the first is the "
                   "report's `teacher`, and the report adds each teacher, the ensemble and the student's agreement.")
@click.option("--student", "student_path", default="models/student.pt", show_default=True)
@click.option("--baseline", "baseline_path", default="models/baseline.pt", show_default=True)
@click.option("--teacher-live", default=None,
              help="dvclive directory of the teacher (curves it lacks are left out)  [default: the one its checkpoint "
                   "records, from kd teacher --live-dir]")
@click.option("--student-live", default=None,
              help="dvclive directory of the distilled student  [default: the one its checkpoint records]")
@click.option("--baseline-live", default=None,
              help="dvclive directory of the baseline  [default: the one its checkpoint records]")
@click.option("--cache", "cache_path", default=None,
              help="The logit store (a path, or a URL as `kd cache --out` takes), for the report's cache facts  "
                   "[default: the first store the student's checkpoint records]")
@click.option("--search-figure", default=SEARCH["figure"], show_default=True,
              help="`kd search`'s figure (its --figure), embedded when the file exists.")
@click.option("--search-csv", default=SEARCH["csv"], show_default=True,
              help="`kd search`'s trials (its --out), summarised when the file exists.")
@click.option("--metrics", "metrics_path", default="reports/metrics.json", show_default=True)
@click.option("--report", "report_path", default="reports/report.md", show_default=True)
@click.option("--html", "html_path", default="reports/report.html", show_default=True,
              help="The report as one self-contained HTML page.")
@click.option("--confusion", "confusion_path", default="reports/confusion.csv", show_default=True,
              help="The distilled student's test predictions as actual,predicted rows (DVC's confusion plot).")
@click.option("--figures", "figures_dir", default="reports/figures", show_default=True)
@stage
def evaluate(params_path, device, teacher_paths, student_path, baseline_path, teacher_live, student_live,
             baseline_live, cache_path, search_figure, search_csv, metrics_path, report_path, html_path,
             confusion_path, figures_dir):
    """Score the models on the test split, print the verdict, write metrics, figures and report.

    Inputs not given are those the models' checkpoints record (training curves: the --live-dir each was trained
    with; the store: the student's first --cache), and kd search's default outputs; the command prints which it
    used, and leaves out what none records.

    Several --teacher (an ensemble): the first is the report's teacher; each teacher's test accuracy, the
    ensemble's (their logits mixed by distill.ensemble at distill.temperature, as the student's targets were) and
    the student's agreement with each are added (docs/ensembles.md)."""
    import dataclasses
    from pathlib import Path

    import torch

    from pipeline import figures as fig
    from pipeline import metrics as m
    from pipeline import render
    from pipeline import report as r
    from pipeline.data import input_transform, load_dataset
    from pipeline.models import load_for, made_with
    from tqdm.auto import tqdm

    params, device = setup(params_path, device)
    d = params.distill
    if len(teacher_paths) > 1:  # an ensemble: its weights are checked before any model runs
        from pipeline.ensemble import normalized

        weights = normalized(d.ensemble.weights, len(teacher_paths))
    data = load_dataset(params.data)
    test, transform = data.test, input_transform(None, data.mean, data.std)
    labels, classes = test.labels.numpy(), data.classes
    # every model is loaded, and checked against the data, before any runs
    roles = [("teacher", teacher_paths[0]), ("student", student_path), ("baseline", baseline_path)]
    loaded = {name: load_for(path, data, name) for name, path in roles}
    others = [load_for(path, data, "teacher") for path in teacher_paths[1:]]
    if others:
        from pipeline.ensemble import check_distinct

        check_distinct(teacher_paths, [loaded["teacher"][0]] + [model for model, _ in others])
    live = {name: _input(given, made_with(loaded[name][1], "live_dir"), path, "training curves")
            for (name, path), given in zip(roles, (teacher_live, student_live, baseline_live))}
    # read before any model runs: a curve missing from a directory given or recorded stops the stage here
    histories = {name: r.read_history(path, required=name != "teacher") if path else {} for name, path in live.items()}
    stores = made_with(loaded["student"][1], "stores")
    cache_path = _input(cache_path, stores[0] if stores else None, student_path, "store")
    found = [what for what in (search_csv, search_figure) if what and Path(what).is_file()]
    click.echo(f"search: {', '.join(found)}" if found else f"search: none ({search_csv} not found: no search has run)")
    timing_inputs = torch.stack([transform(test.images[i]) for i in range(min(TIMING["batch_size"], len(test)))])
    logits, facts, teacher_logits = {}, {}, []
    with tqdm(total=len(roles) + len(others), desc="evaluate", unit="model") as bar:
        for name, _ in roles:
            model, ckpt = loaded[name]
            model.to(device)
            logits[name] = m.predict(model, test, transform, device, params.num_workers)  # the one pass per model
            facts.update({f"{name}_arch": ckpt["arch"], f"{name}_params": m.count_parameters(model),
                          f"{name}_ms_per_image": m.inference_ms(model, timing_inputs, device, TIMING["warmup"],
                                                                 TIMING["repeats"])})
            bar.update()
        for model, _ in others:  # the first teacher ran above, as `teacher`; the others run once each here
            teacher_logits.append(m.predict(model.to(device), test, transform, device, params.num_workers))
            bar.update()
    metrics = {**m.test_metrics(logits, labels, data.num_classes, params.evaluate.threshold), **facts,
               "timing": {**TIMING, "batch_size": len(timing_inputs), "device": describe(device)},
               "search": r.read_search(search_csv), "cache": r.cache_facts(cache_path) if cache_path else None}
    if others:
        teacher_logits, archs = [logits["teacher"], *teacher_logits], [facts["teacher_arch"]]
        archs += [ckpt["arch"] for _, ckpt in others]
        metrics.update(m.ensemble_metrics(teacher_logits, logits["student"], logits["baseline"], labels, weights,
                                          d.ensemble.rule, d.temperature))
        metrics["ensemble"] = {"teachers": list(teacher_paths), "archs": archs, "weights": weights,
                               "rule": d.ensemble.rule, "temperature": d.temperature}
    confusion = {name: m.confusion_matrix(labels, values.argmax(1), data.num_classes) for name, values in logits.items()}
    bins = {name: m.calibration_bins(values, labels) for name, values in logits.items()}

    out = Path(figures_dir)
    teacher_history = histories["teacher"]
    figures = {"training": out / "training.png", "teacher": out / "teacher.png" if teacher_history else None,
               "confusion": out / "confusion.png", "per_class": out / "per_class.png",
               "reliability": out / "reliability.png",
               "search": Path(search_figure) if search_figure and Path(search_figure).is_file() else None}
    fig.plot_training({"distilled": histories["student"], "baseline (λ = 0)": histories["baseline"]},
                      figures["training"])
    if teacher_history:
        fig.plot_training({"teacher": teacher_history}, figures["teacher"])
    fig.plot_confusion(confusion["student"], classes, figures["confusion"], "Distilled student: confusion matrix (test)")
    labelled = {"teacher": "teacher", "student": "distilled", "baseline": "baseline (λ = 0)"}
    fig.plot_per_class({labelled[n]: m.per_class_accuracy(c) for n, c in confusion.items()}, classes,
                       figures["per_class"])
    fig.plot_reliability({labelled[n]: b for n, b in bins.items()},
                         {labelled[n]: metrics[f"{n}_ece"] for n in bins}, figures["reliability"])

    settings = {"student": d.student, "temperature T": d.temperature, "kd_weight λ": d.kd_weight,
                "ce_weight α": d.ce_weight, "views per sample": params.cache.num_views, "view schedule": d.view_schedule,
                "epochs": d.epochs, "augment": params.augment, "mix": params.mix.mode if params.mix.mode == "none" else
                dataclasses.asdict(params.mix), "teacher source": d.teacher_source}
    if len(teacher_paths) > 1:
        settings["ensemble"] = f"{len(teacher_paths)} teachers, rule {d.ensemble.rule}, weights {weights}"
    sections = r.report_sections(metrics, settings, classes, confusion["student"], figures, list(teacher_history),
                                 search_csv)
    r.write_text(report_path, render.to_markdown(sections, "Distillation report", Path(report_path).parent))
    r.write_text(html_path, render.to_html(sections, "Distillation report"))
    r.write_text(confusion_path, r.confusion_csv(labels, logits["student"].argmax(1), classes))
    r.write_text(metrics_path, r.json_text(metrics))  # strict JSON: a NaN (e.g. a class without test images) is null
    if len(teacher_paths) == 1:
        click.echo(f"Teacher test accuracy: {100 * metrics['teacher_acc']:.2f} %")
    else:  # teacher 0 is the report's `teacher`: its accuracy is printed once, with the others
        for k, path in enumerate(teacher_paths):
            click.echo(f"Teacher {k} ({path}) test accuracy: {100 * metrics[f'teacher_acc_{k}']:.2f} %")
        click.echo(f"Ensemble of {len(teacher_paths)} teachers test accuracy: {100 * metrics['ensemble_acc']:.2f} %")
    click.echo(f"Baseline (student alone) test accuracy: {100 * metrics['baseline_acc']:.2f} %")
    click.echo(f"Student model test accuracy: {100 * metrics['student_acc']:.2f} %")
    click.echo(f"Is above threshold performance? {metrics['above_threshold']}")


def _input(given, recorded, model_path, what: str):
    """The input a report uses, printed with where it came from: `given` (an option), else `recorded` (in the
    checkpoint at `model_path`), else none (left out)."""
    if given is not None:
        click.echo(f"{what} of {model_path}: {given} (given)")
        return given
    if recorded is not None:
        click.echo(f"{what} of {model_path}: {recorded} (recorded in {model_path})")
        return recorded
    click.echo(f"{what} of {model_path}: none recorded in {model_path}: left out")
    return None


def describe(device) -> str:
    """The device the timing ran on, in words: `cpu (2 threads)` or `cuda:0 (NVIDIA H100 ...)`."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'s' if threads > 1 else ''})"
