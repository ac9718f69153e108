"""Training on several processes with `torchrun`: joining the group and reducing across ranks.

Every function is a no-op in a single process (world size 1), so the training loop reads the same with
one GPU, several, or a CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mvae_course.device import pick_device


def init_distributed(device: str | torch.device | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, joined): joins the process group `torchrun` describes in the environment.

    `joined` is True when this call started the group (and the caller should leave it at the end).
    """
    device = pick_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device, False
    if device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device, joined


def leave_distributed() -> None:
    """Leave the process group `init_distributed` joined."""
    dist.destroy_process_group()


def barrier(world_size: int) -> None:
    """Wait until every rank gets here (rank 0 writes the data files, the others then read them)."""
    if world_size > 1:
        dist.barrier()


def sum_over_ranks(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """The element-wise sum of `values` over all ranks."""
    if world_size > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def mean_over_ranks(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """The element-wise mean of `values` over all ranks."""
    return sum_over_ranks(values, world_size) / world_size if world_size > 1 else values
