"""The few collectives the training loop and tasks use, each a no-op in a group of one (or with no group at all), so
a single worker pays for no communication it does not need."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process in its group; (0, 1) without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _grouped() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over every rank, in one all-reduce."""
    if not _grouped():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every rank, in place."""
    if _grouped():
        dist.all_reduce(tensor)
    return tensor


def mean_over_ranks(value: torch.Tensor) -> float:
    if not _grouped():
        return float(value)
    value = value.clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def barrier() -> None:
    if _grouped():
        dist.barrier()
