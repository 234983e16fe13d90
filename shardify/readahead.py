"""Range requests kept in flight ahead of each reader, within one byte budget per process.

A store far away answers each request after its time to first byte (20-100 ms), then streams
fast: a reader that asks for one block at a time is bound by that latency. Little's law says
what must be in flight to read at a rate: bytes in flight = rate x latency (60 MB/s at 40 ms:
2.4 MB). So every object opened for reading (a ``ReadAheadFile``) keeps several chunk requests
outstanding ahead of its read position, run concurrently by this process's ``RangePool`` (one
thread, and one connection, per request in flight), and the bytes requested but not yet read,
over every open object of the process, stay within the pool's budget: each object gets an equal
share, and may always have one chunk outstanding, so a reader never waits on the others.

Nothing past an object's end, or past the ``limit`` its reader says it will stop at, is asked
for; closing an object cancels its queued requests and drops what arrived for it. Errors of a
chunk surface when the reader reaches it, as the backend's own exception, so the retry loop of
bytestream.py classifies it and reopens at the byte it had reached.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

DEFAULT_CHUNK_BYTES = 4 << 20
"""One range request: large enough that a request's fixed cost (a round trip, and ~2 ms of a
Python client's CPU) is small against its transfer (benchmarks/bench_remote.py: botocore spends
half the CPU per GB at 4 MB as at 1 MB); readers that stop early clip it to where they stop."""
DEFAULT_BUDGET_BYTES = 32 << 20
"""Per process (dataloader worker): 200 MB/s at 100 ms to first byte is 20 MB in flight; the
rest covers the burst when all lanes of a worker load their next shuffle window at once."""
MIN_CHUNK_BYTES = 256 << 10
"""The smallest request read-ahead makes (a worker with many open shards and a small budget)."""
MAX_CONNECTIONS = 32
PREFETCH_CHUNKS = 1
"""Chunks a prefetched object (the next shard of a lane) asks for before it is read: its first
answer is what the lane waits for when it gets there; the rest comes at the lane's pace."""
MAX_PREFETCHED = 256
"""Prefetched objects kept for their readers; past this the oldest (a reader that stopped
early) are dropped. Each holds one chunk of the budget until it is opened."""


@dataclass(frozen=True)
class Answer:
    """One range request's bytes, and the whole object's size and version tag as the store said."""

    data: bytes
    size: int | None
    etag: str | None
    fetched: bool = True
    """False for bytes a failed read put back (they were counted when they came)."""


class ObjectChangedError(Exception):
    """An answer's version tag differs from the first one's: the object was replaced mid-read."""


RangeReader = Callable[[int, int], Answer]
"""``(start, stop) -> Answer``: one blocking range request; raises the backend's errors."""


