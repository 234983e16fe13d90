"""Small helpers over torch.distributed that are no-ops in a single process."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _multi_process() -> bool:
    return _initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where collectives run: NCCL only moves CUDA tensors, gloo only CPU ones (as used here)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    """This process's rank, 0 in a single process."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """The number of processes, 1 in a single process."""
    return dist.get_world_size() if _initialized() else 1


def barrier() -> None:
    """Wait for every rank."""
    if _multi_process():
        dist.barrier()


def gather_sizes(size: int) -> list[int]:
    """Every rank's `size`, in rank order."""
    if not _multi_process():
        return [size]
    local = torch.tensor([size], dtype=torch.int64, device=_device())
    sizes = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s) for s in torch.cat(sizes).tolist()]


@torch.no_grad()
def gather_variable(tensor: Tensor) -> Tensor:
    """Every rank's rows concatenated in rank order, for tensors whose first dim differs across ranks.

    The other dims and the dtype must agree. No gradient; the result is on `tensor`'s device.
    """
    if not _multi_process():
        return tensor.detach()
    sizes = gather_sizes(tensor.shape[0])
    # all_gather needs equal shapes: pad every rank to the largest, then trim.
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]), device=_device())
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(tensor.device)


def gather_objects(items: list[Any]) -> list[Any]:
    """Every rank's list concatenated in rank order (items must be picklable)."""
    if not _multi_process():
        return list(items)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """`values` summed across ranks; a key some ranks lack counts as 0 there.

    Ranks may hold different keys (an error counter appears only where an error happened):
    a sum over mismatched vectors would abort gloo or silently mix up NCCL's counters.
    """
    if not _multi_process():
        return dict(values)
    keys = sorted(set(gather_objects(sorted(values))))  # one order on every rank
    totals = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(totals)
    return dict(zip(keys, totals.tolist(), strict=True))


def all_reduce_max(value: int) -> int:
    """The largest of every rank's ``value``."""
    if not _multi_process():
        return value
    total = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())
