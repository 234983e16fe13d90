"""How many samples of each source every step holds: weights, schedules, exact apportionment.

A mixture is ``data.train`` written as mappings ``{path, weight, name}``. A weight is a number or
a schedule ``{step: weight}``: the weight listed at step ``s`` applies from optimizer step ``s``
on (steps count from 1; a source is off before its first listed step, 0 means from the start).

Each rank's step holds ``per_rank`` samples. Source ``i`` gets its exact share
``per_rank * w_i / sum(w)`` plus what it was owed by earlier steps (its *carry*), rounded by
largest remainder, so every rank's running total of every source stays within one sample of
its exact share, step after step, and every rank holds the same counts. The carries are exact
fractions: the counts are a pure function of (weights, per-rank batch, step) with no float drift,
and the carries are all the state a resumed run needs to continue them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from streamtrain.config.weights import Schedule


def apportion(
    schedules: Sequence[Schedule], per_rank: int, step: int, carries: Sequence[Fraction]
) -> tuple[list[int], list[Fraction]]:
    """This step's sample count of every source on each rank, and the carries after it.

    The counts sum to ``per_rank``; a source whose weight is 0 gets none and owes nothing.
    """
    weights = [sched.at(step) for sched in schedules]
    total = sum(weights)
    if total == 0:
        raise ValueError(f"every source weight is 0 at step {step}")
    on = [i for i, w in enumerate(weights) if w > 0]
    owed = {i: per_rank * weights[i] / total + carries[i] for i in on}
    # What switched-off sources were owed is shared by the others, so the total stays exact.
    gap = per_rank - sum(owed.values())
    for i in on:
        owed[i] += gap * weights[i] / total
    counts = [0] * len(schedules)
    for i in on:
        counts[i] = max(0, math.floor(owed[i]))
    left = per_rank - sum(counts)
    by_remainder = sorted(on, key=lambda i: (-(owed[i] - counts[i]), i))
    while left > 0:
        for i in by_remainder[:left]:
            counts[i] += 1
        left = per_rank - sum(counts)
    while left < 0:  # a source owed less than nothing gave up its floor; take from the least owed
        for i in sorted((i for i in on if counts[i] > 0), key=lambda i: (owed[i] - counts[i], i))[:-left]:
            counts[i] -= 1
        left = per_rank - sum(counts)
    new_carries = [owed[i] - counts[i] if i in owed else Fraction(0) for i in range(len(schedules))]
    return counts, new_carries


def encode_carries(carries: Sequence[Fraction]) -> list[str]:
    return [str(c) for c in carries]


def decode_carries(encoded: Sequence[str]) -> list[Fraction]:
    return [Fraction(text) for text in encoded]
