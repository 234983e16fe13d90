"""parquet-to-tar: read rows in order, check media in parallel, write shards in order."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from shardify.checks import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MediaCheck,
    check_audio,
    check_image,
    check_text,
    transcode_to_png,
)
from shardify.fetch import Fetched, Fetcher, FetchOptions
from shardify.format import (
    CHECKSUM_ALGORITHM,
    CHECKSUMS_SUFFIX,
    COMMON_IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    SKIPPED_NAME,
    Manifest,
    sample_key,
)
from shardify.journal import PROGRESS_NAME, Progress, ShardSequence, write_skipped_log
from shardify.output import WORK_DIR, Output
from shardify.sources import (
    AUDIO_COLUMN,
    IMAGE_COLUMN,
    SHA256_COLUMN,
    TEXT_COLUMNS,
    URL_COLUMN,
    InputError,
    Layout,
    ParquetInput,
    column_problems,
    detect_schema,
    expand_inputs,
    media_values,
    open_inputs,
)

_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass
class ConvertOptions:
    """How to convert; everything but ``workers``, ``fetch``, ``overwrite`` and ``batch_rows`` shapes
    the output."""

    output: str
    """Local directory or s3://bucket/prefix."""
    schema: str | None = None
    """caption or qa; None detects it from the columns."""
    max_samples_per_shard: int = 5000
    max_shard_bytes: int = 1 << 30
    prefix: str = "shard"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    transcode_uncommon: bool = False
    """Re-encode GIF/BMP/TIFF images as PNG so readers that know only jpg/png/webp see them."""
    columns: dict[str, str] = field(default_factory=dict)
    """Field -> the column to read it from (``--column FIELD=COLUMN``); unmapped fields use their name."""
    workers: int = field(default_factory=default_workers)
    fetch: FetchOptions = field(default_factory=FetchOptions)
    """Downloading of ``image_url`` rows. Not part of the fingerprint: a rerun may change them."""
    overwrite: bool = False
    batch_rows: int = 32

    def validate(self) -> None:
        problems = []
        for name in ("max_samples_per_shard", "max_shard_bytes", "max_image_pixels", "workers", "batch_rows"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not _PREFIX_PATTERN.match(self.prefix):
            problems.append(f"--prefix {self.prefix!r} may hold only letters, digits, '_' and '-'")
        problems += column_problems(self.columns) + self.fetch.problems()
        if problems:
            raise InputError("; ".join(problems))

    def shaping(self) -> dict[str, Any]:
        """The options that determine the output (recorded in the manifest)."""
        shaping: dict[str, Any] = {
            "max_samples_per_shard": self.max_samples_per_shard,
            "max_shard_bytes": self.max_shard_bytes,
            "prefix": self.prefix,
            "max_image_pixels": self.max_image_pixels,
            "transcode_uncommon": self.transcode_uncommon,
        }
        # Only when given, so conversions without a mapping keep the fingerprint they always had.
        if self.columns:
            shaping["columns"] = dict(sorted(self.columns.items()))
        return shaping


@dataclass
class ConvertResult:
    manifest: Manifest
    already_complete: bool
    resumed_at_row: int
    """Rows that an earlier, interrupted run had already committed."""
    rows_this_run: int
    media_bytes_this_run: int
    elapsed_s: float


@dataclass
class RowBatch:
    """Consecutive rows of one input, as Python values."""

    source: ParquetInput
    start: int
    sample_ids: list[Any] | None
    texts: dict[str, list[Any]]
    images: list[bytes | None] | None
    audios: list[bytes | None] | None
    json_rows: list[dict[str, Any]]
    image_urls: list[Any] | None = None
    """Where to fetch each row's image, when the input names images by URL instead of holding them."""
    image_sha256s: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.json_rows)


@dataclass
class RowMedia:
    """Check verdicts of one row, and the image payload to store (transcoded or original)."""

    image: MediaCheck | None
    audio: MediaCheck | None
    image_payload: bytes | None


