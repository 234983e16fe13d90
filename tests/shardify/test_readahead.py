"""Read-ahead: range requests in flight ahead of the reader, within the budget, never past the end."""

from __future__ import annotations

import random
import threading
import time

import pytest

from shardify.readahead import Answer, ObjectChangedError, RangePool

KB = 1 << 10
DATA = random.Random(0).randbytes(600 * KB)


class Store:
    """One object behind a range reader that answers after ``delay_s``, recording every request."""

    def __init__(self, data: bytes = DATA, delay_s: float = 0.01) -> None:
        self.data = data
        self.delay_s = delay_s
        self.etag = "v1"
        self.requests: list[tuple[int, int]] = []
        self.fail_once: set[int] = set()
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def read(self, start: int, stop: int) -> Answer:
        with self._lock:
            self.requests.append((start, stop))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            if start in self.fail_once:
                self.fail_once.discard(start)
                raise ConnectionResetError("reset (injected)")
            return Answer(self.data[start:stop], len(self.data), self.etag)
        finally:
            with self._lock:
                self.in_flight -= 1


def _read_all(file, step: int = 7 * KB) -> bytes:
    parts = []
    while chunk := file.read(step):
        parts.append(chunk)
    return b"".join(parts)


def test_reads_ahead_concurrently_within_the_budget_and_never_past_the_end() -> None:
    store = Store()
    pool = RangePool(budget_bytes=128 * KB, chunk_bytes=32 * KB)
    file = pool.open("obj", store.read)
    assert _read_all(file) == DATA
    file.close()
    assert store.most_in_flight > 1  # requests overlap: latency is paid once per window, not per chunk
    assert pool.peak_reserved <= 128 * KB + 32 * KB  # the budget, plus the one chunk a reader may always have
    assert max(stop for _, stop in store.requests) <= len(DATA)
    assert sorted(store.requests) == sorted(set(store.requests))  # each byte asked for once
    assert sum(stop - start for start, stop in store.requests) == len(DATA)
    assert pool.reserved == 0


def test_a_budget_under_one_chunk_is_one_request_at_a_time() -> None:
    store = Store()
    pool = RangePool(budget_bytes=0, chunk_bytes=64 * KB)
    assert _read_all(pool.open("obj", store.read)) == DATA
    assert store.most_in_flight == 1


def test_nothing_is_asked_past_the_limit_the_reader_gives() -> None:
    store = Store()
    pool = RangePool(budget_bytes=256 * KB, chunk_bytes=16 * KB)
    file = pool.open("obj", store.read, limit=100 * KB, size=len(DATA))
    assert file.read(90 * KB) == DATA[: 90 * KB]
    time.sleep(0.05)  # whatever was going to be asked has been
    assert max(stop for _, stop in store.requests) <= 100 * KB
    # A reader that goes on past where it said it would stop still gets its bytes, on demand.
    assert file.read(20 * KB) == DATA[90 * KB : 110 * KB]
    file.close()


def test_closing_cancels_what_is_queued() -> None:
    store = Store(delay_s=0.05)
    pool = RangePool(budget_bytes=512 * KB, chunk_bytes=16 * KB)  # 32 chunks allowed, 32 threads
    pool.connections = 2  # but two connections: most requests wait in the queue
    file = pool.open("obj", store.read, size=len(DATA))
    file.read(KB)
    file.read(40 * KB)  # the window has grown: many chunks queued behind two connections
    file.close()
    time.sleep(0.3)
    assert len(store.requests) < len(DATA) // (16 * KB)
    assert pool.reserved == 0


def test_a_failed_request_raises_then_is_sent_again_without_refetching_the_rest() -> None:
    store = Store()
    store.fail_once = {64 * KB}
    pool = RangePool(budget_bytes=256 * KB, chunk_bytes=32 * KB)
    file = pool.open("obj", store.read, size=len(DATA))
    got = [file.read(50 * KB)]
    with pytest.raises(ConnectionResetError):
        got.append(file.read(50 * KB))
    assert file.position == 50 * KB  # a failed read takes nothing
    file.resend_failed()
    got.append(_read_all(file))
    assert b"".join(got) == DATA
    asked = [start for start, _ in store.requests]
    assert asked.count(64 * KB) == 2 and len(asked) == len(set(asked)) + 1


def test_an_object_replaced_mid_read_is_refused() -> None:
    store = Store()
    pool = RangePool(budget_bytes=32 * KB, chunk_bytes=16 * KB)
    file = pool.open("obj", store.read)
    file.read(20 * KB)
    store.etag = "v2"
    file.seek(200 * KB)  # outside the window: asked anew, from the replaced object
    with pytest.raises(ObjectChangedError):
        file.read(KB)


def test_skipping_over_requested_chunks_shrinks_the_window() -> None:
    """A tar header scan past large members: few bytes wasted, not the whole budget each time."""
    store = Store(data=random.Random(1).randbytes(2048 * KB))
    pool = RangePool(budget_bytes=1024 * KB, chunk_bytes=16 * KB)
    file = pool.open("obj", store.read, size=2048 * KB)
    _ = file.read(200 * KB)  # read through: the window grows
    grown = file.window
    for position in range(400 * KB, 2048 * KB, 200 * KB):
        file.seek(position)
        assert file.read(512) == store.data[position : position + 512]
    assert grown > 4 and file.window <= 2
    file.close()


def test_a_prefetched_object_is_taken_over_by_its_reader() -> None:
    store = Store()
    pool = RangePool(budget_bytes=256 * KB, chunk_bytes=32 * KB)
    pool.prefetch("obj", store.read, size=len(DATA))
    time.sleep(0.05)
    assert store.requests == [(0, 32 * KB)]  # one chunk until someone reads it
    file = pool.open("obj", store.read, size=len(DATA))
    assert _read_all(file) == DATA
    assert store.requests.count((0, 32 * KB)) == 1
    file.close()
