"""The rows of one unit: read in order, media checked (and fetched) in parallel, written in order."""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from shardify.checks import MediaCheck, check_audio, check_image, check_text, transcode_to_png
from shardify.conversations import ConversationError, row_turns
from shardify.fetch import Fetched, Fetcher, ImageFiles
from shardify.format import COMMON_IMAGE_EXTENSIONS, sample_key
from shardify.groups import UnitGroups, read_rows
from shardify.journal import ShardSequence, Unit
from shardify.options import ConvertOptions
from shardify.sources import (
    AUDIO_COLUMN,
    IMAGE_COLUMN,
    PATH_COLUMN,
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
    image_paths: list[Any] | None = None
    """json-to-tar: each row's image file, relative to ``--image-root``."""
    turn_values: dict[str, list[Any]] | None = None
    """Conversation schema: each row's values of the fields its turns are made from."""

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
    column: str = URL_COLUMN,
) -> list[RowMedia]:
    """:func:`check_media` on images being fetched; a failed fetch is the row's image verdict."""
    fetched = [job.result() if job is not None else None for job in fetches]
    images = [f.data if f is not None else None for f in fetched]
    verdicts = check_media(images, audios, max_pixels, transcode_uncommon, column=column)
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
    # Image bytes in the input win over a URL, a URL over a path: nothing else is fetched.
    fetching = IMAGE_COLUMN not in fields and URL_COLUMN in fields
    reading = IMAGE_COLUMN not in fields and URL_COLUMN not in fields and PATH_COLUMN in fields
    media = [fields[f] for f in (IMAGE_COLUMN, AUDIO_COLUMN) if f in fields]
    columns = list(dict.fromkeys(layout.json_columns + [fields[f] for f in fields] + media))
    turn_fields = layout.turns.fields if layout.turns is not None else ()
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
            image_sha256s=_field_values(batch, layout, SHA256_COLUMN) if fetching or reading else None,
            image_paths=_field_values(batch, layout, PATH_COLUMN) if reading else None,
            turn_values={f: batch.column(fields[f]).to_pylist() for f in turn_fields}
            if turn_fields
            else None,
        )
        start += batch.num_rows


def joined_columns(layout: Layout) -> tuple[list[str], list[str]]:
    """What is read of a row joined to another's sample: its ``.json`` columns and its turn fields,
    and their names."""
    turn_columns = [layout.fields[f] for f in layout.turns.fields] if layout.turns is not None else []
    names = dict(zip(layout.json_columns, layout.json_names, strict=True))
    for field_name, column in zip(layout.turns.fields if layout.turns else (), turn_columns, strict=True):
        names.setdefault(column, field_name)
    return list(names), list(names.values())


@dataclass
class Joined:
    """The rows a unit joins to its groups' leading rows (``--group-by``)."""

    groups: UnitGroups
    rows: dict[tuple[int, int], dict[str, Any]]
    """``(input, row)`` -> its ``.json`` values and turn fields, by name."""
    layouts: dict[int, Layout]


