"""Whether `torch.compile` speeds up the cache stage's teacher, and what it does to the logits (`cache.compile`).

For each teacher: the eager forward (`pipeline.cache.teacher_forward`, eval, no grad, as the cache runs it) against
the same teacher under `torch.compile` (default mode, inductor), alternating, `--repeats` timed passes over the same
batches after warm-up; images per second (medians), the one-off compile time, and the largest difference of the
logits from the eager ones (relative to the largest logit). Keys: `teacher_compile_speedup_<arch>`,
`teacher_compile_max_rel_diff_<arch>`, `teacher_compile_seconds_<arch>`.

Usage: python bench/teacher_compile.py [--repeats 5] [--device cpu] [--append BENCHMARKS.md]
"""

import statistics
import time

import click
import torch

from output import publish
from pipeline.cache import prepare_teacher, teacher_forward
from pipeline.models import build_model

TEACHERS = {"resnet20": (3, 32, 256), "resnet56": (3, 32, 256), "mobilenet_v3_small": (3, 224, 32)}


@click.command()
@click.option("--repeats", default=5, show_default=True)
@click.option("--batches", default=2, show_default=True, help="Batches per timed pass.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--append", "out", default=None)
@click.option("--json", "json_path", default="bench/results.json", show_default=True)
def main(repeats, batches, device, out, json_path):
    device = torch.device(device)
    lines = ["", f"### torch.compile for the cache's teacher (`python bench/teacher_compile.py --repeats {repeats} "
             f"--device {device}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{torch.get_num_threads()} threads)", "",
             "| teacher | input x batch | eager img/s | compiled img/s | speed-up | compile time | max logit difference "
             "(relative) |", "|---|---|---|---|---|---|---|"]
    results = {}
    for arch, (channels, size, batch) in TEACHERS.items():
        teacher = prepare_teacher(build_model(arch, channels, 10, {}, size, seed=0), device)
        compiled = torch.compile(teacher)
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(batch, channels, size, size, generator=g) for _ in range(batches)]
        started = time.perf_counter()
        got = teacher_forward(compiled, xs[0], device, "off")  # compiles
        compile_s = time.perf_counter() - started
        eager = teacher_forward(teacher, xs[0], device, "off")
        diff = ((got - eager).abs().max() / eager.abs().max()).item()
        times = {"eager": [], "compiled": []}
        for _ in range(repeats):
            for name, model in (("eager", teacher), ("compiled", compiled)):
                started = time.perf_counter()
                for x in xs:
                    teacher_forward(model, x, device, "off")
                times[name].append(time.perf_counter() - started)
        rate = {name: batch * batches / statistics.median(t) for name, t in times.items()}
        speedup = rate["compiled"] / rate["eager"]
        results.update({f"teacher_compile_speedup_{arch}": speedup, f"teacher_compile_max_rel_diff_{arch}": diff,
                        f"teacher_compile_seconds_{arch}": compile_s})
        lines.append(f"| {arch} | {channels}x{size}x{size} x {batch} | {rate['eager']:.0f} | {rate['compiled']:.0f} | "
                     f"{speedup:.2f}x | {compile_s:.0f} s | {diff:.1e} |")
        print(lines[-1], flush=True)
    publish(lines, results, out, json_path)


if __name__ == "__main__":
    main()
