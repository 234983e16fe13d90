"""The loader a training loop iterates: steps of the elastic stream, resumable on any topology."""

from __future__ import annotations

import atexit
import logging
import signal
import weakref
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from streamtrain.data.ahead import Ahead
from streamtrain.data.counts import Collate
from streamtrain.data.device_decode import finish_batch
from streamtrain.data.elastic import ElasticStream, Layout, Progress
from streamtrain.data.handover import Packed
from streamtrain.data.lanes import Cursor
from streamtrain.data.mixture import decode_carries, encode_carries
from streamtrain.data.ring import RingControl, RingLayout, StepRing, slots_for
from streamtrain.data.sample_log import SampleLog
from streamtrain.errors import UserError

log = logging.getLogger(__name__)

# Loaders with running workers. Infinite dataloader workers never finish on their own, and an
# interpreter that exits with them alive can hang in DataLoader's finaliser (seen under
# torchrun), so they are stopped explicitly at exit.
_RUNNING: weakref.WeakSet[ElasticLoader] = weakref.WeakSet()


@atexit.register
def _stop_running_loaders() -> None:
    for loader in list(_RUNNING):
        loader.close()


def stop_workers(iterator: object) -> None:
    """Stop the worker processes of a DataLoader iterator now.

    Infinite workers never finish on their own, and a finite pass abandoned half-way would keep
    its workers until garbage collection; DataLoader has no public call for this.
    """
    workers = list(getattr(iterator, "_workers", []))
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:  # one that did not take the stop request (it ignores SIGTERM too)
        if worker.is_alive():
            worker.kill()


def leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: workers ignore SIGINT and SIGTERM.

    A terminal's Ctrl-C reaches the whole process group and some schedulers signal every
    process of a job; the rank decides when to stop (after a checkpoint) and its workers
    end with it (they watch their parent), so a signal must not take a worker from under it.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _endless(stream: Any, workers: int, settings: ElasticLoader) -> Iterator[Any]:
    """An iterator over an endless stream through a DataLoader of ``workers`` processes, with
    the prefetch and pinning ``settings`` (a loader) asks for."""
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=settings.prefetch_factor if workers else None,
        pin_memory=settings.pin_memory,
        persistent_workers=False,
        worker_init_fn=leave_stop_signals_to_the_rank,
    )
    return iter(loader)


class LoaderStateError(UserError):
    """A saved loader state that cannot be resumed exactly with this configuration."""


ELASTIC_STATE_VERSION = 3
UNROTATED_STATE_VERSION = 2
"""Elastic states saved before the remainder rotated: their current epoch leaves out the tail of
its order, as it did when saved; the epochs after it rotate."""
FIXED_TOPOLOGY_STATE_VERSION = 1
LAST_READING_FIXED_TOPOLOGY = "6c741cc"
"""The last streamtrain commit that resumes a state of the fixed-topology loader (version 1)."""


