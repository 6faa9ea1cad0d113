"""`kd evaluate`: test accuracy of teacher, student and baseline; metrics, figure and report."""

import click

from stages.common import device_option, params_option, setup, stage


@click.command()
@params_option
@device_option
@click.option("--teacher", "teacher_path", default="models/teacher.pt", show_default=True)
@click.option("--student", "student_path", default="models/student.pt", show_default=True)
@click.option("--baseline", "baseline_path", default="models/baseline.pt", show_default=True)
@click.option("--student-live", default="reports/live/student", show_default=True,
              help="dvclive directory of the distilled student.")
@click.option("--baseline-live", default="reports/live/baseline", show_default=True,
              help="dvclive directory of the baseline.")
@click.option("--metrics", "metrics_path", default="reports/metrics.json", show_default=True)
@click.option("--report", "report_path", default="reports/report.md", show_default=True)
@click.option("--figures", "figures_dir", default="reports/figures", show_default=True)
@stage
def evaluate(params_path, device, teacher_path, student_path, baseline_path, student_live, baseline_live,
             metrics_path, report_path, figures_dir):
    """Score the models on the test split, print the verdict, write metrics, figure and report."""
    import json
    import os
    from pathlib import Path

    from pipeline.data import input_transform, load_dataset
    from pipeline.models import load_checkpoint
    from pipeline.report import markdown_report, plot_training, read_history, write_text
    from pipeline.train import accuracy

    params, device = setup(params_path, device)
    data = load_dataset(params.data)
    test, transform = data.test, input_transform(None, data.mean, data.std)
    acc = {name: accuracy(load_checkpoint(path)[0].to(device), test, transform, device, params.num_workers)
           for name, path in (("teacher", teacher_path), ("student", student_path), ("baseline", baseline_path))}
    threshold = params.evaluate.threshold
    metrics = {"teacher_acc": acc["teacher"], "student_acc": acc["student"], "baseline_acc": acc["baseline"],
               "kd_gain": acc["student"] - acc["baseline"], "threshold": threshold,
               "above_threshold": acc["student"] >= threshold, "test_samples": len(test),
               **{f"{name}_errors": round((1 - a) * len(test)) for name, a in acc.items()}}
    figure = Path(figures_dir) / "training.png"
    plot_training({"distilled": read_history(student_live), "baseline (λ = 0)": read_history(baseline_live)},
                  figure)
    d = params.distill
    settings = {"student": d.student, "temperature T": d.temperature, "kd_weight λ": d.kd_weight,
                "ce_weight α": d.ce_weight, "views per sample": params.cache.num_views, "view schedule": d.view_schedule,
                "epochs": d.epochs, "augment": params.augment, "teacher source": d.teacher_source}
    report = markdown_report(metrics, settings, os.path.relpath(figure, Path(report_path).parent))
    write_text(report_path, report)
    write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    click.echo(f"Teacher test accuracy: {100 * acc['teacher']:.2f} %")
    click.echo(f"Baseline (student alone) test accuracy: {100 * acc['baseline']:.2f} %")
    click.echo(f"Student model test accuracy: {100 * acc['student']:.2f} %")
    click.echo(f"Is above threshold performance? {metrics['above_threshold']}")
