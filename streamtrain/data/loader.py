"""The loader a training loop iterates: a DataLoader over a ShardStream, Stateful by one integer."""

from __future__ import annotations

import atexit
import signal
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from streamtrain.data.sample_log import SampleLog
from streamtrain.data.stream import ShardStream
from streamtrain.errors import UserError

STATE_VERSION = 1

# Loaders with running workers. Infinite dataloader workers never finish on their own, and an
# interpreter that exits with them alive can hang in DataLoader's finaliser (seen under
# torchrun), so they are stopped explicitly at exit.
_RUNNING: weakref.WeakSet[StreamLoader] = weakref.WeakSet()


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


class LoaderStateError(UserError):
    """A saved loader state that cannot be resumed exactly with this configuration."""


class StreamLoader:
    """Batches for this rank, forever. ``state_dict()`` after step s resumes at batch s + 1.

    A batch none of whose samples could be read is None, in its place.

    Every rank reads only its own shards (no rank-0 dispatch). The state records how many
    batches this rank consumed — prefetched batches are not counted, so nothing is skipped —
    plus the topology and dataset it is valid for. Resuming with another world size, worker
    count, batch size, seed or shard list is refused with a clear error rather than silently
    yielding a different order.
    """

    def __init__(
        self,
        stream: ShardStream,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        sample_log: SampleLog | None = None,
        batches_per_step: int = 1,
    ) -> None:
        """``sample_log`` gets one line per ``batches_per_step`` batches (an optimizer step with
        gradient accumulation), listing the batches' ``"sample_ids"``."""
        self.stream = stream
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.sample_log = sample_log
        self.batches_per_step = batches_per_step
        self._step_sample_ids: list[str] = []
        self.batches = 0
        self.read_stats: Counter[str] = Counter()
        self._iterator: Iterator[tuple[Any, dict[str, int]]] | None = None

    @property
    def epoch(self) -> float:
        """Epochs consumed so far, fractional."""
        return self.batches / self.stream.batches_per_epoch

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self.stream.start_batch = self.batches
            workers = self.stream.topology.num_workers
            loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=workers,
                prefetch_factor=self.prefetch_factor if workers else None,
                pin_memory=self.pin_memory,
                persistent_workers=False,
                worker_init_fn=leave_stop_signals_to_the_rank,
            )
            self._iterator = iter(loader)
            _RUNNING.add(self)
        batch, stats = next(self._iterator)
        self.batches += 1
        self.read_stats.update(stats)
        if self.sample_log is not None:
            self._log_samples(batch)
        return batch

    def _log_samples(self, batch: Any) -> None:
        if batch is None:  # no sample of it could be read
            batch = {"sample_ids": []}
        if not isinstance(batch, dict) or "sample_ids" not in batch:
            raise TypeError("data.sample_log needs batches that carry 'sample_ids' (a dict from the collate)")
        self._step_sample_ids.extend(batch["sample_ids"])
        if self.batches % self.batches_per_step == 0:
            assert self.sample_log is not None
            self.sample_log.record(self.batches // self.batches_per_step, self._step_sample_ids)
            self._step_sample_ids = []

    def close(self) -> None:
        """Stop the workers now (a later ``next()`` starts them again at the current position)."""
        stop_workers(self._iterator)
        self._iterator = None
        _RUNNING.discard(self)

    def start_fresh(self) -> None:
        """Begin at batch 0 of a new run: sample-log lines of an earlier attempt that never
        checkpointed are retrained, so they are dropped."""
        if self.sample_log is not None:
            self.sample_log.rewind(0)

    def shutdown(self) -> None:
        """Stop the workers and close the sample log; the loader is done."""
        self.close()
        if self.sample_log is not None:
            self.sample_log.close()

    def _identity(self) -> dict[str, Any]:
        topology = self.stream.topology
        return {
            "seed": self.stream.config.seed,
            "world_size": topology.world_size,
            "num_workers": topology.num_workers,
            "batch_size": topology.batch_size,
            "shuffle_buffer": self.stream.config.shuffle_buffer,
            "dataset": self.stream.dataset.fingerprint(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "rank": self.stream.topology.rank,
            "batches": self.batches,
            "step_sample_ids": list(self._step_sample_ids),
            "read_stats": dict(self.read_stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise LoaderStateError(
                f"data loader state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        expected = self._identity()
        changed = [
            f"{key}: saved {state.get(key)!r}, now {value!r}"
            for key, value in expected.items()
            if state.get(key) != value
        ]
        if changed:
            raise LoaderStateError(
                "cannot resume the data stream exactly, its configuration changed ("
                + "; ".join(changed)
                + "). Resume with the original settings, or start a new run."
            )
        self.batches = int(state["batches"])
        self._step_sample_ids = list(state.get("step_sample_ids", []))
        self.read_stats = Counter(state.get("read_stats", {}))
        if self.sample_log is not None:
            # Lines the interrupted run wrote after this state was saved are not history.
            self.sample_log.rewind(self.batches // self.batches_per_step)
        self.close()
