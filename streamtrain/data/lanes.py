"""Who reads what, elastically: every source's epoch as lanes, re-laned when the topology changes.

One source's epoch is its shards in an order drawn from (seed, source, epoch), laid end to end
(the *epoch order*). The ``N - L * R`` samples (fewer than ``L``) this epoch leaves out, its
**remainder**, are set aside first (see *The rotating remainder*); the rest is cut into
``L = world_size * q`` contiguous **lanes** of ``R = N // L`` samples (``q`` lanes per rank).
A rank consumes its ``q`` lanes round-robin: its ``t``-th sample of the epoch is round ``t // q``
of its lane ``t % q``. Every rank consumes the same count of every source at
every step (mixture.py), so one integer ``t`` says how far every lane of every rank has got, and
an epoch ends on all ranks at the same step. Inside a lane, rounds are shuffled in windows of
``max(1, shuffle_buffer // L)`` (a pure function of the seed and the lane), so memory is about
``shuffle_buffer / world_size`` undecoded samples per rank and source.

A lane is a contiguous run of the epoch order: its reader reads each shard byte once, front to
back. With one source, each step takes round ``s`` of every lane: the samples of a step depend on
the global batch ``L`` and not on how many ranks or workers read them (elastic determinism).

**Topology changes.** A run resumed on another world size, per-rank batch or worker count keeps
its ``t`` when the lanes are unchanged (``L`` equal and every lane at the same round: always so
for one source with the same global batch); workers never matter, they only read. Otherwise the
epoch's unread samples — every lane's tail plus the remainder — are laid end to end in lane order
and cut into the new topology's lanes: a new **level** of the epoch. A level is recorded as
``(world_size, q, t)``; the current epoch's list of levels is all the state, so re-planning is
arithmetic on the manifest and that list, whatever the dataset size. Nothing is read twice.

**The rotating remainder.** Which samples an epoch leaves out depends on the epoch, so that none
is left out for ever. Samples are named by their position in the *first* epoch's order (a fixed
numbering of the source); epoch ``e`` leaves out the ``r`` samples just before those its earlier
epochs left out, counting back from the end: first-order positions ``[N - d - r, N - d)`` modulo
``N``, where ``d`` is the samples left out by all earlier epochs (the cursor's ``dropped``). The
first epoch (``d = 0``) leaves out the tail of its order; later ones walk back through the source
and wrap around. Consecutive epochs leave out disjoint samples (``2r < N``, as ``r < L <= N - r``),
so any two consecutive epochs on one topology train every sample at least once. In the epoch's own
order the left-out samples are a few runs (inside at most ``r / shard + 2`` shards); level 0 is
that order without them, then them: they are its remainder.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from streamtrain.errors import UserError


class PlanError(UserError):
    """The data cannot be split as asked (e.g. fewer samples than one batch per rank)."""


def derive_seed(*parts: object) -> int:
    """A stable 64-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class LevelShape:
    """How one level of an epoch is laned: ``world_size`` ranks of ``q`` lanes each."""

    world_size: int
    q: int

    @property
    def lanes(self) -> int:
        return self.world_size * self.q