class RangePool:
    """This process's request threads and byte budget, shared by every open object."""

    def __init__(
        self, budget_bytes: int = DEFAULT_BUDGET_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self.budget_bytes = budget_bytes
        self.chunk_bytes = max(4096, chunk_bytes)  # a budget under one chunk: one request at a time
        # A thread (and a connection) per request in flight, for requests of about 2 MB: more
        # Python threads reading sockets cost more CPU in contention than they gain.
        self.connections = max(2, min(MAX_CONNECTIONS, budget_bytes // (2 << 20)))
        self.reserved = 0
        """Bytes requested (queued, in flight or arrived) and not yet read or dropped."""
        self.peak_reserved = 0
        self.requests = 0
        """Range requests started (a cancelled one that never started is not counted)."""
        self.bytes_fetched = 0
        """Bytes the store answered with, whether read or dropped."""
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Future[Answer], RangeReader, int, int] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._files: weakref.WeakSet[ReadAheadFile] = weakref.WeakSet()
        self._prefetched: OrderedDict[str, ReadAheadFile] = OrderedDict()

    # ------------------------------------------------------------------ requests

    def submit(self, read: RangeReader, start: int, stop: int) -> Future[Answer]:
        future: Future[Answer] = Future()
        with self._lock:
            if len(self._threads) < self.connections:
                thread = threading.Thread(target=self._serve, name="shardify-range", daemon=True)
                self._threads.append(thread)
                thread.start()
        self._queue.put((future, read, start, stop))
        return future

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, read, start, stop = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued: never sent
            with self._lock:
                self.requests += 1
            try:
                answer = read(start, stop)
            except BaseException as exc:
                future.set_exception(exc)
                continue
            with self._lock:
                self.bytes_fetched += len(answer.data)
            future.set_result(answer)

    # ------------------------------------------------------------------ budget

    def reserve(self, size: int) -> None:
        with self._lock:
            self.reserved += size
            self.peak_reserved = max(self.peak_reserved, self.reserved)

    def release(self, size: int) -> None:
        with self._lock:
            self.reserved -= size

    def share(self) -> int:
        """Bytes one open object may have requested ahead of its reader."""
        return self.budget_bytes // max(1, len(self._files))

    def chunk_for(self, share: int) -> int:
        """The size of one request of an object with ``share``: at least two fit in it (one being
        read, one on the way), so many open objects get smaller requests, not none ahead; under
        two of the smallest, whole chunks on demand (no read-ahead to speak of)."""
        floor = min(MIN_CHUNK_BYTES, self.chunk_bytes)
        if share < 2 * floor:
            return self.chunk_bytes
        return max(floor, min(self.chunk_bytes, share // 2))

    def room(self) -> int:
        return self.budget_bytes - self.reserved

    # ------------------------------------------------------------------ objects

    def open(
        self, key: str, read: RangeReader, start: int = 0, limit: int | None = None, size: int | None = None
    ) -> ReadAheadFile:
        """An object read from ``start``: a prefetched one when ``key`` was prefetched from there."""
        with self._lock:
            found = self._prefetched.pop(key, None)
        if found is not None and found.position == start and not found.closed:
            found.adopt(limit)
            return found
        if found is not None:
            found.close()
        return ReadAheadFile(self, read, start, limit, size=size)

    def prefetch(
        self, key: str, read: RangeReader, limit: int | None = None, size: int | None = None
    ) -> None:
        """Start reading ``key`` from byte 0 before it is opened (the next shard of a reader)."""
        with self._lock:
            if key in self._prefetched or self.room() < self.chunk_bytes:
                return  # a prefetch never takes the budget from objects being read
        file = ReadAheadFile(self, read, 0, limit, chunks=PREFETCH_CHUNKS, size=size)
        with self._lock:
            self._prefetched[key] = file
            # Prefetches nobody opened (a reader that stopped early) must not hold the budget.
            stale = []
            while len(self._prefetched) > MAX_PREFETCHED:
                stale.append(self._prefetched.popitem(last=False)[1])
        for old in stale:
            old.close()

    def register(self, file: ReadAheadFile) -> None:
        with self._lock:
            self._files.add(file)

    def unregister(self, file: ReadAheadFile) -> None:
        with self._lock:
            self._files.discard(file)

    def close(self) -> None:
        """Cancel every queued request of every object (a stopping worker)."""
        with self._lock:
            files = list(self._files)
            self._prefetched.clear()
        for file in files:
            file.close()


class ReadAheadFile:
    """One object read forward from ``start`` with chunk requests in flight ahead of the reader.

    ``seek`` inside the requested window drops what lies before; outside it, starts anew there.
    """

    def __init__(
        self,
        pool: RangePool,
        read: RangeReader,
        start: int = 0,
        limit: int | None = None,
        chunks: int | None = None,
        size: int | None = None,
    ) -> None:
        self.pool = pool
        self.read_range = read
        self.position = start
        self.limit = limit
        """Nothing at or past this byte is requested ahead (the reader stops before it)."""
        self.size = size
        """The object's size: from the caller (a manifest) until the store's first answer says."""
        self.etag: str | None = None
        self.answered = False
        self.fetched = 0
        """Bytes of the answers this reader took in (read, or dropped after they came)."""
        self.answers = 0
        self.skipped = 0
        """Bytes seeked over that were never requested."""
        self.window = 1
        """Chunks it may have requested ahead: one more for every chunk read through, half as
        many when the reader skips over chunks it had requested (a scan of tar headers past large
        members), so a forward reader soon has its share in flight and a skipping one wastes little."""
        self.closed = False
        self._chunks: deque[tuple[int, int, Future[Answer]]] = deque()
        self._next = start
        self._cap_chunks = chunks
        pool.register(self)
        self._fill()

    def adopt(self, limit: int | None) -> None:
        """Its reader arrived: read ahead at the full share from now on."""
        self._cap_chunks = None
        self.limit = limit
        self._fill()

    @property
    def requested(self) -> int:
        return sum(stop - start for start, stop, _ in self._chunks)

    def _end(self) -> int | None:
        ends = [e for e in (self.size, self.limit) if e is not None]
        return min(ends) if ends else None

    def _fill(self, demand: bool = False) -> None:
        """Issue chunk requests up to this object's share, the budget, and its end."""
        if self.closed:
            return
        end = self._end()
        share = self.pool.share()
        # Requests start small and double with every one read through (a header scan that
        # skips large members keeps them small; a forward reader reaches full size in a few).
        floor = min(MIN_CHUNK_BYTES, self.pool.chunk_bytes)
        chunk = min(self.pool.chunk_for(share), floor << min(self.window - 1, 16))
        while True:
            if end is not None and self._next >= end:
                return
            if self.size is None and self._chunks:
                return  # the first answer tells the size: nothing past the end is asked for
            outstanding = self.requested
            cap = self.window if self._cap_chunks is None else self._cap_chunks
            if len(self._chunks) >= cap:
                return
            must = demand and not self._chunks
            if not must and (outstanding + chunk > share or self.pool.room() < chunk):
                return
            stop = self._next + chunk if end is None else min(end, self._next + chunk)
            self.pool.reserve(stop - self._next)
            self._chunks.append((self._next, stop, self.pool.submit(self.read_range, self._next, stop)))
            self._next = stop

    def seek(self, position: int) -> None:
        wasted = sum(1 for start, _, _ in self._chunks if self.position < start and start + 1 <= position)
        if wasted:
            self.window = max(1, self.window // 2)
        if self._chunks and self._chunks[0][0] <= position < self._next:
            while self._chunks and self._chunks[0][1] <= position:
                self._drop(self._chunks.popleft())
        else:
            if position > self._next:
                self.skipped += position - self._next
            self._cancel()
            self._next = position
        self.position = position
        self._fill()

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes from the position (fewer only at the object's end). A read that
        fails leaves the position where it was: the bytes it had taken are put back."""
        parts: list[bytes] = []
        began = self.position
        try:
            return self._read(size, parts)
        except BaseException:
            if parts:
                taken = b"".join(parts)
                done: Future[Answer] = Future()
                done.set_result(Answer(taken, self.size, self.etag, fetched=False))
                self.pool.reserve(len(taken))
                self._chunks.appendleft((began, began + len(taken), done))
                self.position = began
            raise

    def _read(self, size: int, parts: list[bytes]) -> bytes:
        want = size
        while want > 0:
            if not self._chunks:
                end = self._end()
                if end is not None and self.position >= end:
                    if self.limit is not None and (self.size is None or self.position < self.size):
                        self.limit = None  # the reader went on past where it expected to stop
                        continue
                    break
                self._fill(demand=True)
            start, stop, future = self._chunks[0]
            answer = future.result()  # a failed request raises here; resend_failed() tries it again
            if not self.answered:
                self._answer(answer)
            elif answer.etag and self.etag and answer.etag != self.etag:
                detail = f"ETag {self.etag} became {answer.etag} at byte {start}"
                raise ObjectChangedError(detail)
            offset = self.position - start
            piece = answer.data[offset : offset + want]
            if not piece:  # the object ended inside this chunk
                self._drop(self._chunks.popleft())
                self.size = self.position if self.size is None else min(self.size, self.position)
                break
            parts.append(piece)
            self.position += len(piece)
            want -= len(piece)
            if self.position >= start + len(answer.data):
                self._drop(self._chunks.popleft())
                self.window += 1
                if len(answer.data) < stop - start:
                    self.size = self.position if self.size is None else self.size
            self._fill()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def resend_failed(self) -> None:
        """Send again the requests that failed (a retry after a transient error)."""
        for index, (start, stop, future) in enumerate(self._chunks):
            if future.done() and future.exception() is not None:
                self._chunks[index] = (start, stop, self.pool.submit(self.read_range, start, stop))

    def first_answer(self) -> Answer:
        """The answer of the chunk at the position (waits for it): what the store says the object is."""
        if not self._chunks:
            self._fill(demand=True)
        try:
            answer = self._chunks[0][2].result()
        except BaseException:
            self._cancel()
            raise
        if not self.answered:
            self._answer(answer)
            self._fill()
        return answer

    def _answer(self, answer: Answer) -> None:
        """The store's first answer: the object's real size (a hint may have been wrong) and tag."""
        self.answered = True
        self.etag = answer.etag
        if answer.size is not None:
            self.size = answer.size
            self._trim(answer.size)  # requests past the end were asked on a wrong hint: drop them

    def _trim(self, size: int) -> None:
        kept: deque[tuple[int, int, Future[Answer]]] = deque()
        for item in self._chunks:
            if item[0] >= size:
                self._drop(item)
            else:
                kept.append(item)
        self._chunks = kept
        self._next = min(self._next, max(size, self.position))

    def _drop(self, item: tuple[int, int, Future[Answer]]) -> None:
        start, stop, future = item
        if not future.cancel() and future.done() and future.exception() is None:
            answer = future.result()
            if answer.fetched:
                self.fetched += len(answer.data)
                self.answers += 1
        self.pool.release(stop - start)

    def _cancel(self) -> None:
        while self._chunks:
            self._drop(self._chunks.popleft())
        self._next = self.position

    def close(self) -> None:
        if self.closed:
            return
        self._cancel()
        self.closed = True
        self.pool.unregister(self)


_POOLS: dict[int, RangePool] = {}
_SETTINGS = {"budget_bytes": DEFAULT_BUDGET_BYTES, "chunk_bytes": DEFAULT_CHUNK_BYTES}


def configure(budget_bytes: int | None = None, chunk_bytes: int | None = None) -> None:
    """Set this process's read-ahead budget (``data.read_ahead_mb``) for the pool made next."""
    if budget_bytes is not None:
        _SETTINGS["budget_bytes"] = budget_bytes
    if chunk_bytes is not None:
        _SETTINGS["chunk_bytes"] = chunk_bytes
    pool = _POOLS.get(os.getpid())
    if pool is not None and (pool.budget_bytes, pool.chunk_bytes) != (
        _SETTINGS["budget_bytes"],
        _SETTINGS["chunk_bytes"],
    ):
        pool.close()
        del _POOLS[os.getpid()]


def pool() -> RangePool:
    """This process's pool (a forked child makes its own: the parent's threads are not there)."""
    pid = os.getpid()
    found = _POOLS.get(pid)
    if found is None:
        _POOLS.clear()
        found = _POOLS[pid] = RangePool(_SETTINGS["budget_bytes"], _SETTINGS["chunk_bytes"])
    return found
