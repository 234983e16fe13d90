"""What an uninterrupted run trains on, read by the real loader in this process (no training).

The elastic loader's steps are a pure function of the data, seed and topology, so a test's
reference sample log is this, not another training run.
"""

from __future__ import annotations

import json
from typing import Any

from streamtrain.config import DataConfig
from streamtrain.data.pipeline import resolve_sources, train_loader

StepLog = dict[tuple[int, int], list[str]]
"""sample_ids by (step, rank)."""


def original_id(raw: dict[str, Any], rng: object) -> str:
    return json.loads(raw["json"])["sample_id"]


def planned_steps(
    train: Any,
    steps: int,
    *,
    world_size: int,
    batch_size: int,
    grad_accum: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 64,
    first_step: int = 1,
) -> StepLog:
    """Each rank's sample_ids of steps ``first_step .. steps``, as a run with this topology logs them."""
    data = DataConfig(train=train, num_workers=0, shuffle_buffer=shuffle_buffer)
    dataset = resolve_sources(data.train)
    log: StepLog = {}
    for rank in range(world_size):
        loader = train_loader(
            data,
            dataset,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            seed=seed,
            decode=original_id,
            collate=lambda ids: {"sample_ids": ids},
            batches_per_step=grad_accum,
        )
        for step in range(1, steps + 1):
            ids = [i for _ in range(grad_accum) for i in (next(loader) or {"sample_ids": []})["sample_ids"]]
            if step >= first_step:
                log[(step, rank)] = ids
        loader.shutdown()
    return log
