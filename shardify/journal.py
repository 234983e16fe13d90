"""Units of work, their shard sequences, and the journals that make a conversion restartable.

The inputs are cut into units (whole row groups of one input, by size; see :func:`plan_units`)
that depend only on the inputs and options. Each unit's rows are consumed in file order and
become its own run of shards, ``{prefix}-{unit:06d}-{part:06d}.tar``, so the shards are a pure
function of the inputs and options whatever the engine, the worker count or the restarts, and
units convert independently on any machine. Each time a shard fills up it is *committed*: its
checksums, its tar and the skipped rows seen since the last commit are published, then the
unit's journal records the position of the next unconsumed row and every count. A unit that is
started again resumes from that position and rewrites exactly what was not committed, so no
sample is written twice or lost, and no partial shard is ever visible. A finished unit leaves a
``done`` record, never rewritten, that the manifest is built from.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from shardify.format import CHECKSUMS_SUFFIX, ShardEntry, checksums_json, shard_name
from shardify.output import WORK_DIR, Output
from shardify.tarwriter import TarShard, finished_size, sample_tar_bytes

JOURNAL_VERSION = 2
PROGRESS_NAME = f"{WORK_DIR}/progress.json"
"""The single journal of a version-1 (sequential layout) conversion; its presence is reported."""
JOB_NAME = f"{WORK_DIR}/job.json"
"""Which conversion an unfinished output holds: its fingerprint and unit count."""
UNITS_DIR = f"{WORK_DIR}/units"


@dataclass(frozen=True)
class Unit:
    """Rows ``[start, end)`` of input ``source``: converted as one, into its own shards."""

    index: int
    source: int
    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start

    @property
    def tag(self) -> str:
        return f"u{self.index:06d}"

    @property
    def journal(self) -> str:
        return f"{UNITS_DIR}/{self.tag}.json"

    @property
    def done(self) -> str:
        return f"{UNITS_DIR}/{self.tag}.done.json"

    def shard(self, prefix: str, part: int) -> str:
        return shard_name(f"{prefix}-{self.index:06d}", part)

    def segment(self, number: int) -> str:
        """Name (under the output) of the unit's ``number``-th committed run of skipped rows."""
        return f"{UNITS_DIR}/{self.tag}-skipped-{number:06d}.jsonl"


