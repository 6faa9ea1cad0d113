"""The crop and flip draws of a batch of views: computed for the whole batch at once against torch's own calls.

Usage: python bench/draws.py [--repeats 5] [--append BENCHMARKS.md] [--json bench/results.json]

`BatchReplay.draw` gives each view's crop offsets and flips exactly as `replay_view` draws them: a generator seeded
per view, then `torch.randint` per cropped axis and `torch.rand` per flip. Two ways, alternated in every repeat, on
the CIFAR augmentation (RandomCrop 32 padding 4, RandomHorizontalFlip: 3 words a view) for batches of 64 to 16,384
views:
  computed  the generators' words for the whole batch at once (`pipeline.replay.mt19937_words`; `draw` does so from
            `COMPUTED_FROM` views, forced here for every size)
  calls     torch's calls view by view (what `draw` does where `mt19937_is_torchs` is False; before it, always)
Both give the same numbers (checked here for each batch). Keys in results.json: draws_views_per_s_<way>_<batch>,
draws_computed_vs_calls_<batch> (medians of per-repeat ratios).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from output import publish  # noqa: E402

BATCHES = (64, 128, 256, 1_024, 16_384)


def views_per_s(plan, samples, views, computed: bool) -> tuple[float, np.ndarray]:
    """Views a second of one `plan.draw` over the batch (at least ~0.3 s of draws), and the parameters drawn."""
    from pipeline import replay

    real, threshold = replay.mt19937_is_torchs, replay.COMPUTED_FROM
    replay.mt19937_is_torchs, replay.COMPUTED_FROM = (real, 0) if computed else (lambda: False, threshold)
    try:
        count, start = 0, time.perf_counter()
        while True:
            params = plan.draw(0, samples, views, (3, 32, 32))
            count += len(samples)
            elapsed = time.perf_counter() - start
            if elapsed > 0.3:
                return count / elapsed, params
    finally:
        replay.mt19937_is_torchs, replay.COMPUTED_FROM = real, threshold


@click.command()
@click.option("--repeats", default=5, show_default=True)
@click.option("--append", "out", default=None, help="Append the markdown section to this file.")
@click.option("--json", "json_path", default="bench/results.json", show_default=True)
@click.option("--quick", is_flag=True, help="Smoke run: one repeat, batches of 64; numbers meaningless.")
def main(repeats, out, json_path, quick):
    import torch

    from pipeline.augment import build_augment
    from pipeline.data import input_transform
    from pipeline.replay import COMPUTED_FROM, BatchReplay

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    augment = [{"RandomCrop": {"size": 32, "padding": 4}}, {"RandomHorizontalFlip": {"p": 0.5}}]
    plan = BatchReplay.of(input_transform(build_augment(augment), (0.5,) * 3, (0.25,) * 3))
    batches, repeats = ((64,), 1) if quick else (BATCHES, repeats)
    rows, results = [], {}
    for size in batches:
        samples, views = np.arange(size) * 7 + 3, np.arange(size) % 4
        rates = {"computed": [], "calls": []}
        for r in range(repeats):
            drawn = {}
            for way in (("computed", "calls") if r % 2 == 0 else ("calls", "computed")):
                rate, drawn[way] = views_per_s(plan, samples, views, way == "computed")
                rates[way].append(rate)
            if not np.array_equal(drawn["computed"], drawn["calls"]):
                raise SystemExit(f"the computed draws differ from torch's calls for a batch of {size}")
        ratio = statistics.median(a / b for a, b in zip(rates["computed"], rates["calls"]))
        for way in rates:
            results[f"draws_views_per_s_{way}_{size}"] = statistics.median(rates[way])
        results[f"draws_computed_vs_calls_{size}"] = ratio
        rows.append(f"| {size:,} | {statistics.median(rates['computed']):,.0f} | "
                    f"{1e6 / statistics.median(rates['computed']):.2f} | {statistics.median(rates['calls']):,.0f} | "
                    f"{1e6 / statistics.median(rates['calls']):.2f} | {ratio:.1f}x |")
    command = " ".join(["python bench/draws.py", *sys.argv[1:]])
    lines = ["", "## The crop and flip draws of a batch: computed at once against torch's calls", "",
             f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
             f"{torch.get_num_threads()} torch thread(s)): `BatchReplay.draw` for the CIFAR augmentation (RandomCrop "
             "32 padding 4, flip: 3 generator words a view), the generators' words computed for the batch at once "
             "(`mt19937_words`) against torch's calls view by view, alternated, medians of "
             f"{repeats}; the same numbers both ways (checked). `draw` computes them from {COMPUTED_FROM} views.", "",
             "| views a batch | computed: views/s | us a view | calls: views/s | us a view | computed / calls |",
             "|---|---|---|---|---|---|", *rows]
    publish(lines, results, out, json_path)


if __name__ == "__main__":
    main()
