"""json-to-tar's inputs: JSON (an array of objects) or JSONL files, the way LLaVA publishes its
instruction data, read into Arrow and served like parquet inputs: the same units of work, batches,
checks, journals and restarts.

LLaVA's fields are read without ``--column``: ``id`` as the sample_id, ``image`` as the image's
path under ``--image-root``, ``conversations`` (``[{from: human|gpt, value}, ...]``) as the
messages. A file is read whole (JSONL line by line) when the conversion is planned, and again by
each process that converts its units.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from shardify.sources import PATH_COLUMN, InputError, ParquetInput
from shardify.storage import as_user_error, filesystem

JSON_SUFFIXES = (".json", ".jsonl")
LLAVA_COLUMNS = {"sample_id": "id", PATH_COLUMN: "image", "messages": "conversations"}
"""Field -> LLaVA's name for it, used when an input has that column and no column of the field's name."""
_GROUP_ROWS = 1024
"""Rows per (synthetic) row group: the grain units are cut at."""


@dataclass
class JsonInput(ParquetInput):
    """One JSON or JSONL file, held as an Arrow table."""

    def iter_batches(
        self, start_row: int, end_row: int, batch_rows: int, columns: list[str]
    ) -> Iterator[pa.RecordBatch]:
        if start_row >= end_row:
            return
        table = _table(self.url, self.size).select(columns).slice(start_row, end_row - start_row)
        yield from table.to_batches(max_chunksize=batch_rows)


def open_json_inputs(urls: list[str]) -> list[JsonInput]:
    """Read every JSON input up front, so a malformed file fails before any shard is written."""
    inputs = []
    for index, url in enumerate(urls):
        with as_user_error(InputError, url):
            fs, path = filesystem(url)
            size = int(fs.size(path))
        table = _table(url, size)
        rows = [min(_GROUP_ROWS, table.num_rows - start) for start in range(0, table.num_rows, _GROUP_ROWS)]
        starts = range(0, table.num_rows, _GROUP_ROWS)
        nbytes = [max(1, table.slice(start, count).nbytes) for start, count in zip(starts, rows, strict=True)]
        inputs.append(JsonInput(url, index, table.num_rows, rows, table.schema, size, nbytes))
    return inputs


def llava_columns(inputs: list[ParquetInput], columns: dict[str, str]) -> dict[str, str]:
    """``columns`` with LLaVA's names filled in for the fields it leaves unmapped."""
    filled = dict(columns)
    for field_name, llava_name in LLAVA_COLUMNS.items():
        taken = field_name in filled or llava_name in filled.values()
        if not taken and all(
            llava_name in item.schema.names and field_name not in item.schema.names for item in inputs
        ):
            filled[field_name] = llava_name
    return filled


@functools.lru_cache(maxsize=4)
def _table(url: str, size: int) -> pa.Table:
    """The file's objects as a table; ``size`` keys the cache, so a changed file is read again."""
    return rows_to_table(_read_objects(url), url)


def _read_objects(url: str) -> list[dict]:
    try:
        with as_user_error(InputError, url):
            fs, path = filesystem(url)
            with fs.open(path, "rb") as handle:
                text = handle.read().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"input {url} does not exist") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"input {url} is not UTF-8 text: {exc}") from None
    if url.endswith(".jsonl"):
        objects = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                objects.append(_parse(line, f"{url} line {number}"))
    else:
        objects = _parse(text, url)
        if not isinstance(objects, list):
            raise InputError(
                f"{url}: expected a JSON array of objects (LLaVA's layout), found {type(objects).__name__}"
            )
    for number, item in enumerate(objects):
        if not isinstance(item, dict):
            raise InputError(f"{url}: item {number} is {type(item).__name__}, not an object")
    return objects


def _parse(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON: {exc}") from None


def rows_to_table(objects: list[dict], url: str = "") -> pa.Table:
    """One column per key (in order of first appearance), null where an object lacks it; a key
    whose values Arrow cannot hold in one type keeps each value as JSON text."""
    names = list(dict.fromkeys(key for item in objects for key in item))
    arrays = {}
    for name in names:
        values = [item.get(name) for item in objects]
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays[name] = pa.array(
                [None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string()
            )
    if not arrays:
        return pa.table({"id": pa.array([], pa.string())}) if not objects else pa.table({})
    return pa.table(arrays)
