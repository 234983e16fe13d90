"""Scenarios 4 and 6: comparing a faulted run's ``data.sample_log`` with an uninterrupted reference."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from shardify.tarread import iter_samples
from streamtrain.data.sample_log import read_sample_log

StepLog = dict[tuple[int, int], list[str]]
"""sample_ids by (step, rank)."""


def by_step(log: Path) -> StepLog:
    return {(line["step"], line["rank"]): line["sample_ids"] for line in read_sample_log(log)}


def shard_sample_ids(shard: str) -> set[str]:
    """The original sample_ids inside one shard (local path or s3:// URL)."""
    return {json.loads(sample["json"])["sample_id"] for sample in iter_samples(shard)}


@dataclass
class Comparison:
    """A faulted run's log against the reference, given the samples it was allowed to skip."""

    lost: int
    """Reference samples outside ``skippable`` that the faulted run did not train on."""
    repeated: int
    """Samples the faulted run trained on more often than the reference."""
    skipped: int
    """Samples of ``skippable`` that the reference trained on and the faulted run did not."""
    same_order: bool
    """Every (step, rank) holds the reference's samples minus the skipped ones, in the same order."""


def compare(
    reference: StepLog, faulted: StepLog, skippable: frozenset[str] | set[str] = frozenset()
) -> Comparison:
    want = Counter(i for ids in reference.values() for i in ids)
    got = Counter(i for ids in faulted.values() for i in ids)
    missing = want - got
    same_order = sorted(reference) == sorted(faulted) and all(
        faulted[key] == [i for i in ids if i not in skippable or got[i]] for key, ids in reference.items()
    )
    return Comparison(
        lost=sum(n for i, n in missing.items() if i not in skippable),
        repeated=sum((got - want).values()),
        skipped=sum(n for i, n in missing.items() if i in skippable),
        same_order=same_order,
    )