class ElasticLoader:
    """Micro-batches for this rank, forever, resumable on any topology (see elastic.py, lanes.py).

    ``state_dict()`` after optimizer step s is the data's position after s — the same on every
    rank, a few integers per source — plus this rank's read counts. A run resumed from it on any
    world size, worker count or split of the per-rank batch into micro-batches continues every
    source's epoch where it stopped; with the same global batch and one source, every step holds
    exactly the samples an uninterrupted run would have. A state of the fixed-topology loader
    that earlier versions used (version 1) is refused, naming the release that resumes it.
    """

    elastic = True
    """Its saved state resumes on any number of ranks (see CheckpointManager.load)."""

    def __init__(
        self,
        stream: ElasticStream,
        collate: Collate,
        batch_size: int,
        batches_per_step: int = 1,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        sample_log: SampleLog | None = None,
        decode_device: torch.device | None = None,
    ) -> None:
        self.stream = stream
        self.decode_device = decode_device
        """Where images the workers left undecoded are decoded (default: the CPU)."""
        self.collate = collate
        self.batch_size = batch_size
        self.batches_per_step = batches_per_step
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.sample_log = sample_log
        self.progress = stream.start.copy()
        """After the last step whose micro-batches were all handed out."""
        self._read_stats: Counter[str] = Counter()
        self._pending: deque[Any] = deque()
        self._step_ids: list[str] = []
        self._next_progress: Progress | None = None
        self._iterator: Iterator[tuple[int, Packed, dict[str, int]]] | None = None
        self._ahead: Ahead[_Step] | None = None
        self._control: RingControl | None = None
        self._ring: StepRing | None = None
        self._ring_sized = False

    @property
    def read_stats(self) -> Counter[str]:
        """Read counts of this rank so far (the run's, over its lives)."""
        return self._read_stats

    @property
    def layout(self) -> Layout:
        return self.stream.layout

    @property
    def epoch(self) -> float:
        """Epochs consumed so far, fractional (all sources together)."""
        total = sum(source.samples for source in self.layout.sources)
        read = sum(c.epoch_fraction * c.samples for c in self.progress.cursors)
        return read / total

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches in one epoch of the first source on this topology (all of one source)."""
        cursor = Progress.start(self.layout).cursors[0]
        return cursor.level().rounds * cursor.levels[-1][1] // self.layout.per_rank * self.batches_per_step

    def source_metrics(self) -> dict[str, float]:
        """Each source's epoch, for the log line of a mixture (not summed over ranks)."""
        if len(self.layout.sources) == 1:
            return {}
        return {
            f"data/{source.name}/epoch": cursor.epoch_fraction
            for source, cursor in zip(self.layout.sources, self.progress.cursors, strict=True)
        }

    def __iter__(self) -> ElasticLoader:
        return self

    def __next__(self) -> Any:
        if not self._pending:
            self._next_step()
        batch = self._pending.popleft()
        if not self._pending:  # the step's last micro-batch: the step is the loader's position
            assert self._next_progress is not None
            self.progress, self._next_progress = self._next_progress, None
            if self.sample_log is not None:
                self.sample_log.record(self.progress.step, self._step_ids)
        return batch

    def _start(self) -> None:
        self.stream.start = self.progress.copy()
        self._control = self.stream.control = RingControl() if self.stream.num_workers else None
        self._ring_sized = False
        self._iterator = _endless(self.stream, self.stream.num_workers, self)
        _RUNNING.add(self)
        if self.decode_device is not None:  # decoding in this process: one step ahead, in a thread
            planned = [self.progress]

            def produce() -> _Step:
                made = self._read_step(planned[0])
                planned[0] = made.progress
                return made

            self._ahead = Ahead(produce, self.decode_device)

    def _next_step(self) -> None:
        if self._iterator is None:
            self._start()
        if self._control is not None:  # the step before the last one handed out is done with
            self._control.release(self.progress.step - 1)
        step = self._ahead.take() if self._ahead is not None else self._read_step(self.progress)
        self._read_stats.update(step.counts)
        self._pending.extend(step.batches)
        self._step_ids = step.sample_ids
        self._next_progress = step.progress

    def _read_step(self, after: Progress) -> _Step:
        """The step after ``after``: its micro-batches, read from the workers and collated (and
        their images decoded on the device, if the workers left them undecoded)."""
        assert self._iterator is not None
        progress = after.copy()
        progress.advance(self.layout, self.stream.shapes)
        counts: Counter[str] = Counter()
        parts = []
        for _ in range(self.stream.readers):
            step, packed, read = next(self._iterator)
            if step != progress.step:
                raise RuntimeError(f"data worker sent step {step} where step {progress.step} was due")
            parts.append(packed)
            counts.update(read)
        rows: list[Any] = [None] * self.layout.per_rank
        for packed in parts:
            for row, sample in packed.items(self._ring, progress.step):
                rows[row] = sample
        if not self._ring_sized and self._control is not None:
            self._size_ring([sample for sample in rows if sample is not None])
        dropped = sum(c.dropped for c in progress.cursors) - sum(c.dropped for c in after.cursors)
        if dropped and self.stream.rank == 0:  # the same on every rank: counted once
            counts["dropped_samples"] += dropped
        made = _Step(progress, counts)
        for micro in range(self.batches_per_step):
            chunk = rows[micro * self.batch_size : (micro + 1) * self.batch_size]
            samples = [sample for sample in chunk if sample is not None]
            batch = None
            if samples:
                batch = _finished(self.collate(samples), self.decode_device, counts)
            if batch is None:
                counts["empty_batches"] += 1
            elif self.sample_log is not None:
                made.sample_ids.extend(_sample_ids(batch))
            made.batches.append(batch)
        return made

    def _size_ring(self, samples: list[Any]) -> None:
        """Make the step ring, sized for the samples of the first step read (ring.py)."""
        assert self._control is not None
        self._ring_sized = True
        slots = slots_for(self.prefetch_factor, ahead=self.decode_device is not None)
        layout = RingLayout.of(samples, self.layout.per_rank, slots)
        if layout is None:
            return
        try:
            self._ring = StepRing.create(layout, self._control, self.pin_memory)
        except OSError as exc:
            log.warning(
                "no room for the loader's step ring (%.0f MB of shared memory: %s); handing steps "
                "over without it, with a copy each",
                layout.slot_bytes * layout.slots / 2**20,
                exc,
            )

    def close(self) -> None:
        """Stop the workers now (a later ``next()`` starts them again at the current position)."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
        if self._control is not None:  # workers waiting for a slot stop waiting
            self._control.stop()
        stop_workers(self._iterator)
        if self._ring is not None:
            self._ring.close()
        self._iterator, self._control, self._ring = None, None, None
        self._pending.clear()
        self._next_progress = None
        _RUNNING.discard(self)

    def start_fresh(self) -> None:
        if self.sample_log is not None:
            self.sample_log.rewind(0, self.layout.world_size)

    def shutdown(self) -> None:
        self.close()
        if self.sample_log is not None:
            self.sample_log.close()

    def _identity(self) -> dict[str, Any]:
        return {
            "seed": self.stream.settings.seed,
            "shuffle_buffer": self.stream.settings.shuffle_buffer,
            "dataset": self.stream.fingerprint(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": ELASTIC_STATE_VERSION,
            **self._identity(),
            "rank": self.stream.rank,
            "world_size": self.layout.world_size,
            "num_workers": self.stream.num_workers,
            "per_rank": self.layout.per_rank,
            "batch_size": self.batch_size,
            "step": self.progress.step,
            "sources": [cursor.to_dict() for cursor in self.progress.cursors],
            "carries": encode_carries(self.progress.carries),
            "read_stats": dict(self._read_stats),
        }

    def load_state_dict(self, state: dict[str, Any], absorbed: list[dict[str, Any]] | None = None) -> None:
        """Continue from ``state``, the saved state of this rank (or of rank 0 for a rank the
        saved run did not have); ``absorbed``: states of saved ranks this run no longer has,
        whose read counts rank 0 carries on."""
        if state.get("version") == FIXED_TOPOLOGY_STATE_VERSION:
            raise LoaderStateError(
                "the data loader state was written by streamtrain's fixed-topology loader (state "
                f"version 1), which streamtrain after {LAST_READING_FIXED_TOPOLOGY} no longer has: resume "
                f"it with streamtrain {LAST_READING_FIXED_TOPOLOGY} (git checkout "
                f"{LAST_READING_FIXED_TOPOLOGY}), or start a new run"
            )
        if state.get("version") not in (ELASTIC_STATE_VERSION, UNROTATED_STATE_VERSION):
            raise LoaderStateError(
                f"data loader state version {state.get('version')!r} is not {ELASTIC_STATE_VERSION}"
            )
        changed = _changed(self._identity(), state)
        if changed:
            raise LoaderStateError(
                "cannot continue the data stream, the data or its order changed ("
                + "; ".join(changed)
                + "). Resume with the original data, seed and mixture, or start a new run."
            )
        rotating = state["version"] == ELASTIC_STATE_VERSION
        sources = self.layout.sources
        if len(state["sources"]) != len(sources):
            raise LoaderStateError(f"the saved data has {len(state['sources'])} sources, now {len(sources)}")
        cursors = [
            Cursor.from_dict(self.layout.counts(i), self.layout.windows(i), saved, rotating)
            for i, saved in enumerate(state["sources"])
        ]
        progress = Progress(int(state["step"]), cursors, decode_carries(state["carries"]))
        progress.fit(self.layout)
        self.close()
        self.progress = progress
        own = state.get("rank") == self.stream.rank
        self._read_stats = Counter(state.get("read_stats", {}) if own else {})
        for other in absorbed or []:
            self._read_stats.update(other.get("read_stats", {}))
        if self.sample_log is not None:
            # Lines the interrupted run wrote after this state was saved are not history.
            self.sample_log.rewind(progress.step, self.layout.world_size)


@dataclass
class _Step:
    """One step as read: where the data stands after it, and its micro-batches."""

    progress: Progress
    counts: Counter[str]
    batches: list[Any] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)


def _finished(batch: Any, device: torch.device | None, read_stats: Counter[str]) -> Any:
    """``batch`` with its undecoded images decoded on ``device``; what no decoder read is left
    out and counted (a batch left with nothing is None)."""
    finished, counts = finish_batch(batch, device or torch.device("cpu"))
    read_stats.update(counts)
    return finished


def _sample_ids(batch: Any) -> list[str]:
    if not isinstance(batch, dict) or "sample_ids" not in batch:
        raise TypeError("data.sample_log needs batches that carry 'sample_ids' (a dict from the collate)")
    return list(batch["sample_ids"])


def _changed(expected: dict[str, Any], state: dict[str, Any]) -> list[str]:
    """What a saved state says differently from ``expected``, one ``key: saved x, now y`` each."""
    return [
        f"{key}: saved {state.get(key)!r}, now {value!r}"
        for key, value in expected.items()
        if state.get(key) != value
    ]