def check_media(
    images: list[bytes | None] | None,
    audios: list[bytes | None] | None,
    max_pixels: int,
    transcode_uncommon: bool,
    column: str = IMAGE_COLUMN,
) -> list[RowMedia]:
    """The per-row media checks of one batch; runs on a worker thread (decoders release the GIL)."""
    count = len(images if images is not None else audios or [])
    verdicts = []
    for i in range(count):
        image = images[i] if images is not None else None
        audio = audios[i] if audios is not None else None
        image_check = check_image(image, max_pixels, column=column) if image is not None else None
        payload = image
        if (
            transcode_uncommon
            and image_check is not None
            and image_check.ok
            and image_check.extension not in COMMON_IMAGE_EXTENSIONS
        ):
            payload = transcode_to_png(image)
            image_check = MediaCheck(
                ok=True, extension="png", width=image_check.width, height=image_check.height
            )
        audio_check = check_audio(audio) if audio is not None else None
        verdicts.append(RowMedia(image_check, audio_check, payload))
    return verdicts


def check_fetched(
    fetches: list[Future[Fetched] | None],
    audios: list[bytes | None] | None,
    max_pixels: int,
    transcode_uncommon: bool,
) -> list[RowMedia]:
    """:func:`check_media` on images being fetched; a failed fetch is the row's image verdict."""
    fetched = [job.result() if job is not None else None for job in fetches]
    images = [f.data if f is not None else None for f in fetched]
    verdicts = check_media(images, audios, max_pixels, transcode_uncommon, column=URL_COLUMN)
    for i, outcome in enumerate(fetched):
        if outcome is not None and not outcome.ok:
            verdicts[i] = RowMedia(MediaCheck.fail(outcome.reason, outcome.detail), verdicts[i].audio, None)
    return verdicts


def _field_values(batch: pa.RecordBatch, layout: Layout, field_name: str) -> list[Any] | None:
    column = layout.column(field_name)
    return batch.column(column).to_pylist() if column is not None else None


def iter_batches(
    inputs: list[ParquetInput], layouts: list[Layout], source: int, row: int, schema: str, batch_rows: int
) -> Iterator[RowBatch]:
    """All rows from ``(source, row)`` on, in input order."""
    for item, layout in zip(inputs[source:], layouts[source:], strict=True):
        start = row if item.index == source else 0
        fields = layout.fields
        # Image bytes in the input win over a URL: nothing is fetched for such inputs.
        fetching = IMAGE_COLUMN not in fields and URL_COLUMN in fields
        media = [fields[f] for f in (IMAGE_COLUMN, AUDIO_COLUMN) if f in fields]
        columns = list(dict.fromkeys(layout.json_columns + [fields[f] for f in fields] + media))

        for batch in item.iter_batches(start, batch_rows, columns):
            metadata = batch.select(layout.json_columns).rename_columns(layout.json_names)
            yield RowBatch(
                source=item,
                start=start,
                sample_ids=_field_values(batch, layout, "sample_id"),
                texts={f: batch.column(fields[f]).to_pylist() for f in TEXT_COLUMNS[schema]},
                images=media_values(batch.column(fields[IMAGE_COLUMN])) if IMAGE_COLUMN in fields else None,
                audios=media_values(batch.column(fields[AUDIO_COLUMN])) if AUDIO_COLUMN in fields else None,
                json_rows=metadata.to_pylist(),
                image_urls=_field_values(batch, layout, URL_COLUMN) if fetching else None,
                image_sha256s=_field_values(batch, layout, SHA256_COLUMN) if fetching else None,
            )
            start += batch.num_rows


