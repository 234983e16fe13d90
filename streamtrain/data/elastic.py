"""The elastic stream: every step's samples from the mixture counts and the sources' lanes.

``Progress`` is the whole position of the data: the last step taken, each source's Cursor
(lanes.py) and the mixture carries (mixture.py) — the same on every rank. ``Progress.advance``
is the pure transition of one step: how many samples of each source every rank takes, and at
which ``(epoch, level, t)`` of each source. The main process and every dataloader worker apply
the same transitions, so a worker knows every step's samples without being told.

A rank's step is ``per_rank`` *slots* (sources in order, each source's samples in ``t`` order).
A slot's sample sits in one of the rank's lanes; worker ``w`` of ``K`` reads the lanes ``j`` with
``j % K == w`` and yields, for every step, one item: the slots it read, decoded. The loader joins
the ``K`` items of a step (DataLoader hands them over in worker order) into the step's
micro-batches. So workers only decide who reads, never what a step holds.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from shardify.bytestream import RateLimitedLog, ReadStats, RetryPolicy, ShardReadError
from shardify.tarread import DEFAULT_MAX_MEMBER_BYTES
from streamtrain.data.counts import Decode, count_reads, decode_samples
from streamtrain.data.dataset import ShardInfo, Source
from streamtrain.data.handover import Packed, step_rows
from streamtrain.data.lanes import (
    Cursor,
    Level,
    LevelShape,
    PlanError,
    ShardOrder,
    Taken,
    Windows,
    derive_seed,
    lanes_per_rank,
    level_of,
)
from streamtrain.data.mixture import apportion
from streamtrain.data.remote import RemoteReads, ShardOpener, ShardSpan
from streamtrain.data.ring import RingControl, RingWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """Order and robustness settings of a stream."""

    seed: int = 0
    """Shard order, sample order and augmentations are pure functions of it (and the topology)."""
    shuffle_buffer: int = 256
    """Samples per shuffle window (undecoded bytes held per rank and source, over its lanes)."""
    warn_every_s: float = 30.0
    """At most one warning per this many seconds per worker for read-time failures."""
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    """A sample with a larger tar member is skipped unread (counted as ``oversized_samples``)."""


@dataclass(frozen=True)
class Layout:
    """What the plan needs of the run: sources, seed, ranks and the per-rank step size."""

    sources: tuple[Source, ...]
    seed: int
    world_size: int
    per_rank: int
    """Samples per rank and optimizer step (per-device batch × accumulation)."""
    shuffle_buffer: int

    def windows(self, index: int) -> Windows:
        return Windows(self.seed, self.sources[index].name, self.shuffle_buffer)

    def counts(self, index: int) -> tuple[int, ...]:
        """Source ``index``'s samples per shard."""
        return self._counts[index]

    @cached_property
    def _counts(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(shard.samples for shard in source.shards) for source in self.sources)

    def shapes(self) -> list[LevelShape]:
        """How each source is laned on this topology (PlanError when it cannot be)."""
        return list(self._shapes)

    @cached_property
    def _shapes(self) -> tuple[LevelShape, ...]:
        shapes = []
        for source in self.sources:
            try:
                q = lanes_per_rank(source.samples, self.world_size, self.per_rank)
            except PlanError:
                raise PlanError(
                    f"{source.name}: {source.samples} samples cannot give each of {self.world_size} "
                    f"ranks one batch of {self.per_rank}; use a smaller batch size or more data"
                ) from None
            shapes.append(LevelShape(self.world_size, q))
        self.check_shares()
        return tuple(shapes)

    def check_shares(self) -> None:
        """A weighted source must hold at least its largest share of one global batch."""
        schedules = [s.schedule for s in self.sources]
        if any(s is None for s in schedules):
            return
        steps = sorted({1, *(p for s in schedules for p in s.changes)})  # type: ignore[union-attr]
        batch = self.world_size * self.per_rank
        for step in steps:
            weights = [s.at(step) for s in schedules]  # type: ignore[union-attr]
            total = sum(weights)
            for source, weight in zip(self.sources, weights, strict=True):
                share = batch * weight / total if total else 0
                if share > source.samples:
                    raise PlanError(
                        f"{source.name}: {source.samples} samples are fewer than its share of one global "
                        f"batch ({float(share):.1f} of {batch} from step {step}); give it more data or a "
                        "smaller weight"
                    )


