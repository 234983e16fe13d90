"""Samples out of WebDataset tar shards, parsed from their 512-byte headers as the bytes stream in.

The shard is read front to back through the storage layer (bytestream.py: retries, resume at
the byte). Samples before ``first`` are skipped by parsing the tar headers only and seeking past
their payloads, so counting or skipping samples costs headers, not payloads.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from shardify.bytestream import (
    DEFAULT_BLOCK_SIZE,
    Extent,
    ReadStats,
    RetryPolicy,
    ShardByteStream,
    ShardReadError,
)
from shardify.format import parse_checksums
from shardify.storage import storage_for

log = logging.getLogger(__name__)

TAR_BLOCK = 512
_END_OF_ARCHIVE = bytes(TAR_BLOCK)
_REGULAR_TYPES = (b"0", b"\0", b"7")
_USTAR_MAGIC = b"ustar\x00"  # POSIX only; GNU headers ("ustar  ") use the prefix field for times
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
"""Members above this are never read into memory: their sample is marked with ``__error__``."""
# pax records and GNU long names are a few hundred bytes; a huge one is a corrupt or hostile tar.
_MAX_HEADER_PAYLOAD = 1 << 20

MemberFilter = Callable[[int, str], bool]
"""``(sample index, member extension) -> whether to fetch that member's payload``."""


def iter_samples(
    url: str,
    first: int = 0,
    stop: int | None = None,
    retry: RetryPolicy | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    stats: ReadStats | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    fetch: MemberFilter | None = None,
    checksums: Mapping[str, int] | None = None,
    extent: Extent | None = None,
) -> Iterator[dict[str, Any]]:
    """The samples of shard ``url`` with index in ``[first, stop)``, in order.

    Each is ``{"__key__", "__index__", "__url__", extension: payload bytes, ...}``: consecutive
    members whose basenames share the part before the first dot form one sample. Only basenames
    count (``../../x.jpg`` is member ``x.jpg``) and nothing is ever written to disk. A member
    larger than ``max_member_bytes`` is skipped unread and its sample gets ``"__error__"`` (the
    reason) instead, so callers skip and count it. With ``fetch``, a member it refuses is seeked
    past unread and stands in its sample as None, and nothing is read ahead of what is asked for
    (a scan that reads few payloads costs headers: shardify index). A shard that ends
    early raises ShardReadError("truncated") after every sample whose end was read; the sample
    being read when the data ran out is dropped even if the cut fell right after one of its members,
    since nothing in a tar says how many members a sample has.

    With ``checksums`` (member basename -> CRC-32, see ``load_checksums``) every member read is
    verified; a sample with a mismatching member gets ``"__checksum_error__"`` (which member, both
    values) so callers skip and count it. Members the mapping does not list are not verified.
    ``extent`` (the shard's size, the byte the caller stops near) bounds the read-ahead.
    """
    if first < 0 or (stop is not None and stop < first):
        raise ValueError(f"bad sample range [{first}, {stop}) for {url}")
    if stop is not None and first >= stop:
        return iter(())
    stream = ShardByteStream(url, retry, block_size, stats, extent)
    return _read_samples(stream, first, stop, max_member_bytes, fetch, checksums)


@functools.lru_cache(maxsize=16)
def load_checksums(url: str) -> Mapping[str, int] | None:
    """A shard's member checksums from its ``.crc32.json`` file at ``url``; None (and a warning)
    when it cannot be read, so that the shard is still read, unverified. Cached: a worker opens
    the same shard once per lane reading it."""
    storage = storage_for(url)
    try:
        return parse_checksums(storage.read_bytes(url).decode("utf-8"))
    except Exception as exc:
        if not isinstance(exc, ValueError | KeyError | TypeError) and storage.failure(exc) is None:
            raise
        log.warning("reading %s unverified: its checksums cannot be read (%s)", url, exc)
        return None


def _read_samples(
    stream: ShardByteStream,
    first: int,
    stop: int | None,
    max_member_bytes: int,
    fetch: MemberFilter | None,
    checksums: Mapping[str, int] | None,
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
            block = stream.read(TAR_BLOCK, ahead=fetch is None and index + 1 >= first)
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
                payload = _read_exact(stream, size, url, ahead=fetch is None)
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
            if fetch is not None and not fetch(index, extension):
                sample[extension] = None
                stream.skip(padded)
                continue
            if size > max_member_bytes:
                sample["__error__"] = f"member {base} has {size} bytes, over the limit of {max_member_bytes}"
                stream.skip(padded)
                continue
            payload = sample[extension] = _read_exact(stream, size, url, ahead=fetch is None)
            stream.skip(padded - size)
            expected = checksums.get(base) if checksums is not None else None
            if expected is not None and (got := zlib.crc32(payload)) != expected:
                sample["__checksum_error__"] = f"member {base}: crc32 {got:08x}, recorded {expected:08x}"
    finally:  # also when the caller stops early or drops the generator
        stream.close()


def _read_exact(stream: ShardByteStream, size: int, url: str, ahead: bool = True) -> bytes:
    start = stream.offset
    data = stream.read(size, ahead)
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
