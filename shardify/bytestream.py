"""Forward reads of one stored object that ride out transient storage errors.

An object is read as one forward byte stream through its storage backend (storage.py). When a
read fails with an error the backend calls transient (reset or refused connection, timeout,
5xx) the object is reopened at the byte offset already consumed, so nothing is read twice and
nothing is lost; an object whose size or tag changed in between is refused, never spliced.
"""

from __future__ import annotations

import io
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from shardify import readahead
from shardify.storage import Failure, ObjectInfo, ReadableFile, storage_for

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 1 << 20
# A range request costs about as much as transferring 1 MB: on S3 skipping fetches whole blocks
# (headers of small samples come along for free); on local disk a seek is nearly free, so the
# least read is one 512-byte tar header.
_REMOTE_SKIP_READ = 1 << 20
_LOCAL_SKIP_READ = 512


@dataclass(frozen=True)
class RetryPolicy:
    """How reads of one object ride out transient storage errors."""

    attempts: int = 6
    """Consecutive failed tries of one read before giving up; any successful read resets the count."""
    initial_backoff_s: float = 0.5
    """Wait after the first failure; it doubles with every further consecutive failure."""
    max_backoff_s: float = 8.0
    """Ceiling of the wait between two tries."""
    missing_attempts: int = 2
    """Tries before a missing S3 object is reported (eventually consistent stores lag briefly)."""
    log_interval_s: float = 30.0
    """At most one retry warning per stream in this many seconds; the rest are counted."""

    def __post_init__(self) -> None:
        counts = ("attempts", "missing_attempts")
        problems = [f"{name} must be at least 1" for name in counts if getattr(self, name) < 1]
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            problems.append("backoffs must satisfy 0 <= initial_backoff_s <= max_backoff_s")
        if problems:
            raise ValueError(f"RetryPolicy: {'; '.join(problems)}")

    def backoff_s(self, failures: int) -> float:
        """Wait before the next try after ``failures`` consecutive failures (jittered exponential)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (failures - 1))
        # Jitter keeps many workers that failed together from retrying in lockstep.
        return random.uniform(ceiling / 2, ceiling)


@dataclass
class ReadStats:
    """What reading cost; callers pass one in and read it afterwards (it may span many objects)."""

    bytes_read: int = 0
    """Bytes fetched from storage."""
    bytes_skipped: int = 0
    """Bytes seeked over without being fetched."""
    requests: int = 0
    """Successful reads from storage (range requests on S3)."""
    retries: int = 0
    """Failed tries that were retried."""
    reopens: int = 0
    """Times an object was reopened after an error."""
    reopened_bytes: int = 0
    """Offsets at which objects were reopened, summed: what restarting from zero would re-read."""


class ShardReadError(Exception):
    """A shard could not be read; ``reason``: missing, denied, truncated, corrupt, changed, unavailable."""

    def __init__(self, url: str, reason: str, detail: str = "") -> None:
        self.url = url
        self.reason = reason
        self.detail = detail
        super().__init__(f"cannot read shard {url}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.url, self.reason, self.detail)


class RateLimitedLog:
    """At most one warning per ``every_s`` seconds; the ones held back are counted, and the count
    goes out with the next warning let through (a dying store must not flood the log)."""

    def __init__(self, log: logging.Logger, every_s: float) -> None:
        self.log = log
        self.every_s = every_s
        self.last = -float("inf")
        self.suppressed = 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.suppressed += 1
            return
        extra = f" ({self.suppressed} similar warnings suppressed)" if self.suppressed else ""
        self.log.warning("%s%s", message, extra)
        self.last, self.suppressed = now, 0


@dataclass(frozen=True)
class Extent:
    """What a reader knows before opening an object: its size (from a manifest) and the byte it
    will stop reading at, where it stops early (a lane ending inside a shard); read-ahead asks
    for nothing past either."""

    size: int | None = None
    stop: int | None = None


class ShardByteStream:
    """Forward reads over one object (any registered storage) that resume where they failed.

    On a store that reads byte ranges from any thread (S3), several range requests run ahead of
    the reader (readahead.py: this process's budget, shared by its open objects).
    """

    def __init__(
        self,
        url: str,
        retry: RetryPolicy | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        stats: ReadStats | None = None,
        extent: Extent | None = None,
    ) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        self.stats = stats if stats is not None else ReadStats()
        self.offset = 0
        """Bytes consumed (read or skipped) so far."""
        self._storage = storage_for(url)
        self._ranges = self._storage.range_reader(url)
        self._extent = extent or Extent()
        self._block_size = block_size
        self._skip_read = _REMOTE_SKIP_READ if self._storage.remote else _LOCAL_SKIP_READ
        if self._ranges is not None:
            self._skip_read = _LOCAL_SKIP_READ  # the read-ahead fetches around the reader
        self._file: ReadableFile | None = None
        self._file_pos = 0
        self._identity: ObjectInfo | None = None
        self._buffer = b""
        self._buffer_pos = 0
        self._failures = 0
        self._warnings = RateLimitedLog(logger, self.retry.log_interval_s)

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
                self._count(file)
            except Exception:  # closing a broken connection must not hide the real error
                logger.debug("closing %s failed", self.url, exc_info=True)

    def read(self, size: int, ahead: bool = True) -> bytes:
        """The next ``size`` bytes (fewer only at the end of the object).

        ``ahead=False`` fetches no more than needed: for headers read while skipping samples.
        """
        start = self._buffer_pos
        if len(self._buffer) - start >= size:
            self._buffer_pos += size
            self.offset += size
            return self._buffer[start : start + size]
        parts = [self._buffer[start:]] if start < len(self._buffer) else []
        need = size - len(self._buffer) + start
        position = self.offset + size - need
        self._buffer, self._buffer_pos = b"", 0
        while need > 0:
            if need >= self._block_size or self._ranges is not None:
                # Large payloads go straight into their own bytes object; a read-ahead file holds
                # its own window (asking for more would fetch past where the reader stops).
                wanted = need
            else:
                wanted = self._block_size if ahead else max(need, self._skip_read)
            chunk = self._fetch(position, wanted)
            if not chunk:
                break
            position += len(chunk)
            if len(chunk) > need:
                self._buffer, self._buffer_pos = chunk, need
                chunk = chunk[:need]
            parts.append(chunk)
            need -= len(chunk)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset += len(out)
        return out

    def skip(self, size: int) -> None:
        """Move ``size`` bytes forward without fetching what lies outside the buffer."""
        available = len(self._buffer) - self._buffer_pos
        if size <= available:
            self._buffer_pos += size
        else:
            if self._ranges is None:  # a read-ahead file counts what it never requested itself
                self.stats.bytes_skipped += size - available
            self._buffer, self._buffer_pos = b"", 0
        self.offset += size

    def _fetch(self, position: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``position``, reopening the object after transient errors."""
        while True:
            try:
                if self._file is None:
                    self._file = self._open(position)
                if self._file_pos != position:
                    self._file.seek(position)
                    self._file_pos = position
                data = self._file.read(size)
            except readahead.ObjectChangedError as exc:
                self.close()
                raise ShardReadError(self.url, "changed", str(exc)) from exc
            except Exception as exc:
                kind = self._storage.failure(exc)
                if kind is None:
                    raise
                self._handle_failure(exc, kind, position)
                continue
            self._file_pos += len(data)
            if not self._count(self._file):
                self.stats.bytes_read += len(data)
                self.stats.requests += 1
            if self._failures:
                logger.info("%s: reading at byte %d after %d failures", self.url, position, self._failures)
                self._failures = 0
            return data

    def _count(self, file: ReadableFile) -> bool:
        """Move a read-ahead file's fetched bytes and answers into the stats (False: not one)."""
        if not isinstance(file, readahead.ReadAheadFile):
            return False
        self.stats.bytes_read += file.fetched
        self.stats.requests += file.answers
        self.stats.bytes_skipped += file.skipped
        file.fetched = file.answers = file.skipped = 0
        return True

    def _open(self, position: int) -> ReadableFile:
        if self._ranges is not None:
            extent = self._extent
            ahead = readahead.pool().open(self.url, self._ranges, position, extent.stop, extent.size)
            try:
                ahead.first_answer()
            except BaseException:
                ahead.close()
                raise
            self._file_pos = position
            if ahead.size is None and ahead.etag is None:
                return ahead  # an answer that says nothing of the object (a range past its end)
            return self._check_identity(ahead, ObjectInfo(ahead.size, ahead.etag), position)
        file, identity = self._storage.open(self.url)
        self._file_pos = 0
        return self._check_identity(file, identity, position)

    def _check_identity(self, file: ReadableFile, identity: ObjectInfo, position: int) -> ReadableFile:
        if self._identity is not None:
            self.stats.reopens += 1
            self.stats.reopened_bytes += position
            if identity != self._identity:
                file.close()
                was, now = self._identity, identity
                detail = f"size/ETag {(was.size, was.etag)} became {(now.size, now.etag)}"
                raise ShardReadError(self.url, "changed", detail)
        self._identity = identity
        return file

    def _handle_failure(self, exc: Exception, kind: Failure, position: int) -> None:
        """Count the failure and wait before the next try, or raise ShardReadError when out of tries.

        A read-ahead file stays open: only its failed requests are sent again (what arrived ahead
        of them is kept, so nothing is fetched twice); any other file is reopened at ``position``.
        """
        ahead = self._file if isinstance(self._file, readahead.ReadAheadFile) else None
        if ahead is None or not kind.retried:
            self.close()
            ahead = None
        self._failures += 1
        # Local files do not appear late; on S3 a fresh object may be listed before it can be read.
        missing = self.retry.missing_attempts if self._storage.remote else 1
        limit = missing if kind is Failure.MISSING else self.retry.attempts if kind.retried else 1
        if self._failures >= limit:
            self.close()
            reason = "unavailable" if kind.retried else kind.value
            raise ShardReadError(self.url, reason, f"{type(exc).__name__}: {exc}") from exc
        self.stats.retries += 1
        delay = self.retry.backoff_s(self._failures)
        retrying = f"retry {self._failures} of {limit - 1} in {delay:.2f}s"
        self._warnings.warn(
            f"{self.url}: {kind.value} at byte {position} ({type(exc).__name__}: {exc}); {retrying}"
        )
        time.sleep(delay)
        if ahead is not None:
            self.stats.reopens += 1
            self.stats.reopened_bytes += position
            ahead.resend_failed()


class RangeInput(io.RawIOBase):
    """A remote object as a seekable binary file (what pyarrow reads a parquet input through),
    read with read-ahead and riding out transient errors as shard streams do; a read that still
    fails raises OSError (FileNotFoundError, PermissionError) naming the object."""

    def __init__(self, url: str, size: int, retry: RetryPolicy | None = None) -> None:
        super().__init__()
        self.url = url
        self.size = size
        self.retry = retry or RetryPolicy()
        self._storage = storage_for(url)
        reader = self._storage.range_reader(url)
        if reader is None:
            raise ValueError(f"{url}: its storage reads no byte ranges")
        self._reader = reader
        self._file: readahead.ReadAheadFile | None = None
        self._position = 0
        self._warnings = RateLimitedLog(logger, self.retry.log_interval_s)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), max(0, self.size - self._position))
        if want == 0:
            return 0
        failures = 0
        while True:
            try:
                if self._file is None:
                    self._file = readahead.pool().open(self.url, self._reader, self._position, size=self.size)
                if self._file.position != self._position:
                    self._file.seek(self._position)
                data = self._file.read(want)
                break
            except Exception as exc:
                kind = self._storage.failure(exc)
                failures += 1
                if kind is None or not kind.retried or failures >= self.retry.attempts:
                    self.close()
                    raise _as_os_error(self.url, exc, kind) from exc
                delay = self.retry.backoff_s(failures)
                self._warnings.warn(f"{self.url}: {kind.value} at byte {self._position} ({exc}); retrying")
                time.sleep(delay)
                if self._file is not None:
                    self._file.resend_failed()
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def _as_os_error(url: str, exc: Exception, kind: Failure | None) -> OSError:
    if isinstance(exc, OSError):
        return exc
    kinds: dict[Failure | None, type[OSError]] = {
        Failure.MISSING: FileNotFoundError,
        Failure.DENIED: PermissionError,
    }
    return kinds.get(kind, OSError)(f"cannot read {url}: {type(exc).__name__}: {exc}")
