"""Converting one unit of work, anywhere: in this process or in a task on another machine."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from shardify.groups import UnitGroups
from shardify.journal import Progress, ShardSequence, Unit
from shardify.options import ConvertOptions
from shardify.output import Output
from shardify.rows import convert_rows
from shardify.sources import Layout, ParquetInput

UNIT_ERRORS = (OSError, RuntimeError, ValueError, pa.ArrowException)
"""What a unit's conversion may fail with: reported for that unit while the others go on."""


@dataclass
class UnitJob:
    """Everything one unit's conversion needs; small and picklable (it is sent to Ray tasks)."""

    unit: Unit
    item: ParquetInput
    layout: Layout
    schema: str
    options: ConvertOptions
    fingerprint: str
    groups: UnitGroups | None = None
    """``--group-by``: which of the unit's rows lead a group (and the rows joined to them), which
    are joined to an earlier row's sample."""
    joined_inputs: dict[int, tuple[ParquetInput, Layout]] | None = None
    """The inputs holding the rows joined to this unit's groups, with their layouts."""


@dataclass
class UnitOutcome:
    """A finished unit: its committed record, and what this run did for it."""

    unit: Unit
    progress: Progress
    rows_this_run: int
    media_bytes_this_run: int


@dataclass
class UnitFailure:
    """A unit that could not be converted (after the engine's retries), named by its input."""

    unit: Unit
    source: str
    error: str

    def describe(self) -> str:
        return f"{self.source} rows {self.unit.start:,}-{self.unit.end - 1:,}: {self.error}"


def convert_unit(job: UnitJob, on_progress: Callable[[int], None] | None = None) -> UnitOutcome:
    """Convert one unit from where its journal says it stopped; a finished unit is left as it is.

    ``on_progress(rows)`` is called as rows are written: ``rows`` of the unit are consumed so far.
    """
    unit, options = job.unit, job.options
    output = Output(options.output)
    try:
        done = output.read_text(unit.done)
        if done is not None:
            return UnitOutcome(unit, Progress.from_json(done), 0, 0)
        journal = output.read_text(unit.journal)
        if journal is not None:
            progress = Progress.from_json(journal)
            if progress.fingerprint != job.fingerprint:
                raise RuntimeError(f"the journal {output.path(unit.journal)} belongs to another conversion")
        else:
            progress = Progress(fingerprint=job.fingerprint, source=unit.source, row=unit.start)
        resumed_at = progress.row
        consumed = resumed_at - unit.start

        def written(rows: int) -> None:
            nonlocal consumed
            consumed += rows
            if on_progress:
                on_progress(consumed)

        sequence = ShardSequence(
            output, progress, unit, options.prefix, options.max_samples_per_shard, options.max_shard_bytes
        )
        try:
            media_bytes = convert_rows(
                job.item,
                job.layout,
                unit,
                job.schema,
                options,
                sequence,
                written,
                job.groups,
                job.joined_inputs,
            )
            sequence.commit(unit.source, unit.end)
        finally:
            sequence.close()
        # The done record is never rewritten, so nothing can turn a finished unit back into an
        # unfinished one; its journal is then no longer needed.
        output.write_text(unit.done, progress.to_json())
        output.remove([unit.journal])
        return UnitOutcome(unit, progress, unit.end - resumed_at, media_bytes)
    finally:
        output.close()


def read_unit_states(output: Output, units: list[Unit]) -> tuple[dict[int, Progress], dict[int, int]]:
    """The done records of finished units, and the committed rows of the others' journals."""

    def read(unit: Unit) -> tuple[Progress | None, int]:
        done = output.read_text(unit.done)
        if done is not None:
            return Progress.from_json(done), unit.rows
        journal = output.read_text(unit.journal)
        return None, (Progress.from_json(journal).row - unit.start) if journal is not None else 0

    finished: dict[int, Progress] = {}
    committed: dict[int, int] = {}
    # Many small reads: on S3 each is a round trip, so they run side by side.
    with ThreadPoolExecutor(16, thread_name_prefix="shardify-journal") as pool:
        for unit, (record, rows) in zip(units, pool.map(read, units), strict=True):
            if record is not None:
                finished[unit.index] = record
            committed[unit.index] = rows
    return finished, committed
