"""Options shared by every stage, defined once, and the error boundary between library and CLI."""

from __future__ import annotations

import contextlib
import functools

import click

params_option = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(dir_okay=False), help="The parameters file.")
device_option = click.option("--device", default=None,
                             help="Overrides params.yaml `device` (auto | cpu | cuda | cuda:N).")


def stage(func):
    """Turn a library error (KDError) into a clear CLI error: message on stderr, exit status 1, below any progress
    bar the error interrupted."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from pipeline import KDError

        try:
            return func(*args, **kwargs)
        except KDError as e:
            _close_progress_bars()
            message = str(e)
            if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original message
                message = message.rstrip().rsplit("KDError: ", 1)[-1]
            raise click.ClickException(message) from None
        except OSError as e:  # e.g. an output under a folder that cannot be written
            _close_progress_bars()
            where = e.filename or "a file"
            raise click.ClickException(f"{where}: {e.strerror or e}; check that the path exists and is "
                                       "writable (or readable, for inputs)") from None

    return wrapper


def _close_progress_bars() -> None:
    """Close every open tqdm bar. A bar left open by an error is otherwise closed when the process exits, after
    the error was printed, and its line (often a "100%") would be the last on screen, reading like success."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def setup(params_path: str, device: str | None):
    """Load params and pick the device: (params, torch.device)."""
    from pipeline.models import resolve_device
    from pipeline.params import load_params

    params = load_params(params_path)
    return params, resolve_device(device or params.device)


@contextlib.contextmanager
def live_log(live_dir: str | None):
    """A dvclive logger as an `EpochLog` callable (a no-op without a directory)."""
    if live_dir is None:
        yield lambda epoch, metrics: None
        return
    from dvclive import Live

    with Live(dir=live_dir, save_dvc_exp=False, dvcyaml=False) as live:
        def log(epoch: int, metrics: dict) -> None:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()

        yield log


def default_store(cache_format: str) -> str:
    """Where dvc.yaml puts the logit store, `cache/teacher_logits.<cache.format>`: the default of `kd cache --out`
    and of every `--cache` (one convention: an input defaults to where the command that writes it writes it)."""
    return f"cache/teacher_logits.{cache_format}"


def store_checks(teachers: int, **fields) -> dict:
    """What `open_run_store` holds a store to from params.yaml's `cache` section (`fields`: storage, top_k, dtype,
    amp) for a lone store, the one `kd cache` writes with these params; {} for an ensemble, whose stores may each
    have been written with other values (top-K beside full, float16 beside float32): each is read as its own
    metadata says (they still name the run: the resume key and search's config hash hold every store's)."""
    return fields if teachers == 1 else {}


def open_run_store(path, memory_mb: int, teacher, data, augment, seed: int, num_views: int, chunk_samples: int,
                   storage: str | None = None, top_k: int = 0, dtype: str | None = None, amp: str | None = None,
                   mix=None):
    """The logit store at `path` (read within `memory_mb`), refused with every differing field named (its value
    in the store and in this run) unless its logits belong to the views this run replays: same teacher weights
    and training data (fingerprints), augmentation, mixing (`mix`), normalisation, replay seed, views, samples,
    classes and chunk
    rows; and, when given (`params.cache`), the same `storage` (and `top_k` when storage is topk) and `dtype`.
    `amp` is compared only when explicit (off, float16, bfloat16): `auto` resolves on the device that ran the
    teacher (float16 on a GPU), so a store cached on a GPU serves a distill run on the CPU."""
    from pipeline.data import fingerprint
    from pipeline.mix import as_spec
    from pipeline.models import weights_fingerprint
    from pipeline.store import LogitStore

    store = LogitStore(path, max_memory_bytes=memory_mb << 20)
    expected = {"storage": storage, "dtype": dtype, "amp": None if amp in (None, "auto") else amp}
    if storage == "topk":
        expected["top_k"] = top_k
    store.check_run(teacher_fingerprint=weights_fingerprint(teacher), dataset_fingerprint=fingerprint(data.train),
                    augment=augment, mean=list(data.mean), std=list(data.std), seed=seed, num_views=num_views,
                    num_samples=len(data.train), num_classes=data.num_classes, chunk_samples=chunk_samples,
                    mix=as_spec(mix),
                    **{key: value for key, value in expected.items() if value is not None})
    return store
