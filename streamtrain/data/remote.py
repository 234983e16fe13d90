"""Reading samples out of WebDataset tar shards on local disk or S3, through transient errors.

A shard is read as one forward byte stream. When a read fails with a transient error (reset or
refused connection, timeout, 5xx) the object is reopened at the byte offset already consumed, so
nothing is read twice and no sample is lost or repeated. Samples before ``first`` are skipped by
parsing the 512-byte tar headers only and seeking past their payloads.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

try:  # only S3 reads need these; a local-only install may lack them
    import aiohttp
    import botocore.exceptions

    _CLIENT_ERRORS: tuple[type[BaseException], ...] = (botocore.exceptions.ClientError,)
    _TRANSIENT_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
        botocore.exceptions.BotoCoreError,
        aiohttp.ClientError,
    )
except ImportError:
    _CLIENT_ERRORS = _TRANSIENT_LIBRARY_ERRORS = ()

from shardify.format import filesystem, is_remote

logger = logging.getLogger(__name__)

TAR_BLOCK = 512
DEFAULT_BLOCK_SIZE = 1 << 20
_END_OF_ARCHIVE = bytes(TAR_BLOCK)
_REGULAR_TYPES = (b"0", b"\0", b"7")
_USTAR_MAGIC = b"ustar\x00"  # POSIX only; GNU headers ("ustar  ") use the prefix field for times
# A range request costs about as much as transferring 1 MB: on S3 skipping fetches whole blocks
# (headers of small samples come along for free); on local disk a seek is nearly free.
_REMOTE_SKIP_READ = 1 << 20
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
"""Members above this are never read into memory: their sample is marked with ``__error__``."""
# pax records and GNU long names are a few hundred bytes; a huge one is a corrupt or hostile tar.
_MAX_HEADER_PAYLOAD = 1 << 20


@dataclass(frozen=True)
class RetryPolicy:
    """How reads of one shard ride out transient storage errors."""

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
    """What reading cost; callers pass one in and read it afterwards (it may span many shards)."""

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


def _failure_kind(exc: BaseException) -> str | None:
    """missing, denied or transient for storage errors; None for everything else (a bug: re-raise)."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return "missing"
    if isinstance(exc, PermissionError):
        return "denied"
    if isinstance(exc, _CLIENT_ERRORS):
        response: dict[str, Any] = getattr(exc, "response", {})
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if error.get("Code") in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
            return "missing"
        if status in (401, 403):
            return "denied"
        return "transient" if status >= 500 or status in (408, 429) or "SlowDown" in str(exc) else None
    if isinstance(exc, (OSError, EOFError, *_TRANSIENT_LIBRARY_ERRORS)):
        return "transient"  # OSError covers timeouts, resets and s3fs's translated 5xx errors
    return None


