"""Mixture weights as written in a config: a number or a ``{step: weight}`` schedule.

The weight listed at step ``s`` applies from optimizer step ``s`` on (steps count from 1; a source
is off before its first listed step, 0 means from the start). Weights are exact fractions, so the
data layer's apportionment (``streamtrain.data.mixture``) is a pure function of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

Weight = float | int | Mapping[int, float]


@dataclass(frozen=True)
class Schedule:
    """A source's weight over the steps: ``(from_step, weight)`` points, steps ascending."""

    points: tuple[tuple[int, Fraction], ...]

    def at(self, step: int) -> Fraction:
        weight = Fraction(0)
        for start, value in self.points:
            if start > step:
                break
            weight = value
        return weight

    @property
    def changes(self) -> tuple[int, ...]:
        return tuple(start for start, _ in self.points)

    @property
    def peak(self) -> Fraction:
        return max(value for _, value in self.points)

    def describe(self) -> Any:
        """The schedule as written back into a config (a number when constant)."""
        if len(self.points) == 1 and self.points[0][0] <= 1:
            return _plain(self.points[0][1])
        return {start: _plain(value) for start, value in self.points}


def _plain(value: Fraction) -> float | int:
    return int(value) if value.denominator == 1 else float(value)


def weight_problems(weight: Any, where: str) -> list[str]:
    """What is wrong with a weight or schedule as written at config key ``where`` (empty: fine)."""
    if isinstance(weight, bool) or not isinstance(weight, int | float | Mapping):
        return [f"{where}: {weight!r} is not a number or a {{step: weight}} schedule"]
    if not isinstance(weight, Mapping):
        return _number_problems(weight, where)
    if not weight:
        return [f"{where}: an empty schedule; give at least one {{step: weight}}"]
    found = []
    steps = []
    for step, value in weight.items():
        if isinstance(step, str) and step.isdigit():  # a schedule read back from JSON
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            found.append(f"{where}: schedule step {step!r} is not a whole number >= 0")
        else:
            steps.append(step)
        found += _number_problems(value, f"{where}[{step}]")
    if steps != sorted(steps):
        found.append(f"{where}: schedule steps {steps} are not in ascending order")
    return found


def _number_problems(value: Any, where: str) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [f"{where}: {value!r} is not a number"]
    if not math.isfinite(value) or value < 0:
        return [f"{where}: {value!r} must be a finite number >= 0"]
    return []


def schedule(weight: Weight) -> Schedule:
    """The Schedule of a checked weight (see ``weight_problems``)."""
    if isinstance(weight, Mapping):
        points = tuple((int(step), Fraction(str(value))) for step, value in weight.items())
    else:
        points = ((0, Fraction(str(weight))),)
    return Schedule(points)


def silent_steps(schedules: Sequence[Schedule]) -> list[int]:
    """Steps from which every weight is zero (no source to draw from); empty when none."""
    starts = sorted({1, *(s for sched in schedules for s in sched.changes if s >= 1)})
    return [step for step in starts if not any(sched.at(step) > 0 for sched in schedules)]
