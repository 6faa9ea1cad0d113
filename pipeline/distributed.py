"""torch.distributed, as torchrun sets it up: rank and world size from the environment, rank 0 writes.

`torchrun --nproc_per_node=N kd cache ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT set; `init(device)` joins them into one process group (NCCL on CUDA, gloo on CPU).
A single process (no WORLD_SIZE) is a world of one and every call here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s generator (dropout masks): rank 0 keeps `seed`, so one process runs as it always
    did; every other rank gets its own, `SeedSequence([seed, rank])`, so no two ranks draw the same masks."""
    if rank == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group when WORLD_SIZE > 1; returns this rank's device (cuda:LOCAL_RANK on CUDA)."""
    if world_size() == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of every rank's CPU `tensor` (a copy; the input alone in one process)."""
    if world_size() == 1:
        return tensor
    out = tensor.clone()
    if dist.get_backend() == "nccl":
        out = out.cuda()
    dist.all_reduce(out)
    return out.cpu()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