class ShardByteStream:
    """Forward reads over one shard (local path or ``s3://`` URL) that resume where they failed."""

    def __init__(
        self,
        url: str,
        retry: RetryPolicy | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        stats: ReadStats | None = None,
    ) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        self.stats = stats if stats is not None else ReadStats()
        self.offset = 0
        """Bytes consumed (read or skipped) so far."""
        self._fs, self._path = filesystem(url)
        self._remote = is_remote(url)
        self._block_size = block_size
        self._skip_read = _REMOTE_SKIP_READ if self._remote else TAR_BLOCK
        self._file: Any = None
        self._file_pos = 0
        self._identity: tuple[Any, Any] | None = None
        self._buffer = b""
        self._buffer_pos = 0
        self._failures = 0
        self._last_warning = float("-inf")
        self._suppressed = 0

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
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
            if need >= self._block_size:
                wanted = need  # large payloads go straight into their own bytes object
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
            self.stats.bytes_skipped += size - available
            self._buffer, self._buffer_pos = b"", 0
        self.offset += size

    def _fetch(self, position: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``position``, reopening the object after transient errors."""
        while True:
            try:
                if self._file is None:
                    self._open(position)
                if self._file_pos != position:
                    self._file.seek(position)
                    self._file_pos = position
                data = self._file.read(size)
            except Exception as exc:
                kind = _failure_kind(exc)
                if kind is None:
                    raise
                self._handle_failure(exc, kind, position)
                continue
            self._file_pos += len(data)
            self.stats.bytes_read += len(data)
            self.stats.requests += 1
            if self._failures:
                logger.info("%s: reading at byte %d after %d failures", self.url, position, self._failures)
                self._failures = 0
            return data

    def _open(self, position: int) -> None:
        options = {"cache_type": "none"} if self._remote else {}
        file = self._fs.open(self._path, "rb", **options)
        details = getattr(file, "details", None) or {}
        identity = (getattr(file, "size", None), details.get("ETag"))
        if self._identity is not None:
            self.stats.reopens += 1
            self.stats.reopened_bytes += position
            if identity != self._identity:
                file.close()
                raise ShardReadError(self.url, "changed", f"size/ETag {self._identity} became {identity}")
        self._identity = identity
        self._file, self._file_pos = file, 0

    def _handle_failure(self, exc: Exception, kind: str, position: int) -> None:
        """Count the failure and wait before the next try, or raise ShardReadError when out of tries."""
        self.close()
        self._failures += 1
        # Local files do not appear late; on S3 a fresh object may be listed before it can be read.
        missing = self.retry.missing_attempts if self._remote else 1
        limit = {"missing": missing, "transient": self.retry.attempts}.get(kind, 1)
        if self._failures >= limit:
            reason = "unavailable" if kind == "transient" else kind
            raise ShardReadError(self.url, reason, f"{type(exc).__name__}: {exc}") from exc
        self.stats.retries += 1
        delay = self.retry.backoff_s(self._failures)
        now = time.monotonic()
        if now - self._last_warning >= self.retry.log_interval_s:
            suppressed = f"; {self._suppressed} similar warnings suppressed" if self._suppressed else ""
            message = f"{kind} at byte {position} ({type(exc).__name__}: {exc})"
            retrying = f"retry {self._failures} of {limit - 1} in {delay:.2f}s{suppressed}"
            logger.warning("%s: %s; %s", self.url, message, retrying)
            self._last_warning, self._suppressed = now, 0
        else:
            self._suppressed += 1
        time.sleep(delay)


def iter_samples(
    url: str,
    first: int = 0,
    stop: int | None = None,
    retry: RetryPolicy | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    stats: ReadStats | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[dict[str, Any]]:
    """The samples of shard ``url`` with index in ``[first, stop)``, in order.

    Each is ``{"__key__", "__index__", "__url__", extension: payload bytes, ...}``: consecutive
    members whose basenames share the part before the first dot form one sample. Only basenames
    count (``../../x.jpg`` is member ``x.jpg``) and nothing is ever written to disk. A member
    larger than ``max_member_bytes`` is skipped unread and its sample gets ``"__error__"`` (the
    reason) instead, so callers skip and count it. A shard that ends
    early raises ShardReadError("truncated") after every sample whose end was read; the sample
    being read when the data ran out is dropped even if the cut fell right after one of its members,
    since nothing in a tar says how many members a sample has.
    """
    if first < 0 or (stop is not None and stop < first):
        raise ValueError(f"bad sample range [{first}, {stop}) for {url}")
    if stop is not None and first >= stop:
        return iter(())
    stream = ShardByteStream(url, retry, block_size, stats)
    return _read_samples(stream, first, stop, max_member_bytes)


def _read_samples(
    stream: ShardByteStream, first: int, stop: int | None, max_member_bytes: int
) -> Iterator[dict[str, Any]]:
    url = stream.url
    index = -1  # of the sample whose members are being read
    key: str | None = None
    extensions: set[str] = set()
    sample: dict[str, Any] | None = None  # None while skipping
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    try:
        while True:
            header_at = stream.offset
            block = stream.read(TAR_BLOCK, ahead=index + 1 >= first)
            if len(block) < TAR_BLOCK:
                raise ShardReadError(url, "truncated", f"ends in or before the header at byte {header_at}")
            if block == _END_OF_ARCHIVE:
                if sample is not None:
                    yield sample
                return
            name, size, typeflag = _parse_header(block, url, header_at)
            padded = size + -size % TAR_BLOCK
            if typeflag in (b"g", b"K"):  # pax globals and GNU long link names: nothing to keep
                stream.skip(padded)
                continue
            if typeflag in (b"x", b"L"):
                if size > _MAX_HEADER_PAYLOAD:
                    detail = f"extended header of {size} bytes at byte {header_at}"
                    raise ShardReadError(url, "corrupt", detail)
                payload = _read_exact(stream, size, url)
                stream.skip(padded - size)
                if typeflag == b"L":
                    long_name = payload.split(b"\0", 1)[0]
                else:
                    pax.update(_pax_records(payload, url, header_at))
                continue
            name = long_name or pax.get(b"path") or name
            size = int(pax[b"size"]) if b"size" in pax else size
            padded = size + -size % TAR_BLOCK
            long_name, pax = None, {}
            base = name.rsplit(b"/", 1)[-1].decode("utf-8", "surrogateescape")
            if typeflag not in _REGULAR_TYPES or name.endswith(b"/") or "." not in base:
                stream.skip(padded)  # directories, links, devices and extension-less files
                continue
            member_key, extension = base.split(".", 1)
            # A repeated extension means a second sample with the same key: never merge the two.
            if member_key != key or extension in extensions:
                if sample is not None:
                    yield sample
                index += 1
                if stop is not None and index >= stop:
                    return
                key, extensions = member_key, set()
                sample = {"__key__": key, "__index__": index, "__url__": url} if index >= first else None
            extensions.add(extension)
            if sample is None:
                stream.skip(padded)
                continue
            if size > max_member_bytes:
                sample["__error__"] = f"member {base} has {size} bytes, over the limit of {max_member_bytes}"
                stream.skip(padded)
                continue
            sample[extension] = _read_exact(stream, size, url)
            stream.skip(padded - size)
    finally:  # also when the caller stops early or drops the generator
        stream.close()


def _read_exact(stream: ShardByteStream, size: int, url: str) -> bytes:
    start = stream.offset
    data = stream.read(size)
    if len(data) < size:
        raise ShardReadError(url, "truncated", f"ends inside the member at byte {start}")
    return data


def _parse_header(block: bytes, url: str, offset: int) -> tuple[bytes, int, bytes]:
    """(name, payload size, type flag) of one tar header block."""
    stored = _number(block[148:156], url, offset)
    unsigned = sum(block) - sum(block[148:156]) + 8 * ord(" ")
    if stored != unsigned:
        # Some old tars summed signed chars: every byte above 127 counts 256 less.
        high = sum(1 for byte in block[:148] + block[156:] if byte > 127)
        if stored != unsigned - 256 * high:
            raise ShardReadError(url, "corrupt", f"bad tar header checksum at byte {offset}")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == _USTAR_MAGIC:
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name, _number(block[124:136], url, offset), block[156:157]


def _number(field: bytes, url: str, offset: int) -> int:
    if field[0] == 0x80:  # GNU base-256 for values too large for octal
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        detail = f"bad number {field!r} in the tar header at byte {offset}"
        raise ShardReadError(url, "corrupt", detail) from None


def _pax_records(payload: bytes, url: str, offset: int) -> dict[bytes, bytes]:
    """The ``length key=value\\n`` records of a pax extended header."""
    records: dict[bytes, bytes] = {}
    position = 0
    while position < len(payload) and payload[position] != 0:
        space = payload.find(b" ", position)
        try:
            length = int(payload[position:space])
        except ValueError:
            length = 0
        if space < 0 or length <= space - position:
            raise ShardReadError(url, "corrupt", f"bad pax record in the header at byte {offset}")
        record_key, _, value = payload[space + 1 : position + length - 1].partition(b"=")
        records[record_key] = value
        position += length
    return records
