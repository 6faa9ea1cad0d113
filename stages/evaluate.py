"""`kd evaluate`: teacher (or teachers), student and baseline on the test split; verdict, metrics, figures, report
(md + html)."""

import click

from stages.common import device_option, params_option, setup, stage

TIMING = {"batch_size": 256, "warmup": 3, "repeats": 10}  # inference timing: test images per batch, passes


@click.command()
@params_option
@device_option
@click.option("--teacher", "teacher_paths", multiple=True, default=["models/teacher.pt"], show_default=True,
              help="Teacher checkpoint; repeat for an ensemble (in kd distill's --teacher order): the first is the "
                   "report's `teacher`, and the report adds each teacher, the ensemble and the student's agreement.")
@click.option("--student", "student_path", default="models/student.pt", show_default=True)
@click.option("--baseline", "baseline_path", default="models/baseline.pt", show_default=True)
@click.option("--teacher-live", default="reports/live/teacher", show_default=True,
              help="dvclive directory of the teacher (curves it lacks are left out).")
@click.option("--student-live", default="reports/live/student", show_default=True,
              help="dvclive directory of the distilled student.")
@click.option("--baseline-live", default="reports/live/baseline", show_default=True,
              help="dvclive directory of the baseline.")
@click.option("--cache", "cache_path", default=None,
              help="The logit store (a path, or a URL as `kd cache --out` takes), for the report's cache facts.")
@click.option("--search-figure", default=None, help="`kd search`'s figure, embedded when the file exists.")
@click.option("--search-csv", default=None, help="`kd search`'s trials, summarised when the file exists.")
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

    Several --teacher (an ensemble): the first is the report's teacher; each teacher's test accuracy, the
    ensemble's (their logits mixed by distill.ensemble at distill.temperature, as the student's targets were) and
    the student's agreement with each are added (README, "Ensembles")."""
    import dataclasses
    from pathlib import Path

    import torch

    from pipeline import figures as fig
    from pipeline import metrics as m
    from pipeline import render
    from pipeline import report as r
    from pipeline.data import input_transform, load_dataset
    from pipeline.models import load_checkpoint

    params, device = setup(params_path, device)
    d = params.distill
    if len(teacher_paths) > 1:  # an ensemble: its weights are checked before any model runs
        from pipeline.ensemble import normalized

        weights = normalized(d.ensemble.weights, len(teacher_paths))
    data = load_dataset(params.data)
    test, transform = data.test, input_transform(None, data.mean, data.std)
    labels, classes = test.labels.numpy(), data.classes
    timing_inputs = torch.stack([transform(test.images[i]) for i in range(min(TIMING["batch_size"], len(test)))])
    logits, facts = {}, {}
    for name, path in (("teacher", teacher_paths[0]), ("student", student_path), ("baseline", baseline_path)):
        model, ckpt = load_checkpoint(path)
        model.to(device)
        logits[name] = m.predict(model, test, transform, device, params.num_workers)  # the one pass per model
        facts.update({f"{name}_arch": ckpt["arch"], f"{name}_params": m.count_parameters(model),
                      f"{name}_ms_per_image": m.inference_ms(model, timing_inputs, device, TIMING["warmup"],
                                                             TIMING["repeats"])})
    metrics = {**m.test_metrics(logits, labels, data.num_classes, params.evaluate.threshold), **facts,
               "timing": {**TIMING, "batch_size": len(timing_inputs), "device": describe(device)},
               "search": r.read_search(search_csv), "cache": r.cache_facts(cache_path) if cache_path else None}
    if len(teacher_paths) > 1:  # the first teacher ran above, as `teacher`; the others run once each here
        teacher_logits, archs = [logits["teacher"]], [facts["teacher_arch"]]
        for path in teacher_paths[1:]:
            model, ckpt = load_checkpoint(path)
            teacher_logits.append(m.predict(model.to(device), test, transform, device, params.num_workers))
            archs.append(ckpt["arch"])
        metrics.update(m.ensemble_metrics(teacher_logits, logits["student"], logits["baseline"], labels, weights,
                                          d.ensemble.rule, d.temperature))
        metrics["ensemble"] = {"teachers": list(teacher_paths), "archs": archs, "weights": weights,
                               "rule": d.ensemble.rule, "temperature": d.temperature}
    confusion = {name: m.confusion_matrix(labels, values.argmax(1), data.num_classes) for name, values in logits.items()}
    bins = {name: m.calibration_bins(values, labels) for name, values in logits.items()}

    out = Path(figures_dir)
    teacher_history = r.read_history(teacher_live, required=False)
    figures = {"training": out / "training.png", "teacher": out / "teacher.png" if teacher_history else None,
               "confusion": out / "confusion.png", "per_class": out / "per_class.png",
               "reliability": out / "reliability.png",
               "search": Path(search_figure) if search_figure and Path(search_figure).is_file() else None}
    fig.plot_training({"distilled": r.read_history(student_live), "baseline (λ = 0)": r.read_history(baseline_live)},
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
    click.echo(f"Teacher test accuracy: {100 * metrics['teacher_acc']:.2f} %")
    if len(teacher_paths) > 1:
        for k, path in enumerate(teacher_paths):
            click.echo(f"Teacher {k} ({path}) test accuracy: {100 * metrics[f'teacher_acc_{k}']:.2f} %")
        click.echo(f"Ensemble of {len(teacher_paths)} teachers test accuracy: {100 * metrics['ensemble_acc']:.2f} %")
    click.echo(f"Baseline (student alone) test accuracy: {100 * metrics['baseline_acc']:.2f} %")
    click.echo(f"Student model test accuracy: {100 * metrics['student_acc']:.2f} %")
    click.echo(f"Is above threshold performance? {metrics['above_threshold']}")


def describe(device) -> str:
    """The device the timing ran on, in words: `cpu (2 threads)` or `cuda:0 (NVIDIA H100 ...)`."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'s' if threads > 1 else ''})"