def _json_safe(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _row_failure(batch: RowBatch, i: int, media: RowMedia) -> tuple[str, str] | None:
    """Why row ``i`` cannot become a sample, or None."""
    checks = [c for c in (media.image, media.audio) if c is not None]
    if not checks:
        media = ((IMAGE_COLUMN, batch.images), (URL_COLUMN, batch.image_urls), (AUDIO_COLUMN, batch.audios))
        columns = [c for c, v in media if v is not None]
        return "missing", " and ".join(columns) + (" is null" if len(columns) == 1 else " are null")
    for check in checks:
        if not check.ok:
            return check.reason, check.detail
    for column, values in batch.texts.items():
        problem = check_text(values[i], column)
        if problem:
            return problem
    return None


def write_batch(batch: RowBatch, verdicts: list[RowMedia], sequence: ShardSequence, schema: str) -> None:
    """Append a checked batch to the shard sequence, row by row, in order."""
    source = batch.source.index
    for i, media in enumerate(verdicts):
        row = batch.start + i
        sample_id = batch.sample_ids[i] if batch.sample_ids is not None else None
        failure = _row_failure(batch, i, media)
        if failure:
            sequence.add_skip(
                {
                    "sample_id": _json_safe(sample_id),
                    "source": batch.source.url,
                    "row": row,
                    "reason": failure[0],
                    "detail": failure[1],
                }
            )
            continue
        members: list[tuple[str, bytes]] = []
        if media.image is not None:
            members.append((media.image.extension, media.image_payload))
        if media.audio is not None:
            members.append((media.audio.extension, batch.audios[i]))
        if schema == "caption":
            members.append(("txt", batch.texts["caption"][i].encode("utf-8")))
        row_json = json.dumps(batch.json_rows[i], ensure_ascii=False, default=str)
        members.append(("json", row_json.encode("utf-8")))
        sequence.add_sample(source, row, sample_key(source, row, sample_id), members)


def _fingerprint(inputs: list[ParquetInput], schema: str, options: ConvertOptions) -> str:
    described = {
        "inputs": [[item.url, item.size, item.num_rows] for item in inputs],
        "schema": schema,
        "options": options.shaping(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _our_files(output: Output, prefix: str) -> list[str]:
    shard_pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar({re.escape(CHECKSUMS_SUFFIX)})?$")
    return [n for n in output.names() if shard_pattern.match(n) or n in (MANIFEST_NAME, SKIPPED_NAME)]


def _prepare(output: Output, fingerprint: str, options: ConvertOptions) -> Progress | Manifest:
    """The journal to resume from, or the finished manifest when there is nothing left to do."""
    if options.overwrite:
        output.remove([*_our_files(output, options.prefix), WORK_DIR])
    manifest_text = output.read_text(MANIFEST_NAME)
    if manifest_text is not None:
        manifest = Manifest.from_json(manifest_text, output.path(MANIFEST_NAME))
        if manifest.fingerprint != fingerprint:
            raise InputError(
                f"{output.url} already holds a finished conversion of other inputs or options; "
                "pass --overwrite to replace it, or choose another --output"
            )
        output.remove([WORK_DIR])
        return manifest
    progress_text = output.read_text(PROGRESS_NAME)
    if progress_text is not None:
        progress = Progress.from_json(progress_text)
        if progress.fingerprint != fingerprint:
            raise InputError(
                f"{output.url} holds an unfinished conversion of other inputs or options; "
                "rerun that command to finish it, pass --overwrite to discard it, or choose another --output"
            )
        output.clear_scratch()
        return progress
    if _our_files(output, options.prefix):
        raise InputError(
            f"{output.url} already holds {options.prefix}-*.tar shards that no shardify run here is "
            "tracking; pass --overwrite to replace them, or choose another --output"
        )
    progress = Progress(fingerprint=fingerprint)
    output.write_text(PROGRESS_NAME, progress.to_json())
    return progress


def convert(
    patterns: list[str],
    options: ConvertOptions,
    on_rows: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Convert the parquet inputs matched by ``patterns`` into shards under ``options.output``.

    ``on_plan(total_rows, done_rows)`` is called once before conversion starts, ``on_rows(n)``
    after each batch is written (for progress bars).
    """
    started = time.perf_counter()
    options.validate()
    inputs = open_inputs(expand_inputs(patterns))
    schema, layouts = detect_schema(inputs, options.schema, options.columns)
    fingerprint = _fingerprint(inputs, schema, options)
    output = Output(options.output)
    try:
        state = _prepare(output, fingerprint, options)
        if isinstance(state, Manifest):
            return ConvertResult(state, True, state.rows_read, 0, 0, time.perf_counter() - started)
        resumed_at = state.rows_read
        total_rows = sum(item.num_rows for item in inputs)
        if on_plan:
            on_plan(total_rows, resumed_at)
        sequence = ShardSequence(
            output, state, options.prefix, options.max_samples_per_shard, options.max_shard_bytes
        )
        try:
            media_bytes = _run(inputs, layouts, state, schema, options, sequence, on_rows)
            sequence.commit(len(inputs), 0)
        finally:
            sequence.close()
        manifest = _finish(output, sequence.committed, inputs, schema, options, fingerprint, total_rows)
    finally:
        output.close()
    return ConvertResult(
        manifest,
        False,
        resumed_at,
        manifest.rows_read - resumed_at,
        media_bytes,
        time.perf_counter() - started,
    )


def _run(
    inputs: list[ParquetInput],
    layouts: list[Layout],
    progress: Progress,
    schema: str,
    options: ConvertOptions,
    sequence: ShardSequence,
    on_rows: Callable[[int], None] | None,
) -> int:
    """Check batches on ``options.workers`` threads while this thread reads and writes in order.

    Images named by URL are fetched on ``options.fetch.workers`` more threads, ahead of the
    writer: the read position runs that far ahead of the rows written, never behind the resume
    point, so committed rows are not fetched again.
    """
    media_bytes = 0
    in_flight: deque[tuple[RowBatch, Future[list[RowMedia]]]] = deque()
    # Enough batches queued to keep every worker busy, few enough to bound memory; with URLs,
    # also a few rows per fetch thread, so one slow URL does not leave the others idle at once.
    max_in_flight = 2 * options.workers + 1
    if any(URL_COLUMN in layout.fields and IMAGE_COLUMN not in layout.fields for layout in layouts):
        max_in_flight = max(max_in_flight, -(-4 * options.fetch.workers // options.batch_rows) + 1)

    def write_oldest() -> int:
        batch, verdicts = in_flight.popleft()
        checked = verdicts.result()
        write_batch(batch, checked, sequence, schema)
        if on_rows:
            on_rows(len(batch))
        if batch.image_urls is None:
            return 0
        return sum(len(v.image_payload) for v in checked if v.image_payload and v.image and v.image.ok)

    with (
        ThreadPoolExecutor(options.workers, thread_name_prefix="shardify-check") as pool,
        Fetcher(options.fetch) as fetcher,
    ):
        try:
            batches = iter_batches(inputs, layouts, progress.source, progress.row, schema, options.batch_rows)
            for batch in batches:
                for values in (batch.images, batch.audios):
                    media_bytes += sum(len(v) for v in values or () if v)
                limits = (options.max_image_pixels, options.transcode_uncommon)
                if batch.image_urls is not None:
                    sha256s = batch.image_sha256s or [None] * len(batch)
                    fetches = [fetcher.submit(u, h) for u, h in zip(batch.image_urls, sha256s, strict=True)]
                    job = pool.submit(check_fetched, fetches, batch.audios, *limits)
                else:
                    job = pool.submit(check_media, batch.images, batch.audios, *limits)
                in_flight.append((batch, job))
                if len(in_flight) >= max_in_flight:
                    media_bytes += write_oldest()
            while in_flight:
                media_bytes += write_oldest()
        finally:
            for _, job in in_flight:
                job.cancel()
    return media_bytes


def _finish(
    output: Output,
    progress: Progress,
    inputs: list[ParquetInput],
    schema: str,
    options: ConvertOptions,
    fingerprint: str,
    total_rows: int,
) -> Manifest:
    """Reconcile every count, then publish skipped.jsonl and, last, manifest.json."""
    shard_samples = sum(entry.samples for entry in progress.shards)
    problems = []
    if progress.rows_read != progress.samples_written + progress.rows_skipped:
        problems.append(
            f"rows read {progress.rows_read} != written {progress.samples_written}"
            f" + skipped {progress.rows_skipped}"
        )
    if progress.rows_read != total_rows:
        problems.append(f"rows read {progress.rows_read} != rows in the inputs {total_rows}")
    if shard_samples != progress.samples_written:
        problems.append(f"shards hold {shard_samples} samples, expected {progress.samples_written}")
    if problems:
        raise RuntimeError("counts do not reconcile, manifest not written: " + "; ".join(problems))
    manifest = Manifest(
        schema=schema,
        shards=progress.shards,
        rows_read=progress.rows_read,
        samples_written=progress.samples_written,
        rows_skipped=progress.rows_skipped,
        skipped_by_reason=progress.skipped_by_reason,
        inputs=[item.url for item in inputs],
        options=options.shaping(),
        media=progress.media,
        fingerprint=fingerprint,
        checksums=CHECKSUM_ALGORITHM if progress.checksums else None,
    )
    write_skipped_log(output, progress, SKIPPED_NAME)
    output.write_text(MANIFEST_NAME, manifest.to_json())
    output.remove([WORK_DIR])
    return manifest
