"""Who reads what: the epoch plan as pure arithmetic on the manifest's per-shard counts.

For epoch ``e`` the shards are put in an order drawn from ``(seed, e)`` and concatenated into
one sequence of samples. Rank ``r`` of ``W`` takes a contiguous run of ``batches_per_rank * B``
samples of it (the same count on every rank, so distributed training never waits on a rank
that ran dry); the few samples left over — fewer than one batch per rank — are this epoch's
remainder and are not read (the next epoch's order differs, so no sample is always left out).
Inside the rank, worker ``w`` of ``K`` takes a contiguous sub-run of whole batches. Shards are
split by sample index wherever a run boundary falls, so ranks × workers may exceed the number of
shards. No I/O is needed to know who reads what: ``epoch_plan`` is a pure function of
(shard counts, seed, epoch, world size, workers, batch size), and the stream only consumes it.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from streamtrain.data.dataset import Dataset, ShardInfo
from streamtrain.errors import UserError


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` of shard ``shard`` (an index into the shard list)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Topology:
    """How many readers share the data, and the batch size each consumes."""

    world_size: int = 1
    rank: int = 0
    num_workers: int = 0
    batch_size: int = 1

    @property
    def readers(self) -> int:
        """Dataloader workers per rank; a loader without workers reads in-process as one."""
        return max(1, self.num_workers)


class PlanError(UserError):
    """The data cannot be split as asked (e.g. fewer samples than one batch per rank)."""


def derive_seed(*parts: object) -> int:
    """A stable 64-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(derive_seed("shard-order", seed, epoch)).shuffle(order)
    return order


def batches_per_rank(shards: Sequence[ShardInfo], topology: Topology) -> int:
    total = sum(shard.samples for shard in shards)
    batches = total // (topology.world_size * topology.batch_size)
    if batches == 0:
        raise PlanError(
            f"{total} samples cannot give each of {topology.world_size} ranks one batch of "
            f"{topology.batch_size}; use a smaller batch size or more data"
        )
    return batches


def worker_batches(total_batches: int, readers: int, worker: int, epoch: int) -> tuple[int, int]:
    """(first batch, batch count) of ``worker`` among the rank's ``total_batches`` this epoch.

    Batches are dealt as evenly as possible; the workers that get one extra rotate with the
    epoch, so every worker yields batches in every few epochs even when batches < workers.
    """
    base, extra = divmod(total_batches, readers)
    rotated = (worker - epoch * extra) % readers
    count = base + (1 if rotated < extra else 0)
    first = sum(base + (1 if (w - epoch * extra) % readers < extra else 0) for w in range(worker))
    return first, count


def worker_pieces(
    shards: Sequence[ShardInfo], topology: Topology, seed: int, epoch: int, worker: int
) -> list[Piece]:
    """The shard pieces worker ``worker`` of this rank reads in ``epoch``, in reading order."""
    return list(epoch_plan(shards, topology, seed, epoch).worker(worker).pieces)


@dataclass(frozen=True)
class WorkerPlan:
    """One dataloader worker's share of its rank's epoch."""

    first_batch: int
    """Index of its first batch among the rank's batches of the epoch."""
    batches: int
    pieces: tuple[Piece, ...]
    """What it reads, in reading order: ``batches * batch_size`` samples."""


@dataclass(frozen=True)
class EpochPlan:
    """Who reads what on one rank in one epoch; build it with ``epoch_plan``.

    The batch counts are known at once; the shard order and the pieces are worked out when first
    asked for, so skipping epochs on resume costs nothing per shard.
    """

    shards: tuple[ShardInfo, ...]
    topology: Topology
    seed: int
    epoch: int
    batches_per_rank: int

    def worker(self, worker: int) -> WorkerPlan:
        """The share of worker (reader role) ``worker``."""
        first, count = worker_batches(self.batches_per_rank, self.topology.readers, worker, self.epoch)
        batch_size = self.topology.batch_size
        start = (self.topology.rank * self.batches_per_rank + first) * batch_size
        pieces = _slice(self.shards, self._order, self._ends, start, start + count * batch_size)
        return WorkerPlan(first, count, tuple(pieces))

    def batches(self, worker: int) -> int:
        """How many batches worker ``worker`` yields this epoch."""
        return worker_batches(self.batches_per_rank, self.topology.readers, worker, self.epoch)[1]

    @property
    def workers(self) -> tuple[WorkerPlan, ...]:
        return tuple(self.worker(w) for w in range(self.topology.readers))

    @cached_property
    def _order(self) -> list[int]:
        return shard_order(len(self.shards), self.seed, self.epoch)

    @cached_property
    def _ends(self) -> list[int]:
        return _cumulative_ends(self.shards, self._order)


def epoch_plan(data: Dataset | Sequence[ShardInfo], topology: Topology, seed: int, epoch: int) -> EpochPlan:
    """The plan of ``epoch`` on ``topology.rank``: a pure function of its arguments, with no I/O.

    Raises PlanError when the data cannot give every rank one batch.
    """
    shards = data.shards if isinstance(data, Dataset) else tuple(data)
    return EpochPlan(shards, topology, seed, epoch, batches_per_rank(shards, topology))


def slice_sequence(shards: Sequence[ShardInfo], order: list[int], start: int, stop: int) -> list[Piece]:
    """Samples ``[start, stop)`` of the shards concatenated in ``order``, as pieces."""
    return _slice(shards, order, _cumulative_ends(shards, order), start, stop)


def _cumulative_ends(shards: Sequence[ShardInfo], order: list[int]) -> list[int]:
    """Where each shard of ``order`` ends in the concatenated sequence."""
    ends: list[int] = []
    total = 0
    for index in order:
        total += shards[index].samples
        ends.append(total)
    return ends


def _slice(
    shards: Sequence[ShardInfo], order: list[int], ends: list[int], start: int, stop: int
) -> list[Piece]:
    pieces = []
    position = bisect.bisect_right(ends, start)
    while start < stop and position < len(order):
        shard_start = ends[position] - shards[order[position]].samples
        piece_stop = min(stop, ends[position])
        if piece_stop > start:
            pieces.append(Piece(order[position], start - shard_start, piece_stop - shard_start))
        start = piece_stop
        position += 1
    return pieces
