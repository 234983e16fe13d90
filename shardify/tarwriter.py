"""Writing one tar shard: deterministic headers, payloads written straight to the file."""

from __future__ import annotations

import tarfile
from typing import BinaryIO

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


class TarShard:
    """An open shard. Members of a sample are written contiguously, in the order given."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.data_bytes = 0
        self.samples = 0

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for extension, payload in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(payload)
            info.mtime = TAR_MTIME
            info.mode = 0o644
            header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
            self._handle.write(header)
            self._handle.write(payload)
            pad = _padded(len(payload)) - len(payload)
            if pad:
                self._handle.write(b"\0" * pad)
            self.data_bytes += len(header) + len(payload) + pad
        self.samples += 1

    def finish(self) -> int:
        """Write the end-of-archive blocks and record padding; returns the archive size."""
        size = finished_size(self.data_bytes)
        self._handle.write(b"\0" * (size - self.data_bytes))
        self._handle.close()
        return size
