"""The rows of one unit: read in order, media checked (and fetched) in parallel, written in order."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from shardify.checks import MediaCheck, check_audio, check_image, check_text, transcode_to_png
from shardify.fetch import Fetched, Fetcher
from shardify.format import COMMON_IMAGE_EXTENSIONS, sample_key
from shardify.journal import ShardSequence, Unit
from shardify.options import ConvertOptions
from shardify.sources import (
    AUDIO_COLUMN,
    IMAGE_COLUMN,
    SHA256_COLUMN,
    TEXT_COLUMNS,
    URL_COLUMN,
    Layout,
    ParquetInput,
    media_values,
)


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
    item: ParquetInput, layout: Layout, start: int, end: int, schema: str, batch_rows: int
) -> Iterator[RowBatch]:
    """Rows ``[start, end)`` of one input, in order."""
    fields = layout.fields
    # Image bytes in the input win over a URL: nothing is fetched for such inputs.
    fetching = IMAGE_COLUMN not in fields and URL_COLUMN in fields
    media = [fields[f] for f in (IMAGE_COLUMN, AUDIO_COLUMN) if f in fields]
    columns = list(dict.fromkeys(layout.json_columns + [fields[f] for f in fields] + media))
    for batch in item.iter_batches(start, end, batch_rows, columns):
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


def convert_rows(
    item: ParquetInput,
    layout: Layout,
    unit: Unit,
    schema: str,
    options: ConvertOptions,
    sequence: ShardSequence,
    on_rows: Callable[[int], None] | None,
) -> int:
    """Convert the unit's rows from its journal's resume point on; the media bytes read.

    Batches are checked on ``options.workers`` threads while this thread reads and writes in order.

    Images named by URL are fetched on ``options.fetch.workers`` more threads, ahead of the
    writer: the read position runs that far ahead of the rows written, never behind the resume
    point, so committed rows are not fetched again.
    """
    media_bytes = 0
    in_flight: deque[tuple[RowBatch, Future[list[RowMedia]]]] = deque()
    # Enough batches queued to keep every worker busy, few enough to bound memory; with URLs,
    # also a few rows per fetch thread, so one slow URL does not leave the others idle at once.
    max_in_flight = 2 * options.workers + 1
    if URL_COLUMN in layout.fields and IMAGE_COLUMN not in layout.fields:
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
            start = sequence.committed.row
            batches = iter_batches(item, layout, start, unit.end, schema, options.batch_rows)
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
