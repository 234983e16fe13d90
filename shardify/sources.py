"""Finding and opening parquet inputs on local disk or S3, and deciding their schema."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from shardify.format import SCHEMAS
from shardify.storage import as_user_error, filesystem, is_remote, storage_for

IMAGE_COLUMN = "image_bytes"
AUDIO_COLUMN = "audio_bytes"
MEDIA_COLUMNS = (IMAGE_COLUMN, AUDIO_COLUMN)
TEXT_COLUMNS = {"caption": ("caption",), "qa": ("question", "answer")}


class InputError(Exception):
    """A problem with what the user asked for; reported as a message, never a traceback."""


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files, directories (searched recursively for ``*.parquet``) and globs, in a stable order."""
    found: list[str] = []
    for pattern in patterns:
        with as_user_error(InputError, pattern):
            fs, path = filesystem(pattern)
            if glob.has_magic(path):
                matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
            elif fs.isdir(path):
                matches = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
                if not matches:
                    raise InputError(f"directory {pattern} holds no *.parquet files")
            elif fs.exists(path):
                matches = [path]
            else:
                raise InputError(f"input {pattern} does not exist")
        if not matches:
            raise InputError(f"no input matched {pattern}")
        found.extend(storage_for(pattern).url(p) for p in matches)  # listings give bare paths
    unique = list(dict.fromkeys(found))
    if not unique:
        raise InputError("no inputs given")
    return unique


@dataclass
class ParquetInput:
    """One parquet file, opened far enough to know its schema and row groups."""

    url: str
    index: int
    num_rows: int
    row_group_rows: list[int]
    schema: pa.Schema
    size: int

    def open(self) -> pq.ParquetFile:
        # pre_buffer would read every requested row group up front: memory would grow with
        # the file. Without it, pyarrow streams one row group's pages at a time.
        fs, path = filesystem(self.url)
        if not is_remote(self.url):
            return pq.ParquetFile(path, pre_buffer=False)
        return pq.ParquetFile(fs.open(path, "rb"), buffer_size=1 << 20, pre_buffer=False)

    def iter_batches(self, start_row: int, batch_rows: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """Record batches from ``start_row`` on, reading only the row groups that hold them."""
        first_group, skip = 0, start_row
        while first_group < len(self.row_group_rows) and skip >= self.row_group_rows[first_group]:
            skip -= self.row_group_rows[first_group]
            first_group += 1
        if first_group >= len(self.row_group_rows):
            return
        parquet = self.open()
        try:
            groups = list(range(first_group, len(self.row_group_rows)))
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
                if skip:
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    batch = batch.slice(skip)
                    skip = 0
                yield batch
        finally:
            parquet.close()


def open_inputs(urls: list[str]) -> list[ParquetInput]:
    """Read every input's footer up front, so bad files fail before any shard is written."""
    inputs = []
    for index, url in enumerate(urls):
        try:
            with as_user_error(InputError, url):
                fs, path = filesystem(url)
                size = int(fs.size(path))
                with fs.open(path, "rb") as handle:
                    metadata = pq.ParquetFile(handle).metadata
                    schema = metadata.schema.to_arrow_schema()
        except PermissionError as exc:
            raise InputError(f"cannot read input {url}: {exc}") from None
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
            raise InputError(f"input {url} is not a readable parquet file: {exc}") from None
        row_groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        inputs.append(ParquetInput(url, index, metadata.num_rows, row_groups, schema, size))
    return inputs


def is_binary(field: pa.Field) -> bool:
    kind = field.type
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def detect_schema(inputs: list[ParquetInput], requested: str | None) -> str:
    """The row schema (caption or qa): as requested, or from the columns; checks every file."""
    schema = requested
    for item in inputs:
        names = set(item.schema.names)
        if schema is None:
            has_qa = {"question", "answer"} <= names
            has_caption = "caption" in names
            if has_qa and has_caption:
                raise InputError(
                    f"{item.url} has both caption and question/answer columns: pass --schema caption or qa"
                )
            if not (has_qa or has_caption):
                raise InputError(
                    f"{item.url}: cannot tell the schema: need a 'caption' column (caption schema) or "
                    f"'question' and 'answer' (qa schema); found: {', '.join(item.schema.names)}"
                )
            schema = "qa" if has_qa else "caption"
        assert schema in SCHEMAS
        missing = [name for name in TEXT_COLUMNS[schema] if name not in names]
        if not any(name in names for name in MEDIA_COLUMNS):
            missing.append(f"{IMAGE_COLUMN} (or {AUDIO_COLUMN})")
        if missing:
            raise InputError(
                f"{item.url}: missing required column(s) for the {schema} schema: {', '.join(missing)}; "
                f"found: {', '.join(item.schema.names)}"
            )
        for name in MEDIA_COLUMNS:
            if name in names and not is_binary(item.schema.field(name)):
                raise InputError(
                    f"{item.url}: column {name} must be binary, found {item.schema.field(name).type}"
                )
    assert schema is not None
    return schema
