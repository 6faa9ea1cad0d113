"""Resumable training: an end-of-epoch checkpoint of everything that decides the rest of a run.

`kd teacher` and `kd distill` save, after every epoch e, the state that the rest of the run is a pure function
of: the model's state dict (weights and buffers), the optimiser's and the schedule's state, torch's CPU (and
CUDA) generator state of every rank, the next epoch e + 1 and the metrics logged so far. The samplers need
nothing: epoch e's order and views are pure functions of (seed, e), and every view is replayed from its own seed.
Killed at any moment (SIGKILL, a machine crash) and started again with the same command, the run restores that
state and continues with epoch e + 1; its weights end bit-identical (CPU) to an uninterrupted run's, and the
logged metrics are replayed into dvclive first, so its history holds every step once.

A checkpoint is bound to a key: a hash of everything else that decides the run (params, data, teacher, store,
number of ranks). One with another key is from another run: it is not used, and is replaced by this run's
(said on stderr). Writes are atomic: `<path>.tmp`, flushed and fsynced, renamed over `path`, and the folder
fsynced, so the file on disk is always a whole checkpoint, the previous one or the new one. The stage deletes it
once its output is written: a finished run leaves nothing behind (so `dvc repro` never sees it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.writer import fsync_path


def run_key(*parts) -> str:
    """A short hash of `parts` (JSON-able values: params as dicts, fingerprints, counts)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resume_at(out: str | Path, *decides) -> "Resume":
    """The checkpoint of the run that writes `out`: `<out>.resume`, bound to `decides` (everything that decides the
    run's result: params sections, fingerprints) and the number of processes."""
    return Resume(f"{out}.resume", run_key(*decides, distributed.world_size()))


class Resume:
    """The end-of-epoch checkpoint of one run at `path`, bound to `key` (`run_key` of what decides the run)."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key

    def load(self) -> dict | None:
        """This run's last saved state, or None (no checkpoint, or one of another run: said on stderr).
        Under torchrun rank 0 reads it and every rank gets the same."""
        state = None
        if distributed.rank() == 0 and self.path.exists():
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 -- an unreadable checkpoint is not the run's: start afresh
                print(f"note: {self.path} cannot be read ({type(e).__name__}: {e}); starting from epoch 0",
                      file=sys.stderr)
            if state is not None and state.get("key") != self.key:
                print(f"note: {self.path} is a checkpoint of another run (other params, data, teacher or number of "
                      "processes); starting from epoch 0 (it is replaced after the first epoch)", file=sys.stderr)
                state = None
        return distributed.broadcast(state)

    def save(self, state: dict) -> None:
        """Write `state` (tensors, numbers, lists, dicts) atomically and durably; rank 0 writes."""
        if distributed.rank() != 0:
            return
        buffer = io.BytesIO()
        torch.save({**state, "key": self.key}, buffer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_path(self.path.parent)  # the rename

    def clear(self) -> None:
        """Delete the checkpoint (the run's output is written)."""
        if distributed.rank() == 0:
            self.path.unlink(missing_ok=True)
            self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)


def capture(model: torch.nn.Module, optimizer, schedule, epoch: int, history: list[dict]) -> dict:
    """The state after epoch `epoch` (call it on every rank: the generator states are gathered to rank 0)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "rng": distributed.gather(rng), "history": list(history)}


def restore(state: dict, model: torch.nn.Module, optimizer, schedule) -> tuple[int, list[dict]]:
    """Load `state` into the run; returns (the epoch to start with, the metrics logged before it)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    rng = state["rng"][distributed.rank()]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["epoch"]), list(state["history"])

