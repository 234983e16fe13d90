"""Held-out evaluation, one code path for the trainer's evaluations and ``streamtrain eval``.

Both read ``data.eval`` the same way (rank split, batches, decode device) and hand the batches to
the task's ``evaluate``, so a checkpoint evaluated later reports the numbers its run logged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from streamtrain.config import RunConfig
from streamtrain.data.dataset import Dataset
from streamtrain.data.pipeline import held_out_batches
from streamtrain.distributed import all_reduce_sum
from streamtrain.train.task import Decode, Task

ToDevice = Callable[[dict[str, Any]], dict[str, Any]]


def held_out(
    config: RunConfig,
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    *,
    rank: int,
    world_size: int,
    decode: Decode,
    to_device: ToDevice,
    decode_device: torch.device | None,
) -> dict[str, float]:
    """The task's metrics over all of ``dataset``, plus the read-time counts (``eval/data/...``)."""
    read_stats = Counter[str]()
    batches_read = held_out_batches(
        config.data,
        config.eval,
        dataset,
        rank=rank,
        world_size=world_size,
        decode=decode,
        collate=task.collate,
        decode_device=decode_device,
    )

    def batches() -> Iterator[dict[str, Any]]:
        for batch, stats in batches_read:
            read_stats.update(stats)
            if batch is not None:
                yield to_device(batch)

    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model, batches())
    model.train(was_training)
    skipped = all_reduce_sum({k: float(v) for k, v in read_stats.items() if k != "samples"})
    return {**metrics, **{f"eval/data/{k}": v for k, v in skipped.items()}}


def evaluate_sources(
    dataset: Dataset, evaluate: Callable[[Dataset], dict[str, float]], summarize: Callable[[dict], str]
) -> tuple[dict[str, float], dict[str, float], str]:
    """``(metrics of the whole set, what is logged, its summary line)``: the logged names carry
    ``eval/`` and, when ``data.eval`` names several sources, each source's metrics apart
    (``eval/NAME/...``). The summary is made before the sources' passes, since it may quote the
    answers of the pass over the whole set."""
    metrics = evaluate(dataset)
    summary = summarize(metrics)
    logged = {key if "/" in key else f"eval/{key}": value for key, value in metrics.items()}
    if dataset.named and len(dataset.sources) > 1:
        for source in dataset.sources:
            part = evaluate(Dataset((source,), dataset.schema))
            logged.update({f"eval/{source.name}/{key.removeprefix('eval/')}": v for key, v in part.items()})
    return metrics, logged, summary
