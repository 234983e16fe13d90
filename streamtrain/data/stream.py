"""The rank's stream of batches: plan + windowed shuffle + decode, resumable from one integer.

Every dataloader worker produces an infinite sequence of batches (epochs roll over inside it),
and the rank's batch ``b`` is the ``b // K``-th batch of reader role ``b % K``: PyTorch's
DataLoader hands batches over from its workers in exactly this round-robin order (infinite
workers never break it), starting with worker 0, so a loader resumed at batch ``s`` gives its
worker ``w`` the role ``(w + s) % K``. So the whole position of a rank is the number of
batches it has consumed; from it each worker derives its epoch, the batch inside the epoch,
and the shuffle window to refill — without reading any sample that was already consumed.

Shuffling: shard order is drawn per epoch (plan.py); inside a worker's run, samples are read
in windows of ``shuffle_buffer`` consecutive samples and emitted in an order drawn from
(seed, epoch, rank, worker, window). Memory holds one window of undecoded samples per worker.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from shardify.bytestream import RateLimitedLog, ReadStats, RetryPolicy, ShardReadError
from shardify.tarread import DEFAULT_MAX_MEMBER_BYTES, iter_samples
from streamtrain.data.counts import Collate, Decode, count_reads, decode_samples
from streamtrain.data.dataset import Dataset
from streamtrain.data.plan import Piece, Topology, WorkerPlan, derive_seed, epoch_plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """Order and robustness settings of a stream."""

    seed: int = 0
    """Shard order, sample order and augmentations are pure functions of it (and the topology)."""
    shuffle_buffer: int = 256
    """Samples per shuffle window (undecoded bytes held per worker); 1 reads in plan order."""
    warn_every_s: float = 30.0
    """At most one warning per this many seconds per worker for read-time failures."""
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    """A sample with a larger tar member is skipped unread (counted as ``oversized_samples``)."""


class ShardStream(IterableDataset):
    """Infinite, deterministic batches for one rank; yields ``(batch, read_stats)`` pairs.

    ``batch`` is None where none of its samples could be read or decoded.
    """

    def __init__(
        self,
        dataset: Dataset,
        topology: Topology,
        decode: Decode,
        collate: Collate,
        config: StreamConfig | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.dataset = dataset
        self.topology = topology
        self.decode = decode
        self.collate = collate
        self.config = config or StreamConfig()
        self.retry = retry
        # Every epoch has as many batches per rank (the plan equalises ranks; PlanError if none).
        self.batches_per_epoch = epoch_plan(dataset, topology, self.config.seed, 0).batches_per_rank
        self.start_batch = 0
        """Rank batches already consumed; set by the loader before iteration starts."""

    def __iter__(self) -> Iterator[tuple[Any, dict[str, int]]]:
        info = get_worker_info()
        readers = self.topology.readers
        # A new DataLoader asks its worker 0 first, but the next rank batch may belong to
        # another role: worker w plays role (w + start_batch) % readers.
        role = ((info.id if info is not None else 0) + self.start_batch) % readers
        # Rank batches j < start_batch with j % readers == role were this role's.
        done = max(0, -(-(self.start_batch - role) // readers))
        return self._worker_batches(role, done)

    def _worker_batches(self, worker: int, done: int) -> Iterator[tuple[Any, dict[str, int]]]:
        """Reader role ``worker``'s batches from its ``done``-th on, epoch after epoch."""
        epoch = 0
        warnings = RateLimitedLog(log, self.config.warn_every_s)
        while True:
            plan = epoch_plan(self.dataset, self.topology, self.config.seed, epoch)
            count = plan.batches(worker)
            if done >= count:
                done -= count
                epoch += 1
                continue
            yield from self._epoch_batches(plan.worker(worker), epoch, worker, done, warnings)
            done = 0
            epoch += 1

    def _epoch_batches(
        self, share: WorkerPlan, epoch: int, worker: int, done: int, warnings: RateLimitedLog
    ) -> Iterator[tuple[Any, dict[str, int]]]:
        """The batches of one epoch's share, from its ``done``-th on."""
        batch_size = self.topology.batch_size
        run = _Run(self.dataset, share.pieces, self.retry, warnings, self.config.max_member_bytes)
        window_size = max(1, self.config.shuffle_buffer)
        position = done * batch_size
        pending: list[Any] = []
        stats: Counter[str] = Counter()
        end = share.batches * batch_size
        window_start = position - position % window_size
        while window_start < end:
            window_stop = min(window_start + window_size, end)
            raw = run.read(window_start, window_stop, stats)
            order = list(range(window_start, window_stop))
            if window_size > 1:
                random.Random(
                    derive_seed("window", self.config.seed, epoch, self.topology.rank, worker, window_start)
                ).shuffle(order)
            for emitted, sample_position in enumerate(order, start=window_start):
                if emitted < position:
                    continue
                pending.append(raw.get(sample_position))
                if len(pending) == batch_size:
                    batch_index = emitted // batch_size
                    yield self._collate(pending, epoch, worker, batch_index, stats, warnings), dict(stats)
                    pending, stats = [], Counter()
            window_start = window_stop

    def _collate(
        self,
        raw_samples: list[dict[str, Any] | None],
        epoch: int,
        worker: int,
        batch_index: int,
        stats: Counter[str],
        warnings: RateLimitedLog,
    ) -> Any:
        """Decode a batch under RNGs seeded by its identity, so augmentations survive a resume."""
        seed = derive_seed("batch", self.config.seed, epoch, self.topology.rank, worker, batch_index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % (1 << 63))
            decoded = decode_samples(raw_samples, self.decode, random.Random(seed), stats, warnings)
        if not decoded:
            # Every sample unreadable (e.g. a missing shard): the batch keeps its place in the
            # order as None, which the trainer steps over without breaking distributed lockstep.
            stats["empty_batches"] += 1
            return None
        return self.collate(decoded)


