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

from streamtrain.data.dataset import Dataset
from streamtrain.data.eval import EvalReader, eval_parts
from streamtrain.distributed import all_reduce_sum
from streamtrain.train.task import Task

ToDevice = Callable[[dict[str, Any]], dict[str, Any]]


def held_out(
    task: Task, model: nn.Module, reader: EvalReader, part: str | None, to_device: ToDevice
) -> dict[str, float]:
    """The task's metrics over ``part`` of the held-out set (None: all of it), plus the read-time
    counts (``eval/data/...``)."""
    read_stats = Counter[str]()

    def batches() -> Iterator[dict[str, Any]]:
        for batch, stats in reader.batches(part):
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
    dataset: Dataset, evaluate: Callable[[str | None], dict[str, float]], summarize: Callable[[dict], str]
) -> tuple[dict[str, float], dict[str, float], str]:
    """``(metrics of the whole set, what is logged, its summary line)``; ``evaluate`` is given a
    part of ``dataset`` (see ``eval_parts``: None for all of it). The logged names carry ``eval/``
    and, when ``data.eval`` names several sources, each source's metrics apart (``eval/NAME/...``).
    The summary is made before the sources' passes, since it may quote the answers of the pass
    over the whole set."""
    metrics = evaluate(None)
    summary = summarize(metrics)
    logged = {key if "/" in key else f"eval/{key}": value for key, value in metrics.items()}
    for name in eval_parts(dataset):
        if name is not None:
            part = evaluate(name)
            logged.update({f"eval/{name}/{key.removeprefix('eval/')}": v for key, v in part.items()})
    return metrics, logged, summary
