"""Writing one tar shard: deterministic headers, payloads written straight to the file."""

from __future__ import annotations

import os
import tarfile
import zlib

from shardify.format import TAR_MTIME

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile and GNU tar pad archives to whole records


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def sample_tar_bytes(members: list[tuple[str, bytes]]) -> int:
    """Bytes the members of one sample take in a tar: a header block each plus padded payload."""
    return sum(BLOCK + _padded(len(payload)) for _, payload in members)


def finished_size(data_bytes: int) -> int:
    """Size of an archive holding ``data_bytes`` of members once its end blocks are written."""
    return -(-(data_bytes + 2 * BLOCK) // RECORD) * RECORD


_HEADER_TEMPLATE = bytearray(tarfile.TarInfo("x").tobuf(format=tarfile.USTAR_FORMAT))
_HEADER_TEMPLATE[0:100] = bytes(100)
_HEADER_TEMPLATE[100:108] = b"0000644\0"
_HEADER_TEMPLATE[136:148] = b"%011o\0" % TAR_MTIME


def ustar_header(name: bytes, size: int) -> bytes:
    """The USTAR header tarfile would write for a regular file (mode 0644, uid 0, fixed mtime).

    Built by hand because ``TarInfo.tobuf`` costs more per sample than the rest of the write path.
    """
    if len(name) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a USTAR header")
    header = _HEADER_TEMPLATE.copy()
    header[0 : len(name)] = name
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


class TarShard:
    """An open shard. Members of a sample are written contiguously, in the order given."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.data_bytes = 0
        self.samples = 0
        self.checksums: dict[str, int] = {}
        """CRC-32 of every member's payload, by member name, in write order."""

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        # One write per sample: on a busy machine every syscall costs a GIL hand-off with the
        # checker threads, so few large writes keep this thread cheap.
        chunks = []
        for extension, payload in members:
            name = f"{key}.{extension}"
            self.checksums[name] = zlib.crc32(payload)
            chunks.append(ustar_header(name.encode(), len(payload)))
            chunks.append(payload)
            pad = _padded(len(payload)) - len(payload)
            if pad:
                chunks.append(bytes(pad))
        expected = sum(len(chunk) for chunk in chunks)
        written = os.writev(self._fd, chunks)  # no join: the payload is copied once, by the kernel
        if written < expected:
            _write_all(self._fd, b"".join(chunks)[written:])
        self.data_bytes += expected
        self.samples += 1

    def finish(self) -> int:
        """Write the end-of-archive blocks and record padding; returns the archive size."""
        size = finished_size(self.data_bytes)
        try:
            _write_all(self._fd, bytes(size - self.data_bytes))
        finally:
            os.close(self._fd)
        return size


def _write_all(fd: int, data: bytes) -> None:
    """Write everything or raise (a full disk raises ENOSPC instead of writing short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