class _Run:
    """A worker's epoch run (its pieces laid end to end), read by consecutive position ranges.

    The reader of a piece stays open from one window to the next, so a shard is read once,
    front to back; only the first window after a resume seeks (by tar headers) into a piece.
    """

    def __init__(
        self,
        dataset: Dataset,
        pieces: tuple[Piece, ...],
        retry: RetryPolicy | None,
        warnings: RateLimitedLog,
        max_member_bytes: int,
    ) -> None:
        self.dataset = dataset
        self.pieces = pieces
        self.retry = retry
        self.warnings = warnings
        self.max_member_bytes = max_member_bytes
        self.failed: set[str] = set()
        self.read_stats = ReadStats()
        """Storage retries and reopens since the last window, moved into its counts."""
        self._open: tuple[int, int, Iterator[dict[str, Any]]] | None = None
        """(piece index, run position of its next sample, its sample iterator)."""

    def read(self, start: int, stop: int, stats: Counter[str]) -> dict[int, dict[str, Any]]:
        """Samples at run positions ``[start, stop)``; unreadable ones are absent and counted."""
        found: dict[int, dict[str, Any]] = {}
        offset = 0
        for index, piece in enumerate(self.pieces):
            lo, hi = max(start, offset), min(stop, offset + len(piece))
            if lo < hi:
                shard = self.dataset.shards[piece.shard]
                position = lo
                try:
                    if shard.url not in self.failed:  # a shard that failed is not retried this epoch
                        samples = self._reader(index, piece, offset, lo)
                        while position < hi:
                            found[position] = next(samples)
                            position += 1
                            self._open = (index, position, samples)
                        if hi == offset + len(piece) and piece.stop == shard.samples:
                            self._check_ended(samples, shard.url, shard.samples, stats)
                except (ShardReadError, StopIteration) as exc:
                    self._open = None
                    self.failed.add(shard.url)
                    stats["shard_errors"] += 1
                    problem = (
                        exc if isinstance(exc, ShardReadError) else "fewer samples than its manifest says"
                    )
                    self.warnings.warn(f"skipping the rest of {shard.url}: {problem}")
                stats["unreadable_samples"] += hi - position
            offset += len(piece)
        count_reads(self.read_stats, stats)
        return found

    def _check_ended(
        self, samples: Iterator[dict[str, Any]], url: str, listed: int, stats: Counter[str]
    ) -> None:
        """A shard with more samples than its manifest lists is reported, not silently cut.

        Costs nothing when the count is right: the end-of-archive block is already read.
        """
        if next(samples, None) is not None:
            stats["shard_errors"] += 1
            self.warnings.warn(
                f"{url} holds more samples than the {listed} its manifest lists; the rest were not read"
            )

    def _reader(self, index: int, piece: Piece, offset: int, position: int) -> Iterator[dict[str, Any]]:
        if self._open is not None and self._open[:2] == (index, position):
            return self._open[2]
        first = piece.start + position - offset
        shard = self.dataset.shards[piece.shard]
        # A piece that ends the shard reads on to its end, so a miscounted manifest shows.
        stop = None if piece.stop == shard.samples else piece.stop
        # To the piece's end: kept open.
        return iter_samples(
            shard.url,
            first,
            stop,
            self.retry,
            max_member_bytes=self.max_member_bytes,
            stats=self.read_stats,
            checksums=shard.member_checksums(),
        )
