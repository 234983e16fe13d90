"""Run by test_distributed.py under torchrun: each rank streams its share and syncs every batch."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from streamtrain.config import DataConfig
from streamtrain.data.pipeline import train_loader
from streamtrain.data.shards import resolve


def decode(raw: dict[str, Any], rng: random.Random) -> str:
    return json.loads(raw["json"])["sample_id"]


def main(shards: str, out: str, epochs: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = DataConfig(train=shards, num_workers=2, shuffle_buffer=8)
    loader = train_loader(
        data, resolve(shards), rank=rank, world_size=world, batch_size=4, seed=7, decode=decode, collate=list
    )
    batches = []
    for _ in range(epochs * loader.batches_per_epoch):
        batch = next(loader)
        # A collective per step, as DDP does: a rank with fewer batches would hang here.
        count = torch.tensor([len(batch)])
        dist.all_reduce(count)
        batches.append(batch)
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"batches": batches, "per_epoch": loader.batches_per_epoch})
    )
    dist.barrier()
    dist.destroy_process_group()
    # No loader.close(): the loader must stop its infinite workers at exit by itself.


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
