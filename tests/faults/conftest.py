"""The fault-injection suite: shared knobs and the report every scenario writes its figures to.

Each scenario runs real processes, injects faults and compares the outcome with an
uninterrupted reference. In the normal test run every scenario does a reduced number of trials
(``trials(quick, full)`` returns ``quick``); ``./launch.sh faults`` sets
``STREAMTRAIN_FAULTS=full`` for the full counts and ``STREAMTRAIN_FAULT_REPORT`` to a JSONL file
that ``python -m tests.faults.report`` turns into the table of docs/faults.md.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

FULL = os.environ.get("STREAMTRAIN_FAULTS", "") == "full"


def trials(quick: int, full: int) -> int:
    """How many trials a scenario runs: ``quick`` in the normal suite, ``full`` under ./launch.sh faults."""
    return full if FULL else quick


def fault_rng(name: str) -> random.Random:
    """A seeded RNG for a scenario's random fault moments; STREAMTRAIN_FAULT_SEED varies them."""
    return random.Random(f"{name}:{os.environ.get('STREAMTRAIN_FAULT_SEED', '0')}")


@dataclass
class FaultRecord:
    """One scenario's figures, as the table of docs/faults.md shows them."""

    scenario: str
    """Short name, e.g. "2. training killed at random steps"."""
    trials: int = 0
    """Complete trials run (each compared with the reference)."""
    faults: int = 0
    """Faults injected over all trials."""
    survived: int = 0
    """Faults after which the outcome met the scenario's contract."""
    lost: int = 0
    """Samples lost over all trials (must be 0)."""
    repeated: int = 0
    """Samples repeated over all trials (must be 0)."""
    recovery_s: list[float] = field(default_factory=list)
    """Seconds from each fault to the job running again (or to the clear error, where that is
    the contract)."""

    @contextmanager
    def recovering(self) -> Iterator[None]:
        """Times the block as one recovery."""
        start = time.monotonic()
        yield
        self.recovery_s.append(time.monotonic() - start)


@pytest.fixture
def fault_record(request: pytest.FixtureRequest) -> Iterator[FaultRecord]:
    """A record the test fills in; appended to $STREAMTRAIN_FAULT_REPORT when the test passes."""
    marker = request.node.get_closest_marker("scenario")
    if marker is None:
        raise pytest.UsageError(f"{request.node.nodeid}: fault tests need @pytest.mark.scenario(name)")
    record = FaultRecord(scenario=marker.args[0])
    yield record
    path = os.environ.get("STREAMTRAIN_FAULT_REPORT")
    report = getattr(request.node, "rep_call", None)
    if path and report is not None and report.passed:
        line = asdict(record) | {"test": request.node.nodeid, "full": FULL}
        with Path(path).open("a") as handle:
            handle.write(json.dumps(line) + "\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)
