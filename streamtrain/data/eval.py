"""One finite pass over a held-out set: every sample read once by exactly one (rank, worker).

Unlike training, evaluation must neither drop nor repeat samples to equalise ranks, so the
split is by contiguous sample ranges of the shards in manifest order: rank r of W takes
``[N*r/W, N*(r+1)/W)`` and divides it the same way among its workers. Ranks may therefore hold
batch counts that differ by one; callers gather variable-sized results (see streamtrain.distributed).

A run evaluates many times, so its loader workers are forked once, when the reader is made at
setup, and told through shared memory which part of the set each pass reads. Forking a training
process again at every evaluation would fork it while its threads run (the step ring, checkpoint
writers, queue feeders): CPython 3.11 before 3.11.8 can leave such a child deadlocked in its
after-fork code when another thread was ending at that moment (gh-112275), and the run hangs.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawValue
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shardify.bytestream import RateLimitedLog, ReadStats, RetryPolicy, ShardReadError
from shardify.tarread import DEFAULT_MAX_MEMBER_BYTES, iter_samples
from streamtrain.data.counts import Collate, Decode, count_reads, decode_samples
from streamtrain.data.dataset import Dataset, ShardInfo
from streamtrain.data.device_decode import finish_batch
from streamtrain.data.loader import leave_stop_signals_to_the_rank, stop_workers

log = logging.getLogger(__name__)
WARN_EVERY_S = 30.0
"""At most one warning per this many seconds per worker for read-time failures (as in training)."""


def _share(total: int, parts: int, index: int) -> tuple[int, int]:
    return total * index // parts, total * (index + 1) // parts


def eval_parts(dataset: Dataset) -> dict[str | None, Dataset]:
    """What one evaluation reads: all of ``dataset`` (key None) and, when it is written as several
    named sources, each source apart (key: its name)."""
    parts: dict[str | None, Dataset] = {None: dataset}
    if dataset.named and len(dataset.sources) > 1:
        parts.update({source.name: Dataset((source,), dataset.schema) for source in dataset.sources})
    return parts


class EvalStream(IterableDataset):
    """This rank's share of a held-out set as ``(batch, read_stats)`` pairs, in manifest order.

    A pass reads the part of ``dataset`` (see ``eval_parts``) that ``choose`` named last (all of
    it by default); the choice lives in shared memory, so workers forked once follow it.
    """

    def __init__(
        self,
        dataset: Dataset,
        rank: int,
        world_size: int,
        batch_size: int,
        decode: Decode,
        collate: Collate,
        max_samples: int | None = None,
        retry: RetryPolicy | None = None,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ) -> None:
        self.parts = eval_parts(dataset)
        self.names = list(self.parts)
        self.max_member_bytes = max_member_bytes
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.decode = decode
        self.collate = collate
        self.totals = [min(max_samples or part.samples, part.samples) for part in self.parts.values()]
        self.retry = retry
        self._chosen = RawValue("i", 0)

    def choose(self, part: str | None) -> None:
        """The part the next pass reads (None: all of the set)."""
        self._chosen.value = self.names.index(part)

    def choose_nothing(self) -> None:
        """The next pass is empty."""
        self._chosen.value = -1

    def __iter__(self) -> Iterator[tuple[Any, dict[str, int]]]:
        chosen = self._chosen.value
        if chosen < 0:
            return
        dataset, total = self.parts[self.names[chosen]], self.totals[chosen]
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        rank_lo, rank_hi = _share(total, self.world_size, self.rank)
        lo, hi = _share(rank_hi - rank_lo, workers, worker)
        shards = list(dataset.shards)
        pieces = slice_shards(shards, rank_lo + lo, rank_lo + hi)
        rng = random.Random(0)  # eval decoders draw nothing, but the decoder contract takes one
        warnings = RateLimitedLog(log, WARN_EVERY_S)
        read_stats = ReadStats()
        pending: list[Any] = []
        stats: Counter[str] = Counter()
        for piece in pieces:
            url, broken = shards[piece.shard].url, shards[piece.shard].broken
            read = 0
            try:
                for raw in iter_samples(
                    url,
                    piece.start,
                    piece.stop,
                    self.retry,
                    max_member_bytes=self.max_member_bytes,
                    stats=read_stats,
                    checksums=shards[piece.shard].member_checksums(),
                ):
                    read += 1
                    if raw["__key__"] in broken:  # listed by `shardify index --check`: never decoded
                        stats["broken_samples"] += 1
                        continue
                    # Batches are filled with decoded samples: every batch but the last is full.
                    pending += decode_samples([raw], self.decode, rng, stats, warnings)
                    if len(pending) == self.batch_size:
                        count_reads(read_stats, stats)
                        yield self.collate(pending), dict(stats)
                        pending, stats = [], Counter()
            except ShardReadError as exc:
                stats["shard_errors"] += 1
                warnings.warn(f"skipping the rest of {url}: {exc}")
            if read < len(piece):
                stats["unreadable_samples"] += len(piece) - read
        count_reads(read_stats, stats)
        if pending:
            yield self.collate(pending), dict(stats)
        elif +stats:  # something was counted since the last batch (zero counts aside)
            yield None, dict(stats)


class EvalReader:
    """Passes over the parts of a held-out set (see ``eval_parts``) through loader workers forked
    once, when the reader is made; batches the workers left undecoded are decoded on
    ``decode_device`` (None: the CPU). ``close`` stops the workers."""

    def __init__(self, stream: EvalStream, num_workers: int, decode_device: Any = None) -> None:
        self.stream = stream
        self.decode_device = decode_device
        workers = max(0, min(num_workers, stream.totals[0] // max(1, stream.world_size)))
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=leave_stop_signals_to_the_rank,
        )
        self._iterator: Any = None
        if workers:
            stream.choose_nothing()  # the workers start now, on an empty pass, and wait for the first
            self._iterator = iter(self.loader)

    def batches(self, part: str | None = None) -> Iterator[tuple[Any, dict[str, int]]]:
        """One pass over ``part`` (None: the whole set) as ``(batch or None, read counts)`` pairs."""
        if self.loader.num_workers and self._iterator is None:
            raise RuntimeError("the held-out reader is closed")
        self.stream.choose(part)
        for batch, counts in iter(self.loader):  # persistent workers: the same ones, reset
            if batch is not None:
                batch, more = finish_batch(batch, self.decode_device or "cpu")
                counts = dict(Counter(counts) + Counter(more)) if more else counts
            yield batch, counts

    def close(self) -> None:
        if self._iterator is not None:
            stop_workers(self._iterator)
            self._iterator = None

    def __enter__(self) -> EvalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` of shard ``shard`` (an index into the shard list)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def slice_shards(shards: Sequence[ShardInfo], start: int, stop: int) -> list[Piece]:
    """Samples ``[start, stop)`` of the shards laid end to end in manifest order, as pieces."""
    ends, total = [], 0
    for shard in shards:
        total += shard.samples
        ends.append(total)
    pieces = []
    index = bisect.bisect_right(ends, start)
    while start < stop and index < len(shards):
        shard_start = ends[index] - shards[index].samples
        piece_stop = min(stop, ends[index])
        if piece_stop > start:
            pieces.append(Piece(index, start - shard_start, piece_stop - shard_start))
        start = piece_stop
        index += 1
    return pieces
