"""A local cache of whole shards from a far store, bounded, shared by the processes of a node.

Data that fits on local disk is read from the store once: the first reader of a shard downloads
all of it (through the read-ahead, retries included) into ``directory``, checks every member
against the shard's checksums, and renames it into place; later readers, in any worker or rank
of the node, read the local copy. Past ``limit_bytes`` the least recently used shards are
removed. Safe with many processes: a shard is downloaded under an exclusive ``flock`` on its own
lock file (the others wait, then find it there), files appear only by atomic rename, and a
reader that has a copy open keeps reading it if it is evicted meanwhile (POSIX unlink). A copy
is verified again by the first reader of each process before it is reused: one with a member
that does not match is removed and downloaded afresh. A shard larger than the whole limit is
not cached (read from the store), so a small limit slows reading, never stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from shardify.bytestream import Extent, ReadStats, RetryPolicy, ShardByteStream, ShardReadError
from shardify.format import checksums_json, parse_checksums

log = logging.getLogger(__name__)

_SUFFIX = ".tar"
_CHECKSUMS = ".crc32.json"
_WRITE_BLOCK = 4 << 20


class ShardCache:
    """Whole shards of ``s3://`` (or any remote) URLs under ``directory``, at most ``limit_bytes``."""

    def __init__(self, directory: str | os.PathLike[str], limit_bytes: int) -> None:
        self.directory = Path(directory)
        self.limit_bytes = limit_bytes
        self.hits = 0
        """Shards read from the cache."""
        self.downloads = 0
        """Shards downloaded into it."""
        self.rejected = 0
        """Copies that failed verification and were removed."""
        self._verified: set[tuple[str, int, int, int]] = set()
        self._lock = threading.Lock()

    def path_of(self, url: str) -> Path:
        """Where ``url``'s copy lives: a digest of the URL (unique), then its file name (readable)."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:20]
        name = url.rsplit("/", 1)[-1].removesuffix(_SUFFIX)[:80]
        return self.directory / f"{digest}-{name}{_SUFFIX}"

    def local_copy(
        self,
        url: str,
        checksums: Mapping[str, int] | None,
        size: int | None = None,
        retry: RetryPolicy | None = None,
        stats: ReadStats | None = None,
    ) -> Path | None:
        """A verified copy of ``url`` on local disk, downloaded if need be; None when it cannot
        be cached (larger than the limit). Raises ShardReadError when the store cannot give it."""
        if size is not None and size > self.limit_bytes:
            return None
        path = self.path_of(url)
        if self._usable(path, checksums):
            self.hits += 1
            return path
        self.directory.mkdir(parents=True, exist_ok=True)
        with _exclusive(path.with_name(path.name + ".lock")):
            if self._usable(path, checksums):  # another process brought it while this one waited
                self.hits += 1
                return path
            written = self._download(url, path, checksums, size, retry, stats)
        if written is None:
            return None
        self.downloads += 1
        self.evict(keep=path)
        return path

    def checksums(self, url: str, checksums_url: str) -> Mapping[str, int] | None:
        """The member checksums of ``url``'s shard, read from ``checksums_url`` once per node and
        kept beside its copy (None, and a warning, when they cannot be read)."""
        from shardify.tarread import load_checksums

        kept = self.path_of(url).with_suffix(_CHECKSUMS)
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            return parse_checksums(kept.read_text(encoding="utf-8"))
        found = load_checksums(checksums_url)
        if found is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            partial = kept.with_name(f"{kept.name}.{os.getpid()}-{threading.get_ident()}.partial")
            partial.write_text(checksums_json(dict(found)), encoding="utf-8")
            os.replace(partial, kept)
        return found

    def _usable(self, path: Path, checksums: Mapping[str, int] | None) -> bool:
        """Whether ``path`` is a complete, verified copy (verified once per process and file)."""
        try:
            info = path.stat()
        except FileNotFoundError:
            return False
        key = (str(path), info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            known = key in self._verified
        if not known:
            if not _verified(path, checksums):
                self.rejected += 1
                log.warning("removing the cached copy %s: it does not match its checksums", path)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                return False
            with self._lock:
                self._verified.add(key)
        _touch(path, info.st_mtime)
        return True

    def _download(
        self,
        url: str,
        path: Path,
        checksums: Mapping[str, int] | None,
        size: int | None,
        retry: RetryPolicy | None,
        stats: ReadStats | None,
    ) -> Path | None:
        partial = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
        stream = ShardByteStream(url, retry, stats=stats, extent=Extent(size=size))
        written = 0
        try:
            with open(partial, "wb") as out:
                while chunk := stream.read(_WRITE_BLOCK):
                    written += len(chunk)
                    if written > self.limit_bytes:  # larger than the manifest said, and the limit
                        partial.unlink()
                        return None
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if not _verified(partial, checksums):
                partial.unlink()
                raise ShardReadError(url, "corrupt", "the downloaded copy does not match its checksums")
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise
        finally:
            stream.close()
        info = path.stat()
        with self._lock:
            self._verified.add((str(path), info.st_ino, info.st_size, info.st_mtime_ns))
        return path

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used copies until the cache holds at most ``limit_bytes``; returns
        the bytes removed. ``keep`` (just brought in) stays."""
        removed = 0
        with _exclusive(self.directory / ".evict.lock"):
            copies = []
            for entry in self.directory.glob(f"*{_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    info = entry.stat()
                    copies.append((info.st_atime, info.st_size, entry))
            total = sum(size for _, size, _ in copies)
            for _, size, entry in sorted(copies, key=lambda item: item[0]):
                if total <= self.limit_bytes:
                    break
                if entry == keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    total -= size
                    removed += size
                with contextlib.suppress(FileNotFoundError):
                    entry.with_suffix(_CHECKSUMS).unlink()
        return removed

    def size_bytes(self) -> int:
        return sum(entry.stat().st_size for entry in self.directory.glob(f"*{_SUFFIX}"))


def _verified(path: Path, checksums: Mapping[str, int] | None) -> bool:
    """Whether every member of the tar at ``path`` reads whole and matches ``checksums`` (with
    none recorded: the tar reads whole to its end)."""
    from shardify.tarread import iter_samples

    try:
        for sample in iter_samples(str(path), checksums=checksums):
            if "__checksum_error__" in sample:
                return False
    except ShardReadError:
        return False
    return True


def _touch(path: Path, mtime: float) -> None:
    """Mark ``path`` used now: its access time orders eviction (set here, whatever the mount's
    atime policy; the modification time stays, as it identifies the verified copy)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path, (time.time(), mtime))


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` (made if missing), held for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