@dataclass
class Progress:
    """Where the data stands after ``step`` optimizer steps; the same on every rank."""

    step: int
    cursors: list[Cursor]
    carries: list[Fraction] = field(default_factory=list)

    @classmethod
    def start(cls, layout: Layout) -> Progress:
        cursors = [Cursor(layout.counts(i), layout.windows(i)) for i in range(len(layout.sources))]
        progress = cls(0, cursors, [Fraction(0)] * len(cursors))
        progress.fit(layout)
        return progress

    def fit(self, layout: Layout) -> None:
        for cursor, shape in zip(self.cursors, layout.shapes(), strict=True):
            cursor.fit(shape)

    def copy(self) -> Progress:
        return Progress(self.step, [c.copy() for c in self.cursors], list(self.carries))

    def counts(self, layout: Layout, step: int) -> list[int]:
        """Samples of each source in every rank's ``step``; updates the carries."""
        if len(layout.sources) == 1 and layout.sources[0].schedule is None:
            return [layout.per_rank]
        schedules = [source.schedule for source in layout.sources]
        counts, self.carries = apportion(schedules, layout.per_rank, step, self.carries)  # type: ignore[arg-type]
        return counts

    def advance(self, layout: Layout, shapes: Sequence[LevelShape]) -> list[list[Taken]]:
        """Take the next step: per source, the ``(epoch, level, t)`` of each of its samples."""
        self.step += 1
        counts = self.counts(layout, self.step)
        return [
            cursor.take(count, shape)
            for cursor, count, shape in zip(self.cursors, counts, shapes, strict=True)
        ]


