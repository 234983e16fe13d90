"""parquet-to-tar: plan units of work, convert the unfinished ones on an engine, publish the manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from shardify.format import (
    CHECKSUM_ALGORITHM,
    CHECKSUMS_SUFFIX,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    SKIPPED_NAME,
    Manifest,
)
from shardify.groups import Grouping, plan_groups
from shardify.journal import (
    JOB_NAME,
    JOURNAL_VERSION,
    PROGRESS_NAME,
    Progress,
    Unit,
    plan_units,
    write_skipped_log,
)
from shardify.jsoninput import JSON_SUFFIXES, llava_columns, open_json_inputs
from shardify.options import ConvertOptions, default_workers
from shardify.output import WORK_DIR, Output
from shardify.rows import check_media
from shardify.schema import detect_schema
from shardify.sources import InputError, Layout, ParquetInput, expand_inputs, open_inputs
from shardify.units import UNIT_ERRORS, UnitFailure, UnitJob, UnitOutcome, convert_unit, read_unit_states

__all__ = [
    "ConvertOptions",
    "ConvertResult",
    "NoSamplesError",
    "UnitsFailedError",
    "check_media",
    "convert",
    "default_workers",
]


@dataclass
class ConvertResult:
    manifest: Manifest
    already_complete: bool
    resumed_at_row: int
    """Rows that an earlier, interrupted run had already committed."""
    rows_this_run: int
    media_bytes_this_run: int
    elapsed_s: float
    units: int = 0
    """Units of work the inputs were cut into."""
    engine_startup_s: float = 0.0
    """Of ``elapsed_s``, the time the engine took to start (joining a Ray cluster, checking nodes)."""


class NoSamplesError(Exception):
    """Every row was skipped (or there was none): no manifest is written, the skip log is."""

    def __init__(self, rows: int, skipped_by_reason: dict[str, int], skipped_log: str) -> None:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in skipped_by_reason.items())
        if rows:
            why = f"every one of the {rows:,} rows was skipped ({reasons}); see {skipped_log}"
        else:
            why = "the inputs hold no rows"
        super().__init__(f"no sample written: {why}")
        self.rows = rows
        self.skipped_by_reason = skipped_by_reason


class UnitsFailedError(Exception):
    """Some units could not be converted; every other unit is finished and kept."""

    def __init__(self, failures: list[UnitFailure], units: int) -> None:
        super().__init__(f"{len(failures)} of {units} units failed")
        self.failures = failures
        self.units = units


def _fingerprint(inputs: list[ParquetInput], schema: str, options: ConvertOptions) -> str:
    described = {
        "inputs": [[item.url, item.size, item.num_rows] for item in inputs],
        "schema": schema,
        "options": options.shaping(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _our_files(output: Output, prefix: str) -> list[str]:
    shard_pattern = re.compile(
        rf"^{re.escape(prefix)}-\d{{6}}(-\d{{6}})?\.tar({re.escape(CHECKSUMS_SUFFIX)})?$"
    )
    return [n for n in output.names() if shard_pattern.match(n) or n in (MANIFEST_NAME, SKIPPED_NAME)]


def _prepare(output: Output, fingerprint: str, options: ConvertOptions, units: int) -> Manifest | None:
    """The finished manifest when there is nothing left to do; else None, with the job recorded."""
    if options.overwrite:
        output.remove([*_our_files(output, options.prefix), WORK_DIR])
    manifest_text = output.read_text(MANIFEST_NAME)
    if manifest_text is not None:
        manifest = Manifest.from_json(manifest_text, output.path(MANIFEST_NAME))
        if manifest.fingerprint != fingerprint:
            if manifest.format_version < MANIFEST_FORMAT_VERSION:
                raise InputError(
                    f"{output.url} holds a finished conversion by an older shardify (manifest format "
                    f"{manifest.format_version}, one run of shards across all inputs); the trainer still "
                    "reads it as it is; pass --overwrite to convert again in the current layout"
                )
            raise InputError(
                f"{output.url} already holds a finished conversion of other inputs or options; "
                "pass --overwrite to replace it, or choose another --output"
            )
        output.remove([WORK_DIR])
        return manifest
    if output.read_text(PROGRESS_NAME) is not None:
        raise InputError(
            f"{output.url} holds an unfinished conversion begun by an older shardify (journal version 1); "
            "finish it with that version, or pass --overwrite to start it again"
        )
    job_text = output.read_text(JOB_NAME)
    if job_text is not None:
        if json.loads(job_text).get("fingerprint") != fingerprint:
            raise InputError(
                f"{output.url} holds an unfinished conversion of other inputs or options; "
                "rerun that command to finish it, pass --overwrite to discard it, or choose another --output"
            )
        output.clear_scratch()
        return None
    if _our_files(output, options.prefix):
        raise InputError(
            f"{output.url} already holds {options.prefix}-*.tar shards that no shardify run here is "
            "tracking; pass --overwrite to replace them, or choose another --output"
        )
    job = {"version": JOURNAL_VERSION, "fingerprint": fingerprint, "units": units}
    output.write_text(JOB_NAME, json.dumps(job, indent=1))
    return None


def convert(
    patterns: list[str],
    options: ConvertOptions,
    on_rows: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Convert the parquet inputs matched by ``patterns`` into shards under ``options.output``.

    ``on_plan(total_rows, done_rows)`` is called once before conversion starts, ``on_rows(n)``
    as rows are written (for progress bars). Raises :class:`UnitsFailedError` when some units
    failed: the others are kept, and the same call converts only what is missing.
    """
    started = time.perf_counter()
    options.validate()
    if options.engine == "ray":
        from shardify.ray_engine import preflight

        preflight(options)
    if options.input_format == "json":
        inputs = open_json_inputs(expand_inputs(patterns, JSON_SUFFIXES))
        options = dataclasses.replace(options, columns=llava_columns(inputs, options.columns))
    else:
        inputs = open_inputs(expand_inputs(patterns))
    schema, layouts = detect_schema(
        inputs, options.schema, options.columns, options.template, options.group_by
    )
    fingerprint = _fingerprint(inputs, schema, options)
    units = plan_units(
        [item.row_group_rows for item in inputs],
        [item.row_group_bytes for item in inputs],
        options.unit_bytes,
    )
    output = Output(options.output)
    try:
        manifest = _prepare(output, fingerprint, options, len(units))
        if manifest is not None:
            return ConvertResult(manifest, True, manifest.rows_read, 0, 0, time.perf_counter() - started)
        finished, committed = read_unit_states(output, units)
        resumed_at = sum(committed.values())
        total_rows = sum(item.num_rows for item in inputs)
        if on_plan:
            on_plan(total_rows, resumed_at)
        grouping = plan_groups(inputs, layouts, options.group_by) if options.group_by else None
        jobs = [
            UnitJob(
                unit,
                inputs[unit.source],
                layouts[unit.source],
                schema,
                options,
                fingerprint,
                *_grouped(grouping, unit, inputs, layouts),
            )
            for unit in units
            if unit.index not in finished
        ]
        if options.engine == "ray":
            from shardify.ray_engine import run_on_ray  # imports Ray only when asked for

            outcomes, failures, startup_s = run_on_ray(jobs, options, committed, on_rows)
        else:
            outcomes, failures = _run_here(jobs, committed, on_rows)
            startup_s = 0.0
        if failures:
            raise UnitsFailedError(sorted(failures, key=lambda f: f.unit.index), len(units))
        finished.update((outcome.unit.index, outcome.progress) for outcome in outcomes)
        manifest = _finish(
            output, [finished[u.index] for u in units], units, inputs, schema, options, fingerprint
        )
    finally:
        output.close()
    return ConvertResult(
        manifest,
        False,
        resumed_at,
        sum(outcome.rows_this_run for outcome in outcomes),
        sum(outcome.media_bytes_this_run for outcome in outcomes),
        time.perf_counter() - started,
        len(units),
        startup_s,
    )


