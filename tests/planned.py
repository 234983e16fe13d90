"""What an uninterrupted run trains on, read by the real loader in this process (no training).

The elastic loader's steps are a pure function of the data, seed and topology, so a test's
reference sample log is this, not another training run.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from streamtrain.config import DataConfig
from streamtrain.data.pipeline import resolve_sources, train_loader
from tests.faults.s46_logs import Comparison

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


def not_yet_read(
    reference: StepLog,
    shard_ids: dict[str, set[str]],
    *,
    after_step: int,
    margin: int,
    rank: int | None = None,
    first_epoch_steps: int | None = None,
    from_step: int = 1,
) -> list[str]:
    """Shards none of whose samples a run has opened by ``after_step``: their first sample in
    ``reference`` comes at least ``margin`` steps later (margin covers prefetch and a shuffle
    window: a window is read when its first sample is due, and emits over as many steps as it
    holds). With ``rank``, only shards that no other rank reads in the first
    ``first_epoch_steps`` steps. Only steps from ``from_step`` on count."""
    first: dict[str, int] = {}
    readers: dict[str, set[int]] = {}
    owner = {i: url for url, ids in shard_ids.items() for i in ids}
    for (step, step_rank), ids in sorted(reference.items()):
        if step < from_step:
            continue
        for i in ids:
            url = owner[i]
            first.setdefault(url, step)
            if first_epoch_steps is None or step <= first_epoch_steps:
                readers.setdefault(url, set()).add(step_rank)
    return sorted(
        url
        for url, step in first.items()
        if step >= after_step + margin and (rank is None or readers.get(url, set()) == {rank})
    )


def occurrences(reference: StepLog, ids: set[str]) -> int:
    """How many times the samples ``ids`` are trained on in ``reference``."""
    return sum(1 for step_ids in reference.values() for i in step_ids if i in ids)


def compare_skipping(reference: StepLog, faulted: StepLog, skippable: set[str]) -> Comparison:
    """Like ``s46_logs.compare``, where any occurrence of a ``skippable`` sample may be missing
    (a sample trained once through an open reader and missed when its shard is opened again)."""
    want = Counter(i for ids in reference.values() for i in ids)
    got = Counter(i for ids in faulted.values() for i in ids)
    missing = want - got
    same_order = sorted(reference) == sorted(faulted) and all(
        _is_subsequence(faulted[key], ids) and not set(ids).difference(faulted[key]) - skippable
        for key, ids in reference.items()
    )
    return Comparison(
        lost=sum(n for i, n in missing.items() if i not in skippable),
        repeated=sum((got - want).values()),
        skipped=sum(n for i, n in missing.items() if i in skippable),
        same_order=same_order,
    )


def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    items = iter(whole)
    return all(any(i == j for j in items) for i in part)
