"""How a lane opens its shards on a far store: read-ahead, prefetch of the next one, a local cache.

``RemoteReads`` is what ``data.read_ahead_mb``, ``data.cache_dir`` and ``data.cache_limit`` say.
A worker applies it once (``start``); a lane then opens each shard with ``open_shard`` (from the
cache when one is set, else streamed with read-ahead bounded by what the lane will read of it)
and announces the next one with ``prefetch`` so that its first bytes are on the way before the
lane reaches it. Only *when* bytes arrive changes: which samples a lane reads does not.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from shardify import readahead
from shardify.bytestream import Extent, ReadStats, RetryPolicy, ShardReadError
from shardify.cache import ShardCache
from shardify.storage import storage_for
from shardify.tarread import iter_samples, load_checksums


@dataclass(frozen=True)
class RemoteReads:
    """Read-ahead and caching of shards on remote storage (the ``data`` settings)."""

    read_ahead_bytes: int = readahead.DEFAULT_BUDGET_BYTES
    """Per worker process: bytes requested ahead of the readers, over all its open shards."""
    cache_dir: str | None = None
    """Where whole shards are kept on local disk; None: no cache."""
    cache_limit_bytes: int = 0
    """Most bytes the cache holds; least recently used shards go first."""


@dataclass(frozen=True)
class ShardSpan:
    """What a lane reads of one shard: samples ``[first, stop)`` of ``samples``, ``size`` bytes."""

    url: str
    first: int
    stop: int
    samples: int
    size: int | None
    checksums_url: str | None = None
    """Where the shard's member checksums are (``<shard>.crc32.json``); None: not recorded."""

    def extent(self) -> Extent:
        """The shard's size and the byte its reader stops near (estimated from the counts, with
        two samples to spare: sample sizes vary), so read-ahead does not run past the lane."""
        if self.size is None or self.stop >= self.samples:
            return Extent(self.size, None)
        per_sample = self.size / max(1, self.samples)
        return Extent(self.size, min(self.size, math.ceil(per_sample * (self.stop + 2))))


class ShardOpener:
    """A worker's way to its shards: the read-ahead budget set, the cache, background downloads."""

    def __init__(self, reads: RemoteReads | None, retry: RetryPolicy | None, stats: ReadStats) -> None:
        self.reads = reads or RemoteReads()
        self.retry = retry
        self.stats = stats
        readahead.configure(budget_bytes=max(self.reads.read_ahead_bytes, 0))
        self.cache = (
            ShardCache(self.reads.cache_dir, self.reads.cache_limit_bytes) if self.reads.cache_dir else None
        )
        self._downloads: dict[str, Future[Any]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def open_shard(self, span: ShardSpan, max_member_bytes: int) -> Iterator[dict[str, Any]]:
        """The samples of ``span`` from ``span.first`` on (the caller stops at ``span.stop``)."""
        remote = storage_for(span.url).remote
        checksums = self.checksums(span)
        if remote and self.cache is not None:
            local = self._cached(span, checksums)
            if local is not None:
                samples = iter_samples(
                    local, span.first, None, max_member_bytes=max_member_bytes, checksums=checksums
                )
                return _labelled(samples, span.url)
        return iter_samples(
            span.url,
            span.first,
            None,
            self.retry,
            max_member_bytes=max_member_bytes,
            stats=self.stats,
            checksums=checksums,
            extent=span.extent(),
        )

    def checksums(self, span: ShardSpan) -> Mapping[str, int] | None:
        """The shard's member checksums: kept beside its cached copy when there is a cache (a
        later epoch then asks the store for nothing), else read once per process."""
        if span.checksums_url is None:
            return None
        if self.cache is None or not storage_for(span.url).remote:
            return load_checksums(span.checksums_url)
        return self.cache.checksums(span.url, span.checksums_url)

    def prefetch(self, span: ShardSpan) -> None:
        """Start bringing ``span``'s shard: into the cache when there is one, else its first
        chunks into the read-ahead (only from the shard's start: elsewhere the byte is unknown)."""
        storage = storage_for(span.url)
        if not storage.remote:
            return
        if self.cache is not None:
            with self._lock:
                if span.url in self._downloads:
                    return
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(2, thread_name_prefix="shard-cache")
                self._downloads[span.url] = self._executor.submit(self._download, span)
            return
        reader = storage.range_reader(span.url)
        if reader is not None and span.first == 0:
            extent = span.extent()
            readahead.pool().prefetch(span.url, reader, extent.stop, extent.size)

    def _cached(self, span: ShardSpan, checksums: Mapping[str, int] | None) -> str | None:
        with self._lock:
            pending = self._downloads.pop(span.url, None)
        if pending is not None:
            # A failed download is tried again below, where the error is the lane's to report.
            with contextlib.suppress(ShardReadError):
                _merge(self.stats, pending.result())
        assert self.cache is not None
        local = self.cache.local_copy(span.url, checksums, span.size, self.retry, self.stats)
        return str(local) if local is not None else None

    def _download(self, span: ShardSpan) -> ReadStats:
        """Bring ``span``'s shard into the cache (in a background thread: its own counts)."""
        assert self.cache is not None
        stats = ReadStats()
        self.cache.local_copy(span.url, self.checksums(span), span.size, self.retry, stats)
        return stats

    def close(self) -> None:
        """Cancel what is queued or in flight (a stopping worker)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        readahead.pool().close()


def _merge(into: ReadStats, more: ReadStats) -> None:
    for name in vars(more):
        setattr(into, name, getattr(into, name) + getattr(more, name))


def _labelled(samples: Iterator[dict[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    """Samples read from a cached copy, named by the shard's own URL (what warnings show)."""
    try:
        for sample in samples:
            sample["__url__"] = url
            yield sample
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()