def lanes_per_rank(samples: int, world_size: int, per_rank: int) -> int:
    """Lanes each rank reads of a source of ``samples``: one per sample of its step, fewer for a
    source too small to give every rank that many (a mixture's small source)."""
    q = min(per_rank, samples // world_size)
    if q < 1:
        raise PlanError(f"{samples} samples cannot give each of {world_size} ranks one")
    return q


@dataclass(frozen=True)
class Level:
    """One level of an epoch: its samples (runs of the epoch order) and how they are laned."""

    runs: tuple[tuple[int, int], ...]
    """(first epoch-order index, length) of its samples, in level order."""
    shape: LevelShape

    @classmethod
    def first(cls, samples: int, left_out: Runs, shape: LevelShape) -> Level:
        """An epoch's first level: its order without the ``left_out`` runs, then them."""
        runs: list[tuple[int, int]] = []
        position = 0
        for first, length in sorted(left_out):
            runs.append((position, first))
            position = first + length
        runs.append((position, samples))
        ranges = runs + [(first, first + length) for first, length in left_out]
        return cls(_merge(ranges), shape)

    @cached_property
    def size(self) -> int:
        return sum(length for _, length in self.runs)

    @cached_property
    def rounds(self) -> int:
        """Samples per lane (``R``)."""
        return self.size // self.shape.lanes

    @cached_property
    def _starts(self) -> list[int]:
        starts, total = [], 0
        for _, length in self.runs:
            starts.append(total)
            total += length
        return starts

    def epoch_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Level positions ``[start, stop)`` as ``[first, stop)`` ranges of the epoch order."""
        ranges = []
        k = bisect.bisect_right(self._starts, start) - 1
        while start < stop and k < len(self.runs):
            first, length = self.runs[k]
            offset = start - self._starts[k]
            take = min(stop - start, length - offset)
            ranges.append((first + offset, first + offset + take))
            start += take
            k += 1
        return ranges

    def epoch_index(self, position: int) -> int:
        k = bisect.bisect_right(self._starts, position) - 1
        return self.runs[k][0] + position - self._starts[k]

    def unread(self, t: int, windows: Windows, level_index: int) -> Level:
        """What is left after every rank took ``t`` samples: lane tails, then the remainder,
        as the runs of the next level (its shape is set by ``relaned``). A lane stopped inside
        a shuffle window leaves that window's samples not yet emitted."""
        q, rounds = self.shape.q, self.rounds
        window = windows.size(self.shape.lanes)
        pieces: list[tuple[int, int]] = []
        full, partial = divmod(t, q)
        for lane in range(self.shape.lanes):
            taken = full + (1 if lane % q < partial else 0)
            start = lane * rounds
            number, emitted = divmod(taken, window)
            if emitted:
                size = min(window, rounds - number * window)
                order = windows.order(level_index, lane, number, size)
                left = sorted(set(range(size)) - set(order[:emitted]))
                base = start + number * window
                for offset in left:
                    pieces += self.epoch_ranges(base + offset, base + offset + 1)
                taken = (number + 1) * window
            pieces += self.epoch_ranges(start + min(taken, rounds), start + rounds)
        pieces += self.epoch_ranges(self.shape.lanes * rounds, self.size)
        return Level(_merge(pieces), self.shape)

    def relaned(self, shape: LevelShape) -> Level:
        return Level(self.runs, shape)


Runs = tuple[tuple[int, int], ...]
"""(first epoch-order index, length) runs."""


def _merge(ranges: list[tuple[int, int]]) -> Runs:
    """``[first, stop)`` ranges as (first, length) runs, adjacent ones joined."""
    runs: list[list[int]] = []
    for first, stop in ranges:
        if stop <= first:
            continue
        if runs and runs[-1][0] + runs[-1][1] == first:
            runs[-1][1] += stop - first
        else:
            runs.append([first, stop - first])
    return tuple((a, b) for a, b in runs)


@dataclass(frozen=True)
class Windows:
    """The shuffle windows of one source's lanes in one epoch."""

    seed: int
    source: str
    shuffle_buffer: int
    epoch: int = 0

    def size(self, lanes: int) -> int:
        return window_size(self.shuffle_buffer, lanes)

    def order(self, level_index: int, lane: int, number: int, size: int) -> list[int]:
        return window_order(self.seed, (self.source, self.epoch, level_index, lane, number), size)

    def of_epoch(self, epoch: int) -> Windows:
        return Windows(self.seed, self.source, self.shuffle_buffer, epoch)


@dataclass
class Cursor:
    """How far every rank has read one source: its epoch, that epoch's levels, and ``t``.

    ``levels`` holds ``(world_size, q, t)`` per level of the current epoch; the last one is the
    level being read and its ``t`` the samples each rank has taken from it.
    """

    shards: tuple[int, ...]
    """The source's samples per shard, in manifest order."""
    windows: Windows
    epoch: int = 0
    levels: list[list[int]] = field(default_factory=list)
    dropped: int = 0
    """Samples left out to keep ranks equal, over all epochs (fewer than ``L`` per epoch)."""
    consumed: int = 0
    """Samples every rank took from this source, over all epochs."""
    left_out: Runs = ()
    """This epoch's remainder in its own order (the rotating remainder; () for a state saved
    before it rotated, whose epoch leaves out the tail of its order)."""

    @cached_property
    def samples(self) -> int:
        return sum(self.shards)

    def to_dict(self) -> dict[str, object]:
        return {
            "epoch": self.epoch,
            "levels": [list(level) for level in self.levels],
            "dropped": self.dropped,
            "consumed": self.consumed,
        }

    @classmethod
    def from_dict(
        cls, shards: tuple[int, ...], windows: Windows, state: dict, rotating: bool = True
    ) -> Cursor:
        """The cursor ``to_dict`` saved; ``rotating=False`` for a state saved before the remainder
        rotated (its current epoch goes on leaving out the tail of its order)."""
        cursor = cls(
            shards,
            windows,
            int(state["epoch"]),
            [[int(v) for v in level] for level in state["levels"]],
            int(state.get("dropped", 0)),
            int(state.get("consumed", 0)),
        )
        if rotating:
            cursor.left_out = cursor._remainder(LevelShape(*cursor.levels[0][:2]))
        return cursor

    def copy(self) -> Cursor:
        levels = [list(v) for v in self.levels]
        return Cursor(
            self.shards, self.windows, self.epoch, levels, self.dropped, self.consumed, self.left_out
        )

    def level(self) -> Level:
        """The level being read (built from the levels before it)."""
        return level_of(self.samples, self.key(len(self.levels) - 1), self.epoch_windows)

    def key(self, index: int) -> LevelKey:
        """What level ``index`` of the current epoch depends on (see ``level_key``)."""
        return level_key(self.left_out, self.levels, index)

    @property
    def epoch_windows(self) -> Windows:
        return self.windows.of_epoch(self.epoch)

    def fit(self, shape: LevelShape) -> None:
        """Continue on ``shape`` (a fresh start, or a resume on another topology)."""
        if not self.levels:
            self._start_epoch(shape)
            self._skip_empty(shape)
            return
        world, q, t = self.levels[-1]
        if (world, q) == (shape.world_size, shape.q):
            return
        if world * q == shape.lanes and t % q == 0:
            # The same lanes, every one at round t // q: only who reads them changes.
            self.levels[-1] = [shape.world_size, shape.q, t // q * shape.q]
            return
        self.levels.append([shape.world_size, shape.q, 0])
        self._skip_empty(shape)

    def _skip_empty(self, shape: LevelShape) -> None:
        level = self.level()
        if level.rounds == 0:  # fewer unread samples than lanes: the epoch's remainder
            self._next_epoch(level.size, shape)

    def take(self, count: int, shape: LevelShape) -> list[Taken]:
        """Advance every rank by ``count`` samples, and say where each one is."""
        taken = []
        while count:
            _world, q, t = self.levels[-1]
            level = self.level()
            room = level.rounds * q - t
            n = min(count, room)
            key = self.key(len(self.levels) - 1)
            taken += [Taken(self.epoch, len(self.levels) - 1, key, t + k) for k in range(n)]
            self.levels[-1][2] = t + n
            self.consumed += n
            count -= n
            if n == room:
                self._next_epoch(level.size - level.rounds * level.shape.lanes, shape)
        return taken

    def _next_epoch(self, left_out: int, shape: LevelShape) -> None:
        self.dropped += left_out
        self.epoch += 1
        self._start_epoch(shape)
        if self.level().rounds == 0:
            raise PlanError(f"{self.samples} samples cannot fill the {shape.lanes} lanes of one global batch")

    def _start_epoch(self, shape: LevelShape) -> None:
        self.levels = [[shape.world_size, shape.q, 0]]
        self.left_out = self._remainder(shape)

    def _remainder(self, shape: LevelShape) -> Runs:
        """The samples this epoch leaves out on ``shape``, as runs of its order: first-epoch
        positions ``[N - d - r, N - d)`` modulo ``N`` (see *The rotating remainder*)."""
        samples = self.samples
        size = samples % shape.lanes if shape.lanes <= samples else 0
        if size == 0:
            return ()
        start = (samples - self.dropped % samples - size) % samples
        numbering = ((start, min(start + size, samples)), (0, max(0, start + size - samples)))
        first = shard_order(self.shards, self.windows.seed, self.windows.source, 0)
        current = shard_order(self.shards, self.windows.seed, self.windows.source, self.epoch)
        ranges = []
        for lo, hi in numbering:
            for shard, first_index, stop_index in first.pieces(lo, hi) if hi > lo else []:
                begins = current.start_of(shard)
                ranges.append((begins + first_index, begins + stop_index))
        return _merge(ranges)

    @property
    def epoch_fraction(self) -> float:
        """Epochs of this source consumed so far, fractional."""
        level = self.level()
        world, _q, t = self.levels[-1]
        read = self.samples - level.size + t * world
        return self.epoch + read / self.samples


@dataclass(frozen=True)
class Taken:
    """Where one sample a rank takes sits: its source epoch, level, and the rank's ``t`` there."""

    epoch: int
    level_index: int
    level_key: LevelKey
    t: int


LevelKey = tuple[tuple[tuple[int, int], ...] | tuple[int, ...], ...]
"""The epoch's remainder runs, then ``(world_size, q, t)`` of every level before, then the
level's ``(world_size, q)``: its last entry's second value is the level's ``q``."""
_CACHE: dict[tuple[int, LevelKey, Windows], Level] = {}


def level_key(left_out: Runs, levels: list[list[int]], index: int) -> LevelKey:
    """What level ``index`` depends on: the epoch's remainder, the levels before it with their
    ``t``, and its shape."""
    return (left_out, *(tuple(v) for v in levels[:index]), tuple(levels[index][:2]))


def level_of(samples: int, key: LevelKey, windows: Windows) -> Level:
    """The level that ``key`` (see ``level_key``) describes, in the epoch of ``windows``."""
    cache_key = (samples, key, windows)
    found = _CACHE.get(cache_key)
    if found is not None:
        return found
    left_out, levels = key[0], key[1:]
    world, q = levels[0][0], levels[0][1]
    level = Level.first(samples, left_out, LevelShape(world, q))  # type: ignore[arg-type]
    for index, ((_, _, t), following) in enumerate(itertools.pairwise(levels)):
        level = level.unread(t, windows, index).relaned(LevelShape(following[0], following[1]))
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[cache_key] = level
    return level


def window_size(shuffle_buffer: int, lanes: int) -> int:
    return max(1, shuffle_buffer // lanes)


def window_order(seed: int, key: tuple, size: int) -> list[int]:
    """The order the ``size`` rounds of one window of one lane are emitted in."""
    order = list(range(size))
    if size > 1:
        random.Random(derive_seed("lane-window", seed, *key)).shuffle(order)
    return order


@functools.lru_cache(maxsize=16)
def shard_order(shards: tuple[int, ...], seed: int, source: str, epoch: int) -> ShardOrder:
    """``ShardOrder.draw``, remembered: cursors ask for the same epochs again and again."""
    return ShardOrder.draw(shards, seed, source, epoch)


@dataclass(frozen=True)
class ShardOrder:
    """One source's shards in one epoch's order, and where each ends in the epoch order."""

    order: np.ndarray
    ends: np.ndarray
    counts: np.ndarray

    @classmethod
    def draw(cls, counts: Sequence[int], seed: int, source: str, epoch: int) -> ShardOrder:
        counts_array = np.asarray(counts, dtype=np.int64)
        rng = np.random.RandomState(derive_seed("elastic-shard-order", seed, source, epoch) % (1 << 32))
        order = rng.permutation(len(counts_array))
        return cls(order, np.cumsum(counts_array[order]), counts_array)

    def pieces(self, first: int, stop: int) -> list[tuple[int, int, int]]:
        """Epoch-order ``[first, stop)`` as ``(shard, first index, stop index)`` pieces."""
        pieces = []
        k = int(np.searchsorted(self.ends, first, side="right"))
        while first < stop:
            shard = int(self.order[k])
            shard_start = int(self.ends[k]) - int(self.counts[shard])
            piece_stop = min(stop, int(self.ends[k]))
            pieces.append((shard, first - shard_start, piece_stop - shard_start))
            first = piece_stop
            k += 1
        return pieces

    def start_of(self, shard: int) -> int:
        """Where shard ``shard`` (manifest index) begins in the epoch order."""
        return int(self.ends[self.places[shard]]) - int(self.counts[shard])

    @cached_property
    def places(self) -> np.ndarray:
        """Per shard (manifest index): its place in the epoch's shard order."""
        places = np.empty_like(self.order)
        places[self.order] = np.arange(len(self.order))
        return places

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, index inside it) of epoch-order position ``index``."""
        ((shard, first, _),) = self.pieces(index, index + 1)
        return shard, first


def position_of(windows: Windows, rank: int, taken: Taken, samples: int) -> int:
    """The epoch-order position of the sample ``taken`` on ``rank`` (what its lane reader reads)."""
    windows = windows.of_epoch(taken.epoch)
    level = level_of(samples, taken.level_key, windows)
    q = level.shape.q
    lane, round_ = rank * q + taken.t % q, taken.t // q
    window = windows.size(level.shape.lanes)
    number, offset = divmod(round_, window)
    size = min(window, level.rounds - number * window)
    order = windows.order(taken.level_index, lane, number, size)
    return level.epoch_index(lane * level.rounds + number * window + order[offset])