def plan_units(
    row_group_rows: list[list[int]], row_group_bytes: list[list[int]], unit_bytes: int
) -> list[Unit]:
    """Cut every input (its row groups' row counts and sizes) into units of about ``unit_bytes``.

    Whole row groups are taken while they fit; a row group larger than a unit is cut into equal
    row ranges of about ``unit_bytes``. A unit never spans two inputs.
    """
    units: list[Unit] = []

    def add(source: int, start: int, end: int) -> None:
        if end > start:
            units.append(Unit(len(units), source, start, end))

    for source, (group_rows, group_bytes) in enumerate(zip(row_group_rows, row_group_bytes, strict=True)):
        start = row = size = 0
        for rows, nbytes in zip(group_rows, group_bytes, strict=True):
            if nbytes > unit_bytes:
                add(source, start, row)
                pieces = min(rows, -(-nbytes // unit_bytes))
                for k in range(pieces):
                    add(source, row + rows * k // pieces, row + rows * (k + 1) // pieces)
                row += rows
                start, size = row, 0
                continue
            if size and size + nbytes > unit_bytes:
                add(source, start, row)
                start, size = row, 0
            size += nbytes
            row += rows
        add(source, start, row)
    return units


@dataclass
class Progress:
    """Everything committed so far; small, JSON, rewritten atomically at each commit."""

    fingerprint: str
    source: int = 0
    """Index of the input holding the next unconsumed row."""
    row: int = 0
    """Index of that row in its input."""
    rows_read: int = 0
    samples_written: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    media: dict[str, int] = field(default_factory=dict)
    shards: list[ShardEntry] = field(default_factory=list)
    skip_segments: list[str] = field(default_factory=list)
    checksums: bool = True
    """Every committed shard has its ``.crc32.json`` (False for a journal begun before them)."""
    rows_merged: int = 0
    """Rows joined to the sample of an earlier row of the same image (``--group-by``)."""
    version: int = JOURNAL_VERSION

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Progress:
        raw = json.loads(text)
        if raw.get("version") != JOURNAL_VERSION:
            raise ValueError(f"journal version {raw.get('version')!r} is not {JOURNAL_VERSION}")
        raw["shards"] = [ShardEntry(**entry) for entry in raw["shards"]]
        raw.setdefault("checksums", False)
        return cls(**raw)


class ShardSequence:
    """Appends samples and skipped rows in order, cutting shards at the configured limits."""

    def __init__(
        self, output: Output, progress: Progress, unit: Unit, prefix: str, max_samples: int, max_bytes: int
    ) -> None:
        self.output = output
        self.committed = progress
        self.unit = unit
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        # Counts since the last commit; folded into the journal when the next commit lands.
        self._rows = 0
        self._samples = 0
        self._merged = 0
        self._skips: Counter[str] = Counter()
        self._media: Counter[str] = Counter()
        self._shard: TarShard | None = None
        self._skip_handle = None
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="shardify-publish")
        self._publishing: Future[None] | None = None

    def _open_shard(self) -> TarShard:
        name = self.unit.shard(self.prefix, len(self.committed.shards)) + ".partial"
        self._shard = TarShard(self.output.scratch_path(name))
        return self._shard

    def add_sample(self, source: int, row: int, key: str, members: list[tuple[str, bytes]]) -> None:
        """Append one converted row (``row`` of input ``source``)."""
        shard = self._shard
        if shard is not None and shard.samples > 0:
            projected = finished_size(shard.data_bytes + sample_tar_bytes(members))
            if shard.samples >= self.max_samples or projected > self.max_bytes:
                self.commit(source, row)
                shard = None
        if shard is None:
            shard = self._open_shard()
        shard.add_sample(key, members)
        self._rows += 1
        self._samples += 1
        self._media.update(ext for ext, _ in members if ext not in ("txt", "json"))

    def add_skip(self, record: dict) -> None:
        """Log one skipped row (``record`` has sample_id, source, row, reason, detail)."""
        if self._skip_handle is None:
            name = self.unit.segment(len(self.committed.skip_segments)).rsplit("/", 1)[-1] + ".partial"
            self._skip_handle = open(self.output.scratch_path(name), "w", encoding="utf-8")
        self._skip_handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._skips[record["reason"]] += 1
        self._rows += 1

    def add_merged(self) -> None:
        """Count one row joined to an earlier row's sample (``--group-by``): consumed, not written."""
        self._merged += 1
        self._rows += 1

    def commit(self, next_source: int, next_row: int) -> None:
        """Close the open shard and skip segment; record ``(next_source, next_row)`` as resume point.

        Publishing (fsync + rename, or the S3 upload) and the journal write run on one background
        thread, in commit order, so this thread goes on filling the next shard meanwhile.
        """
        progress = self.committed
        files = []
        if self._skip_handle is not None:
            self._skip_handle.close()
            self._skip_handle = None
            segment = self.unit.segment(len(progress.skip_segments))
            files.append((segment.rsplit("/", 1)[-1] + ".partial", segment))
            progress.skip_segments.append(segment)
        if self._shard is not None:
            name = self.unit.shard(self.prefix, len(progress.shards))
            size = self._shard.finish()
            # The checksums go first: a shard that is visible always has them.
            sums = name + CHECKSUMS_SUFFIX
            with open(self.output.scratch_path(sums + ".partial"), "w", encoding="utf-8") as handle:
                handle.write(checksums_json(self._shard.checksums))
            files.append((sums + ".partial", sums))
            files.append((name + ".partial", name))
            progress.shards.append(ShardEntry(name=name, samples=self._shard.samples, bytes=size))
            self._shard = None
        progress.source, progress.row = next_source, next_row
        progress.rows_read += self._rows
        progress.samples_written += self._samples
        progress.rows_merged += self._merged
        progress.skipped_by_reason = dict(sorted((Counter(progress.skipped_by_reason) + self._skips).items()))
        progress.media = dict(sorted((Counter(progress.media) + self._media).items()))
        self._rows = self._samples = self._merged = 0
        self._skips.clear()
        self._media.clear()
        self._wait_for_publisher()
        self._publishing = self._publisher.submit(self._publish, files, progress.to_json())

    def _publish(self, files: list[tuple[str, str]], journal: str) -> None:
        for scratch, final in files:
            self.output.publish(scratch, final)
        self.output.write_text(self.unit.journal, journal)

    def _wait_for_publisher(self) -> None:
        """Surface any error of the previous publish (a full disk, a failed upload) here."""
        if self._publishing is not None:
            self._publishing.result()
            self._publishing = None

    def close(self) -> None:
        """Wait until everything committed is published."""
        try:
            self._wait_for_publisher()
        finally:
            self._publisher.shutdown(wait=True)


def write_skipped_log(output: Output, segments: list[str], name: str) -> None:
    """Concatenate the committed skip segments (names under the output), in order, into the log."""
    scratch = name + ".writing"
    with open(output.scratch_path(scratch), "wb") as combined:
        for segment in segments:
            with output.fs.open(output.path(segment), "rb") as part:
                while chunk := part.read(1 << 20):
                    combined.write(chunk)
    output.publish(scratch, name)
