"""Finding and opening parquet inputs on local disk or S3, and where each field is in them (layouts)."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardify.bytestream import RangeInput
from shardify.conversations import CONVERSATION_FIELDS, TurnSource
from shardify.storage import as_user_error, filesystem, is_remote, storage_for

IMAGE_COLUMN = "image_bytes"
AUDIO_COLUMN = "audio_bytes"
MEDIA_COLUMNS = (IMAGE_COLUMN, AUDIO_COLUMN)
URL_COLUMN = "image_url"
SHA256_COLUMN = "image_sha256"
PATH_COLUMN = "image_path"
"""json-to-tar: an image file's path, relative to ``--image-root``."""
TEXT_COLUMNS = {"caption": ("caption",), "qa": ("question", "answer"), "conversation": ()}
FIELDS = (
    "sample_id",
    "caption",
    "question",
    "answer",
    *CONVERSATION_FIELDS,
    IMAGE_COLUMN,
    URL_COLUMN,
    SHA256_COLUMN,
    PATH_COLUMN,
    AUDIO_COLUMN,
)
"""What ``--column FIELD=COLUMN`` can name; each field is read from the column of its own name by default."""


class InputError(Exception):
    """A problem with what the user asked for; reported as a message, never a traceback."""


def expand_inputs(patterns: list[str], suffixes: tuple[str, ...] = (".parquet",)) -> list[str]:
    """Files, directories (searched recursively for files ending in ``suffixes``) and globs, in a
    stable order."""
    found: list[str] = []
    for pattern in patterns:
        with as_user_error(InputError, pattern):
            fs, path = filesystem(pattern)
            if glob.has_magic(path):
                matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
            elif fs.isdir(path):
                matches = sorted(p for p in fs.find(path) if p.endswith(suffixes))
                if not matches:
                    wanted = " or ".join(f"*{suffix}" for suffix in suffixes)
                    raise InputError(f"directory {pattern} holds no {wanted} files")
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
    row_group_bytes: list[int]
    """Compressed size of each row group: what reading it costs, roughly what checking it costs."""

    def open(self) -> pq.ParquetFile:
        # pre_buffer would read every requested row group up front: memory would grow with
        # the file. Without it, pyarrow streams one row group's pages at a time.
        _, path = filesystem(self.url)
        if not is_remote(self.url):
            return pq.ParquetFile(path, pre_buffer=False)
        return pq.ParquetFile(_open_remote(self.url, self.size), buffer_size=1 << 20, pre_buffer=False)

    def iter_batches(
        self, start_row: int, end_row: int, batch_rows: int, columns: list[str]
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of rows ``[start_row, end_row)``, reading only the row groups that hold them."""
        first_group, skip, group_start = 0, start_row, 0
        while first_group < len(self.row_group_rows) and skip >= self.row_group_rows[first_group]:
            skip -= self.row_group_rows[first_group]
            group_start += self.row_group_rows[first_group]
            first_group += 1
        last_group, group_end = first_group, group_start
        while last_group < len(self.row_group_rows) and group_end < end_row:
            group_end += self.row_group_rows[last_group]
            last_group += 1
        if start_row >= end_row or first_group >= last_group:
            return
        remaining = end_row - start_row
        parquet = self.open()
        try:
            groups = list(range(first_group, last_group))
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
                if skip:
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    batch = batch.slice(skip)
                    skip = 0
                if batch.num_rows >= remaining:
                    yield batch.slice(0, remaining)
                    return
                remaining -= batch.num_rows
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
                size = int(storage_for(url).stat(url).size or 0) if is_remote(url) else int(fs.size(path))
                handle = _open_remote(url, size) if is_remote(url) else fs.open(path, "rb")
                with handle:
                    metadata = pq.ParquetFile(handle).metadata
                    schema = metadata.schema.to_arrow_schema()
        except FileNotFoundError:
            raise InputError(f"input {url} does not exist") from None
        except PermissionError as exc:
            raise InputError(f"cannot read input {url}: {exc}") from None
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
            raise InputError(f"input {url} is not a readable parquet file: {exc}") from None
        groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
        row_bytes = [
            sum(group.column(c).total_compressed_size for c in range(group.num_columns)) for group in groups
        ]
        rows = [group.num_rows for group in groups]
        inputs.append(ParquetInput(url, index, metadata.num_rows, rows, schema, size, row_bytes))
    return inputs


def _open_remote(url: str, size: int) -> Any:
    """A remote parquet file opened for pyarrow: through the read-ahead (range requests in flight,
    retries) where its storage reads byte ranges, else through its filesystem."""
    if storage_for(url).range_reader(url) is not None:
        return RangeInput(url, size)
    fs, path = filesystem(url)
    return fs.open(path, "rb")


def is_binary(field: pa.Field) -> bool:
    kind = field.type
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def is_media_struct(field: pa.Field) -> bool:
    """A Hugging Face ``datasets`` Image/Audio column: ``struct<bytes: binary, path: string>``."""
    kind = field.type
    if not pa.types.is_struct(kind) or kind.get_field_index("bytes") < 0:
        return False
    return is_binary(kind.field(kind.get_field_index("bytes")))


def media_values(column: pa.Array) -> list[bytes | None]:
    """The media bytes of a binary column, or the ``bytes`` of a media struct column."""
    if pa.types.is_struct(column.type):
        return [None if value is None else value["bytes"] for value in column.to_pylist()]
    return column.to_pylist()


def parse_column_specs(specs: list[str]) -> dict[str, str]:
    """``["caption=text", ...]`` (from ``--column``) as ``{field: column}``."""
    columns: dict[str, str] = {}
    for spec in specs:
        field_name, sep, column = spec.partition("=")
        field_name, column = field_name.strip(), column.strip()
        if not sep or not field_name or not column:
            raise InputError(f"--column {spec!r}: expected FIELD=COLUMN, e.g. caption=text")
        if field_name in columns:
            raise InputError(
                f"--column {field_name} given twice ({field_name}={columns[field_name]} and {spec})"
            )
        columns[field_name] = column
    return columns


def column_problems(columns: dict[str, str]) -> list[str]:
    """What is wrong with a ``{field: column}`` mapping on its own, before any input is read."""
    problems = []
    for field_name, column in columns.items():
        if field_name not in FIELDS:
            problems.append(
                f"--column {field_name}={column}: unknown field {field_name!r}; fields: {', '.join(FIELDS)}"
            )
    by_column: dict[str, list[str]] = {}
    for field_name, column in columns.items():
        by_column.setdefault(column, []).append(field_name)
    for column, fields in by_column.items():
        if len(fields) > 1:
            problems.append(
                f"--column: column {column!r} is given for more than one field: {', '.join(fields)}"
            )
    return problems


@dataclass(frozen=True)
class Layout:
    """Where each field lives in one input, and which columns its samples' ``.json`` carries."""

    fields: dict[str, str]
    """Field -> the column holding it, for the fields this input has."""
    json_columns: list[str]
    """Source columns carried into ``.json`` (every non-media one), in file order ..."""
    json_names: list[str]
    """... and their names there: a column mapped with ``--column`` takes its field's name."""
    turns: TurnSource | None = None
    """Conversation schema: where each row's turns come from (see shardify.conversations)."""

    def column(self, field_name: str) -> str | None:
        return self.fields.get(field_name)


def resolve_layout(item: ParquetInput, columns: dict[str, str]) -> Layout:
    """Apply the ``--column`` mapping to one input; canonical names fill the fields not mapped."""
    names = item.schema.names
    claimed = {column: field_name for field_name, column in columns.items()}
    fields: dict[str, str] = {}
    for field_name in FIELDS:
        if field_name in columns:
            if columns[field_name] not in names:
                raise InputError(
                    f"{item.url}: --column {field_name}={columns[field_name]}: no column named "
                    f"{columns[field_name]!r}; found: {', '.join(names)}"
                )
            fields[field_name] = columns[field_name]
        elif field_name in names and field_name not in claimed:
            fields[field_name] = field_name
    media = {fields[name] for name in MEDIA_COLUMNS if name in fields}
    json_columns, json_names = [], []
    for schema_field in item.schema:
        name = schema_field.name
        if is_binary(schema_field) or name in media:
            continue
        if name in claimed:
            json_columns.append(name)
            json_names.append(claimed[name])
        elif name not in columns:  # a column named like a field mapped elsewhere is replaced by it
            json_columns.append(name)
            json_names.append(name)
    return Layout(fields, json_columns, json_names)
