"""Data-parallel training on torch.distributed (launched by torchrun): gloo on CPU, NCCL on GPU.

Every rank draws the same global permutation (same seed) and takes an equal slice of each
global batch, so a world of N processes at batch size B computes the same averaged gradient as
one process at batch size B, up to the order of floating-point sums.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (no-op without it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shutdown() -> None:
    """Leave the process group cleanly (no-op when not distributed).

    Exiting with a live gloo group lets its destructor race the peer's teardown at
    interpreter exit, which can abort the process; destroying it explicitly avoids that.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's contiguous slice of a global batch."""
    per = (len(indices) + size - 1) // size
    return indices[rank * per:(rank + 1) * per]


def average_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce gradients of parameters outside the DDP module and average over ranks.

    The loop already scales each rank's loss by ``local * world / total``, so the average
    over ranks is the mean over the whole global batch, as DDP does for the model itself.
    """
    size = world()[1]
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(size)


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if world()[1] > 1:
        dist.barrier()