def _json_safe(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _row_failure(batch: RowBatch, i: int, media: RowMedia) -> tuple[str, str] | None:
    """Why row ``i`` cannot become a sample, or None."""
    checks = [c for c in (media.image, media.audio) if c is not None]
    if not checks:
        media_columns = (
            (IMAGE_COLUMN, batch.images),
            (URL_COLUMN, batch.image_urls),
            (PATH_COLUMN, batch.image_paths),
            (AUDIO_COLUMN, batch.audios),
        )
        columns = [c for c, v in media_columns if v is not None]
        return "missing", " and ".join(columns) + (" is null" if len(columns) == 1 else " are null")
    for check in checks:
        if not check.ok:
            return check.reason, check.detail
    for column, values in batch.texts.items():
        problem = check_text(values[i], column)
        if problem:
            return problem
    return None


def _conversation(
    batch: RowBatch, i: int, layout: Layout, media: RowMedia, joined: Joined | None
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Row ``i``'s turns followed by those of every row joined to it, and those rows' ``.json``;
    ConversationError when one of them cannot be read (the whole sample is skipped)."""
    assert layout.turns is not None and batch.turn_values is not None
    width, height = (media.image.width, media.image.height) if media.image is not None else (0, 0)
    values = {name: column[i] for name, column in batch.turn_values.items()}
    messages = row_turns(layout.turns, values, width, height)
    others = []
    row = batch.start + i
    for source, other in joined.groups.leads.get(row, []) if joined is not None else []:
        found = joined.rows[(source, other)]
        turns = joined.layouts[source].turns
        assert turns is not None
        try:
            messages += row_turns(turns, {f: found[f] for f in turns.fields}, width, height)
        except ConversationError as error:
            raise ConversationError(
                error.reason, f"joined row {other} of input {source}: {error.detail}"
            ) from None
        carried = {name: found[name] for name in joined.layouts[source].json_names}
        others.append({"source": source, "row": other, **carried})
    return messages, others


def write_batch(
    batch: RowBatch,
    verdicts: list[RowMedia],
    sequence: ShardSequence,
    schema: str,
    layout: Layout | None = None,
    joined: Joined | None = None,
) -> None:
    """Append a checked batch to the shard sequence, row by row, in order."""
    source = batch.source.index
    for i, media in enumerate(verdicts):
        row = batch.start + i
        if joined is not None and row in joined.groups.merged:
            sequence.add_merged()
            continue
        sample_id = batch.sample_ids[i] if batch.sample_ids is not None else None
        failure = _row_failure(batch, i, media)
        row_json = batch.json_rows[i]
        if failure is None and schema == "conversation":
            assert layout is not None
            try:
                messages, others = _conversation(batch, i, layout, media, joined)
                row_json = {**row_json, "messages": messages, **({"grouped_rows": others} if others else {})}
            except ConversationError as error:
                failure = (error.reason, error.detail)
        if failure:
            record = {
                "sample_id": _json_safe(sample_id),
                "source": batch.source.url,
                "row": row,
                "reason": failure[0],
                "detail": failure[1],
            }
            if joined is not None and joined.groups.leads.get(row):
                record["group_rows"] = 1 + len(joined.groups.leads[row])
            sequence.add_skip(record)
            continue
        members: list[tuple[str, bytes]] = []
        if media.image is not None:
            members.append((media.image.extension, media.image_payload))
        if media.audio is not None:
            members.append((media.audio.extension, batch.audios[i]))
        if schema == "caption":
            members.append(("txt", batch.texts["caption"][i].encode("utf-8")))
        row_json_text = json.dumps(row_json, ensure_ascii=False, default=str)
        members.append(("json", row_json_text.encode("utf-8")))
        sequence.add_sample(source, row, sample_key(source, row, sample_id), members)


def convert_rows(
    item: ParquetInput,
    layout: Layout,
    unit: Unit,
    schema: str,
    options: ConvertOptions,
    sequence: ShardSequence,
    on_rows: Callable[[int], None] | None,
    groups: UnitGroups | None = None,
    joined_inputs: dict[int, tuple[ParquetInput, Layout]] | None = None,
) -> int:
    """Convert the unit's rows from its journal's resume point on; the media bytes read.

    Batches are checked on ``options.workers`` threads while this thread reads and writes in order.

    Images named by URL (or, for json-to-tar, by a path under ``options.image_root``) are fetched
    on ``options.fetch.workers`` more threads, ahead of the writer: the read position runs that
    far ahead of the rows written, never behind the resume point, so committed rows are not
    fetched again. With ``groups`` (``--group-by``), only rows that lead a group fetch and check
    their image; the rows joined to them are read first (``joined_inputs``: where they are).
    """
    media_bytes = 0
    joined = _read_joined(groups, joined_inputs or {}, sequence.committed.row) if groups is not None else None
    merged = joined.groups.merged if joined is not None else set()
    in_flight: deque[tuple[RowBatch, Future[list[RowMedia]]]] = deque()
    # Enough batches queued to keep every worker busy, few enough to bound memory; with URLs,
    # also a few rows per fetch thread, so one slow URL does not leave the others idle at once.
    max_in_flight = 2 * options.workers + 1
    if IMAGE_COLUMN not in layout.fields and ({URL_COLUMN, PATH_COLUMN} & set(layout.fields)):
        max_in_flight = max(max_in_flight, -(-4 * options.fetch.workers // options.batch_rows) + 1)

    def write_oldest() -> int:
        batch, verdicts = in_flight.popleft()
        checked = verdicts.result()
        write_batch(batch, checked, sequence, schema, layout, joined)
        if on_rows:
            on_rows(len(batch))
        if batch.image_urls is None and batch.image_paths is None:
            return 0
        return sum(len(v.image_payload) for v in checked if v.image_payload and v.image and v.image.ok)

    with (
        ThreadPoolExecutor(options.workers, thread_name_prefix="shardify-check") as pool,
        Fetcher(options.fetch) as fetcher,
        _image_files(options) as files,
    ):
        try:
            start = sequence.committed.row
            batches = iter_batches(item, layout, start, unit.end, schema, options.batch_rows)
            for batch in batches:
                leading = [batch.start + i not in merged for i in range(len(batch))]
                if batch.images is not None and merged:  # joined rows' copies of the image: unchecked
                    batch.images = [
                        image if lead else None for image, lead in zip(batch.images, leading, strict=True)
                    ]
                for values in (batch.images, batch.audios):
                    media_bytes += sum(len(v) for v in values or () if v)
                limits = (options.max_image_pixels, options.transcode_uncommon)
                remote = (batch.image_urls, fetcher, URL_COLUMN) if batch.image_urls is not None else None
                if batch.image_paths is not None:
                    if files is None:
                        raise ValueError("image paths need an image root (json-to-tar --image-root)")
                    remote = (batch.image_paths, files, PATH_COLUMN)
                if remote is not None:
                    names, reader, column = remote
                    sha256s = batch.image_sha256s or [None] * len(batch)
                    fetches = [
                        reader.submit(name, digest) if lead else None
                        for name, digest, lead in zip(names, sha256s, leading, strict=True)
                    ]
                    job = pool.submit(check_fetched, fetches, batch.audios, *limits, column)
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


def _image_files(options: ConvertOptions) -> ImageFiles | contextlib.nullcontext[None]:
    if options.image_root is None:
        return contextlib.nullcontext()
    return ImageFiles(options.image_root, options.fetch.workers)


def _read_joined(
    groups: UnitGroups, inputs: dict[int, tuple[ParquetInput, Layout]], resume_row: int
) -> Joined:
    """The rows joined to the unit's groups that lead at or after ``resume_row``, read once."""
    wanted = sorted({r for row, rows in groups.leads.items() if row >= resume_row for r in rows})
    sources = sorted({source for source, _ in wanted})
    columns = {source: joined_columns(inputs[source][1]) for source in sources}
    found = read_rows(
        {source: inputs[source][0] for source in sources},
        wanted,
        {source: columns[source][0] for source in sources},
        {source: columns[source][1] for source in sources},
    )
    return Joined(groups, found, {source: layout for source, (_, layout) in inputs.items()})
