"""Run by test_losses_distributed.py under torchrun: global-batch loss and gradients, and the dist helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from streamtrain import distributed
from streamtrain.losses import LogitScale, gather_with_grad, matryoshka_info_nce

GLOBAL_BATCH = 8
MRL_DIMS = (3, 6)


class TinyDualEncoder(nn.Module):
    """Two linear encoders into a shared 6-d space and a learnable logit scale."""

    def __init__(self) -> None:
        super().__init__()
        self.media = nn.Linear(5, 6)
        self.text = nn.Linear(4, 6)
        self.logit_scale = LogitScale(temperature=0.1)  # scale 10: far from the clamp, so it has a gradient


def build() -> tuple[TinyDualEncoder, Tensor, Tensor]:
    """The same model and global batch on every rank and in the test (float64, to compare tightly)."""
    torch.manual_seed(0)
    model = TinyDualEncoder().double()
    generator = torch.Generator().manual_seed(1)
    media = torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64)
    text = torch.randn(GLOBAL_BATCH, 4, generator=generator, dtype=torch.float64)
    return model, media, text


def loss_and_grads(model: TinyDualEncoder, media: Tensor, text: Tensor) -> tuple[Tensor, dict[int, float]]:
    """The Matryoshka loss of these rows, with gradients accumulated into the model."""
    loss, per_dim = matryoshka_info_nce(model.media(media), model.text(text), model.logit_scale(), MRL_DIMS)
    loss.backward()
    return loss, per_dim


def check_loss(rank: int, world: int) -> dict[str, Any]:
    model, media, text = build()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    loss, per_dim = loss_and_grads(model, media[rows], text[rows])
    for param in model.parameters():  # what DDP does after backward
        dist.all_reduce(param.grad)
        param.grad /= world
    grads = {name: param.grad.tolist() for name, param in model.named_parameters()}
    return {"loss": loss.item(), "per_dim": per_dim, "grads": grads}


def check_helpers(rank: int) -> dict[str, Any]:
    rows = 3 if rank == 0 else 5
    local = (torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100 * rank).requires_grad_()
    gathered = distributed.gather_variable(local)
    gathered_with_empty = distributed.gather_variable(local[:0] if rank == 0 else local)
    # Insertion order differs by rank: the sum must still match keys, not positions.
    counters = {"skipped": rank + 1, "seen": 10.5 * (rank + 1)}
    if rank == 1:
        counters = dict(reversed(counters.items()))
    with_grad = gather_with_grad(local)  # unequal batches: padded, gathered, trimmed
    return {
        "rank": distributed.rank(),
        "world_size": distributed.world_size(),
        "gathered": gathered.tolist(),
        "gathered_requires_grad": gathered.requires_grad,
        "gathered_with_empty": gathered_with_empty.tolist(),
        "objects": distributed.gather_objects([f"rank{rank}-item{i}" for i in range(rows)]),
        "sums": distributed.all_reduce_sum(counters),
        "with_grad": with_grad.tolist(),
        "with_grad_requires_grad": with_grad.requires_grad,
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"loss": check_loss(rank, world), "helpers": check_helpers(rank)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    distributed.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
