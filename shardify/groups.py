"""``--group-by``: every row of one image becomes one sample, the image fetched and stored once.

Before any unit is converted, one pass reads the grouping column of every input (a URL, a hash or
a path; for image bytes, their SHA-256) and numbers the groups in order of first appearance over
the sorted inputs. A group's sample is made where its first row is, in that row's unit: its turns
are the first row's followed by every other row's, in input order, and its image is the first
row's. The other rows of a group are *merged* (counted in ``rows_merged``) wherever they are, so
``rows_read == samples_written + rows_skipped + rows_merged`` still holds for every unit, and the
output is a pure function of the inputs and options, whatever the engine or the restarts.

What the pass holds: one integer per row and the distinct keys; the rows a unit joins to its
groups are read again (their non-media columns only) when the unit is converted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from shardify.sources import IMAGE_COLUMN, Layout, ParquetInput, media_values

GROUP_KEYS = ("image_url", "image_sha256", "image_bytes", "image_path")
"""What ``--group-by`` may name: rows with the same value of that field share one sample."""
_BATCH_ROWS = 4096


@dataclass
class Grouping:
    """Which rows share a sample: numpy arrays, a few integers per row."""

    group_of: list[np.ndarray]
    """Per input, the group index of each of its rows (groups numbered by first appearance)."""
    base: np.ndarray
    """Global row number of each input's first row (inputs laid end to end)."""
    order: np.ndarray
    """Global row numbers sorted by group, each group's rows in input order ..."""
    offsets: np.ndarray
    """... group g's rows are ``order[offsets[g]:offsets[g + 1]]``, the first one leading."""

    @property
    def groups(self) -> int:
        return len(self.offsets) - 1

    def for_unit(self, source: int, start: int, end: int) -> UnitGroups:
        """What the unit of rows ``[start, end)`` of input ``source`` needs to know of the grouping."""
        groups = self.group_of[source][start:end]
        rows = np.arange(start, end)
        leading = self.order[self.offsets[groups]] == rows + self.base[source]
        leads: dict[int, list[tuple[int, int]]] = {}
        for row, group in zip(rows[leading].tolist(), groups[leading].tolist(), strict=True):
            joined = self.order[self.offsets[group] + 1 : self.offsets[group + 1]]
            leads[row] = [self._located(int(g)) for g in joined]
        return UnitGroups(leads, set(rows[~leading].tolist()))

    def _located(self, global_row: int) -> tuple[int, int]:
        source = int(np.searchsorted(self.base, global_row, side="right")) - 1
        return source, global_row - int(self.base[source])


@dataclass
class UnitGroups:
    """One unit's part of the grouping: small and picklable (it travels with the unit's job)."""

    leads: dict[int, list[tuple[int, int]]]
    """Rows of the unit that lead their group -> the group's other rows ``(input, row)``."""
    merged: set[int]
    """Rows of the unit joined to a group led by an earlier row."""

    def joined_rows(self) -> list[tuple[int, int]]:
        """Every row this unit's groups join to their leading rows, in input order."""
        return sorted({row for rows in self.leads.values() for row in rows})


def plan_groups(
    inputs: list[ParquetInput], layouts: list[Layout], key: str, on_rows: Callable[[int], None] | None = None
) -> Grouping:
    """Read ``key``'s column of every input and number the groups; a null key is a group of its own."""
    ids: dict[Any, int] = {}
    count = 0
    group_of: list[np.ndarray] = []
    for item, layout in zip(inputs, layouts, strict=True):
        column = layout.column(key)
        assert column is not None  # detect_schema checked that every input has it
        groups = np.empty(item.num_rows, dtype=np.int64)
        row = 0
        for batch in item.iter_batches(0, item.num_rows, _BATCH_ROWS, [column]):
            for value in _keys(batch.column(0), key):
                group = ids.get(value) if value is not None else None
                if group is None:
                    group = count
                    count += 1
                    if value is not None:
                        ids[value] = group
                groups[row] = group
                row += 1
            if on_rows:
                on_rows(batch.num_rows)
        group_of.append(groups)
    every = np.concatenate(group_of) if group_of else np.empty(0, dtype=np.int64)
    order = np.argsort(every, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(every, minlength=count))]).astype(np.int64)
    base = np.concatenate([[0], np.cumsum([item.num_rows for item in inputs])[:-1]]).astype(np.int64)
    return Grouping(group_of, base, order, offsets)


def _keys(column: pa.Array, key: str) -> list[Any]:
    if key != IMAGE_COLUMN:
        return column.to_pylist()
    return [hashlib.sha256(data).digest() if data else None for data in media_values(column)]


def read_rows(
    inputs: dict[int, ParquetInput],
    rows: list[tuple[int, int]],
    columns: dict[int, list[str]],
    names: dict[int, list[str]],
) -> dict[tuple[int, int], dict[str, Any]]:
    """The values of ``rows`` (``(input, row)``) in the given columns of each input, by row group:
    each row group holding some of them is read once, its other rows dropped at once."""
    found: dict[tuple[int, int], dict[str, Any]] = {}
    by_input: dict[int, list[int]] = {}
    for source, row in rows:
        by_input.setdefault(source, []).append(row)
    for source, wanted in by_input.items():
        item = inputs[source]
        bounds = np.cumsum([0, *item.row_group_rows])
        groups = sorted({int(np.searchsorted(bounds, row, side="right")) - 1 for row in wanted})
        wanted_set = set(wanted)
        for group in groups:
            first, last = int(bounds[group]), int(bounds[group + 1])
            batch_start = first
            for batch in item.iter_batches(first, last, _BATCH_ROWS, columns[source]):
                values = batch.rename_columns(names[source]).to_pylist()
                for offset, value in enumerate(values):
                    if batch_start + offset in wanted_set:
                        found[(source, batch_start + offset)] = value
                batch_start += batch.num_rows
    return found