def _grouped(
    grouping: Grouping | None, unit: Unit, inputs: list[ParquetInput], layouts: list[Layout]
) -> tuple:
    """A unit job's part of the grouping, and the inputs holding the rows joined to its groups."""
    if grouping is None:
        return ()
    groups = grouping.for_unit(unit.source, unit.start, unit.end)
    sources = {source for rows in groups.leads.values() for source, _ in rows}
    return groups, {source: (inputs[source], layouts[source]) for source in sources}


def _run_here(
    jobs: list[UnitJob], committed: dict[int, int], on_rows: Callable[[int], None] | None
) -> tuple[list[UnitOutcome], list[UnitFailure]]:
    """The local engine: the units one after another, each checked on ``options.workers`` threads."""
    outcomes, failures = [], []
    for job in jobs:
        shown = committed[job.unit.index]

        def progressed(rows: int) -> None:
            nonlocal shown
            if on_rows:
                on_rows(rows - shown)
            shown = rows

        try:
            outcomes.append(convert_unit(job, progressed))
        except UNIT_ERRORS as exc:
            failures.append(UnitFailure(job.unit, job.item.url, f"{type(exc).__name__}: {exc}"))
    return outcomes, failures


def _finish(
    output: Output,
    records: list[Progress],
    units: list[Unit],
    inputs: list[ParquetInput],
    schema: str,
    options: ConvertOptions,
    fingerprint: str,
) -> Manifest:
    """Reconcile every unit's counts, then publish skipped.jsonl and, last, manifest.json."""
    problems = []
    for unit, record in zip(units, records, strict=True):
        shard_samples = sum(entry.samples for entry in record.shards)
        accounted = record.samples_written + record.rows_skipped + record.rows_merged
        if record.rows_read != unit.rows or record.rows_read != accounted:
            problems.append(
                f"unit {unit.index}: rows read {record.rows_read} of {unit.rows}, written "
                f"{record.samples_written} + skipped {record.rows_skipped} + merged {record.rows_merged}"
            )
        if shard_samples != record.samples_written:
            problems.append(
                f"unit {unit.index}: shards hold {shard_samples} samples, expected {record.samples_written}"
            )
    total_rows = sum(item.num_rows for item in inputs)
    if sum(unit.rows for unit in units) != total_rows:
        problems.append(f"units cover {sum(u.rows for u in units)} rows of {total_rows}")
    if problems:
        raise RuntimeError("counts do not reconcile, manifest not written: " + "; ".join(problems))
    skipped: Counter[str] = Counter()
    media: Counter[str] = Counter()
    for record in records:
        skipped.update(record.skipped_by_reason)
        media.update(record.media)
    manifest = Manifest(
        schema=schema,
        shards=[entry for record in records for entry in record.shards],
        rows_read=total_rows,
        samples_written=sum(record.samples_written for record in records),
        rows_skipped=sum(skipped.values()),
        skipped_by_reason=dict(sorted(skipped.items())),
        inputs=[item.url for item in inputs],
        options=options.shaping(),
        media=dict(sorted(media.items())),
        fingerprint=fingerprint,
        checksums=CHECKSUM_ALGORITHM if all(record.checksums for record in records) else None,
        rows_merged=sum(record.rows_merged for record in records) if options.group_by else None,
    )
    write_skipped_log(
        output, [segment for record in records for segment in record.skip_segments], SKIPPED_NAME
    )
    if manifest.samples_written == 0:
        raise NoSamplesError(total_rows, manifest.skipped_by_reason, output.path(SKIPPED_NAME))
    output.write_text(MANIFEST_NAME, manifest.to_json())
    output.remove([WORK_DIR])
    return manifest