class ElasticStream(IterableDataset):
    """Every step from ``start.step + 1`` on, as ``(step, [(slot, sample or None)], counts)``.

    Each dataloader worker yields one such item per step holding the slots of its lanes; the
    in-process reader (no workers) yields all of them.
    """

    def __init__(
        self,
        layout: Layout,
        rank: int,
        num_workers: int,
        decode: Decode,
        settings: StreamConfig,
        retry: RetryPolicy | None = None,
        reads: RemoteReads | None = None,
    ) -> None:
        self.layout = layout
        self.reads = reads
        """Read-ahead and cache of remote shards (``data.read_ahead_mb``, ``data.cache_dir``)."""
        self.rank = rank
        self.num_workers = num_workers
        self.readers = max(1, num_workers)
        self.decode = decode
        self.settings = settings
        self.retry = retry
        self.shapes = layout.shapes()
        self.start = Progress.start(layout)
        self.control: RingControl | None = None
        """Set by the loader before its workers start: how they reach its step ring."""

    def fingerprint(self) -> str:
        """Identifies the sources, their shards and weights; a resumed run refuses others."""
        text = "\n\n".join(
            "\n".join(f"{s.url}\t{s.samples}" for s in source.shards)
            + (f"\nweight\t{source.schedule.describe()!r}" if source.schedule is not None else "")
            for source in self.layout.sources
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __iter__(self) -> Iterator[tuple[int, Packed, dict[str, int]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return _WorkerReader(self, worker).steps()


class _WorkerReader:
    """One worker's lanes: their open shard readers and shuffle windows."""

    def __init__(self, stream: ElasticStream, worker: int) -> None:
        self.stream = stream
        self.worker = worker
        self.layout = stream.layout
        self.warnings = RateLimitedLog(log, stream.settings.warn_every_s)
        self.read_stats = ReadStats()
        self.lanes: dict[tuple[int, int, int, int], _Lane] = {}
        self.orders: dict[tuple[int, int], ShardOrder] = {}
        self.failed: dict[tuple[int, int, str], int] = {}
        """Per (source, epoch, shard): where reading it failed; what lies before is still read."""
        self.mixed = len(self.layout.sources) > 1
        self.opener = ShardOpener(stream.reads, stream.retry, self.read_stats)

    def steps(self) -> Iterator[tuple[int, Packed, dict[str, int]]]:
        try:
            yield from self._steps()
        finally:  # a stopping worker cancels the reads it has queued or in flight
            self.opener.close()

    def _steps(self) -> Iterator[tuple[int, Packed, dict[str, int]]]:
        progress = self.stream.start.copy()
        in_worker = get_worker_info() is not None
        writer = RingWriter(self.stream.control) if in_worker and self.stream.control is not None else None
        rank, seed = self.stream.rank, self.stream.settings.seed
        while True:
            taken = progress.advance(self.layout, self.stream.shapes)
            counts: Counter[str] = Counter()
            samples: list[tuple[int, Any]] = []
            slot = 0
            with torch.random.fork_rng(devices=[]):
                for index, samples_taken in enumerate(taken):
                    for where in samples_taken:
                        if where.t % _lanes_per_rank(where) % self.stream.readers == self.worker:
                            samples.append((slot, self._sample(index, where, counts)))
                        slot += 1
            for index, cursor in enumerate(progress.cursors):
                self._forget_finished(index, cursor)
            count_reads(self.read_stats, counts)
            rows = step_rows(seed, progress.step, rank, self.layout.per_rank)
            placed = [(rows[slot], sample) for slot, sample in samples]
            ring = writer.current() if writer is not None and placed else None
            if ring is not None and not writer.wait_for_slot(ring, progress.step):  # type: ignore[union-attr]
                return  # the loader is stopping
            packed = Packed.of(placed, in_worker, ring, progress.step)
            yield progress.step, packed, dict(counts)

    def _sample(self, index: int, where: Taken, counts: Counter[str]) -> Any:
        source = self.layout.sources[index]
        q = _lanes_per_rank(where)
        lane = self.stream.rank * q + where.t % q
        key = (index, where.epoch, where.level_index, lane)
        reader = self.lanes.get(key)
        if reader is None:  # a lane's level is worked out once, when the lane is first read
            windows = self.layout.windows(index).of_epoch(where.epoch)
            level = level_of(source.samples, where.level_key, windows)
            reader = self.lanes[key] = _Lane(self, index, windows, where.level_index, level, lane)
        raw, position = reader.get(where.t // q)
        seed = derive_seed("sample", self.stream.settings.seed, source.name, where.epoch, position)
        torch.default_generator.manual_seed(seed % (1 << 63))  # CPU only: no lazy device seeding
        found: Counter[str] = Counter(reader.take_counts())
        decoded = decode_samples([raw], self.stream.decode, random.Random(seed), found, self.warnings)
        counts.update(found)
        if self.mixed:
            counts.update({f"{source.name}/{key}": value for key, value in found.items()})
        return decoded[0] if decoded else None

    def _forget_finished(self, index: int, cursor: Cursor) -> None:
        """Close the lanes of levels and epochs this source has moved past."""
        current = (cursor.epoch, len(cursor.levels) - 1)
        for key in [k for k in self.lanes if k[0] == index and k[1:3] < current]:
            del self.lanes[key]
        for key in [k for k in self.orders if k[0] == index and k[1] < cursor.epoch]:
            del self.orders[key]

    def shard_order(self, index: int, epoch: int) -> ShardOrder:
        key = (index, epoch)
        if key not in self.orders:
            source = self.layout.sources[index]
            counts = [shard.samples for shard in source.shards]
            self.orders[key] = ShardOrder.draw(counts, self.stream.settings.seed, source.name, epoch)
        return self.orders[key]


def _lanes_per_rank(where: Taken) -> int:
    """``q`` of the level a sample sits in (the last entry of its level key is that level's shape)."""
    return where.level_key[-1][1]


class _Lane:
    """One lane of one level: read window by window, front to back, each shard byte once."""

    def __init__(
        self, owner: _WorkerReader, index: int, windows: Windows, level_index: int, level: Level, lane: int
    ) -> None:
        self.owner = owner
        self.index = index
        self.windows = windows
        self.epoch = windows.epoch
        self.level_index = level_index
        self.level = level
        self.lane = lane
        self.window = windows.size(level.shape.lanes)
        self.loaded = -1
        self.buffer: dict[int, dict[str, Any] | None] = {}
        self.order: list[int] = []
        self.counts: Counter[str] = Counter()
        self.open: tuple[str, int, Iterator[dict[str, Any]]] | None = None
        """(shard url, index of its next sample, its sample iterator)."""
        self._spans: list[tuple[int, int, int]] | None = None

    def get(self, round_: int) -> tuple[dict[str, Any] | None, int]:
        """The raw sample emitted at ``round_`` of this lane, and its epoch-order position."""
        number, offset = divmod(round_, self.window)
        if number != self.loaded:
            self._load(number)
        position = self.lane * self.level.rounds + number * self.window + self.order[offset]
        epoch_index = self.level.epoch_index(position)
        return self.buffer.pop(epoch_index, None), epoch_index

    def take_counts(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), Counter()
        return counts

    def _load(self, number: int) -> None:
        rounds = self.level.rounds
        first = number * self.window
        size = min(self.window, rounds - first)
        self.order = self.windows.order(self.level_index, self.lane, number, size)
        start = self.lane * rounds + first
        self.buffer = {}
        order = self.owner.shard_order(self.index, self.epoch)
        shards = self.owner.layout.sources[self.index].shards
        for epoch_first, epoch_stop in self.level.epoch_ranges(start, start + size):
            for shard, lo, hi in order.pieces(epoch_first, epoch_stop):
                self._read(shards[shard], lo, hi, epoch_first - lo, order)
                epoch_first += hi - lo
        self.loaded = number

    def _read(self, shard: ShardInfo, lo: int, hi: int, base: int, order: ShardOrder) -> None:
        """Samples ``[lo, hi)`` of ``shard`` into the buffer, keyed by epoch-order position."""
        failed_key = (self.index, self.epoch, shard.url)
        failed_at = self.owner.failed.get(failed_key, shard.samples)
        if failed_at <= lo:  # a shard that failed is not retried this epoch
            self.counts["unreadable_samples"] += hi - lo
            return
        stop = min(hi, failed_at)
        self.counts["unreadable_samples"] += hi - stop
        position = lo
        try:
            samples = self._reader(shard, lo)
            while position < stop:
                raw = next(samples)
                if shard.broken and raw["__key__"] in shard.broken:
                    raw = None  # still a sample of the count, so positions stay those of the manifest
                    self.counts["broken_samples"] += 1
                self.buffer[base + position] = raw
                position += 1
                self.open = (shard.url, position, samples)
            if stop == shard.samples and next(samples, None) is not None:
                self.counts["shard_errors"] += 1
                self.owner.warnings.warn(
                    f"{shard.url} holds more samples than the {shard.samples} its manifest lists; "
                    "the rest were not read"
                )
        except (ShardReadError, StopIteration) as exc:
            self.open = None
            # The shard ended early, or broke past this piece's start: what lies before is still
            # read by other lanes. One that failed at once (missing, unreachable) is given up.
            ended = isinstance(exc, StopIteration) or position > lo
            self.owner.failed[failed_key] = min(failed_at, position if ended else 0)
            self.counts["shard_errors"] += 1
            self.counts["unreadable_samples"] += stop - position
            problem = exc if isinstance(exc, ShardReadError) else "fewer samples than its manifest says"
            self.owner.warnings.warn(f"skipping the rest of {shard.url}: {problem}")

    def _reader(self, shard: ShardInfo, first: int) -> Iterator[dict[str, Any]]:
        if self.open is not None and self.open[:2] == (shard.url, first):
            return self.open[2]
        span, following = self._span_at(shard, first)
        opener = self.owner.opener
        if following is not None:  # the lane's next shard: its first bytes on the way now
            opener.prefetch(following)
        return opener.open_shard(span, self.owner.stream.settings.max_member_bytes)

    def _span_at(self, shard: ShardInfo, first: int) -> tuple[ShardSpan, ShardSpan | None]:
        """What the lane reads of ``shard`` from sample ``first`` on, and the run after it."""
        if self._spans is None:  # the lane's runs of shards, front to back (arithmetic only)
            order = self.owner.shard_order(self.index, self.epoch)
            start = self.lane * self.level.rounds
            self._spans = [
                piece
                for run in self.level.epoch_ranges(start, start + self.level.rounds)
                for piece in order.pieces(*run)
            ]
        shards = self.owner.layout.sources[self.index].shards
        for k, (index, lo, hi) in enumerate(self._spans):
            if shards[index].url == shard.url and lo <= first < hi:
                if k + 1 == len(self._spans):
                    return _span(shard, first, hi), None
                after, after_first, after_stop = self._spans[k + 1]
                return _span(shard, first, hi), _span(shards[after], after_first, after_stop)
        return _span(shard, first, shard.samples), None


def _span(shard: ShardInfo, first: int, stop: int) -> ShardSpan:
    return ShardSpan(shard.url, first, stop, shard.samples, shard.size, shard.checksums)
