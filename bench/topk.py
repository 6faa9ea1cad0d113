"""How close the top-K store's KD loss and gradient come to full storage, for several K and T, against the
baselines: `renorm` (top-K only), `uniform` (FKD / TinyViT: tail mass at T = 1 spread evenly), `gauss` (tail
mean and spread: tail(T) = mean + var / 2T) and `ours` (pipeline.topk: tail(T) stored at T = 1..16 and inf).

Usage: python bench/topk.py [--store runs/cifar10/logits.zarr] [--append BENCHMARKS.md]
Teachers: a synthetic 1000-class teacher (documented below) and, when --store is given, a real store's logits.
Errors are medians over the views of: |KL_approx - KL_full| / KL_full for the loss KL(q_t || q_s), and
||q_t_approx - q_t||_1 / ||q_s - q_t||_1 for the gradient wrt the student's logits (which is (q_s - q_t) / T).
The student's logits are the teacher's, halved, plus unit Gaussian noise: a student that is learning.
"""

import time

import click
import numpy as np

from output import publish
from pipeline import topk

TEMPERATURES = (1, 2, 4, 8, 20)


def synthetic_teacher(n: int, classes: int = 1000, seed: int = 0) -> np.ndarray:
    """Logits of a confident 1000-class teacher: background N(0, 1.5); the true class +12 (sd 2); 20 classes
    similar to it +5 (sd 2)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    rows = np.arange(n)
    z[rows, rng.integers(classes, size=n)] += rng.normal(12, 2, n)
    similar = rng.integers(classes, size=(n, 20))
    z[rows[:, None], similar] += rng.normal(5, 2, (n, 20))
    return z.astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def approximations(teacher: np.ndarray, k: int, T: float) -> dict[str, np.ndarray]:
    """q_t at temperature T (rows sum to 1) under each scheme."""
    stored = topk.encode("topk", teacher, k)
    order = np.argsort(-teacher, axis=-1, kind="stable")
    tail = np.take_along_axis(teacher, order[..., k:], axis=-1).astype(np.float64)
    out = {}
    for name in ("renorm", "uniform", "gauss", "ours"):
        if name == "ours":
            decoded = topk.decode("topk", stored, T, teacher.shape[-1])
        else:
            if name == "renorm":
                level = np.full(len(teacher), -np.inf)
            elif name == "uniform":
                level = stored["tail"][..., 0]
            else:
                level = tail.mean(-1) + tail.var(-1) / (2 * T)
            decoded = np.repeat(level[:, None], teacher.shape[-1], axis=-1)
            np.put_along_axis(decoded, stored["topk_indices"].astype(np.int64), stored["topk_logits"], axis=-1)
        out[name] = softmax(decoded.astype(np.float64) / T)
    return out


def errors(teacher: np.ndarray, ks, student_seed: int = 1) -> list[dict]:
    student = teacher / 2 + np.random.default_rng(student_seed).normal(0, 1, teacher.shape)
    rows = []
    for k in ks:
        for T in TEMPERATURES:
            q_t, q_s = softmax(teacher.astype(np.float64) / T), softmax(student / T)
            kl = (q_t * (np.log(q_t + 1e-300) - np.log(q_s))).sum(-1)
            grad = np.abs(q_s - q_t).sum(-1)
            for name, approx in approximations(teacher, k, T).items():
                kl_a = (approx * (np.log(approx + 1e-300) - np.log(q_s))).sum(-1)
                rows.append({"K": k, "T": T, "scheme": name,
                             "loss_error": float(np.median(np.abs(kl_a - kl) / kl)),
                             "grad_error": float(np.median(np.abs(approx - q_t).sum(-1) / grad))})
    return rows


def table(rows: list[dict], classes: int, title: str) -> list[str]:
    ks = sorted({r["K"] for r in rows})
    lines = [f"**{title}** ({classes} classes; full float16 storage {2 * classes} bytes per view). "
             "Cells: loss error / gradient error, medians over views.", "",
             "| K | bytes/view | T | renorm | uniform | gauss | ours |", "|---|---|---|---|---|---|---|"]
    for k in ks:
        for T in TEMPERATURES:
            cells = {r["scheme"]: f"{r['loss_error']:.3f} / {r['grad_error']:.3f}" for r in rows
                     if r["K"] == k and r["T"] == T}
            lines.append(f"| {k} | {4 * k + 2 * topk.TAIL_WIDTH} | {T} | {cells['renorm']} | {cells['uniform']} | "
                         f"{cells['gauss']} | {cells['ours']} |")
    return lines


@click.command()
@click.option("--store", default=None, help="A full store whose logits to compress (e.g. runs/cifar10/logits.zarr).")
@click.option("--samples", default=2000, show_default=True)
@click.option("--append", "out", default=None, help="Append the markdown section to this file.")
@click.option("--ks", default="1,2,3,5", show_default=True, help="K values for the real store's table.")
@click.option("--synthetic/--no-synthetic", default=True, show_default=True, help="The synthetic teacher's table.")
@click.option("--json", "json_path", default=None,
              help="Merge the errors into this flat JSON object (keys topk_<loss|grad>_error_<teacher>_K<k>_T<T>_<scheme>).")
def main(store, samples, out, ks, synthetic, json_path):
    results = {}

    def record(rows, teacher):
        for r in rows:
            for what in ("loss", "grad"):
                results[f"topk_{what}_error_{teacher}_K{r['K']}_T{r['T']:g}_{r['scheme']}"] = r[f"{what}_error"]
        return rows

    lines = ["", "## Compact storage for many classes: top-K logits and a tail summary", "",
             f"`python bench/topk.py{' --store ' + store if store else ''}"
             f"{'' if ks == '1,2,3,5' else ' --ks ' + ks}{'' if synthetic else ' --no-synthetic'}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). " + " ".join(__doc__.split("\n\n")[1].split("\n", 1)[1].split()),
             "Bytes per view: K float16 logits + K int16 indices + 6 float16 tail values (the baselines need "
             "1 tail value, 10 bytes less).", ""]
    if synthetic:
        lines += table(record(errors(synthetic_teacher(samples), (5, 20, 100)), "synthetic"), 1000,
                       "Synthetic teacher") + [""]
    if store:
        import zarr

        logits = zarr.open_group(store, mode="r")["logits"]  # read raw: any format version of a full store
        real = np.asarray(logits[:samples, 0]).astype(np.float32)
        lines += table(record(errors(real, [int(k) for k in ks.split(",")]), f"real{real.shape[-1]}"), real.shape[-1],
                       f"Real teacher ({store}, view 0)") + [""]
    publish(lines, results, out, json_path)


if __name__ == "__main__":
    main()
